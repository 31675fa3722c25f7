"""What the API layer sees of the engine: request parameters, streamed outputs, stats, errors.

Plain data classes, no tensors. The HTTP layer translates OpenAI requests into `SamplingParams`,
calls `AsyncEngine.generate`, and turns the `RequestOutput`s it yields back into responses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol


class EngineError(Exception):
    """Base class for errors the API maps to HTTP responses."""


class InvalidRequestError(EngineError, ValueError):
    """Bad parameters or prompt (HTTP 400). `param` names the offending field when known."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class PromptTooLongError(InvalidRequestError):
    """Prompt (plus max_tokens) does not fit the model's context (HTTP 400, context_length_exceeded)."""

    def __init__(self, message: str, param: str | None = "messages"):
        super().__init__(message, param=param, code="context_length_exceeded")


class QueueFullError(EngineError):
    """The bounded waiting queue is full (HTTP 429 with Retry-After)."""


class EngineDeadError(EngineError):
    """The engine loop has stopped (HTTP 503)."""


OUTPUT_KINDS = ("cumulative", "delta", "final_only")
# bad_words are checked on the host for every row and step: bounded, so one request cannot slow
# every step of everyone else's.
MAX_BAD_WORDS = 256
MAX_BAD_WORD_CHARS = 256
MAX_CACHE_SALT_CHARS = 1024


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) disables
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context limit
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k ≥ 0: chosen token's logprob plus top-k
    # vLLM's: per prompt token (but the first), its logprob given the tokens before it, plus top-k.
    # Computed during prefill by the request's first completion, which skips the prefix cache for it.
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    # vLLM's, with its default: generated special tokens (the chat markers) are left out of the text.
    # Token ids and logprobs still show them.
    skip_special_tokens: bool = True
    # Added to the logits of these token ids before penalties and sampling (OpenAI's logit_bias,
    # -100 … 100: ±100 in effect bans or forces a token).
    logit_bias: dict[int, float] = field(default_factory=dict)
    allowed_token_ids: list[int] | None = None  # vLLM's: sample only among these
    # vLLM's: words the completion may not write (as the token sequences that spell them; the
    # engine tokenizes them, engine/bad_words.py).
    bad_words: list[str] = field(default_factory=list)
    # vLLM's: a secret that roots this request's prefix-cache hashes, so that only requests with the
    # same salt share cached pages (one tenant cannot time another's prompts through cache hits).
    # A request property rather than a sampling one, carried here as output_kind is.
    cache_salt: str | None = None
    # Structured output (structured.StructuredOutput): the grammar the output must match.
    structured: Any = None
    # What each RequestOutput carries (vLLM's RequestOutputKind): "cumulative" = text and token ids
    # so far in every output; "delta" = only what the output adds, cumulative fields in the final
    # output only (streaming); "final_only" = one output, when the request finishes (non-streaming).
    # Cumulative fields cost O(length) per sequence per step, so a long stream pays O(length²).
    output_kind: str = "cumulative"

    def validate(self, max_logprobs: int | None = 20) -> None:
        """Raise InvalidRequestError naming the field when a value is out of range; logprobs and
        prompt_logprobs up to `max_logprobs` alternatives (the engine's --max-logprobs; None: no bound
        here, for callers that check before the engine does)."""

        def bad(param, msg):
            raise InvalidRequestError(f"{param} {msg}", param=param)

        if not isinstance(self.n, int) or not 1 <= self.n <= 16:
            bad("n", f"must be an integer between 1 and 16, got {self.n!r}")
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= 2):
            bad("temperature", f"must be between 0 and 2, got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", f"must be -1, 0 (disabled) or a positive integer, got {self.top_k}")
        if not (math.isfinite(self.min_p) and 0 <= self.min_p <= 1):
            bad("min_p", f"must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (math.isfinite(v) and -2 <= v <= 2):
                bad(name, f"must be between -2 and 2, got {v}")
        if not (math.isfinite(self.repetition_penalty) and 0 < self.repetition_penalty <= 2):
            bad("repetition_penalty", f"must be in (0, 2], got {self.repetition_penalty}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", f"must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0 or (
                self.max_tokens is not None and self.min_tokens > self.max_tokens):
            bad("min_tokens", f"must be between 0 and max_tokens, got {self.min_tokens!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                bad(name, f"must be a non-negative integer, got {v!r}")
            if v is not None and max_logprobs is not None and v > max_logprobs:
                bad(name, f"must be between 0 and {max_logprobs} (the server's --max-logprobs), got {v}")
        if len(self.stop) > 16 or any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be at most 16 non-empty strings")
        # A 64-bit seed (vLLM's bound): torch generators take no wider one, and a wider one used to
        # fail its request inside the engine instead of here.
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not -2**63 <= self.seed < 2**63):
            bad("seed", f"must be an integer between -2**63 and 2**63 - 1, got {self.seed!r}")
        if any(not isinstance(k, int) or isinstance(k, bool) for k in self.logit_bias) or any(
                not (isinstance(v, (int, float)) and math.isfinite(v) and -100 <= v <= 100)
                for v in self.logit_bias.values()):
            bad("logit_bias", "must map token ids to numbers between -100 and 100")
        if self.allowed_token_ids is not None and (
                not self.allowed_token_ids or any(not isinstance(t, int) for t in self.allowed_token_ids)):
            bad("allowed_token_ids", "must be a non-empty list of token ids")
        if (not isinstance(self.bad_words, list) or len(self.bad_words) > MAX_BAD_WORDS
                or any(not isinstance(w, str) or not w.strip() or len(w) > MAX_BAD_WORD_CHARS
                       for w in self.bad_words)):
            bad("bad_words", f"must be a list of at most {MAX_BAD_WORDS} non-blank strings of at most "
                             f"{MAX_BAD_WORD_CHARS} characters")
        if self.cache_salt is not None and (not isinstance(self.cache_salt, str) or not self.cache_salt
                                            or len(self.cache_salt) > MAX_CACHE_SALT_CHARS):
            bad("cache_salt", f"must be a non-empty string of at most {MAX_CACHE_SALT_CHARS} characters")
        if self.structured is not None:
            self.structured.check_shape()
        if self.output_kind not in OUTPUT_KINDS:
            bad("output_kind", f"must be one of {', '.join(OUTPUT_KINDS)}, got {self.output_kind!r}")


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, text, logprob), best first
    rank: int | None = None  # prompt logprobs: 1 + how many tokens were more likely


@dataclass
class CompletionOutput:
    """One of the n completions of a request, as of this output."""

    index: int
    num_tokens: int = 0  # tokens generated so far (every output kind)
    # Cumulative text / ids / logprobs: in every output of kind "cumulative", otherwise only in the
    # request's final output ("" / [] / None before it).
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    delta_text: str = ""  # what this output adds (for streaming)
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[TokenLogprob] | None = None
    logprobs: list[TokenLogprob] | None = None  # cumulative
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    # Kind "final_only": the gaps between this completion's consecutive tokens (seconds, engine
    # clock), so inter-token latency is observable without streaming; None for the other kinds.
    inter_token_latencies: list[float] | None = None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache

    def snapshot(self) -> "RequestMetrics":
        """A copy for an output (the engine goes on updating its own); copy.copy is ~3× slower."""
        return RequestMetrics(self.arrival_time, self.first_scheduled_time, self.first_token_time,
                              self.last_token_time, self.finished_time, self.num_cached_tokens)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    # With params.prompt_logprobs: one entry per prompt token, None for the first (nothing before
    # it); set in the first output after the prompt is prefilled (and in every later cumulative one).
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    num_pages_total: int = 0
    num_pages_used: int = 0
    num_preemptions_total: int = 0
    num_failed_steps_total: int = 0  # engine steps that raised (their rows retried, or ended with an error)
    prefix_cache_queries_total: int = 0  # tokens looked up
    prefix_cache_hits_total: int = 0  # tokens found
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    kv_tokens_read_total: int = 0  # per kv group, summed over decode steps (NSA's cost)
    kv_tokens_dense_total: int = 0  # what dense attention would have read for the same steps
    summaries_stored: int = 0  # compressed-block summaries held in the cache now
    # Tokens computed per engine step, as a histogram with power-of-two edges: entry k counts the
    # steps of 2**(k-1) < n <= 2**k tokens (k = 0: one token). A tuple, replaced on each step, so a
    # published copy never changes under its reader.
    iteration_tokens: tuple[int, ...] = ()
    iteration_tokens_sum: int = 0
    # Speculative decoding: rows that verified drafts, their draft tokens, and those accepted.
    spec_decode_num_drafts_total: int = 0
    spec_decode_num_draft_tokens_total: int = 0
    spec_decode_num_accepted_tokens_total: int = 0

    def count_iteration(self, num_tokens: int) -> None:
        k = (num_tokens - 1).bit_length()
        counts = list(self.iteration_tokens) + [0] * (k + 1 - len(self.iteration_tokens))
        counts[k] += 1
        self.iteration_tokens = tuple(counts)
        self.iteration_tokens_sum += num_tokens

    @property
    def kv_cache_usage(self) -> float:
        return self.num_pages_used / self.num_pages_total if self.num_pages_total else 0.0


class AsyncEngine(Protocol):
    """The interface the API layer codes against (implemented by nsa_serve.engine.async_engine)."""

    max_model_len: int

    def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                 priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Submit a request; yields outputs as tokens arrive, the last one with finished=True.

        Raises QueueFullError, PromptTooLongError or InvalidRequestError before yielding anything.
        Closing the iterator early (client gone) aborts the request and frees its pages.
        """

    async def abort(self, request_id: str) -> None: ...

    async def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (pages stay with their owners); the number of pages forgotten."""

    def stats(self) -> EngineStats: ...

    def cache_info(self) -> dict[str, str]:
        """The KV cache's configuration (page size, pages, prefix caching, ...); {} before start."""

    @property
    def is_alive(self) -> bool: ...

    @property
    def is_ready(self) -> bool: ...
