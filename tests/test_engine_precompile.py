"""Start-up kernel compilation (engine/precompile.py): what it plans, that its synthetic steps are
valid engine steps that touch no request's pages, that launches inside `compile_only` compile and
do not run, and (GPU) that after it a mixed workload compiles nothing new."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from triton.runtime.jit import JITFunction

from engine_helpers import make_engine, random_prompts, reference_greedy, single_thread_torch
from nsa_serve.cli import build_parser
from nsa_serve.engine import precompile as pc
from nsa_serve.engine.model_runner import table_width
from nsa_serve.engine.protocol import SamplingParams

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread_torch)


def test_plan_covers_every_width_class_decode_row_count_and_context_class():
    P, max_len, rows = 64, 65600, 5
    steps = pc.plan(rows, max_len, P, 8192)
    classes = pc.width_classes(-(-max_len // P))
    assert classes == [16, 32, 64, 128, 256, 512, 1024, 2048]
    decode = [s for s in steps if s.decode]
    # Every decode-row count beside a prompt chunk, in every table-width class.
    assert {(s.decode, table_width(s.pages)) for s in decode} == {(b, w) for b in range(1, rows + 1) for w in classes}
    assert all(s.chunk <= s.context <= max_len for s in steps)
    prefill = [s for s in steps if not s.decode]
    blocks = {-(-s.context // P) for s in prefill}
    # Every power-of-two class of context blocks (the prefill top-n's width), with block counts that
    # do and do not divide by 4, and chunk lengths that do and do not divide by 16.
    assert {max(16, 1 << (b - 1).bit_length()) for b in blocks} == set(classes)
    assert any(b % 4 == 0 for b in blocks) and any(b % 4 for b in blocks)
    assert {s.chunk % 16 == 0 for s in prefill} == {True, False}
    # Short engines: nothing beyond max_model_len or the largest chunk, no repeated step.
    short = pc.plan(0, 100, 64, 40)
    assert short and all(2 <= s.chunk <= 40 and s.context <= 100 for s in short) and len(set(short)) == len(short)
    assert pc.chunk_lengths(40) == [32, 40] and pc.chunk_lengths(16) == [15, 16] and pc.chunk_lengths(2) == [2]
    assert pc.chunk_lengths(8192) == [64, 71]


@pytest.mark.parametrize("shared_kv", [True, False])
def test_synthetic_steps_are_valid_steps_on_the_trash_page(shared_kv):
    # Run through the real runner (CPU reference attention): inputs build, the forward runs, and no
    # page a request could own is used; a request afterwards decodes exactly as the reference.
    eng = make_engine(shared_kv, num_pages=64)
    runner = eng.runner
    steps = pc.plan(eng.args.max_num_seqs - 1, eng.max_model_len, runner.P, eng._max_chunk())
    assert max(s.chunk for s in steps) <= eng._max_chunk()
    picked = [s for s in steps if not s.decode or s.decode in (1, eng.args.max_num_seqs - 1)]
    for s in picked:
        seqs = [pc.synthetic_sequence(runner, s.pages * runner.P, s.pages * runner.P - 1) for _ in range(s.decode)]
        seqs.append(pc.synthetic_sequence(runner, s.context, s.context - s.chunk))
        inp = runner.prepare(seqs, [1] * s.decode + [s.chunk])
        # Every write (tokens, summaries) lands on the trash page.
        assert int(inp.slots.min()) >= runner.trash_page * runner.P
        if inp.entry_slots.numel():
            assert int(inp.entry_slots.min()) >= runner.trash_page * runner.E
        logits = runner.execute(inp)
        assert logits.shape == (s.decode + 1, eng.model.cfg.vocab_size)
    assert eng.block_manager.num_used_pages == 0
    prompt = random_prompts(1, 50, 50, seed=5)[0]
    out = eng.generate([prompt], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == reference_greedy(eng.model, prompt, 5)


def test_synthetic_steps_take_the_eager_path_and_leave_the_graphs_in_place():
    # Short synthetic steps would go through the piecewise graphs and compile none of the eager
    # path's variants, which long prompt chunks (alone or beside decode rows) then meet.
    eng = make_engine(num_pages=64)

    class Graphs:  # stands in for piecewise_graphs.PiecewiseSteps (CUDA-only)
        def eligible(self, num_tokens):
            raise AssertionError("a synthetic step consulted the piecewise graphs")

    graphs = eng.runner.piecewise = Graphs()
    steps = pc.plan(2, 200, eng.runner.P, 40)
    pc.run_steps(eng.runner, steps[:3] + steps[-2:])
    assert eng.runner.piecewise is graphs
    with pytest.raises(RuntimeError, match="boom"):
        with pc.eager_path(eng.runner):
            assert eng.runner.piecewise is None
            raise RuntimeError("boom")
    assert eng.runner.piecewise is graphs and eng.block_manager.num_used_pages == 0


def test_speculation_extends_the_planned_decode_rows_up_to_the_bound():
    # Rows verifying drafts (1 + k a sequence) reach max_num_seqs·(1 + k); the plan covers them up
    # to decode_rows_bound, past which no row count meets a new variant (next test), and never
    # covers fewer rows than the sequence count.
    assert pc.planned_rows(63, 0, 66) == 63  # no speculation
    assert pc.planned_rows(63, 320, 66) == 66  # paper shape on an H100: 64 seqs × 5 rows, bound 66
    assert pc.planned_rows(63, 320, 132) == 132  # the bundled model's 2 kv heads
    assert pc.planned_rows(3, 20, 132) == 20  # every verifying row count, below the bound
    assert pc.planned_rows(255, 1280, 66) == 255  # never fewer than before


def test_decode_rows_bound_is_where_larger_batches_stop_meeting_new_variants():
    # scripts/count_decode_variants.py --check-bound: both decode launchers, four head shapes, the
    # launchers sized as on four GPUs (132-SM and 114-SM H100s with PDL, a 108-SM A100 and a 142-SM
    # L40S without, each with its shared memory); batches up to three times the bound meet no
    # specialisation key that batches up to it do not (and the bound itself is the first to meet
    # some: it is tight). Half the bound (programs / (2·kv heads)) fails it.
    import subprocess
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    script = root / "scripts" / "count_decode_variants.py"
    r = subprocess.run([sys.executable, str(script), "--check-bound", "--max-pages", "512"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if "bound" in ln]
    assert len(lines) == 16 and all("keys past it not met at or below it: none" in ln for ln in lines), r.stdout
    assert all("first met at the bound itself: none" not in ln for ln in lines), r.stdout
    # The check can fail: half the bound leaves keys that only larger batches meet.
    r = subprocess.run([sys.executable, str(script), "--check-bound", "--max-pages", "512", "--device", "h100-sxm",
                        "--bound-divisor", "2"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "keys past it not met at or below it: {" in r.stdout, r.stdout


def test_warmup_passes_the_verifying_rows_to_the_precompile(monkeypatch):
    import nsa_serve.engine.llm_engine as le

    calls = []
    monkeypatch.setattr(le, "precompile", lambda runner, rows, *a, **kw: calls.append((rows, kw)))
    make_engine(num_speculative_tokens=4, prompt_lookup_min=1, max_num_seqs=5).warmup()
    make_engine(max_num_seqs=5).warmup()
    assert calls == [(5, {"verify_rows": 25}), (5, {"verify_rows": 0})]  # CPU: no graphs, so 5 rows


def test_precompile_is_a_no_op_off_cuda():
    eng = make_engine()
    assert pc.precompile(eng.runner, 3, eng.max_model_len, eng._max_chunk()) == 0
    eng.warmup()  # precompile is on by default; on CPU it does nothing
    assert eng.args.precompile and eng.block_manager.num_used_pages == 0


def test_compile_only_turns_launches_into_compiles_and_restores_run(monkeypatch):
    calls = []

    def recorder(self, *args, grid, warmup, **kwargs):
        calls.append(warmup)

    monkeypatch.setattr(JITFunction, "run", recorder)
    with pc.compile_only(threads=4):
        assert JITFunction.run is not recorder
        JITFunction.run(None, 1, grid=(1,), warmup=False)
    assert calls == [True] and JITFunction.run is recorder
    with pytest.raises(RuntimeError, match="boom"):
        with pc.compile_only(threads=1):
            raise RuntimeError("boom")
    assert JITFunction.run is recorder


def test_precompile_flags():
    from nsa_serve.api.cli import engine_args_from

    assert engine_args_from(build_parser().parse_args(["serve"])).precompile is True
    assert engine_args_from(build_parser().parse_args(["serve", "--no-precompile"])).precompile is False
    assert build_parser().parse_args(["bench", "--no-precompile"]).precompile is False


def _compiled_variants() -> int:
    """Kernel variants in every Triton JIT cache of the project's modules."""
    n = 0
    for name, mod in list(sys.modules.items()):
        if not name.startswith(("nsa_kernels", "nsa_serve")):
            continue
        for obj in vars(mod).values():
            if isinstance(obj, JITFunction):
                n += sum(len(c[0]) for c in obj.device_caches.values())
    return n


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shared_kv,piecewise", [(True, 2048), (False, 2048), (True, 16), (False, 16)])
def test_gpu_mixed_workload_after_precompile_compiles_nothing(shared_kv, piecewise):
    # piecewise 16: the 40-token chunks exceed the piecewise graphs, so prompt and mixed steps run
    # eagerly, as long prompts' steps do in a server.
    kw = dict(device="cuda", dtype="bfloat16", num_pages=64, max_num_seqs=4, max_num_batched_tokens=96,
              long_prefill_token_threshold=40, piecewise_max_tokens=piecewise)
    prompts = random_prompts(6, 20, 700, seed=7)  # chunked prompts beside decoding ones: mixed steps
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    eng = make_engine(shared_kv, **kw)  # first: JIT caches are per process, shared by engines
    eng.warmup()
    assert len(eng.model.layers) == eng.model.cfg.num_layers  # precompile ran one layer, then restored them
    before = _compiled_variants()
    outs = eng.generate(prompts, params)
    assert _compiled_variants() == before  # every variant the workload met was compiled at start-up
    assert eng.block_manager.num_used_pages == 0
    plain = make_engine(shared_kv, precompile=False, **kw)
    plain.warmup()
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    assert [o.outputs[0].token_ids for o in outs] == want  # serving is unchanged by it


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_speculative_workload_after_precompile_compiles_nothing():
    # Sequences verifying 3 drafts are 4 decode rows each, so steps beside the (eager) prompt chunks
    # carry up to 16 rows with 4 sequences: beyond the 3 the precompile planned before speculation
    # was counted. Prompts repeat themselves, so the n-gram proposer drafts from the first step on.
    kw = dict(device="cuda", dtype="bfloat16", num_pages=256, max_num_seqs=4, max_num_batched_tokens=96,
              long_prefill_token_threshold=40, piecewise_max_tokens=16, num_speculative_tokens=3,
              prompt_lookup_min=1)
    prompts = [p * 12 for p in random_prompts(6, 12, 40, seed=11)]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    eng = make_engine(True, **kw)
    eng.warmup()
    before = _compiled_variants()
    eng.generate(prompts, params)
    assert eng._counters.spec_decode_num_drafts_total > 0  # verifying rows were met
    assert _compiled_variants() == before  # every variant the workload met was compiled at start-up
    assert eng.block_manager.num_used_pages == 0


@pytest.mark.parametrize("shared_kv", [True, False])
def test_graph_sizes_compile_pass_runs_every_size_and_restores_the_model(shared_kv, monkeypatch):
    # StaticDecode.compile_sizes (before the CUDA graph capture): one forward per graph size, one
    # layer each, inside compile_only; afterwards the model has all its layers, no page is used and
    # requests decode exactly as the reference (CPU: the forward runs, with the reference attention).
    from nsa_serve.engine.decode_graphs import StaticDecode

    eng = make_engine(shared_kv, num_pages=64, max_num_seqs=5)
    static = eng.runner.static_decode = StaticDecode(eng.runner, 5, eng.max_model_len)  # CUDA-only in engines
    seen = []
    forward = static.forward
    monkeypatch.setattr(static, "forward", lambda x: seen.append((x["ids"].shape[0], len(eng.model.layers)))
                        or forward(x))
    inputs = {n: static.host_inputs([], n) for n in static.sizes}
    static.compile_sizes(inputs, threads=2)
    assert seen == [(n, 1) for n in static.sizes] and static.sizes[-1] == 5
    assert len(eng.model.layers) == eng.model.cfg.num_layers and eng.block_manager.num_used_pages == 0
    prompt = random_prompts(1, 40, 40, seed=9)[0]
    out = eng.generate([prompt], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == reference_greedy(eng.model, prompt, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_graph_capture_compiles_nothing_after_its_compile_pass(monkeypatch):
    # The capture's own forwards (two per size, then the captured one) meet only kernel variants
    # that compile_sizes compiled in its pool.
    from nsa_serve.engine.decode_graphs import StaticDecode

    counts = {}
    compile_sizes, capture = StaticDecode.compile_sizes, StaticDecode.capture

    def counted_compile(self, inputs, threads=None):
        compile_sizes(self, inputs, threads)
        counts["after compile pass"] = _compiled_variants()

    def counted_capture(self):
        capture(self)
        counts["after capture"] = _compiled_variants()

    monkeypatch.setattr(StaticDecode, "compile_sizes", counted_compile)
    monkeypatch.setattr(StaticDecode, "capture", counted_capture)
    eng = make_engine(True, device="cuda", dtype="bfloat16", num_pages=64, max_num_seqs=6, precompile=False)
    eng.warmup()
    assert eng.runner.static_decode.graphs and len(counts) == 2
    assert counts["after capture"] == counts["after compile pass"]


@pytest.mark.parametrize("extra", [[], ["--independent-kv", "--max-num-seqs", "6", "--requests", "14"]])
def test_precompile_plans_every_variant_a_mixed_workload_meets(extra):
    # scripts/check_precompile_coverage.py: the launches of the precompile's steps and of a served
    # workload (chunked prompts beside decoding ones), recorded as Triton's specialisation keys
    # with the launchers sized as on an H200. It found 9 variants the first plan missed (prompt
    # chunks after decode rows, unaligned plan slices, score strides), as the GPU test did.
    import os
    import subprocess
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).resolve().parents[1] / "scripts" / "check_precompile_coverage.py"
    r = subprocess.run([sys.executable, str(script), *extra], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ", 0 not planned" in r.stdout


def test_the_server_imports_and_warms_up_without_triton():
    # The README's serve command installs CPU torch without the test extra, so no triton: the
    # server's modules must not import it (the precompile imports it only on CUDA). Found by the
    # README check when precompile.py imported triton at module level.
    import subprocess

    code = (
        "import sys\n"
        "class NoTriton:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ModuleNotFoundError(\"No module named 'triton'\")\n"
        "sys.meta_path.insert(0, NoTriton())\n"
        "import nsa_serve.api.server, nsa_serve.engine.llm_engine\n"
        "from engine_helpers import make_engine\n"
        "eng = make_engine()\n"
        "eng.warmup()\n"
        "assert 'triton' not in sys.modules\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(__file__))
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
