"""Rotate-half RoPE as one Triton kernel: x [T, H, D] rotated by per-token tables, in x's dtype.

The PyTorch form (`nsa_serve.model.nsa_model.Rope`, the twin the tests compare against) is a cast,
a concatenation of the halves, two products, a sum and a cast back: six launches for each of q and
k in every layer of a decode step. Here it is one: each program rotates one token's heads,
out₁ = x₁·cos − x₂·sin and out₂ = x₂·cos + x₁·sin, in float32.

`rope_rotate_and_sigmoid` also takes the branch gates' logits, which come from the same fused
projection: a strided slice of its output, on which torch's sigmoid is its own launch with a
non-vectorised loop (34 µs a 16-layer decode step at 8 and 16 sequences on the H200,
docs/benchmarks/engine.md, twenty-seventh round). Here the rotation's first head-block programs
apply it in the same launch.

`rope_rotate_sigmoid_write` also stores the step's keys (the rotated key heads) and values into
their page slots, which the engine did with its own launch right after (`cache_write.write_kv_pair`,
~27 µs a 16-layer decode step at 8 sequences: docs/benchmarks/engine.md): the rows are in registers
here already, so the write costs no second read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import next_pow2


@triton.jit
def _rope_kernel(x_ptr, sx_t, sx_h, cos_ptr, sin_ptr, sc_t, out_ptr, so_t, so_h, H,
                 g_ptr, sg_t, go_ptr, NG,
                 kc_ptr, skc_p, skc_h, skc_r, vc_ptr, svc_p, svc_h, svc_r, v_ptr, sv_t, sv_h, slots_ptr, KEY0,
                 HALF: tl.constexpr, HALF_P: tl.constexpr, BH: tl.constexpr,
                 SIG: tl.constexpr, NG_P: tl.constexpr,
                 WRITE: tl.constexpr, R: tl.constexpr, HKV: tl.constexpr, HKV_P: tl.constexpr,
                 DV: tl.constexpr, DV_P: tl.constexpr):
    """Program (t, head block): heads [hb·BH, hb·BH + BH) of token t. The tables are the Rope
    class's: cos = [cos, cos], sin = [−sin, sin] (signed), so out₂ uses sin's second half and
    out₁ subtracts the same value. SIG: program (t, 0) also writes sigmoid(g[t, :NG]) to go[t]
    (float32 math, rounded once to the output's dtype, as torch.sigmoid does).
    WRITE: heads KEY0 … H − 1 are the keys; their rotated rows (as rounded into out) also go to
    the key cache at slots[t] (page slot // R, row slot % R), and program (t, 0) copies v[t]
    [HKV, DV] to the value cache there; a negative slot writes nothing (padding rows)."""
    t = tl.program_id(0).to(tl.int64)
    if SIG:
        if tl.program_id(1) == 0:
            j = tl.arange(0, NG_P)
            g = tl.load(g_ptr + t * sg_t + j, mask=j < NG, other=0.0).to(tl.float32)
            tl.store(go_ptr + t * NG + j, (1.0 / (1.0 + tl.exp(-g))).to(go_ptr.dtype.element_ty), mask=j < NG)
    h = tl.program_id(1) * BH + tl.arange(0, BH)
    d = tl.arange(0, HALF_P)
    dm = d < HALF
    m = (h < H)[:, None] & dm[None, :]
    xp = x_ptr + t * sx_t + h[:, None] * sx_h + d[None, :]
    x1 = tl.load(xp, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(xp + HALF, mask=m, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + t * sc_t + d, mask=dm, other=0.0)[None, :]
    s = tl.load(sin_ptr + t * sc_t + HALF + d, mask=dm, other=0.0)[None, :]
    o1 = (x1 * c - x2 * s).to(out_ptr.dtype.element_ty)
    o2 = (x2 * c + x1 * s).to(out_ptr.dtype.element_ty)
    op = out_ptr + t * so_t + h[:, None] * so_h + d[None, :]
    tl.store(op, o1, mask=m)
    tl.store(op + HALF, o2, mask=m)
    if WRITE:
        slot = tl.load(slots_ptr + t).to(tl.int64)
        page, row = slot // R, slot % R
        # The slot test as a vector (h·0 + slot): the interpreter refuses a scalar in a mask.
        km = m & ((h >= KEY0) & (h * 0 + slot >= 0))[:, None]
        kp = kc_ptr + page * skc_p + (h - KEY0)[:, None] * skc_h + row * skc_r + d[None, :]
        tl.store(kp, o1.to(kc_ptr.dtype.element_ty), mask=km)
        tl.store(kp + HALF, o2.to(kc_ptr.dtype.element_ty), mask=km)
        if tl.program_id(1) == 0:
            hv = tl.arange(0, HKV_P)
            dv = tl.arange(0, DV_P)
            vm = ((hv < HKV) & (hv * 0 + slot >= 0))[:, None] & (dv < DV)[None, :]
            vals = tl.load(v_ptr + t * sv_t + hv[:, None] * sv_h + dv[None, :], mask=vm)
            tl.store(vc_ptr + page * svc_p + hv[:, None] * svc_h + row * svc_r + dv[None, :],
                     vals.to(vc_ptr.dtype.element_ty), mask=vm)


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] (last dim contiguous), cos / sin float32 [T, 1, D] or [T, D] with the Rope
    class's layout → a new [T, H, D] tensor in x's dtype."""
    return _launch(x, cos, sin, None)[0]


def rope_rotate_and_sigmoid(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                            g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope_rotate(x, cos, sin)` and sigmoid(g) in one launch. g [T, NG] (last dim contiguous,
    any token stride: a slice of the projection's output) → a new contiguous [T, NG] tensor in
    g's dtype."""
    _check_gates("rope_rotate_and_sigmoid", x, g)
    return _launch(x, cos, sin, g)


def _check_gates(caller: str, x: torch.Tensor, g: torch.Tensor) -> None:
    if g.dim() != 2 or g.shape[0] != x.shape[0] or (g.shape[1] > 1 and g.stride(1) != 1):
        raise ValueError(f"{caller} needs gate logits [T, NG] with a contiguous last dim, "
                         f"got shape {tuple(g.shape)} strides {g.stride()} for {x.shape[0]} tokens")


def rope_rotate_sigmoid_write(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, g: torch.Tensor,
                              k_cache: torch.Tensor, v_cache: torch.Tensor, v: torch.Tensor,
                              slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope_rotate_and_sigmoid(x, cos, sin, g)`, and in the same launch the last Hkv heads of the
    rotated x (the keys: x is [T, Hq + Hkv, D]) stored into k_cache [pages, Hkv, R, D] and v
    [T, Hkv, Dv] into v_cache [pages, Hkv, R, Dv] at flattened (page, row) slots [T]; a negative
    slot skips its token. The caches end as `cache_write.write_kv_pair(k_cache, v_cache,
    rotated[:, Hq:], v, slots)` leaves them (tests compare bit for bit)."""
    if k_cache.dim() != 4 or v_cache.dim() != 4 or k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"caches must be [pages, Hkv, R, D] alike, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    Hkv = k_cache.shape[1]
    if x.dim() != 3 or x.shape[1] < Hkv or x.shape[2] != k_cache.shape[3]:
        raise ValueError(f"x {tuple(x.shape)} must be [T, Hq + Hkv, D] for a key cache {tuple(k_cache.shape)}")
    if v.dim() != 3 or v.shape != (x.shape[0], Hkv, v_cache.shape[3]) or v.stride(-1) != 1:
        raise ValueError(f"v {tuple(v.shape)} must be [T, Hkv, Dv] = [{x.shape[0]}, {Hkv}, {v_cache.shape[3]}] "
                         f"with a contiguous last dim")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the caches need a contiguous last dim")
    if slots.shape != (x.shape[0],) or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slots must be an int32/int64 vector of length {x.shape[0]}")
    _check_gates("rope_rotate_sigmoid_write", x, g)
    return _launch(x, cos, sin, g, (k_cache, v_cache, v, slots.contiguous()))


def _launch(x, cos, sin, g, write=None):
    T, H, D = x.shape
    if D % 2 or x.stride(-1) != 1:
        raise ValueError(f"rope_rotate needs an even, contiguous last dim, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")
    cos, sin = cos.reshape(T, D), sin.reshape(T, D)
    if (cos.dtype != torch.float32 or sin.dtype != torch.float32 or cos.stride(-1) != 1
            or sin.stride() != cos.stride()):
        raise ValueError("rope_rotate needs float32 tables [T, D] with a contiguous last dim")
    out = torch.empty((T, H, D), dtype=x.dtype, device=x.device)
    gout = None if g is None else torch.empty(g.shape, dtype=g.dtype, device=g.device)
    if T == 0:
        return out, gout
    half_p = next_pow2(D // 2)
    bh = max(1, min(next_pow2(H), 4096 // half_p))  # about 4096 elements of each half a program
    ng = 0 if g is None else g.shape[1]
    if write is None:
        kc = vc = v = slots = x  # unused (WRITE off): any tensor pointer
        kc_s = vc_s = (0, 0, 0)
        v_s, key0, R, Hkv, Dv = (0, 0), H, 1, 1, 1
    else:
        kc, vc, v, slots = write
        kc_s, vc_s, v_s = kc.stride()[:3], vc.stride()[:3], v.stride()[:2]
        key0, R, Hkv, Dv = H - kc.shape[1], kc.shape[2], kc.shape[1], vc.shape[3]
    _rope_kernel[(T, triton.cdiv(H, bh))](
        x, x.stride(0), x.stride(1), cos, sin, cos.stride(0), out, out.stride(0), out.stride(1), H,
        x if g is None else g, 0 if g is None else g.stride(0), out if g is None else gout, ng,
        kc, *kc_s, vc, *vc_s, v, *v_s, slots, key0,
        HALF=D // 2, HALF_P=half_p, BH=bh, SIG=g is not None and ng > 0, NG_P=next_pow2(max(ng, 1)),
        WRITE=write is not None, R=R, HKV=Hkv, HKV_P=next_pow2(Hkv), DV=Dv, DV_P=next_pow2(Dv),
        num_warps=4)
    return out, gout
