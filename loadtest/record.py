"""What one request looked like from the client: its spec, its timings and its outcome.

Plain data classes shared by the workloads (which make `RequestSpec`s), the client (which fills a
`RequestRecord`) and the metric math (which reads records only). Times are seconds on the
`time.perf_counter` clock, relative to the start of the measured phase.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestSpec:
    """One request to send: the prompt (chat content or completion text) and its sampling budget."""

    index: int
    prompt: str
    max_tokens: int
    target_prompt_tokens: int  # the length the workload asked for (tokens of `prompt` itself)
    tags: dict[str, Any] = field(default_factory=dict)  # e.g. doc_tokens, depth, needle answer
    expected_answer: str | None = None  # needle: a string the reply must contain
    messages: list[dict] | None = None  # file workload: a chat sent as is (else `prompt` is the user message)


@dataclass
class RequestRecord:
    """The client's view of one request. `ttft`/`latency` in seconds; `itl` lists the gaps between
    consecutive chunks that carried generated text (vLLM's definition: pooled over requests)."""

    spec: RequestSpec
    start: float = 0.0  # when the request was sent
    success: bool = False
    error_kind: str | None = None  # e.g. http_500, timeout, incomplete_stream (see client.py)
    error: str = ""
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    latency: float | None = None  # E2EL: send → last data event of the stream
    chunk_times: list[float] = field(default_factory=list)  # text-bearing chunks, from `start`
    prompt_tokens: int | None = None  # from the server's usage
    output_tokens: int | None = None  # from the server's usage
    usage_reported: bool = False
    generated_text: str = ""
    finish_reason: str | None = None
    correct: bool | None = None  # needle workload: did the reply contain the answer

    @property
    def end(self) -> float:
        return self.start + (self.latency or 0.0)
