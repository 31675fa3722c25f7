"""Does Triton's Gluon lower a value shared across a thread-block cluster to distributed shared memory?
A check on the CPU machine, for the batch-1 decode plan (docs/benchmarks/decode.md, thirty-fourth round).

    python3 scripts/gluon_cluster_check.py      # no GPU needed: compiles for sm_90 and reads the PTX

Why: a one-launch decode step whose kv group is one cluster would hand its score and merge phases'
few KB between CTAs through distributed shared memory (DSMEM) and the cluster barrier instead of
the L2 and a launch (scripts/cluster_floor.cu measures what that costs in CUDA C++). Triton 3.6
cannot say it; Triton 3.9 (what `pip install torch==2.13.0` brings) has layouts whose `cga_layout`
spreads a tensor over the cluster's CTAs. Each kernel below is compiled with num_ctas = 8 for an
H100 and its PTX searched for the instructions such a hand-off needs: `mapa` (another CTA's shared
address), `ld.shared::cluster` (the read) and `barrier.cluster` (the wait). Nothing is run.

- **sum**: 1 024 floats spread over 8 CTAs, summed to one value every CTA holds (a merge's shape);
- **gather**: the same floats converted to a layout every CTA holds whole (a top-n's gather of its
  group's scores), then a cluster barrier.
"""

from __future__ import annotations

import os
import shutil
import sys

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns unless set
os.environ.pop("TRITON_INTERPRET", None)  # compiled, not interpreted (the test suite sets it)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402

N = 1024  # floats over the cluster: 128 a CTA
NCTA = 8  # the cluster: bases [1], [2], [4] spread dim 0's 128-float CTA tiles over its 8 CTAs


@gluon.jit
def cluster_sum(x_ptr, o_ptr, N: gl.constexpr):
    spread: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0], cga_layout=[[1], [2], [4]])
    x = gl.load(x_ptr + gl.arange(0, N, layout=spread))
    gl.store(o_ptr, gl.sum(x, axis=0))


@gluon.jit
def cluster_gather(x_ptr, o_ptr, N: gl.constexpr):
    spread: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0], cga_layout=[[1], [2], [4]])
    whole: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0], cga_layout=[[0], [0], [0]])
    x = gl.load(x_ptr + gl.arange(0, N, layout=spread))
    y = gl.convert_layout(x, whole)
    gl.barrier(cluster=True)
    gl.store(o_ptr + gl.arange(0, N, layout=whole), y * 2)


def main() -> int:
    print(f"triton {triton.__version__}")
    ptxas = shutil.which("ptxas") or "/usr/local/cuda/bin/ptxas"
    if os.path.exists(ptxas):  # the wheel's own ptxas may be left out (scripts/pack_triton.sh)
        os.environ.setdefault("TRITON_PTXAS_PATH", ptxas)
        os.environ.setdefault("TRITON_PTXAS_BLACKWELL_PATH", ptxas)
    words = ("mapa", "ld.shared::cluster", "barrier.cluster")
    print(f"| kernel | compiles for sm_90, {NCTA} CTAs a cluster | " + " | ".join(words) + " |")
    print("|---|---|" + "---|" * len(words))
    failed = False
    for fn in (cluster_sum, cluster_gather):
        signature = {"x_ptr": "*fp32", "o_ptr": "*fp32", "N": "constexpr"}
        try:
            src = gluon._runtime.GluonASTSource(fn, signature, {"N": N})
            ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                 options={"num_ctas": NCTA, "num_warps": 4}).asm["ptx"]
        except Exception as e:  # Triton < 3.9 has no cga_layout: say so rather than a trace
            failed = True
            print(f"| {fn.__name__} | no: {type(e).__name__}: {str(e).splitlines()[0][:200]} |" + " |" * len(words))
            continue
        print(f"| {fn.__name__} | yes | " + " | ".join(str(ptx.count(w)) for w in words) + " |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
