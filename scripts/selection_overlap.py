"""How many selected pages do neighbouring queries share? (Prefill plan, item 1: docs/benchmarks/prefill.md.)

    python scripts/selection_overlap.py [--model DIR] [--tokens 16384] [--text FILE ...]

The prefill's selected-branch kernel reads each (query, kv group)'s non-forced selected pages from
the L2 (17.5 ms of 49 at 64k on the H200). A kernel that walked a tile of T consecutive queries over
the *union* of their selections would read each shared page once. What that saves depends on the
attention pattern, and the kernel benchmark's random inputs are the worst case. This script measures
the saving on real selections: the trained model's (the bundled default model unless --model),
on real text (the repository's docs unless --text), against random q/k of the same shapes.

For each layer and kv group it takes every query's selection as the reference computes it
(`selection_scores` + `select_blocks`, float32), drops the forced blocks (the initial block and
the local ones, which the window kernel attends), and prints per tile size T:
  reads/query = (pages in the union of a tile's non-forced selections) / T, averaged over tiles,
  saving     = (non-forced pages per query) / (reads/query): how many times fewer page reads.
CPU, in process; no kernel is run.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

import torch

from nsa_kernels.nsa_sdpa import selection_scores
from nsa_kernels.reference import forced_blocks, num_compressed, num_select_blocks, select_blocks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TILES = (1, 2, 4, 8, 16, 32, 64)


def selections(q: torch.Tensor, kc: torch.Tensor, p, scale: float, chunk: int = 2048) -> torch.Tensor:
    """q [T, Hq, Dk], kc [N, Hkv, Dk] → non-forced selected blocks [Hkv, T, NB] (bool), in query chunks."""
    T = q.shape[0]
    N = kc.shape[0]
    NB = num_select_blocks(T, p.select_block)
    out = []
    for a in range(0, T, chunk):
        b = min(T, a + chunk)
        pos = torch.arange(a, b)
        visible = (torch.arange(N)[None, :] * p.stride + p.block - 1) <= pos[:, None]
        sc = selection_scores(q[None, a:b], kc[None], visible, NB, p, scale)[0]  # [Hkv, C, NB]
        out.append(select_blocks(sc, pos, p) & ~forced_blocks(pos, NB, p)[None])
    return torch.cat(out, 1)


def tile_reads(sel: torch.Tensor, tile: int) -> tuple[float, float]:
    """(non-forced pages a query selects, union pages a tile of `tile` queries reads per query)."""
    H, T, NB = sel.shape
    T2 = T // tile * tile
    s = sel[:, :T2]
    per_query = s.sum(-1).float().mean().item()
    union = s.view(H, T2 // tile, tile, NB).any(2).sum(-1).float().mean().item() / tile
    return per_query, union


@torch.no_grad()
def model_selections(model_dir: str, text: str, n_tokens: int):
    from nsa_serve.model.checkpoint import load_model
    from nsa_serve.tokenizer import Tokenizer
    from nsa_serve.train.forward import _compress_batched, batched_attention_block

    model = load_model(model_dir, dtype=torch.float32).eval()
    tok = Tokenizer(f"{model_dir}/tokenizer.model")
    ids = tok.encode(text)[:n_tokens]
    if len(ids) < n_tokens:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than --tokens {n_tokens}")
    c, p = model.cfg, model.cfg.sparsity
    ids = torch.tensor(ids)
    T = ids.shape[0]
    positions = torch.arange(T)
    h = model.embed(ids)
    per_layer = []
    for layer in model.layers:
        x = layer.attn_norm(h)
        q, kv = layer.attn.project(x, positions)
        k, v = kv["cmp"]
        n = num_compressed(T, c.cmp_block, c.cmp_stride)
        kc, _ = _compress_batched(layer.attn, k[None], v[None], n)
        per_layer.append(selections(q, kc[0], p, c.head_dim_k ** -0.5))
        h = h + batched_attention_block(layer.attn, x, 1, positions, 2048)
        h = h + layer.mlp(layer.mlp_norm(h))
    return c, p, per_layer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "nsa_serve", "assets", "default-model"))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--text", nargs="*", help="text files (default: the repository's docs/**/*.md)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    files = a.text or sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
    text = "\n\n".join(open(f, encoding="utf-8").read() for f in files)
    torch.manual_seed(a.seed)
    c, p, layers = model_selections(a.model, text, a.tokens)
    T = a.tokens
    # The benchmark's inputs: random q and summaries of the same shapes.
    n = num_compressed(T, c.cmp_block, c.cmp_stride)
    rnd = selections(torch.randn(T, c.num_heads, c.head_dim_k), torch.randn(n, c.num_kv_heads, c.head_dim_k),
                     p, c.head_dim_k ** -0.5)
    print(f"{T} tokens, {num_select_blocks(T, p.select_block)} blocks of {p.select_block}; n = {p.num_select} "
          f"({p.num_init} initial + {p.num_local} local forced); {c.num_heads} q heads, {c.num_kv_heads} kv heads")
    print()
    print("| selections | non-forced pages a query | " + " | ".join(f"T={t}" for t in TILES) + " |")
    print("|---|---|" + "---|" * len(TILES))
    rows = [(f"layer {i}, group {g}", s[g:g + 1]) for i, s in enumerate(layers) for g in range(s.shape[0])]
    rows.append(("trained, all layers and groups", torch.cat(layers, 0)))
    rows.append(("random q/k (the benchmark's)", rnd))
    for name, s in rows:
        cells = []
        for t in TILES:
            per_query, union = tile_reads(s, t)
            cells.append(f"{union:.2f} ({per_query / union:.2f}×)")
        print(f"| {name} | {tile_reads(s, 1)[0]:.2f} | " + " | ".join(cells) + " |")
    print()
    print("Cells: union pages a tile reads per query (saving against one query a program).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
