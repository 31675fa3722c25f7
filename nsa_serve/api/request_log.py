"""Per-request log lines (vLLM's --enable-log-requests): what arrived, how it ended.

    request chatcmpl-…: 412 prompt tokens, prompt '<|user|>\\nSummarise …', params temperature=0.7 max_tokens=256
    request chatcmpl-… finished: stop, 87 tokens, TTFT 0.041 s, 1.92 s

Off by default: prompts are users' data. `--max-log-len` bounds the prompt text and ids shown.
"""

from __future__ import annotations

import dataclasses
import logging

from ..engine.protocol import RequestOutput, SamplingParams

log = logging.getLogger("nsa_serve.requests")
_DEFAULTS = SamplingParams()
_HIDDEN = {"output_kind"}  # how the server consumes outputs, not what the client asked


class RequestLog:
    def __init__(self, tokenizer, max_len: int | None = None):
        self.tokenizer, self.max_len = tokenizer, max_len

    def arrived(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        text = self.tokenizer.decode(prompt_ids) if self.tokenizer is not None else ""
        ids = prompt_ids
        if self.max_len is not None:
            text, ids = text[:self.max_len], ids[:self.max_len]
        log.info("request %s: %d prompt tokens, prompt %r, prompt ids %s, params %s", request_id, len(prompt_ids),
                 text, ids, describe(params))

    def finished(self, request_id: str, out: RequestOutput | None, reason: str | None = None) -> None:
        if out is None:
            log.info("request %s ended early: %s", request_id, reason or "abort")
            return
        reasons = ", ".join(sorted({c.finish_reason or "none" for c in out.outputs}))
        tokens = sum(c.num_tokens for c in out.outputs)
        m = out.metrics
        ttft = f", TTFT {m.first_token_time - m.arrival_time:.3f} s" if m.first_token_time else ""
        total = f", {m.finished_time - m.arrival_time:.3f} s" if m.finished_time else ""
        log.info("request %s finished: %s, %d tokens%s%s", request_id, reasons, tokens, ttft, total)


def describe(params: SamplingParams) -> str:
    """The fields a request set away from their defaults, as name=value."""
    parts = []
    for f in dataclasses.fields(SamplingParams):
        value = getattr(params, f.name)
        if f.name in _HIDDEN or value == getattr(_DEFAULTS, f.name):
            continue
        if f.name == "cache_salt":  # a tenant's secret
            parts.append("cache_salt=<hidden>")
            continue
        if f.name == "structured":
            value = getattr(value, "kind", value)
        parts.append(f"{f.name}={value!r}")
    return " ".join(parts) or "(defaults)"
