"""Probe for the prefill plan's item 2: does a compressed sweep whose matrix products overlap its
softmax run faster than the Triton one? (docs/benchmarks/prefill.md, twenty-fifth session.)

    python3 scripts/gluon_cmp_probe.py                 # GPU (sm_90): check against torch, then time
    python3 scripts/gluon_cmp_probe.py --compile-only  # CPU: build both kernels for sm_90, print resources

Nsight Compute showed `_cmp_kernel`'s warps waiting on their own warpgroup MMAs (24 % of stall
samples) and TMA copies (18 %), the tensor pipe busy 45.5 % of the time. Triton 3.6 waits for
every MMA at once. This probe times one sweep of the kernel's shape both ways, on the same inputs:
flash attention of G = 16 heads × (BM / 16) queries against N packed summaries (dk 192 = 128 + 64,
dv 128, bf16), every query seeing every summary (the unmasked chunks, most of the work):

- **triton**: the production loop body (`nsa_prefill._sweep1_step_packed`, unmasked), 64 rows, 4
  warps, 2 stages: `_cmp_kernel`'s sweep 1 without its sweep 2;
- **gluon**: a Gluon kernel with a ring of STAGES TMA tile buffers and asynchronous warpgroup MMAs:
  chunk j+1's q·kᵀ runs on the tensor cores while chunk j's softmax runs, and chunk j's p·V stays
  in flight until chunk j+1's softmax is done (FlashAttention-3's intra-warpgroup overlap). Its
  warps are BM / 16 (one warpgroup a 64 rows), all consumers; no producer warp;
- **gluon producer warp(s)**: the same loop with warp-specialized 1-warp producers issuing the
  copies into rings of ready/empty barriers: one ring of key + value slots (128 rows, ≥ 3 slots),
  or separate key and value rings with a producer each (64 or 128 rows). Best on the H200:
  538–540 TFLOP/s, 1.12× the Triton loop (docs/benchmarks/prefill.md, twenty-sixth session).

Not used by the server: a measurement for the plan. Each kernel's output is checked against a
float32 torch computation on sampled tiles before it is timed. Times: triton.testing.do_bench
medians (L2 flushed; the runs in docs/benchmarks/prefill.md, twenty-fifth session, took its default
means), TFLOP/s = 2·rows·N·(dk + dv) / time, and the ratio to the Triton loop in the same run.
"""

from __future__ import annotations

import argparse
import math

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma_init, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
from triton.tools.tensor_descriptor import TensorDescriptor

from nsa_kernels.nsa_prefill import _load_q, _sweep1_step_packed

G, DK, DK1, DK2, DV = 16, 192, 128, 64, 128
LOG2E = 1.4426950408889634
# The same head dims as constants the kernels can read.
K1 = gl.constexpr(DK1)
K2 = gl.constexpr(DK2)
V_ = gl.constexpr(DV)


@triton.jit
def _triton_sweep(q_ptr, out_ptr, kd1, kd2, vd, N, sq_t, sq_h, qk_scale,
                  BT: tl.constexpr, CN: tl.constexpr, DK: tl.constexpr, DK1: tl.constexpr,
                  DK2: tl.constexpr, DV: tl.constexpr, G: tl.constexpr):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    r = tl.arange(0, BT * G)
    t = tile * BT + r // G
    head = h * G + r % G
    ok = r >= 0
    q1, q2 = _load_q(q_ptr, t.to(tl.int64) * sq_t + head * sq_h, ok, DK, DK1, DK2)
    m_i = tl.full([BT * G], -1.0e30, tl.float32)
    l_i = tl.zeros([BT * G], tl.float32)
    o = tl.zeros([BT * G, DV], tl.float32)
    ar = tl.arange(0, CN)
    r0 = h * N
    for i0 in range(0, N, CN):
        m_i, l_i, o = _sweep1_step_packed(i0, r0 + i0, q1, q2, m_i, l_i, o, kd1, kd2, vd, N, ok, t, qk_scale,
                                          ar, DK1, DK2, 16, 32, CN, "tf32", False, False)
    o = o / l_i[:, None]
    dv = tl.arange(0, DV)
    rows = (tile * BT * G + r).to(tl.int64) * tl.num_programs(1) + h
    tl.store(out_ptr + rows[:, None] * DV + dv[None, :], o)


@gluon.jit
def _gluon_load_k(kd1, kd2, k1_s, k2_s, bars, row, slot, pred, NBYTES: gl.constexpr):
    bar = bars.index(slot)
    mbarrier.expect(bar, NBYTES, pred=pred)
    tma.async_copy_global_to_shared(kd1, [row, 0], bar, k1_s.index(slot), pred=pred)
    tma.async_copy_global_to_shared(kd2, [row, K1], bar, k2_s.index(slot), pred=pred)


@gluon.jit
def _gluon_load_v(vd, v_s, bars, row, slot, pred, NBYTES: gl.constexpr):
    bar = bars.index(slot)
    mbarrier.expect(bar, NBYTES, pred=pred)
    tma.async_copy_global_to_shared(vd, [row, 0], bar, v_s.index(slot), pred=pred)


@gluon.jit
def _gluon_qk(q1, q2, k1_s, k2_s, slot, zero):
    s = warpgroup_mma(q1, k1_s.index(slot).permute((1, 0)), zero, use_acc=False, is_async=True)
    return warpgroup_mma(q2, k2_s.index(slot).permute((1, 0)), s, is_async=True)


@gluon.jit
def _gluon_softmax(s, m_i, l_i, qk_scale):
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
    return m_new, alpha, p, l_i * alpha + gl.sum(p, axis=1)


@gluon.jit
def _gluon_overlap(ready, phase, q1, q2, k1_s, k2_s, nslot, zero, s, m_i, l_i, o, p_prev, qk_scale):
    """The loop head every Gluon sweep shares: once chunk j+1's keys are in (`ready`), its q·kᵀ
    runs on the tensor cores while chunk j's softmax runs; then both it and chunk j-1's p·V are
    waited for. (Waiting for the p·V alone, num_outstanding=2, made ptxas serialise every MMA: its
    C7514.) Returns chunk j+1's scores, the softmax state and chunk j's p."""
    mbarrier.wait(ready.index(nslot), phase)
    s_next = _gluon_qk(q1, q2, k1_s, k2_s, nslot, zero)
    m_i, alpha, p, l_i = _gluon_softmax(s, m_i, l_i, qk_scale)
    o, p_prev, s_next = warpgroup_mma_wait(num_outstanding=0, deps=(o, p_prev, s_next))
    return s_next, m_i, alpha, p, l_i, o, p_prev


@gluon.jit
def _gluon_pv(o, alpha, p, v_s, vready, slot, phase, o_layout: gl.constexpr, p_layout: gl.constexpr,
              WAIT_V: gl.constexpr):
    """o rescaled by the softmax's alpha, then this chunk's p·V issued (once its values are in,
    when they have their own barriers: WAIT_V) to run into the next softmax. Returns (o, the bf16
    p it reads: a loop variable until that product is waited for, or the next softmax could reuse
    its registers and ptxas would serialise every MMA)."""
    o = o * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
    if WAIT_V:
        mbarrier.wait(vready.index(slot), phase)
    p_b = gl.convert_layout(p.to(gl.bfloat16), p_layout)
    return warpgroup_mma(p_b, v_s.index(slot), o, is_async=True), p_b


@gluon.jit
def _gluon_tail(s, m_i, l_i, o, p_prev, v_s, vready, n, qk_scale, o_layout: gl.constexpr, p_layout: gl.constexpr,
                STAGES: gl.constexpr, WAIT_V: gl.constexpr):
    """The last chunk after the loop: its softmax, chunk n-2's p·V waited for, then (once its
    values are in, when they have their own barriers: WAIT_V) its own p·V. Returns (o, l)."""
    last = (n - 1) % STAGES
    m_i, alpha, p, l_i = _gluon_softmax(s, m_i, l_i, qk_scale)
    o, p_prev = warpgroup_mma_wait(num_outstanding=0, deps=(o, p_prev))
    o, p_prev = _gluon_pv(o, alpha, p, v_s, vready, last, ((n - 1) // STAGES) & 1, o_layout, p_layout, WAIT_V)
    return warpgroup_mma_wait(num_outstanding=0, deps=(o, )), l_i


@gluon.jit
def _gluon_q(q_ptr, q1_s, q2_s, tile, h, sq_t, sq_h, s_layout: gl.constexpr, ld: gl.constexpr,
             Q_REGS: gl.constexpr):
    """A tile's q (BM = q1_s's rows: BM / 16 queries × the 16 heads of kv group h) into shared
    memory, returned as the q·kᵀ MMAs' A operand: registers (Q_REGS, so those MMAs read only the
    keys from shared memory) or the shared memory itself."""
    BM: gl.constexpr = q1_s.shape[0]
    r = gl.arange(0, BM, layout=gl.SliceLayout(1, ld))
    qoff = gl.expand_dims((tile * (BM // 16) + r // 16).to(gl.int64) * sq_t + (h * 16 + r % 16) * sq_h, 1)
    d1 = gl.expand_dims(gl.arange(0, K1, layout=gl.SliceLayout(0, ld)), 0)
    d2 = gl.expand_dims(gl.arange(0, K2, layout=gl.SliceLayout(0, ld)), 0) + K1
    q1_s.store(gl.load(q_ptr + qoff + d1))
    q2_s.store(gl.load(q_ptr + qoff + d2))
    fence_async_shared()
    if Q_REGS:
        q1 = q1_s.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2))
        q2 = q2_s.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2))
    else:
        q1 = q1_s
        q2 = q2_s
    return q1, q2


@gluon.jit
def _gluon_store(out_ptr, o, l_i, tile, h, o_layout: gl.constexpr):
    """o / l into rows (tile·BM + r)·Hkv + h of out [queries·16·Hkv, dv] (BM = o's rows)."""
    BM: gl.constexpr = o.shape[0]
    o = o / gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, o_layout)), 1)
    ro = gl.arange(0, BM, layout=gl.SliceLayout(1, o_layout))
    dv = gl.arange(0, V_, layout=gl.SliceLayout(0, o_layout))
    rows = (tile * BM + ro).to(gl.int64) * gl.num_programs(1) + h
    gl.store(out_ptr + gl.expand_dims(rows * V_, 1) + gl.expand_dims(dv, 0), o)


@gluon.jit
def _gluon_sweep(q_ptr, out_ptr, kd1, kd2, vd, N, sq_t, sq_h, qk_scale,
                 CN: gl.constexpr, STAGES: gl.constexpr, Q_REGS: gl.constexpr, num_warps: gl.constexpr):
    BM: gl.constexpr = 16 * num_warps  # one warpgroup a 64 rows
    tile = gl.program_id(0)
    h = gl.program_id(1)
    wpc: gl.constexpr = [num_warps, 1]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=wpc, instr_shape=[16, CN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=wpc, instr_shape=[16, 128, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], wpc, [1, 0])

    q1_s = gl.allocate_shared_memory(gl.bfloat16, [BM, K1], gl.NVMMASharedLayout.get_default_for([BM, K1], gl.bfloat16))
    q2_s = gl.allocate_shared_memory(gl.bfloat16, [BM, K2], gl.NVMMASharedLayout.get_default_for([BM, K2], gl.bfloat16))
    q1, q2 = _gluon_q(q_ptr, q1_s, q2_s, tile, h, sq_t, sq_h, s_layout, ld_layout, Q_REGS)

    k1_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, CN, K1], kd1.layout)
    k2_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, CN, K2], kd2.layout)
    v_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, CN, V_], vd.layout)
    # Keys and values in separate rings: a key slot is free once its q·kᵀ is done (waited at the end
    # of the iteration that issued it), a value slot once its p·V is (waited one iteration later).
    kbars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    vbars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(kbars.index(i), count=1)
        mbarrier.init(vbars.index(i), count=1)
    KBYTES: gl.constexpr = CN * (K1 + K2) * 2
    VBYTES: gl.constexpr = CN * V_ * 2
    r0 = h * N
    n = N // CN
    for i in gl.static_range(STAGES):
        _gluon_load_k(kd1, kd2, k1_s, k2_s, kbars, r0 + i * CN, i, i < n, KBYTES)
        _gluon_load_v(vd, v_s, vbars, r0 + i * CN, i, i < n, VBYTES)

    zero = gl.zeros([BM, CN], gl.float32, s_layout)
    m_i = gl.full([BM], -1.0e30, gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BM], gl.float32, gl.SliceLayout(1, s_layout))
    o = warpgroup_mma_init(gl.zeros([BM, V_], gl.float32, o_layout))  # carried in flight across iterations
    mbarrier.wait(kbars.index(0), 0)
    s = _gluon_qk(q1, q2, k1_s, k2_s, 0, zero)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
    # p·V reads p from registers while it runs: p stays a loop variable until that product is
    # waited for, or the next softmax could reuse its registers (ptxas then serialises every MMA).
    p_prev = gl.zeros([BM, CN], gl.bfloat16, p_layout)
    for j in range(n - 1):
        slot = j % STAGES
        nslot = (j + 1) % STAGES
        s_next, m_i, alpha, p, l_i, o, p_prev = _gluon_overlap(kbars, ((j + 1) // STAGES) & 1, q1, q2, k1_s,
                                                               k2_s, nslot, zero, s, m_i, l_i, o, p_prev, qk_scale)
        # Chunk j-1's p·V is done, so its value slot is free; chunk j's key slot was since the last
        # iteration.
        gl.thread_barrier()  # every warp is past those waits before a slot is overwritten
        _gluon_load_k(kd1, kd2, k1_s, k2_s, kbars, r0 + (j + STAGES) * CN, slot, j + STAGES < n, KBYTES)
        pslot = (j + STAGES - 1) % STAGES
        _gluon_load_v(vd, v_s, vbars, r0 + (j + STAGES - 1) * CN, pslot, (j >= 1) & (j + STAGES - 1 < n), VBYTES)
        o, p_prev = _gluon_pv(o, alpha, p, v_s, vbars, slot, (j // STAGES) & 1, o_layout, p_layout, True)
        s = s_next
    o, l_i = _gluon_tail(s, m_i, l_i, o, p_prev, v_s, vbars, n, qk_scale, o_layout, p_layout, STAGES, True)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(kbars.index(i))
        mbarrier.invalidate(vbars.index(i))
    _gluon_store(out_ptr, o, l_i, tile, h, o_layout)


@gluon.jit
def _ws_producer(kd1, kd2, vd, k1_s, k2_s, v_s, ready, empty, r0, n, CN: gl.constexpr, STAGES: gl.constexpr):
    """One warp: chunk j's keys and values into ring slot j % STAGES once both consumers freed it."""
    NBYTES: gl.constexpr = CN * (K1 + K2 + V_) * 2
    for j in range(n):
        slot = j % STAGES
        mbarrier.wait(empty.index(slot), ((j // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1
        bar = ready.index(slot)
        mbarrier.expect(bar, NBYTES)
        tma.async_copy_global_to_shared(kd1, [r0 + j * CN, 0], bar, k1_s.index(slot))
        tma.async_copy_global_to_shared(kd2, [r0 + j * CN, K1], bar, k2_s.index(slot))
        tma.async_copy_global_to_shared(vd, [r0 + j * CN, 0], bar, v_s.index(slot))


@gluon.jit
def _ws_consumer(q_ptr, out_ptr, q1_s, q2_s, k1_s, k2_s, v_s, ready, empty, tile, h, n, sq_t, sq_h,
                 qk_scale, CN: gl.constexpr, STAGES: gl.constexpr, Q_REGS: gl.constexpr):
    """8 warps, the 128 rows of a tile (8 queries): _gluon_sweep's loop, waiting for each chunk on
    the producer's `ready` barrier and freeing its slot on `empty` once its p·V is done."""
    wpc: gl.constexpr = [8, 1]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=wpc, instr_shape=[16, CN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=wpc, instr_shape=[16, 128, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], wpc, [1, 0])
    q1, q2 = _gluon_q(q_ptr, q1_s, q2_s, tile, h, sq_t, sq_h, s_layout, ld, Q_REGS)

    zero = gl.zeros([128, CN], gl.float32, s_layout)
    m_i = gl.full([128], -1.0e30, gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([128], gl.float32, gl.SliceLayout(1, s_layout))
    o = warpgroup_mma_init(gl.zeros([128, V_], gl.float32, o_layout))
    p_prev = gl.zeros([128, CN], gl.bfloat16, p_layout)
    mbarrier.wait(ready.index(0), 0)
    s = _gluon_qk(q1, q2, k1_s, k2_s, 0, zero)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
    for j in range(n - 1):
        slot = j % STAGES
        nslot = (j + 1) % STAGES
        s_next, m_i, alpha, p, l_i, o, p_prev = _gluon_overlap(ready, ((j + 1) // STAGES) & 1, q1, q2, k1_s,
                                                               k2_s, nslot, zero, s, m_i, l_i, o, p_prev, qk_scale)
        gl.thread_barrier()  # both warpgroups past that wait before one thread frees the slot
        mbarrier.arrive(empty.index((j + STAGES - 1) % STAGES), count=1, pred=j >= 1)  # chunk j-1 done
        o, p_prev = _gluon_pv(o, alpha, p, v_s, ready, slot, 0, o_layout, p_layout, False)
        s = s_next
    o, l_i = _gluon_tail(s, m_i, l_i, o, p_prev, v_s, ready, n, qk_scale, o_layout, p_layout, STAGES, False)
    _gluon_store(out_ptr, o, l_i, tile, h, o_layout)


@gluon.jit
def _gluon_sweep_ws(q_ptr, out_ptr, kd1, kd2, vd, N, sq_t, sq_h, qk_scale,
                    CN: gl.constexpr, STAGES: gl.constexpr, Q_REGS: gl.constexpr, num_warps: gl.constexpr):
    """A producer warp for the TMA copies (a warp-specialized worker) and the kernel's 8 warps as
    one 128-row consumer (8 queries a program): slots are freed through mbarriers, with no CTA
    barrier in the loop. Two 64-row consumers as separate workers (FlashAttention-3's layout)
    were serialised by ptxas (C7512; docs/benchmarks/prefill.md, twenty-fifth session)."""
    tile = gl.program_id(0)
    h = gl.program_id(1)
    q1_s = gl.allocate_shared_memory(gl.bfloat16, [128, K1], gl.NVMMASharedLayout.get_default_for([128, K1], gl.bfloat16))
    q2_s = gl.allocate_shared_memory(gl.bfloat16, [128, K2], gl.NVMMASharedLayout.get_default_for([128, K2], gl.bfloat16))
    k1_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, CN, K1], kd1.layout)
    k2_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, CN, K2], kd2.layout)
    v_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, CN, V_], vd.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    n = N // CN
    gl.warp_specialize([
        (_ws_consumer, (q_ptr, out_ptr, q1_s, q2_s, k1_s, k2_s, v_s, ready, empty, tile, h, n, sq_t, sq_h,
                        qk_scale, CN, STAGES, Q_REGS)),
        (_ws_producer, (kd1, kd2, vd, k1_s, k2_s, v_s, ready, empty, h * N, n, CN, STAGES)),
    ], [1], [24])


def run_gluon_ws(q, kp, vp, N, out, CN=64, STAGES=3, q_regs=True):
    if STAGES < 3:
        # The consumer waits for chunk j+1 before it frees chunk j-1's slot (its p·V is in flight
        # until then), and with two slots chunk j+1 needs that slot: the kernel would hang (it did,
        # on the H200, twenty-sixth session).
        raise ValueError("the producer-warp sweep needs STAGES >= 3 (2 deadlocks)")
    lay = lambda shape: gl.NVMMASharedLayout.get_default_for(shape, gl.bfloat16)  # noqa: E731
    kd1 = GluonDescriptor.from_tensor(kp, [CN, DK1], lay([CN, DK1]))
    kd2 = GluonDescriptor.from_tensor(kp, [CN, DK2], lay([CN, DK2]))
    vd = GluonDescriptor.from_tensor(vp, [CN, DV], lay([CN, DV]))
    grid = (q.shape[0] // 8, kp.shape[0] // N)
    _gluon_sweep_ws[grid](q, out, kd1, kd2, vd, N, q.stride(0), q.stride(1), LOG2E / math.sqrt(DK),
                          CN=CN, STAGES=STAGES, Q_REGS=q_regs, num_warps=8)


@gluon.jit
def _ws_ring_producer(desc_a, desc_b, bufs_a, bufs_b, ready, empty, r0, n, COL_B: gl.constexpr,
                      CN: gl.constexpr, STAGES: gl.constexpr):
    """One warp: chunk j's rows of one ring (the keys: both column halves; the values: desc_b
    unused) into slot j % STAGES once the consumer freed it."""
    for j in range(n):
        slot = j % STAGES
        mbarrier.wait(empty.index(slot), ((j // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1
        bar = ready.index(slot)
        if COL_B > 0:
            mbarrier.expect(bar, CN * (bufs_a.shape[2] + bufs_b.shape[2]) * 2)
            tma.async_copy_global_to_shared(desc_a, [r0 + j * CN, 0], bar, bufs_a.index(slot))
            tma.async_copy_global_to_shared(desc_b, [r0 + j * CN, COL_B], bar, bufs_b.index(slot))
        else:
            mbarrier.expect(bar, CN * bufs_a.shape[2] * 2)
            tma.async_copy_global_to_shared(desc_a, [r0 + j * CN, 0], bar, bufs_a.index(slot))


@gluon.jit
def _ws2_consumer(q_ptr, out_ptr, q1_s, q2_s, k1_s, k2_s, v_s, kready, kempty, vready, vempty, tile, h, n,
                  sq_t, sq_h, qk_scale, BM: gl.constexpr, CN: gl.constexpr, STAGES: gl.constexpr):
    """_gluon_sweep's loop (q in registers) fed by two producer warps: a key slot is freed as soon
    as its q·kᵀ is waited for, a value slot once its p·V is (one iteration later)."""
    wpc: gl.constexpr = [BM // 16, 1]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=wpc, instr_shape=[16, CN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=wpc, instr_shape=[16, 128, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], wpc, [1, 0])
    q1, q2 = _gluon_q(q_ptr, q1_s, q2_s, tile, h, sq_t, sq_h, s_layout, ld, True)

    zero = gl.zeros([BM, CN], gl.float32, s_layout)
    m_i = gl.full([BM], -1.0e30, gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BM], gl.float32, gl.SliceLayout(1, s_layout))
    o = warpgroup_mma_init(gl.zeros([BM, V_], gl.float32, o_layout))
    p_prev = gl.zeros([BM, CN], gl.bfloat16, p_layout)
    mbarrier.wait(kready.index(0), 0)
    s = _gluon_qk(q1, q2, k1_s, k2_s, 0, zero)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
    gl.thread_barrier()
    mbarrier.arrive(kempty.index(0), count=1)
    for j in range(n - 1):
        slot = j % STAGES
        nslot = (j + 1) % STAGES
        s_next, m_i, alpha, p, l_i, o, p_prev = _gluon_overlap(kready, ((j + 1) // STAGES) & 1, q1, q2, k1_s,
                                                               k2_s, nslot, zero, s, m_i, l_i, o, p_prev, qk_scale)
        gl.thread_barrier()  # every warp past that wait before one thread frees the slots
        mbarrier.arrive(kempty.index(nslot), count=1)  # chunk j+1's keys
        mbarrier.arrive(vempty.index((j + STAGES - 1) % STAGES), count=1, pred=j >= 1)  # chunk j-1's values
        o, p_prev = _gluon_pv(o, alpha, p, v_s, vready, slot, (j // STAGES) & 1, o_layout, p_layout, True)
        s = s_next
    o, l_i = _gluon_tail(s, m_i, l_i, o, p_prev, v_s, vready, n, qk_scale, o_layout, p_layout, STAGES, True)
    _gluon_store(out_ptr, o, l_i, tile, h, o_layout)


@gluon.jit
def _gluon_sweep_ws2(q_ptr, out_ptr, kd1, kd2, vd, N, sq_t, sq_h, qk_scale,
                     CN: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    """Keys and values in separate rings, each filled by its own 1-warp producer; the kernel's
    warps are one consumer of 16·num_warps rows. With separate rings two slots each cannot
    deadlock (a key slot is free before the next chunk's q·kᵀ is waited for), so 64-row programs
    fit twice an SM (104 KB of shared memory), as the fastest plain variants do."""
    BM: gl.constexpr = 16 * num_warps
    tile = gl.program_id(0)
    h = gl.program_id(1)
    q1_s = gl.allocate_shared_memory(gl.bfloat16, [BM, K1], gl.NVMMASharedLayout.get_default_for([BM, K1], gl.bfloat16))
    q2_s = gl.allocate_shared_memory(gl.bfloat16, [BM, K2], gl.NVMMASharedLayout.get_default_for([BM, K2], gl.bfloat16))
    k1_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, CN, K1], kd1.layout)
    k2_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, CN, K2], kd2.layout)
    v_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, CN, V_], vd.layout)
    kready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kempty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    vready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    vempty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(kready.index(i), count=1)
        mbarrier.init(kempty.index(i), count=1)
        mbarrier.init(vready.index(i), count=1)
        mbarrier.init(vempty.index(i), count=1)
    n = N // CN
    gl.warp_specialize([
        (_ws2_consumer, (q_ptr, out_ptr, q1_s, q2_s, k1_s, k2_s, v_s, kready, kempty, vready, vempty, tile, h, n,
                         sq_t, sq_h, qk_scale, BM, CN, STAGES)),
        (_ws_ring_producer, (kd1, kd2, k1_s, k2_s, kready, kempty, h * N, n, K1, CN, STAGES)),
        (_ws_ring_producer, (vd, vd, v_s, v_s, vready, vempty, h * N, n, 0, CN, STAGES)),
    ], [1, 1], [24, 24])


def run_gluon_ws2(q, kp, vp, N, out, CN=64, STAGES=2, warps=4, maxnreg=None):
    lay = lambda shape: gl.NVMMASharedLayout.get_default_for(shape, gl.bfloat16)  # noqa: E731
    kd1 = GluonDescriptor.from_tensor(kp, [CN, DK1], lay([CN, DK1]))
    kd2 = GluonDescriptor.from_tensor(kp, [CN, DK2], lay([CN, DK2]))
    vd = GluonDescriptor.from_tensor(vp, [CN, DV], lay([CN, DV]))
    grid = (q.shape[0] // warps, kp.shape[0] // N)
    _gluon_sweep_ws2[grid](q, out, kd1, kd2, vd, N, q.stride(0), q.stride(1), LOG2E / math.sqrt(DK),
                           CN=CN, STAGES=STAGES, num_warps=warps, maxnreg=maxnreg)


def make(n_summaries: int, tiles_rows: int, Hkv: int, device):
    """q [T, Hkv·16, 192] and the packed summaries [Hkv·N, 192] / [Hkv·N, 128], random normal."""
    torch.manual_seed(0)
    q = torch.randn(tiles_rows // 16, Hkv * G, DK, device=device, dtype=torch.bfloat16)
    kp = torch.randn(Hkv * n_summaries, DK, device=device, dtype=torch.bfloat16)
    vp = torch.randn(Hkv * n_summaries, DV, device=device, dtype=torch.bfloat16)
    return q, kp, vp


def run_triton(q, kp, vp, N, out, CN=64, BT=4, warps=4, stages=2):
    kd1 = TensorDescriptor.from_tensor(kp, [CN, DK1])
    kd2 = TensorDescriptor.from_tensor(kp, [CN, DK2])
    vd = TensorDescriptor.from_tensor(vp, [CN, DV])
    Hkv = kp.shape[0] // N
    grid = (q.shape[0] // BT, Hkv)
    _triton_sweep[grid](q, out, kd1, kd2, vd, N, q.stride(0), q.stride(1), LOG2E / math.sqrt(DK),
                        BT=BT, CN=CN, DK=DK, DK1=DK1, DK2=DK2, DV=DV, G=G, num_warps=warps, num_stages=stages)


def run_gluon(q, kp, vp, N, out, CN=64, STAGES=3, warps=4, q_regs=False):
    lay = lambda shape: gl.NVMMASharedLayout.get_default_for(shape, gl.bfloat16)  # noqa: E731
    kd1 = GluonDescriptor.from_tensor(kp, [CN, DK1], lay([CN, DK1]))
    kd2 = GluonDescriptor.from_tensor(kp, [CN, DK2], lay([CN, DK2]))
    vd = GluonDescriptor.from_tensor(vp, [CN, DV], lay([CN, DV]))
    Hkv = kp.shape[0] // N
    BT = warps  # 16 rows a warp: BM = 16·warps rows = `warps` queries of 16 heads
    grid = (q.shape[0] // BT, Hkv)
    _gluon_sweep[grid](q, out, kd1, kd2, vd, N, q.stride(0), q.stride(1), LOG2E / math.sqrt(DK),
                       CN=CN, STAGES=STAGES, Q_REGS=q_regs, num_warps=warps)


def reference(q, kp, vp, N, tile_rows):
    """float32 outputs of the given (tile row block, kv group) pairs: rows [16·t, 16·t + 16) = query t."""
    out = {}
    for t, h in tile_rows:
        qq = q[t, h * G:(h + 1) * G].float()  # [16, 192]
        k = kp[h * N:(h + 1) * N].float()
        v = vp[h * N:(h + 1) * N].float()
        out[(t, h)] = torch.softmax(qq @ k.T / math.sqrt(DK), dim=-1) @ v
    return out


VARIANTS = [  # (name, runner, kwargs)
    ("triton 64 rows, 4 warps, 2 stages (production sweep 1)", run_triton, dict(CN=64, BT=4, warps=4, stages=2)),
    ("gluon 64 rows, 64-summary chunks, 2 stages", run_gluon, dict(CN=64, STAGES=2, warps=4)),
    ("gluon 64 rows, 64-summary chunks, 3 stages", run_gluon, dict(CN=64, STAGES=3, warps=4)),
    ("gluon 64 rows, 64-summary chunks, 4 stages", run_gluon, dict(CN=64, STAGES=4, warps=4)),
    ("gluon 128 rows (2 warpgroups), 64-summary chunks, 2 stages", run_gluon, dict(CN=64, STAGES=2, warps=8)),
    ("gluon 128 rows (2 warpgroups), 64-summary chunks, 3 stages", run_gluon, dict(CN=64, STAGES=3, warps=8)),
    ("gluon 64 rows, 128-summary chunks, 2 stages", run_gluon, dict(CN=128, STAGES=2, warps=4)),
    # Both q·kᵀ operands from shared memory at N = 64 ask 4 KB of it an m64n64k16 MMA: the shared
    # memory's 128 B a cycle then take as long as the MMA itself. With q in registers, 2 KB.
    ("gluon 64 rows, q in registers, 2 stages", run_gluon, dict(CN=64, STAGES=2, warps=4, q_regs=True)),
    ("gluon 64 rows, q in registers, 3 stages", run_gluon, dict(CN=64, STAGES=3, warps=4, q_regs=True)),
    ("gluon 128 rows (2 warpgroups), q in registers, 2 stages", run_gluon,
     dict(CN=64, STAGES=2, warps=8, q_regs=True)),
    ("gluon 128 rows (2 warpgroups), q in registers, 3 stages", run_gluon,
     dict(CN=64, STAGES=3, warps=8, q_regs=True)),
    # A producer warp needs 3 slots or more: see run_gluon_ws.
    ("gluon producer warp + 128-row consumer, q in registers, 3 stages", run_gluon_ws, dict(CN=64, STAGES=3)),
    ("gluon producer warp + 128-row consumer, q in registers, 4 stages", run_gluon_ws, dict(CN=64, STAGES=4)),
    ("gluon producer warp + 128-row consumer, q in shared memory, 3 stages", run_gluon_ws,
     dict(CN=64, STAGES=3, q_regs=False)),
    ("gluon key and value producer warps + 64-row consumer, q in registers, 2 stages", run_gluon_ws2,
     dict(CN=64, STAGES=2, warps=4)),
    ("gluon key and value producer warps + 64-row consumer, q in registers, 3 stages", run_gluon_ws2,
     dict(CN=64, STAGES=3, warps=4)),
    # Triton pads the two producer warps to a warpgroup: 8 warps at 255 registers fill the register
    # file. At 128 two programs share an SM, the consumer raised to 232 (setmaxnreg).
    ("gluon key and value producer warps + 64-row consumer, q in registers, 2 stages, 2 programs an SM",
     run_gluon_ws2, dict(CN=64, STAGES=2, warps=4, maxnreg=128)),
    ("gluon key and value producer warps + 128-row consumer, q in registers, 2 stages", run_gluon_ws2,
     dict(CN=64, STAGES=2, warps=8)),
    ("gluon key and value producer warps + 128-row consumer, q in registers, 3 stages", run_gluon_ws2,
     dict(CN=64, STAGES=3, warps=8)),
]


def compile_only():
    from nsa_kernels.compile_check import _resources
    from nsa_kernels.compile_check import compile_only as co

    q, kp, vp = make(512, 256, 2, "cpu")
    out = torch.empty(q.shape[0] * q.shape[1], DV)
    for name, fn, kw in VARIANTS:
        sink: list = []
        try:
            with co(90, sink):
                fn(q, kp, vp, 512, out, **kw)
        except Exception as exc:  # report and go on
            print(f"{name}: FAIL {type(exc).__name__}: {str(exc)[:2000]}")
            continue
        for kname, k in sink:
            regs, local = _resources(k.asm["cubin"])
            print(f"{name}: {kname} regs {regs} local {local} B shared {k.metadata.shared} B")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096, help="summaries every query sees (64k prompt: up to 4096)")
    ap.add_argument("--queries", type=int, default=8192, help="queries (each 16 heads of each kv group)")
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--only", action="append", default=[],
                    help="time only variants whose name contains this (repeatable); the Triton loop always runs")
    a = ap.parse_args()
    if a.compile_only:
        return compile_only()
    Hkv, N = 4, a.n
    q, kp, vp = make(N, a.queries * 16, Hkv, "cuda")
    flops = 2 * a.queries * Hkv * G * N * (DK + DV)
    samples = [(0, 0), (a.queries // 2 + 1, 1), (a.queries - 1, 3), (777 % a.queries, 2)]
    ref = reference(q, kp, vp, N, samples)
    print(f"N = {N} summaries, {a.queries} queries × {Hkv} kv groups × {G} heads; {flops / 1e12:.2f} TFLOP a call")
    print("| variant | ms | TFLOP/s | × the Triton loop | max rel. err vs float32 (sampled queries) |\n"
          "|---|---|---|---|---|")
    base = None
    for k, (name, fn, kw) in enumerate(VARIANTS):
        if k and a.only and not any(o in name for o in a.only):
            continue
        out = torch.full((a.queries * G * Hkv, DV), float("nan"), device="cuda")
        try:
            fn(q, kp, vp, N, out, **kw)
            torch.cuda.synchronize()
        except Exception as exc:
            print(f"| {name} | failed: {type(exc).__name__}: {str(exc)[:200]} | | |", flush=True)
            continue
        o = out.view(a.queries, G, Hkv, DV)
        err = max(((o[t, :, h] - r).abs().max() / r.abs().max()).item() for (t, h), r in ref.items())
        nan = bool(torch.isnan(out).any())
        ms = triton.testing.do_bench(lambda: fn(q, kp, vp, N, out, **kw), warmup=50, rep=200, return_mode="median")
        base = base or ms  # the first variant: the Triton loop
        print(f"| {name} | {ms:.3f} | {flops / ms / 1e9:.0f} | {base / ms:.2f}× | "
              f"{err:.2e}{' (NaN in output!)' if nan else ''} |", flush=True)


if __name__ == "__main__":
    main()
