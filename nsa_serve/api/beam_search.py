"""vLLM's `use_beam_search`, run by the serving layer on top of the engine, as vLLM runs it.

Each step asks the engine, for every live beam, for the top 2·W next tokens of prompt + beam
(one-token requests with logprobs; they batch like any other requests, and the prefix cache serves
the pages the beams share). Every beam's extensions are ranked by cumulative log-probability and the
best W kept; an extension ending in a stop token (eos and `<|end|>` unless ignore_eos, plus
`stop_token_ids`) is finished and keeps its place among the W. After max_tokens steps, or once no
beam is live, the finished and live beams are ranked by cum_logprob / length ** length_penalty
(length counting the prompt, not the final stop token) and the best W returned, best first.

The search is deterministic: it ranks the model's raw log-probabilities, so temperature, top_p,
top_k, min_p and seed play no part. Parameters that would change the distribution (penalties, bias,
structured outputs, ...) are refused by the request models before a search starts.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import anyio

from ..engine.detokenizer import IncrementalDetokenizer
from ..engine.protocol import SamplingParams
from ..metrics import ServerMetrics
from .errors import APIError
from .generation import ClientDisconnected
from .serving_common import raise_if_failed

# A beam keeps its 2·W best next tokens; the engine returns at most 20 (OpenAI's logprobs bound).
MAX_BEAM_WIDTH = 10


@dataclass(frozen=True)
class BeamSearchParams:
    width: int
    max_tokens: int
    length_penalty: float = 1.0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    skip_special_tokens: bool = True
    cache_salt: str | None = None


@dataclass
class Beam:
    tokens: list[int]  # generated tokens, a final stop token included
    cum_logprob: float = 0.0
    finish_reason: str | None = None  # "stop" (a stop token) or "length"; None while live
    stop_reason: int | None = None
    text: str = field(default="", compare=False)
    # Prompt tokens the prefix cache served at the search's first step (usage's
    # prompt_tokens_details.cached_tokens; later steps re-read the prompt's pages, not counted).
    cached_tokens: int = field(default=0, compare=False)


def beam_score(beam: Beam, prompt_len: int, length_penalty: float) -> float:
    length = prompt_len + len(beam.tokens) - (1 if beam.finish_reason == "stop" else 0)
    return beam.cum_logprob / (max(1, length) ** length_penalty)


async def beam_search(engine, prompt_ids: list[int], params: BeamSearchParams, request_id: str,
                      stop_ids: list[int], priority: int = 0) -> list[Beam]:
    """The W best beams for `prompt_ids`, best first, each with its text. `stop_ids`: the model's
    own stop tokens (eos, end of turn), ignored with ignore_eos."""
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(stop_ids))
    step_params = SamplingParams(n=1, temperature=0.0, max_tokens=1, logprobs=2 * params.width, ignore_eos=True,
                                 output_kind="final_only", cache_salt=params.cache_salt)
    live, done = [Beam([])], []
    cached = 0
    for step in range(params.max_tokens):
        outs = await asyncio.gather(*(_next_tokens(engine, prompt_ids + b.tokens, step_params,
                                                   f"{request_id}-s{step}-b{i}", priority)
                                      for i, b in enumerate(live)))
        tops = [top for top, _ in outs]
        if step == 0:
            cached = outs[0][1]
        candidates = [Beam(b.tokens + [t], b.cum_logprob + lp) for b, top in zip(live, tops) for t, lp in top]
        candidates.sort(key=lambda b: b.cum_logprob, reverse=True)
        live = []
        for b in candidates[:params.width]:
            if b.tokens[-1] in stops:
                b.finish_reason, b.stop_reason = "stop", b.tokens[-1]
                done.append(b)
            else:
                live.append(b)
        if not live:
            break
    for b in live:
        b.finish_reason = "length"
    best = sorted(done + live, key=lambda b: beam_score(b, len(prompt_ids), params.length_penalty),
                  reverse=True)[:params.width]
    for b in best:
        detok = IncrementalDetokenizer(engine.tokenizer, prompt_ids, params.skip_special_tokens)
        shown = b.tokens[:-1] if b.finish_reason == "stop" else b.tokens
        b.text = "".join(detok.add(t) for t in shown) + detok.flush()
        b.cached_tokens = cached
    return best


async def _next_tokens(engine, token_ids: list[int], params: SamplingParams, request_id: str,
                       priority: int) -> tuple[list[tuple[int, float]], int]:
    """The (token, logprob) pairs of the best next tokens after `token_ids`, best first, and how
    many of `token_ids` the prefix cache served."""
    it = engine.generate(token_ids, params, request_id, priority=priority)
    last = None
    try:
        async for out in it:
            last = out
    finally:
        # Cancelled (client gone) or failed: close the iterator, which aborts the engine request.
        with anyio.CancelScope(shield=True):
            await it.aclose()
    raise_if_failed(last)  # the step's computation failed: the search cannot go on
    lp = last.outputs[0].logprobs[0]
    return [(t, v) for t, _, v in lp.top], last.metrics.num_cached_tokens


async def observed(metrics: ServerMetrics, prompt_lens: list[int], params: list[BeamSearchParams],
                   search: Callable[[], Awaitable[list[list[Beam]]]]) -> list[list[Beam]]:
    """Run `search` (the beams of each prompt, searched with `params`) and count it in the server's
    metrics as the user's request it is: the engine's one-token step requests are not users'
    requests. A client that left counts its sequences as aborted, a failure (5xx) as errors; a
    refusal (4xx) counts none."""
    started = time.perf_counter()
    reason = None
    try:
        results = await search()
    except ClientDisconnected:
        reason = "abort"
        raise
    except APIError as exc:
        reason = "error" if exc.status >= 500 else None
        raise
    except Exception:
        reason = "error"
        raise
    finally:
        if reason is not None:
            for n, bp in zip(prompt_lens, params):
                metrics.prompt_len.observe(n)
                metrics.e2e.observe(time.perf_counter() - started)
                metrics.request_params(bp.width, bp.max_tokens)
                for _ in range(bp.width):
                    metrics.finished_sequence(reason, 0)
    elapsed = time.perf_counter() - started
    for n, bp, beams in zip(prompt_lens, params, results):
        metrics.prompt_len.observe(n)
        metrics.request_params(bp.width, bp.max_tokens)
        metrics.ttft.observe(elapsed)  # the first text goes out with the last
        metrics.e2e.observe(elapsed)
        for b in beams:
            metrics.finished_sequence(b.finish_reason, len(b.tokens))
    return results
