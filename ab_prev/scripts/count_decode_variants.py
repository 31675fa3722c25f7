"""How many kernel variants eager NSA decode steps can make Triton compile: the decode launcher is
called (nothing is launched or compiled) for every batch size 1…B and table width 1…W pages at the
paper shape on a modelled H200 (132 SMs, PDL), and each launch's specialisation key is recorded —
its constexpr values plus, for every int argument Triton specialises on, whether it is 1, divisible
by 16, or neither (Triton's rule; `do_not_specialize` arguments excepted). A server meets a new key
the first time a step has that batch size and width class, and pays a compile then.

    python3 scripts/count_decode_variants.py [--max-batch 16] [--max-pages 1024] [--exact-width]

Widths are rounded as the engine rounds them (`model_runner.table_width`: the next power of two,
at least 16); `--exact-width` counts tables exactly as wide as the longest sequence (before).

A model of Triton's key, not Triton's cache: it shows which launch constants multiply variants.
Runs on a CPU (kernels/ importable as nsa_kernels). Results: docs/benchmarks/engine.md.
"""

import argparse

import torch
from triton.runtime.jit import JITFunction


def count(max_batch: int, max_pages: int, exact_width: bool = False) -> dict[str, int]:
    import nsa_kernels.nsa_decode as nd
    from nsa_kernels.paged import PagedLayerCache
    from nsa_kernels.reference import SparsityParams
    from nsa_serve.engine.model_runner import table_width

    seen: dict[str, set] = {}

    def record(self, *args, grid, warmup, **kw):
        skip = set(getattr(self, "do_not_specialize", None) or [])
        key = tuple(sorted((k, v) for k, v in kw.items() if isinstance(v, (int, bool, str))
                           and k not in ("num_warps", "num_stages", "launch_pdl")))
        key += tuple("one" if a == 1 else "div16" if a % 16 == 0 else "int"
                     for i, a in enumerate(args) if isinstance(a, int) and not isinstance(a, bool)
                     and self.arg_names[i] not in skip and i not in skip)
        seen.setdefault(self.fn.__name__, set()).add(key)

    original = JITFunction.run, nd.target_programs, nd.pipeline_smem_budget, nd.pdl_enabled
    JITFunction.run = record
    nd.target_programs = lambda dev: 2 * 132
    nd.pipeline_smem_budget = lambda dev: 227 * 1024
    nd.pdl_enabled = lambda dev: True
    try:
        p = SparsityParams(block=32, stride=16, select_block=64, num_select=16, window=512)
        d, P, E, Hkv = torch.bfloat16, p.select_block, p.select_block // p.stride, 4
        layer = PagedLayerCache(torch.empty(4, Hkv, P, 192, dtype=d), torch.empty(4, Hkv, P, 128, dtype=d),
                                torch.empty(4, Hkv, E, 192, dtype=d), torch.empty(4, Hkv, E, 128, dtype=d))
        for B in range(1, max_batch + 1):
            q, g = torch.empty(B, 64, 192, dtype=d), torch.empty(B, 64, 3, dtype=d)
            for pages in range(1, max_pages + 1):
                bt = torch.zeros(B, pages if exact_width else table_width(pages), dtype=torch.int32)
                nd.nsa_decode(q, g, layer, bt, torch.full((B,), pages * P, dtype=torch.int32), p)
    finally:
        JITFunction.run, nd.target_programs, nd.pipeline_smem_budget, nd.pdl_enabled = original
    return {k: len(v) for k, v in seen.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-pages", type=int, default=1024)
    ap.add_argument("--exact-width", action="store_true", help="tables as wide as the longest sequence")
    a = ap.parse_args()
    n = count(a.max_batch, a.max_pages, a.exact_width)
    width = "exact" if a.exact_width else "rounded as the engine rounds them"
    print(f"batch 1–{a.max_batch}, longest sequence 1–{a.max_pages} pages, table widths {width}: {n} — "
          f"{sum(n.values())} in all")


if __name__ == "__main__":
    main()
