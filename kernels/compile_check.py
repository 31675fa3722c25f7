"""Compile every Triton kernel for NVIDIA targets without a GPU, and report registers, local memory
(spills) and shared memory per kernel.

    python -m nsa_kernels.compile_check                    # sm_80 and sm_90, paper + d128 shapes
    python -m nsa_kernels.compile_check --arch 80 --shape paper --dtype bf16

Why: the design card targets A100 (sm_80) as well as H100/H200 (sm_90), and every tuning decision
in docs/benchmarks/ (4 warps, dk split 128 + 64, 128-row prefill tiles) rests on "no spills". Both
can be checked on a CPU machine: the real launchers run on CPU tensors of the real shapes, each
launch is compiled (not run) for the chosen target by Triton's own pipeline and the `ptxas` its
wheel ships, and `cuobjdump --dump-resource-usage` reads the result. Exit status 1 when a kernel
fails to compile or asks for more shared memory than a block may have on that target; with
`--strict` also when one uses local memory (a register spill or a stack array).

It is not a substitute for running on the GPU (the device's Triton may schedule differently), but
it costs no device time and catches a kernel that will not build for a target at all.
Must run in a process without TRITON_INTERPRET=1 (kernels are decorated at import time).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace

import torch

# (Triton's multiply-add fusion default is pinned by the package's __init__, imported first.)
from ._triton_utils import MAX_SHARED, jit_launches_replaced


@dataclass
class KernelReport:
    case: str
    kernel: str
    arch: int
    num_warps: int
    registers: int
    local_bytes: int
    shared_bytes: int
    error: str = ""

    @property
    def builds(self) -> bool:
        """Compiles, and fits the target's shared memory per block."""
        return not self.error and self.shared_bytes <= MAX_SHARED.get(self.arch, 1 << 30)

    @property
    def status(self) -> str:
        if self.error:
            return "FAIL " + self.error
        if not self.builds:
            return f"FAIL shared memory over the sm_{self.arch} limit of {MAX_SHARED[self.arch]} B"
        return "spill" if self.local_bytes else "ok"


class _CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: reports the chosen target, never touches a device."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else "cuobjdump"


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, local bytes per thread) of a cubin, from cuobjdump's resource report."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", text)
    if not m:
        raise RuntimeError(f"unexpected cuobjdump output: {text[-400:]}")
    return int(m.group(1)), int(m.group(2)) + int(m.group(3))


@contextlib.contextmanager
def compile_only(arch: int, sink: list):
    """Within the block, `kernel[grid](...)` compiles for sm_`arch` and appends (name, compiled)
    to `sink` instead of launching."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_check must run without TRITON_INTERPRET=1 (kernels would be interpreted)")
    from triton.runtime.driver import driver

    def wrap(original):
        def run(self, *args, grid, warmup, **kwargs):
            if getattr(self, "_compile_check_arch", None) != arch:
                self.device_caches.clear()  # its binder holds the target of the first compile
                self._compile_check_arch = arch
            sink.append((self.fn.__name__, original(self, *args, grid=grid, warmup=True, **kwargs)))
        return run

    previous = getattr(driver, "_active", None)  # None on a machine without a GPU driver
    driver.set_active(_CompileOnlyDriver(arch))
    try:
        with jit_launches_replaced(wrap):
            yield
    finally:
        driver._active = previous


SHAPES = {  # (query heads, kv heads, dk, dv)
    "paper": (64, 4, 192, 128),
    "d128": (64, 4, 128, 128),
    "g1": (4, 4, 64, 64),  # group size 1: the smallest padded case
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _cases(shape: str, dtype: torch.dtype):
    """(name, thunk) pairs that call each launcher at `shape` with CPU tensors; nothing is read."""
    from .add_rms_norm import add_rms_norm
    from .cache_write import gather_block_pair, gather_blocks, write_kv, write_kv_pair, write_mean_summaries
    from .dense_decode import dense_paged_decode
    from .nsa_decode import nsa_decode, nsa_decode_tuned
    from .nsa_prefill import DEFAULT_CONFIG, nsa_prefill
    from .paged import PagedLayerCache
    from .phi_decode import phi_write_pair
    from .reference import SparsityParams
    from .rope import rope_rotate, rope_rotate_and_sigmoid, rope_rotate_sigmoid_write
    from .silu_mul import silu_mul

    Hq, Hkv, Dk, Dv = SHAPES[shape]
    p = SparsityParams(block=32, stride=16, select_block=64, num_select=16, window=512)
    P, E = p.select_block, p.select_block // p.stride
    # Register use of the decode top-n grows with the table width (NBP), so the widest context the
    # benchmarks use (128k = 2048 pages) is what is compiled. Caches can be tiny: only shapes,
    # strides and dtypes reach the compiler.
    pages, B = 2048, 2
    layer = PagedLayerCache(torch.empty(4, Hkv, P, Dk, dtype=dtype), torch.empty(4, Hkv, P, Dv, dtype=dtype),
                            torch.empty(4, Hkv, E, Dk, dtype=dtype), torch.empty(4, Hkv, E, Dv, dtype=dtype))
    bt = torch.zeros(B, pages, dtype=torch.int32)
    lens = torch.full((B,), pages * P, dtype=torch.int32)
    q1 = torch.empty(B, Hq, Dk, dtype=dtype)
    g1 = torch.empty(B, Hq, 3, dtype=dtype)
    ring = torch.zeros(B, (p.window + 2048) // P, dtype=torch.int32)
    T = 256  # prefill rows: the launcher's tile layout is host-side, the kernels do not depend on T
    qp = torch.empty(T, Hq, Dk, dtype=dtype)
    gp = torch.empty(T, Hq, 3, dtype=dtype)
    cu = torch.tensor([0, T], dtype=torch.int32)
    plens = torch.tensor([pages * P], dtype=torch.int32)
    x = torch.empty(T, Hkv, Dk, dtype=dtype)
    xv = torch.empty(T, Hkv, Dv, dtype=dtype)
    hid = torch.empty(T, 2048, dtype=dtype)  # paper-1b's hidden size
    slots = torch.zeros(T, dtype=torch.long)
    bslots = torch.zeros(8, p.block, dtype=torch.long)
    sslots = torch.zeros(8, dtype=torch.long)
    dm = max(Dk, Dv)
    phi_weights = (torch.empty(2, p.block * dm, dm, dtype=dtype), torch.empty(2, 1, dm, dtype=dtype),
                   torch.empty(2, dm, dm, dtype=dtype))
    return [
        ("nsa_decode", lambda: nsa_decode(q1, g1, layer, bt, lens, p)),  # B·Hkv ≤ 8: small-batch tiles
        ("nsa_decode batch 4", lambda: nsa_decode(q1.repeat(2, 1, 1), g1.repeat(2, 1, 1), layer, bt.repeat(2, 1),
                                                  lens.repeat(2), p)),
        ("nsa_decode ring", lambda: nsa_decode(q1, g1, layer, bt, lens, p, win_tables=ring)),
        ("nsa_decode batch 16, values after keys",  # the default there with PDL (sm_90)
         lambda: nsa_decode_tuned(q1.repeat(8, 1, 1), g1.repeat(8, 1, 1), layer, bt.repeat(8, 1), lens.repeat(8),
                                  p, values_after_keys=True)),
        ("nsa_decode batch 16, fused merge of 4 splits",  # the GPU's batch-16 launch: 4 + 4 splits,
         # merged in the attention kernel, MERGE_CHUNK splits a step (Triton 3.7.1 spilled 264 B at 4)
         lambda: nsa_decode_tuned(q1.repeat(8, 1, 1), g1.repeat(8, 1, 1), layer, bt.repeat(8, 1), lens.repeat(8),
                                  p, values_after_keys=True, cmp_programs=256, num_splits=4, fuse_combine=True)),
        ("nsa_decode top-n over every block", lambda: nsa_decode_tuned(q1, g1, layer, bt, lens, p, topn="sort")),
        ("dense_paged_decode", lambda: dense_paged_decode(q1, layer, bt, lens)),
        ("dense_paged_decode previous", lambda: dense_paged_decode(q1, layer, bt, lens, launch="previous")),
        ("nsa_prefill", lambda: nsa_prefill(qp, gp, layer, bt[:1], cu, plens, p)),
        ("nsa_prefill ring", lambda: nsa_prefill(qp, gp, layer, bt[:1], cu, plens, p, win_tables=ring[:1])),
        ("nsa_prefill top-n kernel",  # the default takes the top-n in _slc_kernel
         lambda: nsa_prefill(qp, gp, layer, bt[:1], cu, plens, p, config=replace(DEFAULT_CONFIG, slc_topn=0))),
        ("nsa_prefill window kernel apart",  # the default runs the window in the first compressed launch
         lambda: nsa_prefill(qp, gp, layer, bt[:1], cu, plens, p, config=replace(DEFAULT_CONFIG, win_fused=0))),
        ("nsa_prefill scores as products",  # the default sums them in registers
         lambda: nsa_prefill(qp, gp, layer, bt[:1], cu, plens, p, config=replace(DEFAULT_CONFIG, score_sums=0))),
        ("write_kv", lambda: write_kv(layer.k_cache, x, slots)),
        ("write_kv_pair", lambda: write_kv_pair(layer.k_cache, layer.v_cache, x, xv, slots)),
        ("add_rms_norm", lambda: add_rms_norm(hid, hid, torch.empty(2048, dtype=dtype), 1e-6)),
        ("silu_mul", lambda: silu_mul(torch.empty(T, 2 * 5632, dtype=dtype))),  # paper-1b's MLP width
        ("gather_blocks", lambda: gather_blocks(layer.k_cache, bslots)),
        ("gather_block_pair", lambda: gather_block_pair(layer.k_cache, layer.v_cache, bslots)),
        ("rope_rotate", lambda: rope_rotate(qp, torch.empty(T, Dk), torch.empty(T, Dk))),
        ("rope_rotate_and_sigmoid", lambda: rope_rotate_and_sigmoid(qp, torch.empty(T, Dk), torch.empty(T, Dk),
                                                                    gp.view(T, 3 * Hq))),
        ("rope_rotate_sigmoid_write",  # q and key heads rotated, gates, the token's K/V written
         lambda: rope_rotate_sigmoid_write(torch.empty(T, Hq + Hkv, Dk, dtype=dtype), torch.empty(T, Dk),
                                           torch.empty(T, Dk), gp.view(T, 3 * Hq), layer.k_cache, layer.v_cache,
                                           xv, slots)),
        ("write_mean_summaries", lambda: write_mean_summaries(layer.k_cache, layer.v_cache, layer.kc_cache,
                                                              layer.vc_cache, bslots, sslots)),
        ("phi_write_pair", lambda: phi_write_pair(layer.k_cache, layer.v_cache, bslots, layer.kc_cache,
                                                  layer.vc_cache, sslots, *phi_weights)),
    ]


def check(archs=(80, 90), shapes=("paper", "d128", "g1"), dtypes=("bf16", "fp16")) -> list[KernelReport]:
    reports: list[KernelReport] = []
    for arch in archs:
        for shape in shapes:
            for dt in dtypes:
                for name, thunk in _cases(shape, DTYPES[dt]):
                    case = f"{name} [{shape} {dt}]"
                    sink: list = []
                    try:
                        with compile_only(arch, sink):
                            thunk()
                    except Exception as exc:  # a compile error: report it, keep checking the rest
                        reports.append(KernelReport(case, "?", arch, 0, 0, 0, 0, f"{type(exc).__name__}: {exc}"))
                        continue
                    for kname, k in sink:
                        regs, local = _resources(k.asm["cubin"])
                        reports.append(KernelReport(case, kname, arch, k.metadata.num_warps, regs, local,
                                                    k.metadata.shared))
    return reports


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="80,90", help="compute capabilities, e.g. 80,90")
    ap.add_argument("--shape", default=",".join(SHAPES), help=f"any of {','.join(SHAPES)}")
    ap.add_argument("--dtype", default="bf16,fp16", help="bf16 and/or fp16")
    ap.add_argument("--strict", action="store_true", help="also fail on local memory (spills)")
    a = ap.parse_args(argv)
    reports = check(tuple(int(x) for x in a.arch.split(",")), tuple(a.shape.split(",")), tuple(a.dtype.split(",")))
    seen = set()
    print(f"{'arch':>4}  {'case':<34} {'kernel':<24} {'warps':>5} {'regs':>4} {'local B':>7} {'shared B':>8}  ok")
    for r in reports:
        key = (r.arch, r.case.split(" [")[0], r.kernel, r.registers, r.local_bytes, r.shared_bytes, r.error)
        if key in seen:  # the same kernel compiled the same way for another case: print once
            continue
        seen.add(key)
        print(f"sm{r.arch}  {r.case:<34} {r.kernel:<24} {r.num_warps:>5} {r.registers:>4} {r.local_bytes:>7} "
              f"{r.shared_bytes:>8}  {r.status}")
    bad = [r for r in reports if not r.builds or (a.strict and r.local_bytes)]
    spills = sum(1 for r in reports if r.builds and r.local_bytes)
    print(f"{len(reports)} compilations: {len(bad)} failing, {spills} with local memory (spills)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
