"""The NSA decode step's kernels as a GPU launches them, compiled for sm_90 on a machine without one:
per kernel, registers, local memory, instructions and the counts of chosen SASS opcodes.

Why: on the H100, Triton 3.9 ran the batch-16 step 9 µs slower than Triton 3.6 in the attention
kernel's fused split merge (docs/benchmarks/decode.md, thirty-sixth round). `nsa_kernels.compile_check`
showed nothing — its decode cases run with the CPU's few programs (one split) and it reports only
registers and local memory — while this count, of the launch the GPU makes, did: 153 barriers and
504 shuffles on 3.9 against 42 and 87 on 3.6. Run it under each Triton to compare before spending
device time, e.g. the project's virtualenv (3.9) and the 3.6 one of docs/benchmarks/compile.md:

    PYTHONPATH=<dir where nsa_kernels names kernels/> python scripts/decode_sass_counts.py --batch 16
    ... --batch 16 --merge-chunk 1         # a launch knob of nsa_decode_tuned
    ... --batch 8 --fuse 1 --splits 8

The grid is sized as on a GPU with --sms SMs (132: H100 and H200), with programmatic dependent
launch on (sm_90's default); the caches are tiny CPU tensors (only shapes and strides reach the
compiler), the block table --ctx tokens wide. The ptxas and cuobjdump are those compile_check uses.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
import subprocess
import sys
import tempfile

import torch

OPCODES = ("BAR", "SHFL", "LDGSTS", "LDG", "STG", "LDS", "STS", "HMMA", "MUFU", "ATOMG")
# A SASS line: /*addr*/ [predicate] OPCODE.modifiers operands ;
_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)[.\s;]")


def opcode_counts(sass: str) -> collections.Counter:
    """Instructions of a `cuobjdump -sass` listing by opcode (modifiers dropped: BAR.SYNC → BAR)."""
    return collections.Counter(m.group(1) for m in _INSTR.finditer(sass))


@contextlib.contextmanager
def gpu_sizing(module, sms: int, arch: int):
    """Within the block, `module`'s launchers size grids and pipeline buffers as on a GPU with `sms`
    SMs of compute capability `arch` (on CPU tensors they would use the interpreter's few programs)."""
    from nsa_kernels._triton_utils import arch_smem_budget

    saved = module.target_programs, module.pipeline_smem_budget
    module.target_programs = lambda dev: 2 * sms
    module.pipeline_smem_budget = lambda dev: arch_smem_budget(arch)
    try:
        yield
    finally:
        module.target_programs, module.pipeline_smem_budget = saved


def compile_step(batch: int, ctx: int, sms: int = 132, arch: int = 90, **knobs) -> list[tuple[str, object]]:
    """(kernel name, compiled kernel) of one paper-shape bf16 decode step at `batch` × `ctx`."""
    from nsa_kernels import compile_check as cc
    from nsa_kernels import nsa_decode as nd
    from nsa_kernels.paged import PagedLayerCache
    from nsa_kernels.reference import SparsityParams

    p = SparsityParams(block=32, stride=16, select_block=64, num_select=16, window=512)
    Hq, Hkv, Dk, Dv, P = 64, 4, 192, 128, p.select_block
    E, dt, pages = P // p.stride, torch.bfloat16, -(-ctx // P)
    layer = PagedLayerCache(torch.empty(4, Hkv, P, Dk, dtype=dt), torch.empty(4, Hkv, P, Dv, dtype=dt),
                            torch.empty(4, Hkv, E, Dk, dtype=dt), torch.empty(4, Hkv, E, Dv, dtype=dt))
    tables = torch.zeros(batch, pages, dtype=torch.int32)
    lens = torch.full((batch,), ctx, dtype=torch.int32)
    q, gates = torch.empty(batch, Hq, Dk, dtype=dt), torch.empty(batch, Hq, 3, dtype=dt)
    sink: list = []
    with gpu_sizing(nd, sms, arch), cc.compile_only(arch, sink):
        nd.nsa_decode_tuned(q, gates, layer, tables, lens, p, pdl=True, **knobs)
    return sink


def report(sink) -> list[dict]:
    """Per kernel: name, warps, registers, local bytes, instructions and OPCODES counts."""
    from nsa_kernels import compile_check as cc

    rows = []
    for name, kernel in sink:
        cubin = kernel.asm["cubin"]
        regs, local = cc._resources(cubin)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            sass = subprocess.run([cc._cuobjdump(), "-sass", f.name], capture_output=True, text=True,
                                  check=True).stdout
        ops = opcode_counts(sass)
        rows.append(dict(kernel=name, warps=kernel.metadata.num_warps, registers=regs, local=local,
                         instructions=sum(ops.values()), **{op: ops[op] for op in OPCODES}))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=65536)
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--splits", type=int, help="attention splits a group (num_splits)")
    ap.add_argument("--fuse", choices=("auto", "0", "1"), default="auto", help="fuse_combine")
    ap.add_argument("--merge-chunk", type=int, help="splits the fused merge takes a step")
    ap.add_argument("--values-after-keys", choices=("auto", "0", "1"), default="auto")
    args = ap.parse_args(argv)
    import triton

    knobs = dict(num_splits=args.splits, merge_chunk=args.merge_chunk,
                 fuse_combine=None if args.fuse == "auto" else args.fuse == "1",
                 values_after_keys=None if args.values_after_keys == "auto" else args.values_after_keys == "1")
    rows = report(compile_step(args.batch, args.ctx, args.sms, args.arch, **knobs))
    print(f"triton {triton.__version__}, sm_{args.arch}, {args.sms} SMs, paper shape bf16, batch {args.batch}, "
          f"ctx {args.ctx}, PDL on, knobs {({k: v for k, v in knobs.items() if v is not None})}")
    cols = ["kernel", "warps", "registers", "local", "instructions", *OPCODES]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    sys.exit(main())
