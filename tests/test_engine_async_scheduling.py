"""Async scheduling (EngineArgs.async_scheduling): a decode step is queued before the previous
step's tokens are read. The same requests must end with the same tokens, logprobs, finish reasons
and freed pages as with synchronous steps.

The fixed-shape decode path (the CUDA-graph one, run eagerly here) is what async steps use; on CPU
the engine does not create it by itself, so the tests attach it as tests/test_engine_kernels.py does.
"""

from __future__ import annotations

import pytest
import torch

from engine_helpers import make_engine, random_prompts, reference_greedy, single_thread_torch
from nsa_serve.engine.decode_graphs import StaticDecode
from nsa_serve.engine.protocol import SamplingParams

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread_torch)


def _engine(async_scheduling: bool, shared_kv: bool = True, **kw):
    engine = make_engine(shared_kv, num_pages=kw.pop("num_pages", 160), async_scheduling=async_scheduling, **kw)
    engine.runner.static_decode = StaticDecode(engine.runner, 8, engine.max_model_len)
    return engine


def _drive(engine, requests, arrivals=None, aborts=None):
    """Step the engine until idle. requests: {id: (prompt, params)}, added at step 0 unless
    `arrivals` maps the id to a later step; `aborts` maps ids to the step they are aborted at.
    Returns the final outputs by id and how many steps left a step in flight."""
    arrivals, aborts = arrivals or {}, aborts or {}
    final, step, in_flight = {}, 0, 0
    todo = dict(requests)
    while todo or engine.has_unfinished_requests():
        for rid in [r for r in todo if arrivals.get(r, 0) <= step]:
            prompt, params = todo.pop(rid)
            engine.add_request(rid, prompt, params)
        for rid, at in aborts.items():
            if at == step:
                engine.abort_request(rid)
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        in_flight += engine._inflight is not None
        step += 1
        assert step < 2000
    engine.block_manager.check_all_free()
    return final, in_flight


def _view(out):
    return [(c.index, c.token_ids, c.finish_reason, c.stop_reason, c.text,
             [(lp.token_id, round(lp.logprob, 5), [(t, round(v, 5)) for t, _, v in lp.top])
              for lp in (c.logprobs or [])]) for c in out.outputs]


@pytest.mark.parametrize("shared_kv", [True, False], ids=["shared_kv", "independent_kv"])
def test_async_steps_give_the_synchronous_outputs(shared_kv):
    prompts = random_prompts(7, 5, 60, seed=41)
    # Learn a token request 0 produces mid-way, so a stop token ends it while its next step is in flight.
    probe = _engine(False, shared_kv).generate([prompts[0]], SamplingParams(temperature=0, max_tokens=12,
                                                                               ignore_eos=True))[0]
    stop_tok = probe.outputs[0].token_ids[5]
    # A one-token bad word the probe writes (its ban needs no earlier token: the row stays async).
    tok = _engine(False, shared_kv).tokenizer
    words = [tok.sp.id_to_piece(t)[1:] for t in probe.outputs[0].token_ids
             if tok.sp.id_to_piece(t).startswith("\u2581") and len(tok.sp.id_to_piece(t)) > 1]
    words = [w for w in words if len(tok.encode(w, add_bos=False)) == 1]
    assert words, "the probe wrote no one-token word to ban"
    banned = tok.encode(words[0], add_bos=False)[0]
    requests = {
        "stop": (prompts[0], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_tok])),
        "greedy": (prompts[1], SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)),
        "seeded-n2": (prompts[2], SamplingParams(temperature=0.9, top_p=0.9, seed=7, n=2, max_tokens=11,
                                                 ignore_eos=True)),
        "logprobs": (prompts[3], SamplingParams(temperature=0, max_tokens=8, logprobs=3, ignore_eos=True)),
        "min-tokens": (prompts[4], SamplingParams(temperature=0.7, seed=3, max_tokens=10, min_tokens=4)),
        "penalty": (prompts[5], SamplingParams(temperature=0, max_tokens=7, repetition_penalty=1.3,
                                               ignore_eos=True)),
        "late": (prompts[6], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)),
        "bad-word": (prompts[0], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, bad_words=[words[0]])),
    }
    arrivals = {"late": 9}
    sync, n_sync = _drive(_engine(False, shared_kv), requests, arrivals)
    eng = _engine(True, shared_kv)
    got, n_async = _drive(eng, requests, arrivals)
    assert n_sync == 0 and n_async >= 5  # async steps did run
    assert set(got) == set(sync) == set(requests)
    for rid in requests:
        assert _view(got[rid]) == _view(sync[rid]), rid
    assert sync["stop"].outputs[0].finish_reason == "stop" and len(sync["stop"].outputs[0].token_ids) < 12
    assert banned not in got["bad-word"].outputs[0].token_ids and banned in probe.outputs[0].token_ids
    assert eng.stats().generation_tokens_total == sum(len(c.token_ids) for o in sync.values() for c in o.outputs)


def test_async_steps_with_aborts_and_preemption_free_every_page():
    # A tight pool forces preemption by recompute; an abort lands while a step is in flight.
    prompts = random_prompts(5, 30, 60, seed=43)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    requests = {f"r{i}": (p, params) for i, p in enumerate(prompts)}
    sync, _ = _drive(_engine(False, num_pages=14), requests)
    eng = _engine(True, num_pages=14)
    got, n_async = _drive(eng, requests)
    assert n_async > 0 and eng.scheduler.num_preemptions > 0
    for rid in requests:
        assert _view(got[rid]) == _view(sync[rid]), rid
    eng = _engine(True)
    got, _ = _drive(eng, requests, aborts={"r1": 12, "r3": 15})
    assert got["r1"].outputs[0].finish_reason == "abort" and got["r3"].outputs[0].finish_reason == "abort"
    for rid in ("r0", "r2", "r4"):
        assert _view(got[rid]) == _view(sync[rid]), rid
    assert eng._inflight is None


def test_async_scheduling_without_the_fixed_shape_path_runs_synchronously():
    engine = make_engine(True, async_scheduling=True)  # CPU: no StaticDecode
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    got, n_async = _drive(engine, {"a": (random_prompts(1, 10, 20, seed=5)[0], params)})
    assert n_async == 0 and len(got["a"].outputs[0].token_ids) == 5


def test_a_step_that_fails_on_the_device_ends_its_rows_with_an_error():
    # Read-back errors surface after the step was launched, when its rows can no longer be retried
    # one by one: they end with finish_reason "error", their pages come back, later requests run.
    engine = _engine(True)
    prompts = random_prompts(3, 10, 30, seed=47)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for i in range(2):
        engine.add_request(f"x{i}", prompts[i], params)
    finals = {}
    while engine._inflight is None:
        engine.step()

    def boom():
        raise RuntimeError("device fault")

    engine._inflight.pending.results = boom
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert {o.outputs[0].finish_reason for o in finals.values()} == {"error"}
    assert engine.stats().num_failed_steps_total == 1
    engine.block_manager.check_all_free()
    got, _ = _drive(engine, {"after": (prompts[2], params)})
    assert len(got["after"].outputs[0].token_ids) == 8


def test_async_scheduling_is_on_by_default_with_cuda_only():
    # None resolves by device, as vLLM (since 0.14) and SGLang default to overlapped scheduling on
    # GPUs; an explicit setting wins. The flags map to True / False / None (the default).
    from nsa_serve.api.cli import engine_args_from
    from nsa_serve.cli import build_parser
    from nsa_serve.engine.args import EngineArgs

    assert EngineArgs().async_scheduling is None
    assert EngineArgs().resolved("cuda").async_scheduling is True
    assert EngineArgs().resolved("cpu").async_scheduling is False
    assert EngineArgs(async_scheduling=False).resolved("cuda").async_scheduling is False
    assert EngineArgs(async_scheduling=True).resolved("cpu").async_scheduling is True
    parse = build_parser().parse_args
    assert engine_args_from(parse(["serve"])).async_scheduling is None
    assert engine_args_from(parse(["serve", "--no-async-scheduling"])).async_scheduling is False
    assert engine_args_from(parse(["serve", "--async-scheduling"])).async_scheduling is True
    assert parse(["bench"]).async_scheduling is None
    assert parse(["bench", "--no-async-scheduling"]).async_scheduling is False
    # The engine keeps the resolved value (CPU here: off).
    assert make_engine(True).args.async_scheduling is False


def _serve_with_fault(engine, prompts, params, culprit: bool | None, ahead: int = 1):
    """Serve `prompts` (ids "0", "1", …); once all four decode, the fixed-shape path's step that
    brings request "2" to `ahead` tokens past that point raises, and with `culprit` the eager retry
    of its row raises too (None: no fault). Returns the final outputs by id, the row counts of the
    failed path steps, and those of the path's steps after the fault."""
    static = engine.runner.static_decode
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    faults, fixed_steps = [], []
    if culprit is not None:
        while len(engine.scheduler.running) < 4 or any(s.in_prefill for s in engine.scheduler.running):
            engine.step()
        bad = next(s for s in engine.scheduler.running if s.request_id == "2")
        L = bad.num_computed_tokens + ahead
        prepare, execute = static.prepare, engine.runner.execute

        def fixed_prepare(seqs, num_new=None):
            if bad in seqs and bad.num_computed_tokens == L and not bad.is_finished:
                faults.append(len(seqs))
                raise RuntimeError("injected fault on the fixed-shape path")
            if faults:  # a fixed-shape step after the failed one
                fixed_steps.append(len(seqs))
            return prepare(seqs, num_new)

        def eager_execute(inp):
            if culprit and bad in inp.seqs and bad.num_computed_tokens == L:
                raise RuntimeError("injected fault of the request")
            return execute(inp)

        static.prepare, engine.runner.execute = fixed_prepare, eager_execute
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
    engine.block_manager.check_all_free()
    return done, faults, fixed_steps


@pytest.mark.parametrize("culprit", [True, False], ids=["a request's fault", "the path's fault"])
def test_a_failed_fixed_shape_step_keeps_the_path_only_when_a_culprit_explains_it(culprit):
    """A decode step on the fixed-shape path raises. Its rows are retried eagerly. If one of them
    fails eagerly too, it explains the failure: it ends with an error and the path stays on for
    the others' later steps. If every row passes eagerly, the path is at fault and stays off."""
    engine = _engine(False)
    static = engine.runner.static_decode
    prompts = random_prompts(4, 10, 20, seed=48)
    done, faults, fixed_steps = _serve_with_fault(
        engine, prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), culprit)
    for i, prompt in enumerate(prompts):
        want = "error" if culprit and i == 2 else "length"
        assert done[str(i)].finish_reason == want, i
        if want == "length":
            assert done[str(i)].token_ids == reference_greedy(engine.model, prompt, 6), i
    assert faults == [4]
    if culprit:
        assert engine.runner.static_decode is static and fixed_steps  # the 3 others' later steps
    else:
        assert engine.runner.static_decode is None and not fixed_steps


@pytest.mark.gpu
@pytest.mark.parametrize("culprit", [True, False], ids=["a request's fault", "the path's fault"])
def test_gpu_a_failed_graph_step_keeps_the_graphs_only_when_a_culprit_explains_it(culprit):
    """The test above on CUDA, on the path as served: decode graphs captured at warm-up and async
    scheduling (a launch that fails falls back to a synchronous step). The three other requests end
    with the tokens of a run without the fault (float32, so that the eager retry's other
    rounding should not flip a greedy token); the graphs stay for their later steps only when the
    culprit fails eagerly too."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    prompts = random_prompts(4, 10, 20, seed=48)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    def run(culprit_or_none):
        engine = make_engine(True, device="cuda", num_pages=160, precompile=False, piecewise_max_tokens=0)
        engine.warmup()
        static = engine.runner.static_decode
        assert static is not None and static.graphs and engine.args.async_scheduling
        # two tokens ahead: with async scheduling a step may already be in flight
        return (engine, static) + _serve_with_fault(engine, prompts, params, culprit_or_none, ahead=2)

    clean = run(None)[2]
    engine, static, done, faults, fixed_steps = run(culprit)
    assert faults
    for i in range(len(prompts)):
        if culprit and i == 2:
            assert done["2"].finish_reason == "error"
        else:
            assert done[str(i)].finish_reason == "length", i
            assert done[str(i)].token_ids == clean[str(i)].token_ids, i
    if culprit:
        assert engine.runner.static_decode is static and fixed_steps
    else:
        assert engine.runner.static_decode is None and not fixed_steps
