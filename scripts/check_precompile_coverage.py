"""Does the start-up precompile (nsa_serve/engine/precompile.py) cover every Triton kernel variant
that served steps meet? Runs on a CPU, no GPU: the engine's attention is switched to the Triton
launchers (nsa_decode, nsa_prefill), and every launch is recorded instead of run — its
specialisation key as Triton forms it: constexpr values, launch options, and for each run-time
argument its class (a pointer 16-byte aligned or not, an integer equal to 1, divisible by 16 or
neither; `do_not_specialize` and `do_not_specialize_on_alignment` arguments excepted). The
launchers size themselves as on an H200 (132 SMs, PDL), as scripts/count_decode_variants.py does.

    python3 scripts/check_precompile_coverage.py [--independent-kv] [--requests 12] [--max-num-seqs 4]
        [--preset tiny --num-pages 64 --budget 96 --chunk 40]

First the precompile's synthetic steps are recorded (`precompile.plan` + `run_steps`), then a
workload of chunked prompts beside decoding ones (mixed steps) through the real scheduler; the
script prints the keys the workload met that the precompile did not, and exits 1 if there are
any. Decode steps run eagerly (`enforce_eager`), so every decode-row count is an eager step, as
with `--enforce-eager` (with graphs, decode-only steps replay graphs compiled at capture).
Outputs are garbage by design (nothing runs); only the step shapes matter, and those follow the
prompt lengths and `max_tokens`.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # real JITFunctions: their launches are what is recorded

import torch  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

OPTIONS = ("num_warps", "num_stages", "launch_pdl", "maxnreg")


def key_of(fn: JITFunction, args, kwargs) -> tuple:
    """Triton's specialisation of one launch, as classes (see the module docstring)."""
    parts = []
    params = {p.name: p for p in fn.params}
    bound = dict(zip((p.name for p in fn.params), args))
    bound.update(kwargs)
    for name, value in sorted(bound.items()):
        p = params.get(name)
        if p is None:  # a launch option
            if name in OPTIONS:
                parts.append((name, value))
            continue
        if p.is_constexpr:
            parts.append((name, value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)))
        elif isinstance(value, torch.Tensor):  # aligned or not, unless the kernel does not specialise on it
            aligned = None if getattr(p, "do_not_specialize_on_alignment", False) else value.data_ptr() % 16 == 0
            parts.append((name, str(value.dtype), aligned))
        elif isinstance(value, bool) or value is None or isinstance(value, float):
            parts.append((name, type(value).__name__))
        elif isinstance(value, int):
            parts.append((name, "int") if p.do_not_specialize else (name, value == 1, value % 16 == 0))
        else:
            parts.append((name, type(value).__name__))
    return (fn.fn.__name__, tuple(parts))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--independent-kv", action="store_true", help="a model with independent K/V per branch")
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--max-num-seqs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--preset", default="tiny", help="model shape (nsa_serve.model.config presets)")
    ap.add_argument("--num-pages", type=int, default=64, help="page pool (sets max_model_len)")
    ap.add_argument("--budget", type=int, default=96, help="max_num_batched_tokens")
    ap.add_argument("--chunk", type=int, default=40, help="long_prefill_token_threshold")
    a = ap.parse_args(argv)

    import nsa_kernels.nsa_decode as nd
    from nsa_kernels._triton_utils import arch_smem_budget
    from nsa_kernels.nsa_prefill import nsa_prefill, plan_prefill
    from nsa_serve.engine import precompile as pc
    from nsa_serve.engine.args import EngineArgs
    from nsa_serve.engine.llm_engine import LLMEngine
    from nsa_serve.engine.protocol import SamplingParams
    from nsa_serve.model.init_model import init_model

    seen: set = set()
    original = JITFunction.run, nd.target_programs, nd.pipeline_smem_budget, nd.pdl_enabled

    def record(self, *args, grid, warmup, **kwargs):
        seen.add(key_of(self, args, kwargs))

    model_dir = init_model(tempfile.mkdtemp(prefix="nsa-coverage-") + "/m", a.preset, seed=0,
                           shared_kv=not a.independent_kv)
    eng = LLMEngine(EngineArgs(model=str(model_dir), device="cpu", dtype="bfloat16", num_pages=a.num_pages,
                               max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.budget,
                               long_prefill_token_threshold=a.chunk, enforce_eager=True, precompile=False))
    att = eng.runner.attention
    att.decode_fn, att.prefill_fn, att.prefill_plan_fn = nd.nsa_decode, nsa_prefill, plan_prefill
    JITFunction.run = record
    nd.target_programs = lambda dev: 2 * 132
    nd.pipeline_smem_budget = lambda dev: arch_smem_budget(90)  # an H100 / H200
    nd.pdl_enabled = lambda dev: True
    try:
        pc.run_steps(eng.runner, pc.plan(a.max_num_seqs, eng.max_model_len, eng.runner.P, eng._max_chunk()))
        planned = set(seen)
        seen.clear()
        rng = random.Random(a.seed)
        V = eng.model.cfg.vocab_size
        prompts = [[rng.randrange(8, V) for _ in range(rng.randint(20, eng.max_model_len // 2))]
                   for _ in range(a.requests)]
        eng.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        met = set(seen)
    finally:
        JITFunction.run, nd.target_programs, nd.pipeline_smem_budget, nd.pdl_enabled = original
    missing = met - planned
    by_kernel: dict[str, list[int]] = {}
    for k in met:
        by_kernel.setdefault(k[0], [0, 0])[0] += 1
    for k in missing:
        by_kernel[k[0]][1] += 1
    print(f"{a.preset}, {'independent' if a.independent_kv else 'shared'} K/V, max_model_len {eng.max_model_len}: "
          f"precompile planned {len(planned)} variants; the workload met {len(met)}, {len(missing)} not planned")
    for name, (n, m) in sorted(by_kernel.items()):
        print(f"  {name}: met {n}, not planned {m}")
    for k in sorted(missing, key=repr)[:5]:
        print("  missing:", k)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
