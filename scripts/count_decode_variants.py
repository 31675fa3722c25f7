"""How many kernel variants eager NSA decode steps can make Triton compile: the decode launcher is
called (nothing is launched or compiled) for every batch size 1…B and table width 1…W pages at the
paper shape on a modelled GPU (default an H100 / H200: 132 SMs, PDL), and each launch's specialisation key is recorded —
its constexpr values plus, for every int argument Triton specialises on, whether it is 1, divisible
by 16, or neither (Triton's rule; `do_not_specialize` arguments excepted). A server meets a new key
the first time a step has that batch size and width class, and pays a compile then.

    python3 scripts/count_decode_variants.py [--max-batch 16] [--max-pages 1024] [--exact-width]
    python3 scripts/count_decode_variants.py --max-batch 320 --max-pages 2048 --classes-only --new-above 63

`--new-above N` lists the keys that only batches above N meet — e.g. whether the start-up
precompile, which runs 1 … max_num_seqs − 1 decode rows beside a prompt chunk, misses variants
that rows verifying speculative drafts (1 + k rows a sequence) can reach. `--dense` counts the
dense decode launcher (the `--attention dense` baseline) as well. `--classes-only` calls each
width class once (its widest and a narrower table) instead of every page count. `--shape` picks
the attention heads (SHAPES: the paper's, the bundled model's, ...).

    python3 scripts/count_decode_variants.py --check-bound

checks `_triton_utils.decode_rows_bound` for every shape in SHAPES on every modelled GPU in
DEVICES (SM counts, with and without PDL, shared-memory budgets), both launchers: batches past the
bound (up to three times it) meet no key that batches 1 … bound do not; exits 1 if one does.
The start-up precompile stops its speculative decode rows at that bound (engine/precompile.py).

Widths are rounded as the engine rounds them (`model_runner.table_width`: the next power of two,
at least 16); `--exact-width` counts tables exactly as wide as the longest sequence (before).

A model of Triton's key, not Triton's cache: it shows which launch constants multiply variants.
Runs on a CPU (kernels/ importable as nsa_kernels). Results: docs/benchmarks/engine.md.
"""

import argparse
import sys

import torch
from triton.runtime.jit import JITFunction


# Attention heads: (q heads, kv heads, dk, dv).
SHAPES = {"paper": (64, 4, 192, 128), "bundled": (8, 2, 64, 64), "one-kv-head": (16, 1, 64, 64),
          "eight-kv-heads": (64, 8, 128, 128)}
# Modelled GPUs: (SMs, PDL, compute capability): what the decode launchers ask of the device
# (`_triton_utils`: target_programs = 2·SMs, pdl_enabled, pipeline_smem_budget by capability).
DEVICES = {"h100-sxm": (132, True, 90), "h100-pcie": (114, True, 90), "a100": (108, False, 80),
           "l40s": (142, False, 89)}


def count(batches, max_pages: int, exact_width: bool = False, dense: bool = False,
          classes_only: bool = False, shape: tuple = SHAPES["paper"], device: str = "h100-sxm") -> dict[int, set]:
    """The specialisation keys each batch size in `batches` meets: {batch: {(kernel name, key)}}."""
    sms, pdl, arch = DEVICES[device]
    import nsa_kernels.dense_decode as dd
    import nsa_kernels.nsa_decode as nd
    from nsa_kernels._triton_utils import arch_smem_budget
    from nsa_kernels.paged import PagedLayerCache
    from nsa_kernels.reference import SparsityParams
    from nsa_serve.engine.model_runner import table_width

    seen: dict[int, set] = {}
    batch = [0]

    def record(self, *args, grid, warmup, **kw):
        skip = set(getattr(self, "do_not_specialize", None) or [])
        key = tuple(sorted((k, v) for k, v in kw.items() if isinstance(v, (int, bool, str))
                           and k not in ("num_warps", "num_stages", "launch_pdl")))
        key += tuple("one" if a == 1 else "div16" if a % 16 == 0 else "int"
                     for i, a in enumerate(args) if isinstance(a, int) and not isinstance(a, bool)
                     and self.arg_names[i] not in skip and i not in skip)
        seen.setdefault(batch[0], set()).add((self.fn.__name__, key))

    original = JITFunction.run, nd.target_programs, nd.pipeline_smem_budget, nd.pdl_enabled, dd.target_programs
    JITFunction.run = record
    nd.target_programs = dd.target_programs = lambda dev: 2 * sms
    nd.pipeline_smem_budget = lambda dev: arch_smem_budget(arch)
    nd.pdl_enabled = lambda dev: pdl
    try:
        p = SparsityParams(block=32, stride=16, select_block=64, num_select=16, window=512)
        Hq, Hkv, Dk, Dv = shape
        d, P, E = torch.bfloat16, p.select_block, p.select_block // p.stride
        layer = PagedLayerCache(torch.empty(4, Hkv, P, Dk, dtype=d), torch.empty(4, Hkv, P, Dv, dtype=d),
                                torch.empty(4, Hkv, E, Dk, dtype=d), torch.empty(4, Hkv, E, Dv, dtype=d))
        page_counts = range(1, max_pages + 1)
        if classes_only:  # table_width's classes: each one's widest table and one just past the last
            page_counts = sorted({n for w in (16 << i for i in range(max_pages.bit_length()))
                                  for n in (w, w // 2 + 1) if n <= max_pages} | {1})
        for B in batches:
            batch[0] = B
            q, g = torch.empty(B, Hq, Dk, dtype=d), torch.empty(B, Hq, 3, dtype=d)
            for pages in page_counts:
                bt = torch.zeros(B, pages if exact_width else table_width(pages), dtype=torch.int32)
                lens = torch.full((B,), pages * P, dtype=torch.int32)
                nd.nsa_decode(q, g, layer, bt, lens, p)
                if dense:
                    dd.dense_paged_decode(q, layer, bt, lens)
    finally:
        JITFunction.run, nd.target_programs, nd.pipeline_smem_budget, nd.pdl_enabled, dd.target_programs = original
    return seen


def per_kernel(keys: set) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, _ in keys:
        out[name] = out.get(name, 0) + 1
    return out


def check_bound(max_pages: int, devices=tuple(DEVICES), divisor: int = 1) -> int:
    """For every modelled GPU and shape: keys of batches bound + 1 … 3·bound against those of
    1 … bound (both launchers, width classes only). Returns the number of (GPU, shape) pairs with
    keys past the bound. `divisor` > 1 checks a bound that many times smaller instead (the
    check's own test: a bound too small must fail it)."""
    failed = 0
    for device in devices:
        for name, shape in SHAPES.items():
            bound = max(1, _bound_on_model(shape[1], device) // divisor)
            seen = count(range(1, 3 * bound + 1), max_pages, dense=True, classes_only=True, shape=shape,
                         device=device)
            low = set().union(*(v for b, v in seen.items() if b <= bound))
            new = set().union(*(v for b, v in seen.items() if b > bound)) - low
            below = set().union(*(v for b, v in seen.items() if b < bound)) if bound > 1 else set()
            print(f"{device} {name} {shape}: bound {bound} rows; keys past it not met at or below it: "
                  f"{per_kernel(new) or 'none'}; keys first met at the bound itself: "
                  f"{per_kernel(low - below) or 'none'}", flush=True)
            failed += bool(new)
    return failed


def _bound_on_model(num_kv_heads: int, device: str) -> int:
    """`decode_rows_bound` on a modelled GPU (its SMs, as `count` sizes the launchers)."""
    import nsa_kernels._triton_utils as tu

    original = tu.target_programs
    tu.target_programs = lambda dev: 2 * DEVICES[device][0]
    try:
        return tu.decode_rows_bound(num_kv_heads, torch.device("cpu"))
    finally:
        tu.target_programs = original


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-pages", type=int, default=1024)
    ap.add_argument("--exact-width", action="store_true", help="tables as wide as the longest sequence")
    ap.add_argument("--dense", action="store_true", help="count the dense decode launcher too")
    ap.add_argument("--classes-only", action="store_true", help="one or two page counts per width class")
    ap.add_argument("--new-above", type=int, metavar="N", help="keys only batches above N meet")
    ap.add_argument("--shape", choices=list(SHAPES), default="paper", help="attention heads (default: paper)")
    ap.add_argument("--device", choices=list(DEVICES), help="the modelled GPU (default: h100-sxm; "
                    "with --check-bound every one)")
    ap.add_argument("--bound-divisor", type=int, default=1, help=argparse.SUPPRESS)  # tests: a smaller bound
    ap.add_argument("--check-bound", action="store_true",
                    help="check decode_rows_bound over every shape and modelled GPU (exit 1 when a batch "
                    "past it meets a new key)")
    a = ap.parse_args()
    if a.check_bound:
        devices = (a.device,) if a.device else tuple(DEVICES)
        return 1 if check_bound(min(a.max_pages, 1024), devices, a.bound_divisor) else 0
    seen = count(range(1, a.max_batch + 1), a.max_pages, a.exact_width, a.dense, a.classes_only, SHAPES[a.shape],
                 a.device or "h100-sxm")
    n = per_kernel(set().union(*seen.values()))
    width = "exact" if a.exact_width else "rounded as the engine rounds them"
    print(f"batch 1–{a.max_batch}, longest sequence 1–{a.max_pages} pages, table widths {width}: {n} — "
          f"{sum(n.values())} in all")
    if a.new_above is not None:
        low = set().union(*(v for b, v in seen.items() if b <= a.new_above))
        new = set().union(*(v for b, v in seen.items() if b > a.new_above)) - low
        first = min((b for b, v in seen.items() if b > a.new_above and v - low), default=None)
        print(f"keys only batches above {a.new_above} meet: {per_kernel(new) or 'none'}"
              + (f" (first at batch {first})" if first else ""))


if __name__ == "__main__":
    sys.exit(main())
