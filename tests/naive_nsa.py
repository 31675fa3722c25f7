"""A deliberately naive NSA attention, written from the paper's definitions (DESIGN.md §1) and
nothing else: loops over query positions, heads and branches, plain Python lists, float64.

It shares no code with nsa_kernels.reference; the tests compare the two.
"""

from __future__ import annotations

import functools
import math

import torch


def naive_phi(block: torch.Tensor, variant: str, params: dict) -> torch.Tensor:
    """One compression block [l, D] → [D] by the φ variant, reading the module's raw parameters."""
    if variant == "mean":
        return sum(block[r] for r in range(block.shape[0])) / block.shape[0]
    x = block + params["pos"] if params.get("pos") is not None else block
    flat = torch.cat([x[r] for r in range(x.shape[0])])  # row-major flatten of [l, D]
    h = params["proj"] @ flat
    if variant == "mlp":
        h = h * (1.0 / (1.0 + torch.exp(-h)))  # SiLU
        h = params["out"] @ h
    return h


@functools.lru_cache(maxsize=None)
def overlap_tokens(i: int, j: int, l: int, d: int, lp: int) -> int:
    cmp_tokens = set(range(i * d, i * d + l))
    sel_tokens = set(range(j * lp, (j + 1) * lp))
    return len(cmp_tokens & sel_tokens)


def softmax_attend(q, keys, values, scale):
    """Attention of one query over explicit lists of keys/values; None when there are none."""
    if len(keys) == 0:
        return None
    keys = keys if torch.is_tensor(keys) else torch.stack(keys)
    values = values if torch.is_tensor(values) else torch.stack(values)
    logits = (keys @ q) * scale
    probs = torch.exp(logits - logits.max())
    probs = probs / probs.sum()
    out = probs @ values
    return out, probs.tolist()


def naive_nsa(q, kv, gates, phi_variant, phi_k_params, phi_v_params, l, d, lp, n, w,
              n_init=1, n_local=2, scale=None):
    """q [S, Hq, Dk] for positions 0 … S−1; kv = {'cmp': (k, v), 'slc': (k, v), 'win': (k, v)} raw
    per-branch [S, Hkv, D*]; gates [S, Hq, 3]. Returns ([S, Hq, Dv], selected blocks per (t, group))."""
    S, Hq, Dk = q.shape
    Hkv = kv["slc"][0].shape[1]
    Dv = kv["slc"][1].shape[2]
    G = Hq // Hkv
    scale = scale if scale is not None else 1.0 / math.sqrt(Dk)
    out = torch.zeros(S, Hq, Dv, dtype=torch.float64)
    chosen_log = {}

    # Compressed entries: entry i summarises tokens [i·d, i·d + l) of the compression branch.
    n_entries = 0
    while n_entries * d + l <= S:
        n_entries += 1
    kc = [[naive_phi(kv["cmp"][0][i * d:i * d + l, g], phi_variant, phi_k_params) for i in range(n_entries)]
          for g in range(Hkv)]
    vc = [[naive_phi(kv["cmp"][1][i * d:i * d + l, g], phi_variant, phi_v_params) for i in range(n_entries)]
          for g in range(Hkv)]

    for t in range(S):
        visible_entries = [i for i in range(n_entries) if i * d + l - 1 <= t]
        n_blocks = t // lp + 1  # blocks that hold at least one token ≤ t
        for g in range(Hkv):
            heads = [g * G + r for r in range(G)]
            # --- compressed branch, and the probabilities that drive selection ---------------
            cmp_out, block_score = {}, [0.0] * n_blocks
            for h in heads:
                res = softmax_attend(q[t, h], [kc[g][i] for i in visible_entries],
                                     [vc[g][i] for i in visible_entries], scale)
                if res is None:
                    cmp_out[h] = torch.zeros(Dv, dtype=torch.float64)
                    continue
                cmp_out[h], probs = res
                for i, p_i in zip(visible_entries, probs):
                    # only the blocks entry i's tokens fall in can share tokens with it
                    for j in range((i * d) // lp, min(n_blocks, (i * d + l - 1) // lp + 1)):
                        block_score[j] += p_i * overlap_tokens(i, j, l, d, lp) / d
            # --- choose blocks: forced first, then best scores, ties to the lower index ------
            forced = [j for j in range(n_blocks) if j < n_init or j >= n_blocks - n_local]
            rest = sorted((j for j in range(n_blocks) if j not in forced), key=lambda j: (-block_score[j], j))
            chosen = sorted(forced + rest[: max(0, n - len(forced))])
            chosen_log[(t, g)] = chosen
            sel_tokens = [s for j in chosen for s in range(j * lp, min((j + 1) * lp, t + 1))]
            win_tokens = list(range(max(0, t - w + 1), t + 1))
            for h in heads:
                # keys/values of exactly the listed token positions
                slc = softmax_attend(q[t, h], kv["slc"][0][sel_tokens, g], kv["slc"][1][sel_tokens, g], scale)[0]
                win = softmax_attend(q[t, h], kv["win"][0][win_tokens, g], kv["win"][1][win_tokens, g], scale)[0]
                gc, gs, gw = (float(x) for x in gates[t, h])
                out[t, h] = gc * cmp_out[h] + gs * slc + gw * win
    return out, chosen_log
