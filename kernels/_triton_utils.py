"""Small shared pieces of the Triton decode kernels: sizing helpers and the split-K combine.

Every split-K kernel here writes, per (sequence, query head, split), an un-normalised partial
softmax state: the running max `m`, the running sum `l` of exp(s − m), and `acc` = Σ exp(s − m)·v
(all float32). `_combine_branch` merges them into one normalised attention output. An empty split
has m = NEG, l = 0, acc = 0 and contributes nothing; a branch with no key at all returns zeros,
which is the reference's convention for rows with nothing to attend to.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import warnings

import torch
import triton
import triton.language as tl

# A finite "minus infinity" for running maxima: exp(NEG − NEG) = 1 instead of NaN when a whole
# tile is masked, while exp(NEG − finite) is still exactly 0.
NEG = tl.constexpr(-1.0e30)


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def triton_release(version: str | None = None) -> tuple[int, int]:
    """(major, minor) of the installed Triton (or of `version`), for defaults measured per release."""
    major, minor = re.match(r"(\d+)(?:\.(\d+))?", version or triton.__version__).groups()
    return int(major), int(minor or 0)  # the minor's leading digits: "3.9rc1" is (3, 9)


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """Programs wanted per launch so that a small batch still covers every SM about twice."""
    if device.type == "cuda":
        return 2 * num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 8  # CPU interpreter: few programs keep the tests fast


def decode_rows_bound(num_kv_heads: int, device: torch.device) -> int:
    """Decode rows from which a larger batch meets no new kernel variant of the decode launchers
    (`nsa_decode`, `dense_paged_decode`): both size their grids from B·Hkv against
    `target_programs` (splits = programs wanted // groups, at least one), so once B·Hkv reaches it
    every such size is at its floor and the launches' constants and argument classes no longer
    change with B. A start-up precompile that covers 1 … this many rows covers every batch
    (scripts/count_decode_variants.py --check-bound tests it over several head shapes)."""
    return -(-target_programs(device) // max(1, num_kv_heads))


# Opt-in shared memory per block (bytes) by compute capability: CUDA programming guide.
MAX_SHARED = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}


def target_arch(device: torch.device) -> int:
    """Compute capability the kernels are built for, e.g. 90: the device's, or (no CUDA device:
    the compile check, the CPU interpreter) the active Triton target's, else 90."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    try:
        from triton.runtime.driver import driver

        arch = driver.active.get_current_target().arch
        return int(arch) if isinstance(arch, int) else 90
    except Exception:  # noqa: BLE001 (no GPU driver at all: any answer is fine for the interpreter)
        return 90


def pipeline_smem_budget(device: torch.device) -> int:
    """Shared memory a kernel's software-pipelined tile buffers may take on `device`'s target."""
    return arch_smem_budget(target_arch(device))


def arch_smem_budget(arch: int) -> int:
    """`pipeline_smem_budget` of compute capability `arch` (e.g. 90): its per-block limit less 24 KB
    for the rest (query tiles, layout conversions, reductions)."""
    return MAX_SHARED.get(arch, 101376) - 24 * 1024


@functools.lru_cache(maxsize=None)
def _pdl_supported(device_index: int) -> bool:
    from triton.backends.nvidia.compiler import CUDAOptions

    has_ops = all(hasattr(tl.extra.cuda, f) for f in ("gdc_wait", "gdc_launch_dependents"))
    has_launch = "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})
    return has_ops and has_launch and torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    """Programmatic dependent launch for a chain of kernels on `device`: Hopper or newer, a Triton
    that has it, and not switched off with NSA_PDL=0.

    Why: a decode step is a chain of short launches; with PDL the next kernel's programs are
    launched while the previous one drains, and wait on its completion (`griddepcontrol.wait`)
    inside the kernel instead of between launches. Every kernel launched this way waits before
    its first global memory access, so it is as safe as a plain launch after any kernel."""
    if device.type != "cuda" or os.environ.get("NSA_PDL", "1") == "0":
        return False
    return _pdl_supported(device.index if device.index is not None else torch.cuda.current_device())


def dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs would otherwise go through tf32 on the GPU (≈1e-3 error), enough to flip
    # near-tied block selections; half-precision inputs are exact products in fp32 anyway.
    return "ieee" if dtype == torch.float32 else "tf32"


def interpreter_upcast(dtype: torch.dtype) -> bool:
    """True when bf16 dot operands must be widened: the CPU interpreter (triton 3.9) multiplies
    bf16 operands as their raw uint16 bits. The upcast is exact, so results keep their meaning.

    The interpreter also rounds float32 → bfloat16 casts (and stores) toward zero, not to nearest
    as the GPU and torch do, so a kernel's bf16 results are up to twice as far from float64 on CPU
    as on the GPU (scripts/phi_accuracy_probe.py). CPU bounds for bf16 kernels allow for that."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        r = tl.dot(a, b, input_precision=PREC)
    return r


@triton.jit
def _online_softmax_step(m, l, acc, s, v, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One key tile of an online softmax: s [rows, keys] masked logits (−inf = excluded), v
    [keys, dv]. Returns the new (m, l, acc) and p = exp(s − m_new) (the compressed pass also
    turns p into selection scores)."""
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, UPCAST)
    return m_new, l, acc, p


@triton.jit
def topn_key(score, j, forced, visible):
    """int64 top-n keys of blocks j (decode and prefill): (float bits of score) << 32 | (2³¹ − 1 − j).
    Scores are ≥ 0, so their bits order like the floats; forced blocks get +inf's bits; −1 where
    not visible. Keys are distinct, so the n largest in descending order are the best blocks,
    ties going to the lower block index (the reference's stable descending sort)."""
    bits = score.to(tl.int32, bitcast=True).to(tl.int64)
    bits = tl.where(forced, 0x7F800000, bits)
    key = (bits << 32) | (0x7FFFFFFF - j).to(tl.int64)
    return tl.where(visible, key, -1)


@triton.jit
def topn_block(key):
    """The block index a `topn_key` names (−1 for a key < 0: no block)."""
    return tl.where(key >= 0, (0x7FFFFFFF - (key & 0x7FFFFFFF)).to(tl.int32), -1)


@triton.jit
def _load_q_halves(q_ptr, row_off, gmask, DK: tl.constexpr, DK0: tl.constexpr, DK1: tl.constexpr):
    """The group's query rows (`row_off` [GP] element offsets) as the operands of dk = DK0 + DK1,
    two power-of-two dots (192 = 128 + 64); q1 is q0 (unused) when DK1 = 0."""
    d0 = tl.arange(0, DK0)
    q0 = tl.load(q_ptr + row_off[:, None] + d0[None, :], mask=gmask[:, None] & (d0[None, :] < DK), other=0.0)
    q1 = q0
    if DK1 > 0:
        d1 = DK0 + tl.arange(0, DK1)
        q1 = tl.load(q_ptr + row_off[:, None] + d1[None, :], mask=gmask[:, None] & (d1[None, :] < DK),
                     other=0.0)
    return q0, q1


# CUfunction_attribute CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT (cuda.h); -1 = the
# driver's choice (CU_SHAREDMEM_CARVEOUT_DEFAULT), 100 = as much shared memory as the SM has.
_CARVEOUT_ATTR = 9
_carveouts: dict[int, int] = {}


# Triton's placeholder for a kernel still compiling under AsyncCompileMode (newer Triton only).
_FUTURE_KERNEL = getattr(triton, "FutureKernel", None)


@functools.lru_cache(maxsize=None)
def _libcuda():
    return ctypes.CDLL("libcuda.so.1")


def set_carveout(compiled, percent: int | None) -> None:
    """Preferred shared-memory carveout of a launched Triton kernel (`compiled`: what
    `kernel[grid](...)` returned), in percent of the SM's unified L1/shared memory; None: the
    driver's choice. Applies to its later launches (and graph replays).

    Why: Triton asks for the largest carveout only for kernels above 48 KB of shared memory. A
    small kernel left to the driver may run SMs in a smaller configuration, and a large-buffer
    kernel launched behind it (PDL) cannot share such an SM until it drains. No-op on the CPU
    interpreter; the driver call is made only when the value changes. A kernel still compiling
    (Triton's FutureKernel, under AsyncCompileMode) is left alone: asking it for its function would
    wait for the compile; the next launch sets it."""
    if _FUTURE_KERNEL is not None and isinstance(compiled, _FUTURE_KERNEL):
        return
    fn = getattr(compiled, "function", None)
    if not fn:
        return
    want = -1 if percent is None else int(percent)
    if _carveouts.get(fn, -1) == want:
        return
    _carveouts[fn] = want  # tried once per value: a refused hint costs speed, never the launch
    try:
        rc = _libcuda().cuFuncSetAttribute(ctypes.c_void_p(fn), ctypes.c_int(_CARVEOUT_ATTR), ctypes.c_int(want))
    except OSError as e:  # no libcuda.so.1 to load
        rc = str(e)
    if rc != 0:
        warnings.warn(f"could not set a kernel's preferred shared-memory carveout to {want}: {rc}", RuntimeWarning)


@contextlib.contextmanager
def jit_launches_replaced(wrap):
    """Within the block, `kernel[grid](...)` calls `wrap(original_run)` (same signature as
    Triton's `JITFunction.run`) instead of launching; the original is back on exit, errors
    included. For compile-only passes (compile_check, the engine's start-up precompile)."""
    from triton.runtime.jit import JITFunction

    original = JITFunction.run
    JITFunction.run = wrap(original)
    try:
        yield
    finally:
        JITFunction.run = original


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (got strides {t.stride()})")


@triton.jit
def _combine_branch(m_ptr, l_ptr, acc_ptr, row, nvalid, S_BUF, SP: tl.constexpr,
                    DV: tl.constexpr, DVP: tl.constexpr):
    """Merge the first `nvalid` of the S_BUF partial states stored for `row`; returns [DVP] fp32.

    All loads are issued up front (one [SP, DVP] tile): decode is latency-bound here."""
    s = tl.arange(0, SP)
    smask = s < nvalid
    dv = tl.arange(0, DVP)
    ms = tl.load(m_ptr + row * S_BUF + s, mask=smask, other=NEG)
    ls = tl.load(l_ptr + row * S_BUF + s, mask=smask, other=0.0)
    a = tl.load(acc_ptr + (row * S_BUF + s)[:, None] * DV + dv[None, :],
                mask=smask[:, None] & (dv[None, :] < DV), other=0.0).to(tl.float32)  # fp32 or bf16
    mx = tl.max(ms, 0)
    w = tl.exp(ms - mx)
    total = tl.sum(ls * w, 0)
    acc = tl.sum(a * w[:, None], 0)
    return acc / tl.where(total > 0, total, 1.0)


@triton.jit
def _combine_kernel(out_ptr, so_b, so_h, gates_ptr, sg_b, sg_h,
                    cm_ptr, cl_ptr, cacc_ptr, sm_ptr, sl_ptr, sacc_ptr, wm_ptr, wl_ptr, wacc_ptr,
                    Hq, NC_BUF, NS_BUF,
                    NSA: tl.constexpr, NC_P: tl.constexpr, NS_P: tl.constexpr, DV: tl.constexpr,
                    DVP: tl.constexpr, PDL: tl.constexpr = False):
    """One program per (sequence, query head). NSA: gated sum of three branches; else dense.
    Every split wrote its partial state (an empty split: m = NEG, l = 0, so it weighs nothing).
    The split counts are run-time values (only their powers of two, NC_P / NS_P, are constants):
    as constants they made eager decode steps compile a variant per count (scripts/
    count_decode_variants.py: 96 combine variants over batch 1–16 × 64k of table widths, now 12).
    PDL: launched with programmatic dependent launch (waits for the previous kernel first)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
    pid = tl.program_id(0)
    b = pid // Hq
    h = pid % Hq
    row = b * Hq + h
    dv = tl.arange(0, DVP)
    if NSA:
        o_c = _combine_branch(cm_ptr, cl_ptr, cacc_ptr, row, NC_BUF, NC_BUF, NC_P, DV, DVP)
        o_s = _combine_branch(sm_ptr, sl_ptr, sacc_ptr, row, NS_BUF, NS_BUF, NS_P, DV, DVP)
        o_w = _combine_branch(wm_ptr, wl_ptr, wacc_ptr, row, NS_BUF, NS_BUF, NS_P, DV, DVP)
        gp = gates_ptr + b * sg_b + h * sg_h
        g0 = tl.load(gp).to(tl.float32)
        g1 = tl.load(gp + 1).to(tl.float32)
        g2 = tl.load(gp + 2).to(tl.float32)
        o = g0 * o_c + g1 * o_s + g2 * o_w
    else:
        o = _combine_branch(sm_ptr, sl_ptr, sacc_ptr, row, NS_BUF, NS_BUF, NS_P, DV, DVP)
    tl.store(out_ptr + b * so_b + h * so_h + dv, o.to(out_ptr.dtype.element_ty), mask=dv < DV)
