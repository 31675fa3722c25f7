"""`ModelRunner.prepare` (vectorised) builds exactly the step inputs of its loop twin
(tests/prepare_reference.py) on every step of mixed workloads: prompt chunks that start and end off
page and compression-block boundaries, summaries spanning old and new rows, decode rows, preemption
and recompute, shared and independent K/V (rings)."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import make_engine, random_prompts, single_thread_torch
from nsa_serve.engine.protocol import SamplingParams
from prepare_reference import assert_same, prepare_reference, static_host_inputs_reference

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread_torch)

@pytest.mark.parametrize("shared_kv", [True, False], ids=["shared_kv", "independent_kv"])
def test_prepare_equals_its_loop_twin_on_every_step(shared_kv):
    engine = make_engine(shared_kv, num_pages=40, max_num_batched_tokens=70, long_prefill_token_threshold=33)
    runner, steps = engine.runner, []
    fast = runner.prepare

    def both(seqs, num_new):
        got = fast(seqs, num_new)
        assert_same(got, prepare_reference(runner, seqs, num_new))
        steps.append((sum(num_new), sum(1 for n in num_new if n == 1), len(num_new)))
        return got

    runner.prepare = both
    # Ragged prompts (several chunks each, off every boundary) with decoding interleaved; the
    # small pool forces preemption and recompute of some sequences.
    prompts = random_prompts(6, 20, 140, seed=31)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 12 for o in outs)
    assert any(d and t > d for t, d, _ in steps), "no mixed prefill + decode step"
    assert any(d == b for _, d, b in steps), "no decode-only step"
    engine.block_manager.check_all_free()


@pytest.mark.parametrize("shared_kv", [True, False], ids=["shared_kv", "independent_kv"])
def test_fixed_shape_decode_inputs_equal_their_loop_twin_on_every_step(shared_kv):
    # The fixed-shape (CUDA graph) decode path's host inputs, built with numpy and block-table rows
    # cached between steps, equal the torch loop version on every decode step: tables growing page
    # by page, sequences leaving and joining the batch, and preemption replacing tables (the small
    # pool forces it).
    from nsa_serve.engine.decode_graphs import StaticDecode

    engine = make_engine(shared_kv, num_pages=40, max_num_batched_tokens=70, long_prefill_token_threshold=33)
    static = engine.runner.static_decode = StaticDecode(engine.runner, 8, engine.max_model_len)
    fast, calls = static.host_inputs, []

    def both(seqs, size, out=None, num_new=None):
        got = fast(seqs, size, out, num_new)  # out: the engine's staging buffers, reused every other step
        want = static_host_inputs_reference(static, seqs, size, num_new)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
        calls.append(len(seqs))
        return got

    static.host_inputs = both
    prompts = random_prompts(8, 60, 140, seed=32)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 40 for o in outs)
    assert len(calls) > 20 and len(set(calls)) > 1
    assert engine.scheduler.num_preemptions > 0
    engine.block_manager.check_all_free()


def test_eager_table_width_is_a_power_of_two_of_at_least_16():
    # Eager steps' block tables are padded (page 0) to these widths so the attention kernels meet
    # few width classes (scripts/count_decode_variants.py: 109 → 53 decode variants).
    from nsa_serve.engine.model_runner import table_width

    assert [table_width(n) for n in (0, 1, 15, 16, 17, 33, 1024, 1025)] == [16, 16, 16, 16, 32, 64, 1024, 2048]


def test_step_inputs_are_views_of_one_buffer_and_staging_alternates():
    # A step's inputs move to the device as one copy of one flat buffer: every view must start
    # aligned, none may overlap another, and a copy carries all of them. The engine fills two
    # staging buffers per graph size in turn (the one copied last step may still be in flight).
    from nsa_serve.engine.decode_graphs import StaticDecode

    engine = make_engine(False, num_pages=40)
    static = StaticDecode(engine.runner, 8, engine.max_model_len)
    a = static.new_inputs(4)
    assert set(a) == {"ids", "pos", "slots", "entry_slots", "block_slots", "tables", "lens", "win_slots",
                      "cmp_slots", "win_tables"}
    base = a.flat.data_ptr()
    spans = sorted((t.data_ptr() - base, t.data_ptr() - base + t.numel() * t.element_size()) for t in a.values())
    assert all(lo % 8 == 0 for lo, _ in spans) and all(h <= lo for (_, h), (lo, _) in zip(spans, spans[1:]))
    assert spans[-1][1] <= a.flat.numel()
    for i, t in enumerate(a.values()):
        t.copy_(torch.arange(t.numel()).view(t.shape) + 1000 * i)
    b = static.new_inputs(4)
    b.copy_(a)
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    first, second, third = (static._staging.take(4) for _ in range(3))
    assert first is third and first is not second and static._staging.take(8) is not first
