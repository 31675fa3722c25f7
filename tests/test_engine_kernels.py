"""The engine's GPU wiring (Triton decode/prefill kernels, the Triton cache writer, dense decode and
SDPA dense prefill) exercised on CPU: the kernels run under TRITON_INTERPRET=1 (tests/conftest.py),
and the outputs must equal the reference model's, as on the CPU path."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import make_engine, random_prompts, reference_greedy, single_thread_torch
from nsa_serve.engine.protocol import SamplingParams

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread_torch)


def use_kernels(engine, dense: bool = False):
    from kernels_interpret import load_kernels

    load_kernels()
    import importlib

    att = engine.runner.attention
    att.decode_fn = importlib.import_module("nsa_kernels.nsa_decode").nsa_decode
    att.prefill_fn = importlib.import_module("nsa_kernels.nsa_prefill").nsa_prefill
    att.prefill_plan_fn = importlib.import_module("nsa_kernels.nsa_prefill").plan_prefill
    att.dense_decode_fn = importlib.import_module("nsa_kernels.dense_decode").dense_paged_decode
    att.dense_prefill_sdpa = True
    engine.runner.write = importlib.import_module("nsa_kernels.cache_write").write_kv


def generate_and_compare(engine, prompts, max_tokens: int) -> None:
    """Greedy requests with prompt logprobs: tokens and prompt logprobs equal the reference
    model's, and every page comes back."""
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                                                   prompt_logprobs=0))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == reference_greedy(engine.model, prompt, max_tokens)
        with torch.no_grad():
            ref = torch.log_softmax(engine.model.step(torch.tensor(prompt), engine.model.new_cache())[:-1].double(), -1)
        want = ref.gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1).tolist()
        assert [t.logprob for t in out.prompt_logprobs[1:]] == pytest.approx(want, abs=2e-4)
    engine.block_manager.check_all_free()


@pytest.mark.parametrize("shared_kv", [True, False], ids=["shared_kv", "independent_kv"])
def test_engine_with_the_triton_kernels_matches_the_reference(shared_kv):
    engine = make_engine(shared_kv, num_pages=64, max_num_batched_tokens=64, long_prefill_token_threshold=24)
    use_kernels(engine)
    att = engine.runner.attention
    plans, prefill = [], att.prefill_fn

    def spy(*args, **kw):  # records the host-side layout each layer's prefill call gets
        plans.append(kw.get("plan"))
        return prefill(*args, **kw)

    att.prefill_fn = spy
    # Two prompts of 2-3 chunks, decoded together: mixed prefill + decode steps (the interpreter is slow).
    # Prompt logprobs ride along: the prompt rows of the Triton prefill's output, scored.
    generate_and_compare(engine, random_prompts(2, 30, 50, seed=21), 2)
    # One plan per step, shared by every layer of that step.
    layers = engine.model.cfg.num_layers
    assert plans and all(pl is not None for pl in plans) and len(plans) % layers == 0
    steps = [plans[i:i + layers] for i in range(0, len(plans), layers)]
    assert all(all(pl is step[0] for pl in step) for step in steps)
    assert len({id(step[0]) for step in steps}) == len(steps)


def test_dense_mode_with_the_dense_decode_kernel_and_sdpa_prefill():
    plain = make_engine(True, num_pages=64, attention="dense")
    fast = make_engine(True, num_pages=64, attention="dense")
    use_kernels(fast)
    static = _static(fast)  # decode steps through the fixed-shape path and the dense decode kernel
    prompts = random_prompts(3, 20, 60, seed=22)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    assert [o.outputs[0].token_ids for o in fast.generate(prompts, params)] == want
    assert static.steps > 0


def _static(engine):
    from nsa_serve.engine.decode_graphs import StaticDecode

    engine.runner.static_decode = StaticDecode(engine.runner, 4, engine.max_model_len)
    return engine.runner.static_decode


@pytest.mark.parametrize("shared_kv", [True, False], ids=["shared_kv", "independent_kv"])
def test_fixed_shape_decode_path_matches_the_reference(shared_kv):
    # The CUDA-graph decode path (padded batch, trash page, one summary per row) run eagerly: the
    # reference attention here, the Triton decode kernel below. Batches of 1-6 cover padding (to 4)
    # and the eager fallback above the largest graph size.
    engine = make_engine(shared_kv, num_pages=128, long_prefill_token_threshold=24)
    static = _static(engine)
    prompts = random_prompts(6, 1, 70, seed=23)
    params = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    outs = engine.generate(prompts, params)
    assert static.steps > 0
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == reference_greedy(engine.model, prompt, 9)
    engine.block_manager.check_all_free()


def _engine_for(case: str):
    if case != "dk_ne_dv":
        return make_engine(case == "shared_kv", num_pages=128)
    from nsa_serve.engine.args import EngineArgs
    from nsa_serve.engine.llm_engine import LLMEngine
    from nsa_serve.model import NSAModel, preset

    torch.manual_seed(0)
    model = NSAModel(preset("tiny", head_dim_k=32, head_dim_v=16)).init_weights(seed=3).eval()
    return LLMEngine(EngineArgs(device="cpu", dtype="float32", num_pages=128, max_num_seqs=16), model=model)


@pytest.mark.parametrize("case", ["shared_kv", "independent_kv", "dk_ne_dv"])
def test_fixed_shape_decode_writes_the_same_cache_as_the_eager_path(case):
    # Greedy tokens of a tiny random model can hide a wrong summary: the cache itself must hold what
    # the eager path writes (the same steps allocate the same pages). Every decode step here runs
    # through the fixed-shape path, whose φ_K and φ_V come from phi_pair; 12 tokens at stride 4
    # complete 3 compression blocks per sequence there.
    prompts = random_prompts(3, 5, 40, seed=25)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    fixed = _engine_for(case)
    static = _static(fixed)
    calls = []
    attn = fixed.model.layers[0].attn
    phi_pair = attn.phi_pair
    attn.phi_pair = lambda x: calls.append(x.shape) or phi_pair(x)
    fixed.generate(prompts, params)
    assert static.steps >= 11 and len(calls) == static.steps
    eager = _engine_for(case)
    eager.generate(prompts, params)
    n = fixed.block_manager.num_pages
    for got, want in zip(fixed.runner.caches, eager.runner.caches):
        for name in ("k_cache", "v_cache", "kc_cache", "vc_cache"):
            a, b = getattr(got, name)[:n], getattr(want, name)[:n]
            assert b.abs().sum() > 0, name
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_fixed_shape_decode_with_the_triton_decode_kernel():
    engine = make_engine(True, num_pages=64)
    use_kernels(engine)
    static = _static(engine)
    prompts = random_prompts(2, 10, 30, seed=24)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert static.steps >= 2
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == reference_greedy(engine.model, prompt, 4)


def test_piecewise_steps_with_the_triton_kernels_match_the_reference():
    """The piecewise path as it runs on CUDA with the Triton kernels: the decode rows' attention
    over padded fixed-shape inputs (piecewise_decode) and the chunks' through a static prefill plan
    per padded size (piecewise_prefill: padded tiles, rows outside the chunks left alone). Here
    uncaptured, under the interpreter: greedy tokens and prompt logprobs equal the reference
    model's, and every page comes back."""
    from nsa_serve.engine.piecewise_graphs import PiecewiseSteps

    engine = make_engine(True, num_pages=64, max_num_batched_tokens=64, long_prefill_token_threshold=24)
    use_kernels(engine)
    pw = engine.runner.piecewise = PiecewiseSteps(engine.runner, 64, engine.args.max_num_seqs, engine.max_model_len)
    assert pw.prefill_rows is not None and sorted(pw.prefill_rows.plans) == pw.sizes
    wide = PiecewiseSteps(engine.runner, 2048, engine.args.max_num_seqs, engine.max_model_len)
    # larger steps keep the eager prefill call (piecewise_prefill.MAX_TOKENS)
    assert sorted(wide.prefill_rows.plans) == [16, 32, 64, 128, 256, 512] and not wide.prefill_rows.serves(1024)
    prepare, seen = engine.runner.prepare, []

    def record(seqs, nums):
        inp = prepare(seqs, nums)
        seen.append((inp.num_decode, inp.num_seqs, inp.piecewise_prefill is not None, inp.block_tables is None))
        return inp

    engine.runner.prepare = record
    generate_and_compare(engine, random_prompts(3, 30, 50, seed=21), 3)
    # A step whose attention the graphs serve whole makes no eager attention inputs; here that is
    # every step (all fit 64 tokens): chunks through the static plans, decode rows through theirs.
    assert seen and all(no_tables and (chunks or nd == b) for nd, b, chunks, no_tables in seen)
    assert any(0 < nd < b for nd, b, _, _ in seen)  # mixed steps among them
    # every step went through the pieces; those with chunks used the static plans, and some of
    # them had decode rows beside the chunks
    assert pw.steps > 0 and pw.prefill_rows.steps > 0 and pw.decode_rows.steps > 0
    assert pw.prefill_rows.steps + pw.decode_rows.steps > pw.steps


def test_independent_kv_piecewise_steps_with_the_triton_kernels_match_the_reference():
    """An independent-K/V model's piecewise steps with the Triton kernels, uncaptured under the
    interpreter: φ from its flat source, both rings written from padded rows, the decode rows' and
    the chunks' attention (static plans) over padded inputs with the window rings' tables. Greedy
    tokens and prompt logprobs equal the reference model's."""
    from nsa_serve.engine.piecewise_graphs import PiecewiseSteps

    engine = make_engine(False, num_pages=64, max_num_batched_tokens=64, long_prefill_token_threshold=24)
    use_kernels(engine)
    pw = engine.runner.piecewise = PiecewiseSteps(engine.runner, 64, engine.args.max_num_seqs, engine.max_model_len)
    assert pw.prefill_rows is not None
    generate_and_compare(engine, random_prompts(3, 30, 50, seed=22), 3)
    assert pw.steps > 0 and pw.decode_rows.steps > 0 and pw.prefill_rows.steps > 0


@pytest.mark.parametrize("piecewise,as_decode", [(False, True), (True, True), (False, False), (True, False)],
                         ids=["eager", "piecewise", "eager-verify-as-chunks", "piecewise-verify-as-chunks"])
def test_speculative_rows_with_the_triton_kernels_match_the_reference(piecewise, as_decode):
    """Rows verifying n-gram drafts (1 + k tokens continuing a cached sequence) through the Triton
    kernels, eagerly and through the piecewise path's graphs: their tokens as decode rows (the
    decode kernel; in a piecewise step the decode rows' graphs), or as the chunk they are (the
    prefill kernel; the piecewise path's static plans). Greedy tokens equal the reference model's,
    with drafts accepted, and every page comes back."""
    from engine_helpers import looping_prompts

    prompts = looping_prompts(make_engine(True), 2, seed=131, max_tokens=10)
    engine = make_engine(True, num_pages=64, max_num_batched_tokens=64, long_prefill_token_threshold=24,
                         num_speculative_tokens=3, prompt_lookup_min=1)
    use_kernels(engine)
    runner = engine.runner
    runner.verify_as_decode = as_decode
    if piecewise:
        from nsa_serve.engine.piecewise_graphs import PiecewiseSteps

        runner.piecewise = PiecewiseSteps(runner, 64, engine.args.max_num_seqs, engine.max_model_len,
                                          decode_queries=4)
    queries, prepare = [], runner.prepare

    def spy(seqs, num_new):  # decode queries beyond the single-token rows: verifying tokens
        inp = prepare(seqs, num_new)
        queries.append(inp.num_decode - sum(1 for n in num_new if n == 1))
        return inp

    runner.prepare = spy
    generate_and_compare(engine, prompts, 10)
    assert engine.stats().spec_decode_num_accepted_tokens_total > 0
    assert any(queries) == as_decode
    if piecewise:
        assert runner.piecewise.decode_rows.steps > 0 and runner.piecewise.prefill_rows.steps > 0
