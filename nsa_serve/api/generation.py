"""Running engine requests on behalf of HTTP clients: metrics on the way, abort when the client is gone.

`tracked_generate` wraps `engine.generate`: it observes every output into `ServerMetrics` and, however
the consumer stops (finished, closed early, cancelled because the client disconnected), closes the
engine iterator and aborts the request inside a shielded scope, so the engine always frees the pages.

`merge` interleaves several requests' outputs (a batch of prompts in one /v1/completions call).
`cancel_on_disconnect` runs an awaitable but gives up as soon as the client hangs up, for the parts of
a request where no response bytes are flowing (non-streaming requests, and waiting for the first output
of a stream), which the ASGI server would otherwise not notice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import anyio
from starlette.requests import Request

from ..engine.protocol import EngineError, RequestOutput, SamplingParams
from ..metrics import ServerMetrics
from .request_log import RequestLog

log = logging.getLogger("nsa_serve.api")
T = TypeVar("T")


class ClientDisconnected(Exception):
    """The HTTP client went away; the request was aborted."""


async def tracked_generate(engine, metrics: ServerMetrics, prompt_ids: list[int], params: SamplingParams,
                           request_id: str, priority: int = 0,
                           request_log: RequestLog | None = None) -> AsyncIterator[RequestOutput]:
    arrival = time.perf_counter()
    if request_log is not None:
        request_log.arrived(request_id, prompt_ids, params)
    it = engine.generate(prompt_ids, params, request_id, priority=priority)
    last_token_at: dict[int, float] = {}
    num_tokens: dict[int, int] = {}
    finished: set[int] = set()
    done = rejected = False
    any_output = False
    end_reason = "abort"  # how sequences that never finished are counted
    try:
        async for out in it:
            any_output = True
            now = time.perf_counter()
            for c in out.outputs:
                k = len(c.delta_token_ids)
                num_tokens[c.index] = c.num_tokens
                if c.inter_token_latencies is not None:  # one final output: the engine timed the gaps
                    for gap in c.inter_token_latencies:
                        metrics.itl.observe(gap)
                elif k:
                    prev = last_token_at.get(c.index)
                    if prev is not None:  # the first token's latency is TTFT, not ITL
                        for _ in range(k):
                            metrics.itl.observe((now - prev) / k)
                    last_token_at[c.index] = now
                if c.finish_reason is not None and c.index not in finished:
                    finished.add(c.index)
                    metrics.finished_sequence(c.finish_reason, c.num_tokens)
            if out.finished:
                done = True
                _observe_request(metrics, out, arrival)
                metrics.request_params(params.n, params.max_tokens)
                if request_log is not None:
                    request_log.finished(request_id, out)
            yield out
    except EngineError:
        # Refused at admission (queue full, prompt too long, ...): never ran, so it is no finished
        # request; the HTTP counter records the refusal.
        rejected = not any_output
        end_reason = "error"
        raise
    except Exception:
        end_reason = "error"
        raise
    finally:
        if not done and request_log is not None:
            request_log.finished(request_id, None, "refused" if rejected else end_reason)
        if not done and not rejected:
            # Closed early: the client disconnected or the consumer failed. Shielded, because under a
            # cancelled scope every await would be cancelled again before the engine heard of it.
            with anyio.CancelScope(shield=True):
                try:
                    await it.aclose()
                    await engine.abort(request_id)
                except Exception:  # the engine may already have dropped it; never mask the original error
                    log.exception("aborting request %s failed", request_id)
            for i in range(params.n):
                if i not in finished:
                    metrics.finished_sequence(end_reason, num_tokens.get(i, 0))
            metrics.prompt_len.observe(len(prompt_ids))
            metrics.e2e.observe(time.perf_counter() - arrival)
            metrics.request_params(params.n, params.max_tokens)


def _observe_request(metrics: ServerMetrics, out: RequestOutput, arrival: float) -> None:
    metrics.prompt_len.observe(len(out.prompt_token_ids))
    m = out.metrics
    if m.first_token_time is not None:
        metrics.ttft.observe(max(0.0, m.first_token_time - m.arrival_time))
    if m.first_scheduled_time is not None:
        metrics.queue_time.observe(max(0.0, m.first_scheduled_time - m.arrival_time))
        if m.first_token_time is not None:
            metrics.prefill_time.observe(max(0.0, m.first_token_time - m.first_scheduled_time))
    if m.first_token_time is not None and m.last_token_time is not None:
        decode = max(0.0, m.last_token_time - m.first_token_time)
        metrics.decode_time.observe(decode)
        # Completions decode side by side: the longest one's tokens set the pace (vLLM: one per request).
        longest = max((c.num_tokens for c in out.outputs), default=0)
        if longest > 1:
            metrics.tpot.observe(decode / (longest - 1))
    if m.finished_time is not None:
        metrics.e2e.observe(max(0.0, m.finished_time - m.arrival_time))
        if m.first_scheduled_time is not None:
            metrics.inference_time.observe(max(0.0, m.finished_time - m.first_scheduled_time))
    else:
        metrics.e2e.observe(time.perf_counter() - arrival)


async def merge(iterators: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Yield (source index, item) from several async iterators as items arrive.

    Plain asyncio tasks rather than a task group: a generator must not yield from inside a task
    group's scope (the consumer, not this generator, decides when it resumes)."""
    if len(iterators) == 1:
        try:
            async for item in iterators[0]:
                yield 0, item
        finally:
            with anyio.CancelScope(shield=True):
                await iterators[0].aclose()  # closing this generator must close (abort) the source
        return
    pending = {asyncio.ensure_future(anext(it)): i for i, it in enumerate(iterators)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(iterators[i]))] = i
                yield i, item
    finally:
        with anyio.CancelScope(shield=True):
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
            for it in iterators:
                await it.aclose()


async def cancel_on_disconnect(request: Request, fn: Callable[[], Awaitable[T]]) -> T:
    """Await fn(); if the client disconnects first, cancel it and raise ClientDisconnected.
    fn's own exceptions come out as they are (not wrapped in an ExceptionGroup)."""
    gone = False
    error: Exception | None = None
    result = None
    async with anyio.create_task_group() as tg:
        async def watch():
            nonlocal gone
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    gone = True
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(watch)
        try:
            result = await fn()
        except Exception as exc:
            error = exc
        tg.cancel_scope.cancel()
    if gone:
        raise ClientDisconnected()
    if error is not None:
        raise error
    return result
