"""The async engine the API layer codes against: streaming, early close, errors, shutdown."""

from __future__ import annotations

import asyncio

import pytest

from engine_helpers import make_engine, random_prompts, single_thread_torch
from nsa_serve.engine.args import EngineArgs
from nsa_serve.engine.async_engine import AsyncLLMEngine
from nsa_serve.engine.protocol import (EngineDeadError, InvalidRequestError, PromptTooLongError, QueueFullError,
                                       SamplingParams)

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread_torch)


def start_engine(**overrides) -> AsyncLLMEngine:
    llm = make_engine(True, **overrides)
    return AsyncLLMEngine(llm.args, engine=llm)


async def collect(engine, prompt, params, rid):
    return [out async for out in engine.generate(prompt, params, rid)]


async def wait_idle(engine, timeout=20.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        s = engine.stats()
        if s.num_running == 0 and s.num_waiting == 0 and not engine.engine.has_unfinished_requests():
            return s
        await asyncio.sleep(0.01)
    raise AssertionError("engine did not become idle")


def test_streams_deltas_that_add_up_to_the_final_output():
    async def main():
        engine = start_engine()
        await engine.start()
        assert engine.is_ready and engine.is_alive
        assert engine.model_name == "shared" and engine.max_model_len > 0 and engine.config.num_layers == 2
        prompt = engine.tokenizer.encode("The quick brown fox")
        params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
        outs = await collect(engine, prompt, params, "a")
        final = outs[-1]
        assert final.finished and all(not o.finished for o in outs[:-1])
        assert final.outputs[0].finish_reason == "length" and len(final.outputs[0].token_ids) == 10
        assert "".join(o.outputs[0].delta_text for o in outs) == final.outputs[0].text
        assert sum((o.outputs[0].delta_token_ids for o in outs), []) == final.outputs[0].token_ids
        assert final.metrics.first_token_time >= final.metrics.arrival_time
        s = engine.stats()
        assert s.generation_tokens_total == 10 and s.prompt_tokens_total == len(prompt)
        assert s.kv_tokens_dense_total > 0 and s.num_pages_total == 256
        await engine.shutdown(1.0)
        assert not engine.is_ready

    asyncio.run(main())


def test_closing_the_stream_early_aborts_and_frees_pages():
    async def main():
        engine = start_engine()
        await engine.start()
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        it = engine.generate(random_prompts(1, 40, 40, seed=1)[0], params, "closed")
        await it.__anext__()
        await it.aclose()
        task = asyncio.create_task(collect(engine, random_prompts(1, 40, 40, seed=2)[0], params, "cancelled"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        s = await wait_idle(engine)
        assert s.num_pages_used == 0
        engine.engine.block_manager.check_all_free()
        await engine.shutdown(1.0)

    asyncio.run(main())


def test_bad_requests_raise_before_the_first_output():
    async def main():
        engine = start_engine()
        await engine.start()
        n = engine.max_model_len
        with pytest.raises(PromptTooLongError):
            await collect(engine, [10] * n, SamplingParams(), "long")
        with pytest.raises(PromptTooLongError):
            await collect(engine, [10] * 10, SamplingParams(max_tokens=n), "long2")
        with pytest.raises(InvalidRequestError, match="vocabulary"):
            await collect(engine, [10, 10**6], SamplingParams(), "vocab")
        with pytest.raises(InvalidRequestError, match="at least one token"):
            await collect(engine, [], SamplingParams(), "empty")
        with pytest.raises(InvalidRequestError) as exc:
            await collect(engine, [10], SamplingParams(temperature=5), "temp")
        assert exc.value.param == "temperature"
        assert engine.is_alive
        await engine.shutdown(1.0)

    asyncio.run(main())


def test_waiting_queue_is_bounded():
    engine = make_engine(True, max_queue=2)
    params = SamplingParams(max_tokens=2)
    engine.add_request("a", [10, 11], params)
    engine.add_request("b", [10, 11], params)
    with pytest.raises(QueueFullError):
        engine.add_request("c", [10, 11], params)
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("a", [10, 11], params)
    engine.step()  # both start: the queue has room again
    engine.add_request("c", [10, 11], params)


def test_a_failing_request_ends_with_error_and_the_others_carry_on():
    async def main():
        engine = start_engine()
        await engine.start()
        poison = 4001
        real_execute = engine.engine.runner.execute

        def execute(inp):
            if any(poison in s.prompt_token_ids for s in inp.seqs):
                raise RuntimeError("injected failure")
            return real_execute(inp)

        engine.engine.runner.execute = execute
        params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
        prompts = random_prompts(4, 5, 30, seed=3)
        prompts[2] = prompts[2] + [poison]
        results = await asyncio.gather(*(collect(engine, p, params, f"r{i}") for i, p in enumerate(prompts)))
        reasons = [r[-1].outputs[0].finish_reason for r in results]
        assert reasons == ["length", "length", "error", "length"]
        assert engine.is_alive
        s = await wait_idle(engine)
        assert s.num_pages_used == 0
        await engine.shutdown(1.0)

    asyncio.run(main())


def test_shutdown_drains_then_aborts_and_refuses_new_requests():
    async def main():
        engine = start_engine()
        await engine.start()
        slow = asyncio.create_task(collect(engine, [10, 11, 12], SamplingParams(max_tokens=3000, ignore_eos=True), "s"))
        quick = asyncio.create_task(collect(engine, [10, 11, 12], SamplingParams(max_tokens=2, ignore_eos=True), "q"))
        await asyncio.sleep(0.1)
        await engine.shutdown(drain_timeout=0.3)
        assert (await quick)[-1].outputs[0].finish_reason == "length"
        assert (await slow)[-1].outputs[0].finish_reason == "abort"
        with pytest.raises(EngineDeadError):
            await collect(engine, [10], SamplingParams(), "late")
        engine.engine.block_manager.check_all_free()

    asyncio.run(main())


def test_start_loads_the_model_named_in_the_args(tmp_path):
    from engine_helpers import tiny_model_dir

    async def main():
        engine = AsyncLLMEngine(EngineArgs(model=str(tiny_model_dir(True)), device="cpu", num_pages=32))
        assert not engine.is_ready
        await engine.start()
        assert engine.is_ready and engine.tokenizer is not None
        out = await collect(engine, [10, 11], SamplingParams(max_tokens=3, ignore_eos=True), "x")
        assert len(out[-1].outputs[0].token_ids) == 3
        await engine.shutdown(0.5)

    asyncio.run(main())
