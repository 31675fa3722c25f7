"""Decode benchmark: NSA and dense paged decode against torch SDPA decode, on one GPU.

    python -m nsa_kernels.bench_decode                 # full table (both shapes, 8k … 128k, batch 1/16/64)
    python -m nsa_kernels.bench_decode --ctx 65536 --batch 16 --shape paper
    python -m nsa_kernels.bench_decode --tune          # a few kernel variants at 64k, paper shape
    python -m nsa_kernels.bench_decode --layers 16     # per layer, 16 layers in one graph (64k, batch 1)
    python -m nsa_kernels.bench_decode --compare       # 64k paper rows + launch variants (+ previous
                                                       # version if kernels/nsa_decode_v1.py exists)

Every number is a median of `triton.testing.do_bench` (L2 flushed before each call, so the data
comes from HBM; `--flush read` empties it by reading instead of writing, see FLUSH). Columns:
SDPA = torch scaled_dot_product_attention on contiguous K/V (GQA, the fastest backend that runs
the shape; its name is printed); dense = our split-K paged decode; NSA and NSA+graph = our
four-launch NSA decode eager and replayed from a CUDA graph; x = SDPA / NSA+graph; MB = bytes
NSA must read (visible summaries + the union of selected and window tokens, K and V, all kv heads
and sequences); GB/s and %copy = those bytes over the NSA+graph time, and against the
device-to-device copy bandwidth (bytes read + written) measured at the start of the same run.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings

import torch

from .dense_decode import dense_paged_decode
from .nsa_decode import nsa_decode, nsa_decode_tuned
from .paged import PagedLayerCache
from .reference import SparsityParams, num_compressed

PAPER_P = SparsityParams(block=32, stride=16, select_block=64, num_select=16, window=512)
SHAPES = {"paper": dict(Hq=64, Hkv=4, Dk=192, Dv=128), "d128": dict(Hq=64, Hkv=4, Dk=128, Dv=128)}


# How the L2 is emptied before each timed call (--flush). "write": triton.testing.do_bench's own
# way, zeroing a 256 MB buffer, which leaves the L2 full of dirty lines: the timed call then pays
# for writing them back to HBM (~50 MB) while it reads. "read": a 256 MB buffer is read instead,
# so the L2 is just as cold for the timed call's data but holds only clean lines — as after the
# weight-reading matmuls that precede attention in a model. Both modes time every kernel of a
# table the same way (SDPA included); docs/benchmarks/decode.md, fifteenth round, has both.
FLUSH_MODES = ("write", "read")
FLUSH = "write"
_FLUSH_BUF: list[torch.Tensor] = []


def bench(fn, rep=100):
    """Median µs of fn after a warm-up, the L2 emptied before each call (FLUSH)."""
    import triton.testing

    if FLUSH == "write":
        return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1e3
    if not _FLUSH_BUF:
        _FLUSH_BUF.append(torch.ones(1 << 26, dtype=torch.int32, device="cuda"))  # 256 MB
    buf = _FLUSH_BUF[0]
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    probe = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    probe[0].record()
    for _ in range(5):
        buf.sum()
        fn()
    probe[1].record()
    torch.cuda.synchronize()
    n = max(10, min(1000, int(rep / (probe[0].elapsed_time(probe[1]) / 5))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for start, end in events:
        buf.sum()  # reads 256 MB, writes one number
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return float(torch.tensor([s.elapsed_time(e) for s, e in events]).median()) * 1e3  # µs


def copy_bandwidth() -> float:
    x = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    us = bench(lambda: y.copy_(x))
    return 2 * x.numel() * 2 / (us * 1e-6) / 1e9  # GB/s, read + written


def make_inputs(B, ctx, Hq, Hkv, Dk, Dv, p, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    P = p.select_block
    pages_per_seq = math.ceil(ctx / P)
    n_pages = B * pages_per_seq
    layer = PagedLayerCache.allocate(n_pages, Hkv, Dk, Dv, P, p.stride, dtype=dtype, device="cuda")
    for t in (layer.k_cache, layer.v_cache, layer.kc_cache, layer.vc_cache):
        t.normal_()
    tables = torch.randperm(n_pages, device="cuda").view(B, pages_per_seq).to(torch.int32)
    seq_lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(B, Hq, Dk, device="cuda", dtype=dtype)
    gates = torch.rand(B, Hq, 3, device="cuda", dtype=dtype)
    return q, gates, layer, tables, seq_lens


def must_read_bytes(sel, ctx, Hkv, Dk, Dv, p, elem=2):
    """Bytes NSA must read for sel [B, Hkv, n] at length ctx: summaries + |selected ∪ window| tokens."""
    P, L = p.select_block, ctx
    j = sel.long()
    ok = j >= 0
    page_tok = (torch.clamp(L - j * P, 0, P)) * ok  # tokens of each selected page below L
    lo = max(0, L - p.window)
    overlap = torch.clamp(torch.clamp((j + 1) * P, max=L) - torch.clamp(j * P, min=lo), min=0) * ok
    tokens = int(page_tok.sum()) + sel.shape[0] * Hkv * (L - lo) - int(overlap.sum())
    summaries = sel.shape[0] * Hkv * num_compressed(L, p.block, p.stride)
    return (tokens + summaries) * (Dk + Dv) * elem


def fastest_sdpa(time_with) -> tuple[float, str]:
    """(µs, backend name) of the fastest SDPA backend (flash / efficient / cuDNN) that runs:
    `time_with()` times the work with the backend already selected; a backend that refuses the
    shape is skipped."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    best = (math.inf, "none")
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            # A refusing backend also warns why (eight lines a row in the table's output): the
            # refusal is expected here and the row names the backend that ran.
            with sdpa_kernel(backend), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                us = time_with()
        except (RuntimeError, NotImplementedError):
            continue
        if us < best[0]:
            best = (us, backend.name.lower().replace("_attention", ""))
    return best


def sdpa_baseline(q, ctx, Hkv, Dk, Dv):
    """Fastest SDPA backend on contiguous [B, Hkv, ctx, D] K/V for one query token; (µs, name)."""
    B, Hq, _ = q.shape
    k = torch.randn(B, Hkv, ctx, Dk, device="cuda", dtype=q.dtype)
    v = torch.randn(B, Hkv, ctx, Dv, device="cuda", dtype=q.dtype)
    q4 = q.unsqueeze(2)

    def time_with():
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(q4, k, v, enable_gqa=True)  # noqa: E731
        fn()
        torch.cuda.synchronize()
        return bench(fn)

    return fastest_sdpa(time_with)


def graph_of(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def run_row(shape, ctx, B, copy_gbs, p=PAPER_P):
    cfg = SHAPES[shape]
    q, gates, layer, tables, seq_lens = make_inputs(B, ctx, **cfg, p=p)
    sdpa_us, backend = sdpa_baseline(q, ctx, cfg["Hkv"], cfg["Dk"], cfg["Dv"])
    dense_us = bench(lambda: dense_paged_decode(q, layer, tables, seq_lens))
    nsa = lambda: nsa_decode(q, gates, layer, tables, seq_lens, p)  # noqa: E731
    nsa_us = bench(nsa)
    g = graph_of(nsa)
    graph_us = bench(g.replay)
    _, sel = nsa_decode(q, gates, layer, tables, seq_lens, p, return_selection=True)
    nbytes = must_read_bytes(sel, ctx, cfg["Hkv"], cfg["Dk"], cfg["Dv"], p)
    gbs = nbytes / (graph_us * 1e-6) / 1e9
    row = (f"| {shape} | {ctx // 1024}k | {B} | {sdpa_us:.1f} ({backend}) | {dense_us:.1f} | {nsa_us:.1f} | "
           f"{graph_us:.1f} | {sdpa_us / graph_us:.2f}x | {nbytes / 1e6:.1f} | {gbs:.0f} | "
           f"{100 * gbs / copy_gbs:.0f}% |")
    q = gates = layer = tables = seq_lens = g = None
    torch.cuda.empty_cache()
    return row


HEADER = ("| shape | ctx | batch | SDPA µs | dense paged µs | NSA µs | NSA+graph µs | x SDPA | MB read "
          "| GB/s | % copy |\n|---|---|---|---|---|---|---|---|---|---|---|")


def tune(copy_gbs, ctx=65536):
    """Time a few launch configurations of the NSA decode (paper shape) to pick the defaults."""
    cfg = SHAPES["paper"]
    print("| batch | chunk | warps | splits | NSA+graph µs | % copy |\n|---|---|---|---|---|---|")
    for B in (1, 16, 64):
        q, gates, layer, tables, seq_lens = make_inputs(B, ctx, **cfg, p=PAPER_P)
        _, sel = nsa_decode(q, gates, layer, tables, seq_lens, PAPER_P, return_selection=True)
        nbytes = must_read_bytes(sel, ctx, cfg["Hkv"], cfg["Dk"], cfg["Dv"], PAPER_P)
        for chunk in (None, 32):  # compressed entries per tile (default 64)
            for warps in (8,):
                for splits in (None, 1, 5, 25):
                    fn = lambda: nsa_decode(q, gates, layer, tables, seq_lens, PAPER_P, chunk=chunk,  # noqa: E731
                                            num_warps=warps, num_splits=splits)
                    try:
                        us = bench(graph_of(fn).replay, rep=50)
                    except Exception as e:  # a variant that fails to compile is reported, not fatal
                        print(f"| {B} | {chunk} | {warps} | {splits} | failed: {type(e).__name__} | |")
                        continue
                    print(f"| {B} | {chunk} | {warps} | {splits} | {us:.1f} | "
                          f"{100 * nbytes / (us * 1e-6) / 1e9 / copy_gbs:.0f}% |", flush=True)
        q = gates = layer = tables = seq_lens = None
        torch.cuda.empty_cache()


# Launch variants timed by --compare (kwargs of nsa_decode_tuned); a value "k*sms" means k times
# the device's SM count.
VARIANTS = {
    "default": {},
    "no PDL": dict(pdl=False),
    "one compressed tile buffer": dict(cmp_stages=2, cmp_programs="2*sms"),
    "splits merged in the attention kernel": dict(fuse_combine=True),
    "splits merged by the combine launch": dict(fuse_combine=False),
    # The fused merge's loads: [GP, k, DVP] tiles of k splits a step, summed over the split axis.
    "fused merge one split a step (2-D loads, no split-axis sums)": dict(merge_chunk=1),
    "fused merge two splits a step": dict(merge_chunk=2),
    "2 attention splits a group, merged by the combine launch": dict(num_splits=2, fuse_combine=False),
    "partial output rows in fp32 (default: bf16 for bf16 inputs)": dict(bf16_partials=False),
    "values read with the keys (default from batch 3 with PDL: after them)": dict(values_after_keys=False),
    "values after the keys (default below batch 3: with them)": dict(values_after_keys=True),
    "values after the keys, 4-warp score programs": dict(values_after_keys=True, score_warps=4),
    "values after the keys, 2-warp score programs": dict(values_after_keys=True, score_warps=2),
    "values after the keys, pass 1 program an SM": dict(values_after_keys=True, cmp_programs="1*sms"),
    "values with the keys, 2-warp score programs": dict(values_after_keys=False, score_warps=2),
    # Batch 4 (16 kv groups) has 16 pass and 16 attention splits, so a combine launch merges them;
    # with 8 of each the attention kernel's last split merges instead (FUSE_MAX_SPLITS).
    "8 attention splits a group": dict(num_splits=8),
    # Batch 16 (64 kv groups) gets 4 attention splits a group by default (two programs an SM):
    # fewer or more, for cards of other bandwidth than the H200 the defaults were chosen on.
    "2 attention splits a group": dict(num_splits=2),
    "3 attention splits a group": dict(num_splits=3),
    "6 attention splits a group": dict(num_splits=6),
    "8 attention splits a group, pass 1 program an SM": dict(num_splits=8, cmp_programs="1*sms"),
    "64-entry compressed tiles": dict(chunk=64),
    "top-n by arg-max passes (default: bitonic top-k)": dict(topn="passes"),
    "top-n over every block (default: of per-program candidates)": dict(topn="sort"),
    "score/combine carveout left to the driver (default: 100 % shared memory)": dict(carveout=None),
    "compressed pass without L2 eviction hints": dict(cmp_evict=False),
    "64-entry compressed tiles, one a program": dict(chunk=64, cmp_programs="2*sms"),
    "32-entry compressed tiles": dict(chunk=32),
    "32-entry compressed tiles, two a program": dict(chunk=32, cmp_programs="2*sms"),
    "32-entry compressed tiles, one a program": dict(chunk=32, cmp_programs="4*sms"),
    # Unpipelined compressed pass (loads to registers, latency hidden by programs an SM): Triton
    # 3.6 keeps the evict-first hint only on such loads, not on pipelined cp.async copies.
    "register loads, 128-entry tiles, 1 an SM": dict(cmp_stages=1),
    "register loads, 128-entry tiles, 2 an SM": dict(cmp_stages=1, chunk=128, cmp_programs="2*sms"),
    "register loads, 64-entry tiles, 8 warps, 2 an SM": dict(cmp_stages=1, chunk=64, cmp_warps=8,
                                                             cmp_programs="2*sms"),
    "register loads, 32-entry tiles, 4 an SM": dict(cmp_stages=1, chunk=32, cmp_programs="4*sms"),
    "register loads, 32-entry tiles, 4 an SM, no hints": dict(cmp_stages=1, chunk=32, cmp_programs="4*sms",
                                                              cmp_evict=False),
    "register loads, 64-entry tiles, 8 warps, 2 an SM, no hints": dict(cmp_stages=1, chunk=64, cmp_warps=8,
                                                                       cmp_programs="2*sms", cmp_evict=False),
}


def _variant_kwargs(kw):
    """kwargs of one variant; a value "k*sms" is k times the device's SM count."""
    from ._triton_utils import num_sms

    sms = num_sms(torch.cuda.current_device())
    return {k: (int(v.split("*")[0]) * sms if isinstance(v, str) and v.endswith("*sms") else v)
            for k, v in kw.items()}


def compare(copy_gbs, ctx=65536, batches=(1, 16, 64), only=None):
    """Paper shape at `ctx`: the table row of the current default, then the previous version
    (`nsa_decode_v1`, if present beside this module: the saved copy of the kernel before this
    round) and launch variants, each from a CUDA graph. `only`: substrings; variants whose name
    has none of them are skipped (the default is always timed)."""
    try:
        from .nsa_decode_v1 import nsa_decode as nsa_v1
    except ImportError:
        nsa_v1 = None
    cfg = SHAPES["paper"]
    rows = []
    for B in batches:
        rows.append(run_row("paper", ctx, B, copy_gbs))
        print(HEADER + "\n" + rows[-1], flush=True)
        q, gates, layer, tables, seq_lens = make_inputs(B, ctx, **cfg, p=PAPER_P)
        _, sel = nsa_decode(q, gates, layer, tables, seq_lens, PAPER_P, return_selection=True)
        nbytes = must_read_bytes(sel, ctx, cfg["Hkv"], cfg["Dk"], cfg["Dv"], PAPER_P)
        ref = nsa_decode(q, gates, layer, tables, seq_lens, PAPER_P).float()
        fns = {f"new {k}": (lambda kw=_variant_kwargs(kw): nsa_decode_tuned(q, gates, layer, tables, seq_lens,
                                                                           PAPER_P, **kw))
               for k, kw in VARIANTS.items() if k == "default" or not only or any(o in k for o in only)}
        if nsa_v1 is not None:
            fns["previous version"] = lambda: nsa_v1(q, gates, layer, tables, seq_lens, PAPER_P)
        print("| batch | variant | NSA+graph µs | % copy | max abs diff vs default |\n|---|---|---|---|---|")
        for name, fn in fns.items():
            try:
                diff = (fn().float() - ref).abs().max().item()
                us = bench(graph_of(fn).replay, rep=50)
            except Exception as e:  # a variant that fails to compile is reported, not fatal
                print(f"| {B} | {name} | failed: {type(e).__name__}: {str(e)[:80]} | | |", flush=True)
                continue
            print(f"| {B} | {name} | {us:.1f} | {100 * nbytes / (us * 1e-6) / 1e9 / copy_gbs:.0f}% | "
                  f"{diff:.2e} |", flush=True)
        _compare_dense(B, q, layer, tables, seq_lens)
        q = gates = layer = tables = seq_lens = None
        torch.cuda.empty_cache()
    print(HEADER)
    print("\n".join(rows))


def _compare_dense(B, q, layer, tables, seq_lens):
    """The dense baseline's launches (dense_decode.DENSE_LAUNCH), each from a CUDA graph."""
    from .dense_decode import DENSE_LAUNCH

    base = dense_paged_decode(q, layer, tables, seq_lens, launch="previous").float()
    print("| batch | dense paged launch | µs (graph) | max abs diff vs previous |\n|---|---|---|---|")
    for name in sorted(DENSE_LAUNCH):
        fn = lambda name=name: dense_paged_decode(q, layer, tables, seq_lens, launch=name)  # noqa: E731
        try:
            diff = (fn().float() - base).abs().max().item()
            us = bench(graph_of(fn).replay, rep=50)
        except Exception as e:  # reported, not fatal
            print(f"| {B} | {name} | failed: {type(e).__name__}: {str(e)[:80]} | |", flush=True)
            continue
        print(f"| {B} | {name} | {us:.1f} | {diff:.2e} |", flush=True)


def layers(ctx=65536, batches=(1,), n_layers=16, shape="paper"):
    """Attention as a model's decode step runs it: `n_layers` layers, each with its own cache and
    query, one after another in one CUDA graph; µs per layer = graph time / n_layers, for SDPA
    (the fastest backend that captures) and NSA. The single-call rows of the table pay the graph's
    own launch and end once per attention call; here they are shared by the layers, as in the
    engine's decode graphs. The L2 is emptied before each replay (FLUSH), not between layers:
    each layer reads its own memory, as in a model. The NSA graph's outputs are checked against
    eager calls before timing."""
    cfg = SHAPES[shape]
    print("| shape | ctx | batch | layers | SDPA µs/layer (graph, backend) | NSA µs/layer (graph) | x SDPA "
          "| max abs diff graph vs eager |\n|---|---|---|---|---|---|---|---|", flush=True)
    for B in batches:
        per = [make_inputs(B, ctx, **cfg, p=PAPER_P, seed=i) for i in range(n_layers)]
        outs: list[torch.Tensor] = []

        def nsa_step():
            outs.clear()
            outs.extend(nsa_decode(q, gates, layer, tables, seq_lens, PAPER_P)
                        for q, gates, layer, tables, seq_lens in per)

        nsa_step()
        eager = [o.float().clone() for o in outs]
        g = graph_of(nsa_step)
        g.replay()
        torch.cuda.synchronize()
        diff = max((o.float() - e).abs().max().item() for o, e in zip(outs, eager))
        nsa_us = bench(g.replay, rep=200) / n_layers
        outs.clear()
        g = eager = None
        qs = [x[0] for x in per]
        per = None
        torch.cuda.empty_cache()
        kv = [(torch.randn(B, cfg["Hkv"], ctx, cfg["Dk"], device="cuda", dtype=q.dtype),
               torch.randn(B, cfg["Hkv"], ctx, cfg["Dv"], device="cuda", dtype=q.dtype)) for q in qs]
        q4s = [q.unsqueeze(2) for q in qs]

        def sdpa_step():
            for q4, (k, v) in zip(q4s, kv):
                torch.nn.functional.scaled_dot_product_attention(q4, k, v, enable_gqa=True)

        best = fastest_sdpa(lambda: bench(graph_of(sdpa_step).replay, rep=200) / n_layers)
        print(f"| {shape} | {ctx // 1024}k | {B} | {n_layers} | {best[0]:.1f} ({best[1]}) | {nsa_us:.1f} | "
              f"{best[0] / nsa_us:.2f}x | {diff:.1e} |", flush=True)
        kv = q4s = qs = None
        torch.cuda.empty_cache()


def profile(copy_gbs, ctx=65536):
    """Per-kernel device time of one NSA and one dense decode step (L2 flushed between steps)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cfg = SHAPES["paper"]
    flush = torch.empty(1 << 28, dtype=torch.int8, device="cuda")
    for B in (1, 16, 64):
        q, gates, layer, tables, seq_lens = make_inputs(B, ctx, **cfg, p=PAPER_P)
        steps = {"nsa": lambda: nsa_decode(q, gates, layer, tables, seq_lens, PAPER_P),
                 "dense": lambda: dense_paged_decode(q, layer, tables, seq_lens)}
        for name, fn in steps.items():
            fn()
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    flush.zero_()
                    fn()
                torch.cuda.synchronize()
            for evt in prof.key_averages():
                total = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
                if total and "fill" not in evt.key and "elementwise" not in evt.key:
                    print(f"  B={B} {name}: {evt.key[:60]:60s} {total / evt.count:8.1f} µs x{evt.count}")
        q = gates = layer = tables = seq_lens = None
        torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), action="append")
    ap.add_argument("--ctx", type=int, action="append")
    ap.add_argument("--batch", type=int, action="append")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--compare", action="store_true", help="64k paper shape: default vs variants")
    ap.add_argument("--layers", type=int, metavar="N", help="per-layer time with N layers in one CUDA graph, "
                    "as in a model's decode step (--ctx, --batch, --shape: the first of each; default 64k, "
                    "batch 1, paper)")
    ap.add_argument("--only", action="append", help="with --compare: time only the variants whose name "
                    "contains one of these substrings (and the default)")
    ap.add_argument("--flush", choices=FLUSH_MODES, default="write",
                    help="how the L2 is emptied before each timed call (default: write, do_bench's)")
    args = ap.parse_args(argv)
    global FLUSH
    FLUSH = args.flush
    if not torch.cuda.is_available():
        sys.exit("bench_decode needs a CUDA GPU")
    copy_gbs = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth (read + write): {copy_gbs:.0f} GB/s  "
          f"L2 flush: {FLUSH}")
    if args.compare:
        compare(copy_gbs, batches=tuple(args.batch or (1, 16, 64)), only=args.only)
    if args.layers:
        layers(ctx=(args.ctx or [65536])[0], batches=tuple(args.batch or (1,)), n_layers=args.layers,
               shape=(args.shape or ["paper"])[0])
    if args.profile:
        profile(copy_gbs)
    if args.tune:
        tune(copy_gbs)
    if args.profile or args.tune or args.compare or args.layers:
        return
    print(HEADER, flush=True)
    for shape in args.shape or list(SHAPES):
        for ctx in args.ctx or [8192, 16384, 32768, 65536, 131072]:
            for B in args.batch or [1, 16, 64]:
                print(run_row(shape, ctx, B, copy_gbs), flush=True)


if __name__ == "__main__":
    main()
