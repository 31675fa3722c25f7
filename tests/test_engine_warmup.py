"""The start-up warm-up over context lengths (`EngineArgs.warmup_context`): what it plans, that it
runs through the real scheduler with a small queue and a small pool, and that it leaves the engine
as it found it (no pages held, counters at zero, later requests unaffected)."""

from __future__ import annotations

import pytest

from engine_helpers import make_engine, random_prompts, reference_greedy, single_thread_torch
from nsa_serve.cli import build_parser
from nsa_serve.engine.args import EngineArgs
from nsa_serve.engine.protocol import SamplingParams

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread_torch)


def test_plan_is_off_by_default_and_covers_every_class_when_asked():
    assert make_engine().warmup_prompt_lengths() == []  # default: off
    eng = make_engine(warmup_context=300)  # chunk 40: one prompt per power of two below it, two long
    n = eng.WARMUP_NEW_TOKENS
    assert eng.warmup_prompt_lengths() == [23, 39, (300 - n) // 2 + 7, 300 - n]
    # Capped by the engine's context length, so every prompt + its new tokens is a valid request.
    capped = make_engine(warmup_context=10**6)
    assert max(capped.warmup_prompt_lengths()) + n == capped.max_model_len


def test_warmup_runs_through_a_small_queue_and_pool_and_leaves_nothing_behind():
    # 4 prompts, 1 may wait at a time, and a pool too small to hold them all at once.
    eng = make_engine(warmup_context=300, max_queue=1, num_pages=30)
    lengths = eng.warmup_prompt_lengths()
    assert sum(eng.block_manager.pages_for(n + eng.WARMUP_NEW_TOKENS) for n in lengths) > 30
    eng.warmup()
    assert not eng.has_unfinished_requests() and not eng.requests
    st = eng.stats()
    # Counters restart at zero; prefix-cached warm-up pages are unreferenced (evictable), not used.
    assert st.prompt_tokens_total == 0 and st.generation_tokens_total == 0 and st.num_pages_used == 0
    assert eng.block_manager.num_used_pages == 0
    # The engine serves as before: greedy tokens equal the reference model's.
    prompt = random_prompts(1, 60, 60, seed=3)[0]
    out = eng.generate([prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == reference_greedy(eng.model, prompt, 6)


def test_warmup_without_prefix_cache_returns_every_page():
    eng = make_engine(warmup_context=200, enable_prefix_caching=False)
    eng.warmup()
    eng.block_manager.check_all_free()


def test_warmup_context_flag_and_validation():
    from nsa_serve.api.cli import engine_args_from

    assert engine_args_from(build_parser().parse_args(["serve"])).warmup_context == 0
    assert engine_args_from(build_parser().parse_args(["serve", "--warmup-context", "70000"])).warmup_context == 70000
    with pytest.raises(ValueError, match="warmup_context"):
        EngineArgs(warmup_context=-1).validate()
