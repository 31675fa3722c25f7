"""Where does passkey retrieval fail: finding the needle, or copying it?

    python -m nsa_serve.train.diagnose MODEL_DIR --data .data/heldout.bin --lengths 4096,16384 --samples 4

For each evaluation passkey prompt (the same cases `nsa-serve eval` sends), with the correct answer
appended (teacher forcing), prints:
  * which key digits the model predicts right, greedy, given the correct ones before;
  * per layer and kv group, at the query that predicts the key's first token: the rank of the needle's
    selection block among all blocks by the selection score, and whether top-n selects it.
A copy that fails while the block is selected is a copying problem; a block that is not selected is a
selection problem (what the default model's first training stage had: docs/training.md).
In process, float32, the trainer's batched forward (no server).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from nsa_kernels.nsa_sdpa import selection_scores
from nsa_kernels.reference import num_compressed, num_select_blocks, select_blocks

from ..model.checkpoint import load_model
from ..tokenizer import Tokenizer, render_chat
from .evaluate import build_passkey_cases
from .forward import _compress_batched, batched_attention_block
from .tasks import passkey_answer
from .tokens import read_tokens


def _find(seq: list[int], sub: list[int]) -> int:
    for i in range(len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    return -1


@torch.no_grad()
def diagnose_case(model, tok: Tokenizer, messages: list, key: str, q_chunk: int = 2048) -> dict:
    c, p = model.cfg, model.cfg.sparsity
    prompt = tok.encode(render_chat(messages))
    nl = len(tok.encode("\n", add_bos=False))

    def piece(text):  # tokens of text in the middle of a prompt (see TaskBuilder._enc)
        return tok.encode("\n" + text, add_bos=False)[nl:]

    answer = piece(passkey_answer(key))
    key_toks = piece(key)
    needle = _find(prompt, key_toks)  # the key's first occurrence in the needle sentence
    first = _find(answer, key_toks)
    if needle < 0 or first < 0:
        raise ValueError("the needle or the key's tokens were not found; tokenization differs from the template")
    ids = torch.tensor(prompt + answer)
    T = ids.shape[0] - 1
    qpos = len(prompt) + first - 1  # this query predicts the key's first token
    block = needle // p.select_block
    positions = torch.arange(T)
    h = model.embed(ids[:-1])
    layers = []
    for layer in model.layers:
        x = layer.attn_norm(h)
        q, kv = layer.attn.project(x, positions)
        k, v = kv["cmp"]
        n = num_compressed(qpos + 1, c.cmp_block, c.cmp_stride)
        kc, _ = _compress_batched(layer.attn, k[None, :qpos + 1], v[None, :qpos + 1], n)
        visible = ((torch.arange(n) * p.stride + p.block - 1) <= qpos)[None]
        nb = num_select_blocks(qpos + 1, p.select_block)
        sc = selection_scores(q[None, qpos:qpos + 1], kc, visible, nb, p, c.head_dim_k ** -0.5)  # [1, Hkv, 1, NB]
        chosen = select_blocks(sc[0], torch.tensor([qpos]), p)  # [Hkv, 1, NB]
        groups = []
        for g in range(c.num_kv_heads):
            rank = int((torch.argsort(sc[0, g, 0], descending=True, stable=True) == block).nonzero()[0])
            groups.append({"rank": rank, "selected": bool(chosen[g, 0, block])})
        layers.append(groups)
        h = h + batched_attention_block(layer.attn, x, 1, positions, q_chunk)
        h = h + layer.mlp(layer.mlp_norm(h))
    pred = model.logits(h).argmax(-1)
    digits = [int(pred[qpos + j]) == int(ids[qpos + j + 1]) for j in range(len(key_toks))]
    return {"tokens": T, "query": qpos, "needle": needle, "block": block, "blocks": nb, "key_tokens_right": digits,
            "layers": layers}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--data", default=".data/heldout.bin", help="held-out token file (passkey filler)")
    ap.add_argument("--lengths", default="4096,16384")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--q-chunk", type=int, default=2048)
    ap.add_argument("--json", help="also write the records here")
    a = ap.parse_args(argv)
    model = load_model(a.model, dtype=torch.float32).eval()
    tok = Tokenizer(f"{a.model}/tokenizer.model")
    cases = build_passkey_cases(tok, read_tokens(a.data), [int(x) for x in a.lengths.split(",")], a.samples, a.seed)
    records = []
    print("| length | depth | needle block / blocks | key tokens right | needle block's rank, layer × group (* = selected) |")
    print("|---|---|---|---|---|")
    for case in cases:
        r = diagnose_case(model, tok, case.messages, case.key, a.q_chunk)
        records.append({"length": case.length, "depth": case.depth, **r})
        ranks = " · ".join(",".join(f"{g['rank']}{'*' if g['selected'] else ''}" for g in layer) for layer in r["layers"])
        right = "".join("✓" if d else "✗" for d in r["key_tokens_right"])
        print(f"| {case.length} | {case.depth:.2f} | {r['block']} / {r['blocks']} | {right} | {ranks} |", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
