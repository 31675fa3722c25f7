"""Piecewise CUDA graphs for prompt and mixed steps (engine/piecewise_graphs.py).

On CPU the pieces run eagerly over the same padded inputs the graphs would replay, so these tests
check the computation: the same tokens, logprobs and prompt logprobs as the eager step, the same
K/V pages and summaries (pad rows write only the trash page), every page freed. The engine
attaches the path itself only on CUDA; here the tests attach it. The capture runs on the GPU
(`scripts/piecewise_probe.py --check`, and the `gpu` test below).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_helpers import make_engine, random_prompts, reference_greedy, single_thread_torch
from script_helpers import load_script
from nsa_serve.engine.args import EngineArgs
from nsa_serve.engine.piecewise_graphs import PiecewiseSteps, capture_sizes
from nsa_serve.engine.protocol import SamplingParams

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread_torch)


def _engine(piecewise: int, shared_kv: bool = True, **kw):
    engine = make_engine(shared_kv, **kw)
    if piecewise:
        engine.runner.piecewise = PiecewiseSteps(engine.runner, piecewise, engine.args.max_num_seqs,
                                                engine.max_model_len)
    return engine


def _caches(engine):
    trash = engine.runner.trash_page
    return [t[:trash].clone() for c in engine.runner.caches
            for t in (c.k_cache, c.v_cache, c.kc_cache, c.vc_cache)]


def test_capture_sizes():
    assert capture_sizes(2048) == [16, 32, 64, 128, 256, 512, 1024, 2048]
    assert capture_sizes(100) == [16, 32, 64, 100]
    assert capture_sizes(5) == [16]


def test_piecewise_validation():
    with pytest.raises(ValueError, match="piecewise_max_tokens"):
        EngineArgs(piecewise_max_tokens=-1).validate()
    pw = _engine(64).runner.piecewise
    with pytest.raises(ValueError, match="piecewise inputs"):  # an independent-K/V step's inputs
        pw.upload(**{name: np.zeros(0, dtype=np.int64) for name in ("ids", "pos", "slots", "entry_slots",
                                                                     "old_slots", "entry_src")})


def test_independent_kv_inputs():
    """An independent-K/V model's pieces take φ's flat source (old ring rows bounded by l − 1 a
    sequence) and both rings' writes instead of block slots; its decode rows' graphs take the window
    rings' tables (the static prefill plans' too: tests/test_engine_kernels.py)."""
    engine = _engine(64, shared_kv=False, max_num_seqs=5)
    pw, l = engine.runner.piecewise, engine.config.cmp_block
    assert pw.max_old(16) == 5 * (l - 1) and pw.max_old(2) == 2 * (l - 1)
    x = pw.padding(16)
    assert set(x) == {"ids", "pos", "slots", "entry_slots", "old_slots", "entry_src", "cmp_rows", "cmp_slots",
                      "win_rows", "win_slots"}
    assert x["entry_src"].shape == (pw.max_entries(16), l) and x["old_slots"].shape == (pw.max_old(16),)
    trash = engine.runner.trash_page
    assert (x["cmp_slots"] // engine.runner.P == trash).all() and (x["win_rows"] == 0).all()
    rows = pw.decode_rows.upload(np.ones((2, 3), dtype=np.int32), [5, 6], 2,
                                 win_tables=np.full((2, engine.runner.win_ring_pages), 7, dtype=np.int32))
    assert rows["win_tables"].shape == (2, engine.runner.win_ring_pages) and (rows["win_tables"] == 7).all()


@pytest.mark.parametrize("attention,shared_kv", [("nsa", True), ("dense", True), ("nsa", False)],
                         ids=["nsa", "dense", "nsa, independent K/V"])
def test_steps_match_the_eager_engine_step_by_step(attention, shared_kv):
    """Two engines in lockstep, one through the pieces: after every step the same pages (K/V and
    summaries, and with independent K/V the rings; trash page aside) and the same sampled tokens
    and logprobs. Chunks end off the summary stride and the page size; decode rows share steps with
    prompt chunks; one prompt asks for prompt logprobs; late arrivals; the 96-token budget exceeds
    the 64-token graphs, so some steps stay eager. Independent K/V: 37-token chunks are longer than
    φ's 16-token ring, so a chunk overwrites ring rows its own first summaries read."""
    kw = dict(attention=attention, max_num_batched_tokens=96, long_prefill_token_threshold=37)
    eager, pw = _engine(0, shared_kv, **kw), _engine(64, shared_kv, **kw)
    if not shared_kv:
        assert eager.runner.cmp_ring < 37
    prompts = random_prompts(6, 3, 150, seed=7)
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2,
                             prompt_logprobs=2 if i == 1 else None) for i in range(len(prompts))]
    outs = {id(eager): {}, id(pw): {}}
    step = 0
    while step == 0 or eager.has_unfinished_requests() or pw.has_unfinished_requests():
        for i, (p, sp) in enumerate(zip(prompts, params)):
            if step == (0 if i < 3 else 2 * i):
                for e in (eager, pw):
                    e.add_request(f"r{i}", p, sp)
        for e in (eager, pw):
            for o in e.step():
                if o.finished:
                    outs[id(e)][o.request_id] = o
        for a, b in zip(_caches(eager), _caches(pw)):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        step += 1
        assert step < 500
    assert pw.runner.piecewise.steps > 0
    assert pw.runner.piecewise.steps < step  # steps over 64 tokens ran eagerly
    # decode rows (beside chunks, or alone: no decode graphs here) went through piecewise_decode
    assert pw.runner.piecewise.decode_rows.steps > 0
    for rid, a in outs[id(eager)].items():
        b = outs[id(pw)][rid]
        ca, cb = a.outputs[0], b.outputs[0]
        assert cb.token_ids == ca.token_ids
        for la, lb in zip(ca.logprobs, cb.logprobs):
            assert lb.token_id == la.token_id and abs(lb.logprob - la.logprob) < 1e-4
            assert [t for t, _, _ in lb.top] == [t for t, _, _ in la.top]
        if a.prompt_logprobs is not None:
            for la, lb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
                assert lb.token_id == la.token_id and abs(lb.logprob - la.logprob) < 1e-4 and lb.rank == la.rank
    for e in (eager, pw):
        e.block_manager.check_all_free()


@pytest.mark.parametrize("shared_kv", [True, False], ids=["shared K/V", "independent K/V"])
def test_piecewise_engine_matches_the_reference_model(shared_kv):
    """Greedy requests through the pieces equal the reference model run alone (many sequences at
    once, so steps hold many summaries: the padded entry rows, and with independent K/V the old
    rows of φ's flat source, must hold them all)."""
    engine = _engine(128, shared_kv, max_num_seqs=12, max_num_batched_tokens=128,
                     long_prefill_token_threshold=128)
    prompts = random_prompts(12, 1, 90, seed=3)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert engine.runner.piecewise.steps > 0
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == reference_greedy(engine.model, prompt, 6)
    engine.block_manager.check_all_free()


def test_entry_rows_bound():
    """A step of `size` tokens completes at most size // d + min(size, max_seqs) summaries. Here a
    16-token step completes 6 > 16 // d: four decode rows each complete a block (prompts of 11,
    15, 19 and 23 tokens: their first decode tokens end blocks, d = 4, l = 8) beside a new
    12-token prompt that completes two. The padded entry rows must hold them all."""
    engine = _engine(64, max_num_seqs=5)
    pw, c = engine.runner.piecewise, engine.config
    assert (c.cmp_stride, c.cmp_block) == (4, 8)
    assert pw.max_entries(16) == 16 // 4 + 5
    seen = []
    prepare = engine.runner.prepare

    def record(seqs, nums):
        inp = prepare(seqs, nums)
        seen.append((sum(nums), inp.entry_slots.numel()))
        return inp

    engine.runner.prepare = record
    prompts = random_prompts(5, 1, 1, seed=9)
    prompts = [p * n for p, n in zip(prompts, (11, 15, 19, 23, 12))]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    outs = {}
    for i in range(4):
        engine.add_request(f"r{i}", prompts[i], params)
    for step in range(20):
        if step == 1:
            engine.add_request("r4", prompts[4], params)
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o.outputs[0].token_ids
        if not engine.has_unfinished_requests():
            break
    assert (16, 6) in seen
    for i, prompt in enumerate(prompts):
        assert outs[f"r{i}"] == reference_greedy(engine.model, prompt, 3)
    e = np.zeros(0, dtype=np.int64)
    with pytest.raises(AssertionError, match="entry_slots rows do not fit"):
        pw.upload(ids=e, pos=e, slots=e, entry_slots=np.zeros(pw.max_entries(16) + 1, dtype=np.int64),
                  block_slots=np.zeros((0, c.cmp_block), dtype=np.int64), size=16)


def test_decode_rows_inputs_are_padded_with_the_trash_page():
    """piecewise_decode's inputs: the step's decode rows' tables and lengths, then padding rows
    (length 1, every column the trash page); a later step with fewer rows or a narrower table
    leaves nothing of the earlier one behind. Tables have the longest sequence's width."""
    engine = _engine(64, max_num_seqs=8)
    rows, trash = engine.runner.piecewise.decode_rows, engine.runner.trash_page
    assert rows.sizes == [1, 2, 4, 8] and rows.max_pages == -(-engine.max_model_len // engine.runner.P)
    wide = np.arange(1, 3 * 20 + 1, dtype=np.int32).reshape(3, 20)  # wider than max_pages: cut
    x = rows.upload(wide, [5, 6, 7], 3)
    w = min(20, rows.max_pages)
    assert x["lens"].tolist() == [5, 6, 7, 1]
    assert np.array_equal(x["tables"][:3, :w].numpy(), wide[:, :w])
    assert (x["tables"][:3, w:] == trash).all() and (x["tables"][3] == trash).all()
    narrow = np.full((1, 2), 9, dtype=np.int32)
    x = rows.upload(narrow, [4], 1, size=4)
    assert x["lens"].tolist() == [4, 1, 1, 1]
    assert x["tables"][0, :2].tolist() == [9, 9]
    assert (x["tables"][0, 2:] == trash).all() and (x["tables"][1:] == trash).all()
    assert rows.upload(narrow, [4], 1)["lens"].shape == (1,)


@pytest.mark.parametrize("shared_kv", [True, False], ids=["shared K/V", "independent K/V"])
def test_probe_double_run_compares_every_piecewise_step(shared_kv):
    """scripts/piecewise_probe.py's double run (also the GPU test's check): each step served by
    the pieces is run eagerly and as pieces too, the hidden states compared; on CPU in float32
    they agree closely. Independent K/V: 64-token chunks overwrite the φ ring rows their first
    summaries read, so each run must start from the ring as it was (it differed by 0.2–0.64 of
    max |h| when the runs shared one ring)."""
    probe = load_script("piecewise_probe")
    engine = _engine(64, shared_kv, max_num_batched_tokens=64, long_prefill_token_threshold=64)
    if not shared_kv:
        assert engine.runner.cmp_ring < 64
    with probe.double_run(engine) as diffs:
        engine.generate(random_prompts(5, 2, 150, seed=2), SamplingParams(temperature=0, max_tokens=4))
    assert 2 * len(diffs) == engine.runner.piecewise.steps > 0  # each step: the pieces, then the served run
    assert max(max(d) for d in diffs) < 1e-5
    for name in ("prepare", "execute", "_layers"):  # the wrappers are gone again
        assert name not in vars(engine.runner)
    assert "forward" not in vars(engine.runner.piecewise)
    engine.block_manager.check_all_free()


@pytest.mark.gpu
@pytest.mark.parametrize("shared_kv", [True, False], ids=["shared K/V", "independent K/V"])
def test_piecewise_graphs_on_gpu(shared_kv):
    """CUDA: the engine captures the graphs at warm-up and serves every step that is not
    decode-only through them. Each such step is also run as uncaptured pieces (the replay must
    give their hidden states exactly) and eagerly (equal up to bf16 rounding of GEMMs with padded
    shapes: 0 for this model on an H200, 6.8e-3–9.5e-3 of max |h| for the bundled one).
    Independent K/V: φ's flat source and the rings' writes inside the graphs (prompts up to 700
    tokens: chunks far longer than φ's ring)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    probe = load_script("piecewise_probe")
    engine = make_engine(shared_kv, device="cuda", dtype="bfloat16", num_pages=256, precompile=False,
                         max_num_batched_tokens=256, long_prefill_token_threshold=256, piecewise_max_tokens=256)
    engine.warmup()
    pw = engine.runner.piecewise
    assert pw is not None and sorted(pw.graphs) == capture_sizes(256)
    layers = len(engine.model.layers)
    assert sorted(pw.decode_rows.graphs) == [(i, s) for i in range(layers) for s in pw.decode_rows.sizes]
    before = pw.steps
    with probe.double_run(engine) as diffs:
        engine.generate(random_prompts(6, 5, 700, seed=5), SamplingParams(temperature=0, max_tokens=8))
    print("pieces vs eager, graphs vs pieces:", diffs)
    assert pw.steps > before and 2 * len(diffs) == pw.steps - before
    assert pw.decode_rows.steps > 0  # mixed steps: their decode rows replayed piecewise_decode's graphs
    assert max(d[1] for d in diffs) < 1e-3, diffs
    assert max(d[0] for d in diffs) < 2e-2, diffs
    engine.block_manager.check_all_free()


@pytest.mark.parametrize("shared_kv", [True, False], ids=["shared K/V", "independent K/V"])
def test_a_failed_piecewise_step_falls_back_to_eager_steps(shared_kv):
    """A step the pieces serve that raises: the path is dropped (as the decode graphs are) and
    the step's sequences are retried eagerly, so every request still completes as the reference
    model's, and every page comes back. Independent K/V: the failed step continued two prompts in
    24-token chunks, which overwrote rows of φ's rings that a retry reads, so those sequences are
    recomputed (ModelRunner.overwrites_phi_source)."""
    engine = _engine(64, shared_kv=shared_kv, long_prefill_token_threshold=24)
    pw = engine.runner.piecewise
    forward = pw.forward
    calls = []

    def failing(inp):
        calls.append(inp)
        if len(calls) == 2:
            raise RuntimeError("injected fault")
        return forward(inp)

    pw.forward = failing
    prompts = random_prompts(3, 5, 30, seed=12) if shared_kv else random_prompts(2, 50, 60, seed=12)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert len(calls) == 2 and engine.runner.piecewise is None
    assert engine.scheduler.num_preemptions == (0 if shared_kv else 2)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].finish_reason == "length"
        assert out.outputs[0].token_ids == reference_greedy(engine.model, prompt, 5)
    engine.block_manager.check_all_free()


def test_piecewise_flags():
    from nsa_serve.api.cli import engine_args_from
    from nsa_serve.cli import build_parser

    assert engine_args_from(build_parser().parse_args(["serve"])).piecewise_max_tokens == 2048
    args = engine_args_from(build_parser().parse_args(["serve", "--piecewise-max-tokens", "0"]))
    assert args.piecewise_max_tokens == 0
    assert build_parser().parse_args(["bench", "--piecewise-max-tokens", "512"]).piecewise_max_tokens == 512
