"""How fast is the dense engine's chunked prefill against one-shot SDPA? (GPU only.)

The dense server is the baseline the load test compares NSA with, so its prompt path should be as
fast as torch allows. One layer of the paper shape (64 q heads, 4 kv heads, dk 192, dv 128, bf16),
a prompt of --ctx tokens in --chunk-token chunks over a shuffled paged cache, each chunk attending
to everything before it and causally to itself. Variants, each summed over the prompt's chunks:

  current   nsa_serve.engine.attention.dense_prefill_sdpa (the chunk against the cached prefix,
            query heads folded per kv head, and against itself, causal: two cuDNN calls merged by
            their log-sum-exps)
  efficient the same with torch's memory-efficient kernel, the engine's route where cuDNN refuses
  padded    the engine's path until 2026-12-06: per group, K/V copied per query head, V padded to
            dk, a lower-right causal mask (torch's FlashAttention-2)
  gqa       one SDPA call, K/V not copied per head (enable_gqa), V padded, lower-right mask
  split     per group: the chunk against the cached prefix (no mask) and against itself (causal,
            square), each through torch's cuDNN attention with its log-sum-exp, then merged
  split_views  the same with K/V passed as expanded views (no per-head copies)
  oneshot   SDPA is_causal over the whole prompt at once, contiguous (what bench_prefill compares
            NSA prefill with): the floor a chunked path can approach

Prints a table (ms per prompt and layer, ratio to current) and each variant's max |difference|
from `current` on the last chunk.
"""

from __future__ import annotations

import argparse
import types

import torch
import torch.nn.functional as F

from nsa_kernels.bench_prefill import timed
from nsa_kernels.paged import PagedLayerCache
from nsa_serve.engine import attention
from nsa_serve.engine.attention import dense_prefill_sdpa, merge_by_lse


def gqa(q, k, v, L, T):
    from torch.nn.attention.bias import causal_lower_right
    Dk, Dv = k.shape[-1], v.shape[-1]
    if Dv < Dk:
        v = F.pad(v, (0, Dk - Dv))
    o = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                       attn_mask=causal_lower_right(T, L), enable_gqa=True)
    return o[0, ..., :Dv].transpose(0, 1)


def split(q, k, v, L, T, copy=True):
    cudnn = torch.ops.aten._scaled_dot_product_cudnn_attention
    c = (lambda x: x.contiguous()) if copy else (lambda x: x)
    Hq, Hkv = q.shape[1], k.shape[0]
    G = Hq // Hkv
    out = q.new_empty(T, Hq, v.shape[-1])
    for h in range(Hkv):
        qh = q[:, h * G:(h + 1) * G].transpose(0, 1).unsqueeze(0)
        kp = c(k[h, :L - T].expand(G, L - T, k.shape[-1]).unsqueeze(0))
        vp = c(v[h, :L - T].expand(G, L - T, v.shape[-1]).unsqueeze(0))
        kc = c(k[h, L - T:].expand(G, T, k.shape[-1]).unsqueeze(0))
        vc = c(v[h, L - T:].expand(G, T, v.shape[-1]).unsqueeze(0))
        o2, lse2 = cudnn(qh, kc, vc, None, True, 0.0, True)[:2]
        lse2 = lse2.reshape(o2.shape[:-1])
        if L > T:
            o1, lse1 = cudnn(qh, kp, vp, None, True, 0.0, False)[:2]
            o = merge_by_lse(o1, lse1.reshape(o1.shape[:-1]).float(), o2, lse2.float())
        else:
            o = o2
        out[:, h * G:(h + 1) * G] = o[0].transpose(0, 1).to(q.dtype)
    return out


def padded(q, k, v, L, T):
    """The engine's path until 2026-12-06: per kv group, K/V copied per query head, V padded to dk,
    a lower-right causal mask (torch's FlashAttention-2)."""
    from torch.nn.attention.bias import causal_lower_right
    Hq, Hkv, Dk, Dv = q.shape[1], k.shape[0], k.shape[-1], v.shape[-1]
    G = Hq // Hkv
    o = q.new_empty(T, Hq, Dv)
    for h in range(Hkv):
        kh = k[h].expand(G, L, Dk).unsqueeze(0).contiguous()
        vh = F.pad(v[h], (0, Dk - Dv)).expand(G, L, Dk).unsqueeze(0).contiguous()
        qh = q[:, h * G:(h + 1) * G].transpose(0, 1).unsqueeze(0)
        oh = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=causal_lower_right(T, L))
        o[:, h * G:(h + 1) * G] = oh[0, ..., :Dv].transpose(0, 1)
    return o


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, default=65536)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    Hq, Hkv, Dk, Dv, P = 64, 4, 192, 128, 64
    S, C = a.ctx, a.chunk
    pages = S // P
    g = torch.Generator(device=dev).manual_seed(0)
    cache = PagedLayerCache.allocate(pages + 1, Hkv, Dk, Dv, P, 16, dtype=dt, device=dev)
    cache.k_cache.normal_(generator=g)
    cache.v_cache.normal_(generator=g)
    table = torch.randperm(pages, generator=g, device=dev).to(torch.int32)[None]
    q = torch.randn(S, Hq, Dk, generator=g, device=dev, dtype=dt)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; paper shape, ctx {S}, chunks of {C}")

    def contiguous(L):
        idx = table[0, :(L + P - 1) // P].long()
        k = cache.k_cache[idx].transpose(0, 1).reshape(Hkv, -1, Dk)[:, :L]
        v = cache.v_cache[idx].transpose(0, 1).reshape(Hkv, -1, Dv)[:, :L]
        return k, v

    def chunks(variant):
        outs = []
        for L in range(C, S + 1, C):
            qc = q[L - C:L]
            if variant in ("current", "efficient"):
                inp = types.SimpleNamespace(cu_host=[0, C], seq_lens_host=[L], block_tables=table)
                use_cudnn = attention._use_cudnn
                if variant == "efficient":
                    attention._use_cudnn = lambda key: False
                try:
                    outs.append(dense_prefill_sdpa(qc, cache, inp, 0, 1))
                finally:
                    attention._use_cudnn = use_cudnn
            else:
                k, v = contiguous(L)
                fn = {"gqa": gqa, "split": split, "split_views": lambda *x: split(*x, copy=False),
                      "padded": padded}[variant]
                outs.append(fn(qc, k, v, L, C))
        return outs[-1]

    kf, vf = contiguous(S)

    def oneshot():
        qq = q.transpose(0, 1).unsqueeze(0)
        kk = kf.repeat_interleave(Hq // Hkv, 0).unsqueeze(0)
        vv = vf.repeat_interleave(Hq // Hkv, 0).unsqueeze(0)
        return F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)[0, :, S - C:].transpose(0, 1)

    base = chunks("current")
    rows = []
    for name, fn in (("current", lambda: chunks("current")), ("efficient", lambda: chunks("efficient")),
                     ("padded", lambda: chunks("padded")),
                     ("gqa", lambda: chunks("gqa")),
                     ("split", lambda: chunks("split")), ("split_views", lambda: chunks("split_views")),
                     ("oneshot", oneshot)):
        try:
            out = fn()
            diff = (out.float() - base.float()).abs().max().item()
            ms = timed(fn, a.reps)
        except Exception as e:  # a backend torch cannot dispatch here: say so, go on
            rows.append((name, None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"))
            continue
        rows.append((name, ms, diff, ""))
        torch.cuda.empty_cache()
    cur = rows[0][1]
    print("| variant | ms per prompt (one layer) | current / variant | max abs diff vs current (last chunk) | note |")
    print("|---|---|---|---|---|")
    for name, ms, diff, note in rows:
        if ms is None:
            print(f"| {name} | — | — | — | {note} |")
        else:
            print(f"| {name} | {ms:.1f} | {cur / ms:.2f}x | {diff:.2e} | {note} |")


if __name__ == "__main__":
    main()
