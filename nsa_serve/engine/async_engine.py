"""The engine as the API layer sees it: `generate()` → async stream of RequestOutputs.

One background asyncio task drives `LLMEngine.step()`, which runs in a single worker thread so
the event loop (HTTP parsing, streaming to clients) stays responsive while the model computes.
The task sleeps on an event when there is no work. Outputs come back to the event loop thread
and are handed to each request's queue; `generate` yields them.

Failure policy: a request whose computation raises ends with finish_reason "error" and the rest
of the batch carries on (LLMEngine isolates it). Only a failure of the engine's own bookkeeping
stops the loop; then `is_alive` turns False and every open stream gets EngineDeadError.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

from .args import EngineArgs
from .llm_engine import LLMEngine
from .protocol import EngineDeadError, EngineStats, RequestOutput, SamplingParams

log = logging.getLogger("nsa_serve.engine")


class AsyncLLMEngine:
    def __init__(self, args: EngineArgs, engine: LLMEngine | None = None):
        args.validate()
        self.args = args
        self.engine = engine  # tests may pass a prebuilt engine
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nsa-engine")
        self._streams: dict[str, asyncio.Queue] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._accepting = False
        self._stopping = False
        self._dead = False
        self._ready = False

    # -- attributes the API reads -----------------------------------------------------------------
    def _require(self) -> LLMEngine:
        if self.engine is None:
            raise EngineDeadError("the engine has not been started")
        return self.engine

    @property
    def tokenizer(self):
        return self._require().tokenizer

    @property
    def model_name(self) -> str:
        return self._require().model_name

    @property
    def max_model_len(self) -> int:
        return self._require().max_model_len

    @property
    def max_logprobs(self) -> int:
        return self._require().max_logprobs

    @property
    def config(self):
        return self._require().config

    @property
    def is_alive(self) -> bool:
        return not self._dead and (self._task is None or not self._task.done() or self._stopping)

    @property
    def is_ready(self) -> bool:
        return self._ready and self._accepting and self.is_alive

    # -- life cycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.engine is None:
            self.engine = await loop.run_in_executor(self._executor, LLMEngine, self.args)
        await loop.run_in_executor(self._executor, self.engine.warmup)
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="nsa-engine-loop")
        self._accepting = True
        self._ready = True
        log.info("engine ready: model %s, max_model_len %d, %d pages, attention %s",
                 self.engine.model_name, self.engine.max_model_len, self.engine.block_manager.num_pages,
                 self.engine.runner.attention.describe())

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Stop admitting, let running requests finish for up to `drain_timeout` s, abort the rest."""
        self._accepting = False
        if self._task is None or self.engine is None:
            self._executor.shutdown(wait=False)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, drain_timeout)
        while self.engine.has_unfinished_requests() and loop.time() < deadline and not self._task.done():
            await asyncio.sleep(0.02)
        for rid in list(self.engine.requests) + list(self._streams):
            self.engine.abort_request(rid)
        self._wake.set()
        # Give the loop one pass to turn the aborts into final outputs and free the pages.
        for _ in range(100):
            if not self.engine.has_unfinished_requests() or self._task.done():
                break
            await asyncio.sleep(0.01)
        self._stopping = True
        self._wake.set()
        try:
            await asyncio.wait_for(self._task, timeout=10)
        except (asyncio.TimeoutError, Exception):
            log.exception("engine loop did not stop cleanly")
        self._ready = False
        self._executor.shutdown(wait=False)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        engine = self.engine
        while not self._stopping:
            if not engine.has_unfinished_requests():
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                outputs = await loop.run_in_executor(self._executor, engine.step)
            except Exception as exc:  # bookkeeping failed: the engine state cannot be trusted
                log.exception("engine loop died")
                self._dead = True
                for q in self._streams.values():
                    q.put_nowait(EngineDeadError(f"the engine stopped: {exc}"))
                return
            for out in outputs:
                q = self._streams.get(out.request_id)
                if q is not None:
                    q.put_nowait(out)

    # -- requests ---------------------------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        if self._dead:
            raise EngineDeadError("the engine loop has stopped")
        if not self._accepting:
            raise EngineDeadError("the engine is not accepting requests (starting or shutting down)")
        engine = self._require()
        engine.add_request(request_id, prompt_token_ids, params, priority)  # raises before any yield
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = q
        self._wake.set()
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if self._streams.get(request_id) is q:
                del self._streams[request_id]
            if not finished:  # the consumer went away (aclose / cancel): free the pages
                engine.abort_request(request_id)
                if self._wake is not None:
                    self._wake.set()

    async def abort(self, request_id: str) -> None:
        if self.engine is not None:
            self.engine.abort_request(request_id)
            if self._wake is not None:
                self._wake.set()

    async def reset_prefix_cache(self) -> int:
        # On the engine's one worker thread, so it runs between two steps, never inside one.
        engine = self._require()
        return await asyncio.get_running_loop().run_in_executor(self._executor, engine.reset_prefix_cache)

    def stats(self) -> EngineStats:
        return self.engine.stats() if self.engine is not None else EngineStats()

    def cache_info(self) -> dict[str, str]:
        return self.engine.cache_info() if self.engine is not None else {}
