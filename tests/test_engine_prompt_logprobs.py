"""Prompt logprobs (vLLM's `prompt_logprobs`, the API's echo + logprobs): every prompt token's logprob
given the tokens before it equals the reference model's full forward, however the prompt is chunked,
batched, preempted, or shares a cached prefix (CPU, tiny preset, fp32)."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import make_engine, random_prompts, single_thread_torch
from nsa_serve.engine.protocol import SamplingParams

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread_torch)


@torch.no_grad()
def reference_prompt_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """[T - 1, V] float64 log-softmax of the logits at positions 0 … T - 2 (the ones predicting 1 … T - 1)."""
    logits = model.step(torch.tensor(prompt), model.new_cache())
    return torch.log_softmax(logits[:-1].double(), dim=-1)


def check_against_reference(model, prompt, lps, k):
    assert lps is not None and len(lps) == len(prompt) and lps[0] is None
    ref = reference_prompt_logprobs(model, prompt)
    for p in range(1, len(prompt)):
        t, row = lps[p], ref[p - 1]
        assert t.token_id == prompt[p]
        assert t.logprob == pytest.approx(float(row[prompt[p]]), abs=2e-4), p
        # Rank = 1 + tokens strictly more likely; fp32 against float64 may order near-ties apart.
        x = row[prompt[p]]
        assert int((row > x + 2e-4).sum()) + 1 <= t.rank <= int((row > x - 2e-4).sum()) + 1, p
        want_top = row.topk(k).values.tolist()
        assert [v for _, _, v in t.top] == pytest.approx(want_top, abs=2e-4), p
        assert all(float(row[i]) == pytest.approx(v, abs=2e-4) for i, _, v in t.top), p  # ids match values


def run(engine, jobs):
    """jobs: (request_id, prompt, params); step until all finish; final outputs by id."""
    for rid, prompt, params in jobs:
        engine.add_request(rid, prompt, params)
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    return finals


@pytest.mark.parametrize("shared_kv", [True, False], ids=["shared_kv", "independent_kv"])
def test_prompt_logprobs_match_the_reference_across_chunks_and_batches(shared_kv):
    engine = make_engine(shared_kv)  # 40-token prefill chunks, 96-token steps: prompts span several
    prompts = random_prompts(5, 1, 150, seed=21)
    prompts[0] = prompts[0][:1]  # a one-token prompt has nothing to score but its None
    jobs = [(str(i), p, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=(i % 3) + 1,
                                       n=2 if i == 2 else 1, output_kind="final_only"))
            for i, p in enumerate(prompts)]
    finals = run(engine, jobs)
    for i, p in enumerate(prompts):
        check_against_reference(engine.model, p, finals[str(i)].prompt_logprobs, (i % 3) + 1)
    engine.block_manager.check_all_free()


def test_a_cached_prefix_is_recomputed_for_prompt_logprobs_and_still_served_to_others():
    engine = make_engine(True)
    P = engine.config.select_block
    prompt = random_prompts(1, 4 * P + 5, 4 * P + 5, seed=22)[0]
    greedy = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    run(engine, [("warm", prompt, greedy)])
    hits = engine.block_manager.prefix_hits
    finals = run(engine, [("lp", prompt, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True,
                                                        prompt_logprobs=2))])
    assert finals["lp"].outputs[0].token_ids == run(engine, [("again", prompt, greedy)])["again"].outputs[0].token_ids
    check_against_reference(engine.model, prompt, finals["lp"].prompt_logprobs, 2)
    assert engine.block_manager.prefix_hits >= hits + 4 * P  # "again" was served from the cache
    engine.block_manager.check_all_free()


def test_prompt_logprobs_survive_preemption():
    prompts = random_prompts(8, 60, 90, seed=23)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=1)
    tight = make_engine(True, num_pages=10, long_prefill_token_threshold=16)
    finals = run(tight, [(str(i), p, params) for i, p in enumerate(prompts)])
    assert tight.scheduler.num_preemptions > 0
    for i, p in enumerate(prompts):
        check_against_reference(tight.model, p, finals[str(i)].prompt_logprobs, 1)
    tight.block_manager.check_all_free()


@pytest.mark.parametrize("kind", ["delta", "cumulative"])
def test_outputs_carry_the_prompt_logprobs_once_prefilled(kind):
    engine = make_engine(True)
    prompt = random_prompts(1, 100, 100, seed=24)[0]
    engine.add_request("s", prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=0,
                                                   output_kind=kind))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    carrying = [o for o in outs if o.prompt_logprobs is not None]
    first_token = next(i for i, o in enumerate(outs) if o.outputs[0].num_tokens > 0)
    assert outs.index(carrying[0]) == first_token  # not before the prompt is done
    # delta: once, plus the final output (which carries every cumulative field); cumulative: every output
    assert len(carrying) == (min(2, len(outs) - first_token) if kind == "delta" else len(outs) - first_token)
    assert carrying[-1] is outs[-1]
    check_against_reference(engine.model, prompt, carrying[0].prompt_logprobs, 0)
