"""What a decode step of a few dependent launches costs before it does any work: the floor under
`bench_decode`'s batch-1 row, measured the way that row is (a CUDA graph replayed under
`bench_decode.bench`, the L2 emptied before each call).

    python3 scripts/launch_floor.py            # on a GPU, from the repo root (kernels/ importable
                                               # as nsa_kernels: source scripts/device_env.sh)

Why: issue 3 asks for ≥ 4× dense SDPA at batch 1 and 64k (≤ 16 µs against cuDNN's ~64 µs). NSA's
decode is a chain: compressed pass → scores and top-n → attention over the selected pages (→ the
split merge at batch 1). Each link needs its predecessor's results, so each waits for at least one
read from HBM after the previous link's last write. This script times graphs of chains of 1–4
kernels that do nothing but that — each program reads one page-sized tile (64 rows of 320 bf16 =
40 KB, the K and V of one page of the paper shape) from a 1 GB buffer and writes one number — on
the device's SM count of programs, linked by programmatic dependent launch (griddepcontrol, as the
decode kernels are: the next launch let in at a program's entry, or after its read) or by plain
stream order, and the same chains with empty kernels; and, for a persistent single kernel, one
launch whose reads are separated by barriers (grid-wide ones polled by read-modify-write atomics,
and ticket barriers polled by acquire loads, grid-wide or in four groups as the step's kv groups
would be). The
difference from the real step is the work the real kernels do beyond one read each.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl


@triton.jit
def _tile_sum(src_ptr, t, ROWS: tl.constexpr, COLS: tl.constexpr, C0: tl.constexpr):
    """The sum of tile t (ROWS × COLS, read as C0 columns + the rest: power-of-two blocks)."""
    r = tl.arange(0, ROWS)
    c0 = tl.arange(0, C0)
    c1 = C0 + tl.arange(0, COLS - C0)
    base = src_ptr + t * ROWS * COLS + r[:, None] * COLS
    x0 = tl.load(base + c0[None, :]).to(tl.float32)
    x1 = tl.load(base + c1[None, :]).to(tl.float32)
    return tl.sum(tl.sum(x0, 1), 0) + tl.sum(tl.sum(x1, 1), 0)


@triton.jit
def _read_tile(src_ptr, dst_ptr, n_tiles, seed, ROWS: tl.constexpr, COLS: tl.constexpr,
               C0: tl.constexpr, READ: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr):
    """One program: wait for the previous launch (PDL), read one ROWS × COLS tile (as C0 + the
    rest: power-of-two blocks) at a pseudo-random tile index (READ), let the next launch start,
    write one number. EARLY: let the next launch start at entry instead (as the decode kernels
    do), so its programs are resident and waiting when this launch's last program ends."""
    pid = tl.program_id(0)
    if PDL:
        if EARLY:
            tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    acc = 0.0
    if READ:
        acc = _tile_sum(src_ptr, (pid * 7919 + seed) % n_tiles, ROWS, COLS, C0)
    if PDL and not EARLY:
        tl.extra.cuda.gdc_launch_dependents()
    tl.store(dst_ptr + pid, acc)


@triton.jit
def _read_tiles_barriers(src_ptr, dst_ptr, bar_ptr, n_tiles, seed, n_prog, LINKS: tl.constexpr,
                         ROWS: tl.constexpr, COLS: tl.constexpr, C0: tl.constexpr):
    """One persistent launch: LINKS reads of one tile each, every read after the first behind a
    grid-wide barrier (all programs resident: at most one an SM), as a single kernel would pass
    the compressed pass's results to its score and attention phases. The barrier reverses a
    generation word (bar_ptr[1]) when the last program arrives on the count (bar_ptr[0]), so it
    is reusable across calls with no reset."""
    pid = tl.program_id(0)
    acc = 0.0
    for i in tl.static_range(LINKS):
        if i > 0:
            gen = tl.atomic_add(bar_ptr + 1, 0, sem="acquire")
            tl.debug_barrier()
            if tl.atomic_add(bar_ptr, 1, sem="acq_rel") == n_prog - 1:
                tl.atomic_xchg(bar_ptr, 0, sem="relaxed")
                tl.atomic_add(bar_ptr + 1, 1, sem="release")
            else:
                while tl.atomic_add(bar_ptr + 1, 0, sem="acquire") == gen:
                    pass
            tl.debug_barrier()
        acc += _tile_sum(src_ptr, (pid * 7919 + seed + 1009 * i) % n_tiles, ROWS, COLS, C0)
    tl.store(dst_ptr + pid, acc)


@triton.jit
def _ld_acquire(ptr):
    """One gpu-scope acquire load (a plain load the L2 answers; no read-modify-write)."""
    return tl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [ptr],
                                     dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _read_tiles_tickets(src_ptr, dst_ptr, bar_ptr, n_tiles, seed, n_prog, LINKS: tl.constexpr,
                        ROWS: tl.constexpr, COLS: tl.constexpr, C0: tl.constexpr, NG: tl.constexpr,
                        ENTRY: tl.constexpr = False):
    """As `_read_tiles_barriers`, with a cheaper barrier: each program's arrival is one
    acq_rel add on a counter that only grows (no reset, no generation word), and it waits with
    acquire *loads* until the counter reaches the next multiple of the participants — polling
    by read-modify-write atomics (the other kernel) queues every poll behind the others at the
    L2. NG > 1: the programs form NG independent groups (pid % NG), each with its own counter
    on its own 128-byte line, as a decode step's kv groups need only wait for their own. The
    counters must start at zero for each NG (a count left by another NG is not a multiple of this
    one's participants; an int32 count lasts 16 M barriers of 132). ENTRY: one more barrier before
    the first read (all programs started)."""
    pid = tl.program_id(0)
    grp = pid % NG
    n_grp = (n_prog - grp + NG - 1) // NG  # programs in this group
    cnt = bar_ptr + 32 * grp
    acc = 0.0
    for i in tl.static_range(LINKS):
        if i > 0 or ENTRY:
            tl.debug_barrier()
            ticket = tl.atomic_add(cnt, 1, sem="acq_rel")
            target = (ticket // n_grp + 1) * n_grp
            while _ld_acquire(cnt) < target:
                pass
            tl.debug_barrier()
        acc += _tile_sum(src_ptr, (pid * 7919 + seed + 1009 * i) % n_tiles, ROWS, COLS, C0)
    tl.store(dst_ptr + pid, acc)


def tickets(src, dst, n_links, programs, groups, entry=False):
    rows, cols = 64, 320
    n_tiles = src.numel() // (rows * cols)
    bar = torch.zeros(32 * groups, dtype=torch.int32, device=src.device)  # one counter a 128-B line

    def fn():
        _read_tiles_tickets[(programs,)](src, dst, bar, n_tiles, 17, programs, LINKS=n_links, ROWS=rows,
                                         COLS=cols, C0=256, NG=groups, ENTRY=entry, num_warps=4)
    return fn


def persistent(src, dst, bar, n_links, programs):
    rows, cols = 64, 320
    n_tiles = src.numel() // (rows * cols)

    def fn():
        _read_tiles_barriers[(programs,)](src, dst, bar, n_tiles, 17, programs, LINKS=n_links, ROWS=rows,
                                          COLS=cols, C0=256, num_warps=4)
    return fn


def chain(src, dst, n_links, read, pdl, programs, early=False):
    rows, cols = 64, 320
    n_tiles = src.numel() // (rows * cols)
    launch = {"launch_pdl": True} if pdl else {}

    def fn():
        for i in range(n_links):
            _read_tile[(programs,)](src, dst, n_tiles, 1009 * i + 17, ROWS=rows, COLS=cols, C0=256, READ=read,
                                    PDL=pdl, EARLY=early, num_warps=4, **launch)
    return fn


def main():
    from nsa_kernels import bench_decode
    from nsa_kernels._triton_utils import num_sms

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--links", type=int, action="append", help="chain lengths (default 1 2 3 4)")
    args = ap.parse_args()
    links = args.links or [1, 2, 3, 4]
    sms = num_sms(torch.cuda.current_device())
    src = torch.randn(1 << 29, device="cuda").to(torch.bfloat16)  # 1 GB, random (never zeros)
    dst = torch.empty(4 * sms, device="cuda")
    bar = torch.zeros(2, dtype=torch.int32, device="cuda")  # grid barrier: arrival count, generation
    print(f"{torch.cuda.get_device_name()}, {sms} SMs, torch {torch.__version__}, triton {triton.__version__}")
    print("graph µs (median); each link = one launch of `programs` programs")
    print("| flush | programs | kernels | links: " + " | ".join(str(n) for n in links) + " |")
    print("|---|---|---|" + "---|" * len(links))
    for flush in bench_decode.FLUSH_MODES:
        bench_decode.FLUSH = flush
        for programs in (sms, 2 * sms):
            for read, pdl, early, what in ((False, True, False, "empty, PDL"),
                                           (True, True, False, "one 40 KB read each, PDL, next launched after the read"),
                                           (True, True, True, "one 40 KB read each, PDL, next launched at entry"),
                                           (True, False, False, "one 40 KB read each, stream order")):
                cells = []
                for n in links:
                    fn = chain(src, dst, n, read, pdl, programs, early)
                    fn()
                    torch.cuda.synchronize()
                    cells.append(f"{bench_decode.bench(bench_decode.graph_of(fn).replay, rep=50):.1f}")
                print(f"| {flush} | {programs} | {what} | " + " | ".join(cells) + " |", flush=True)
        # One launch, reads separated by grid barriers: one program an SM so that all are resident.
        cells = []
        for n in links:
            fn = persistent(src, dst, bar, n, sms)
            fn()
            torch.cuda.synchronize()
            cells.append(f"{bench_decode.bench(bench_decode.graph_of(fn).replay, rep=50):.1f}")
        print(f"| {flush} | {sms} | one launch, one 40 KB read each between grid barriers | "
              + " | ".join(cells) + " |", flush=True)
        # The same with the ticket barrier (acquire-load polling), grid-wide and per group of a
        # quarter of the programs (the decode step's four kv groups at batch 1).
        for groups, entry in ((1, False), (4, False), (4, True)):
            cells = []
            for n in links:
                fn = tickets(src, dst, n, sms, groups, entry)
                fn()
                torch.cuda.synchronize()
                cells.append(f"{bench_decode.bench(bench_decode.graph_of(fn).replay, rep=50):.1f}")
            what = ("grid-wide" if groups == 1 else f"{groups} groups") + (", one more before the first read" if entry else "")
            print(f"| {flush} | {sms} | one launch, reads between ticket barriers ({what}) | "
                  + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
