"""`nsa-serve eval`: held-out perplexity (in process) and passkey retrieval accuracy measured through a
running server's OpenAI API, so what is scored is the paged engine and its kernels, not the trainer.

Perplexity = exp(Σ NLL / N) over next-token predictions in consecutive windows of the held-out tokens.
Passkey: for each context length L and depth (i + ½)/n, a prompt of about L − 24 tokens (room for the
reply) whose filler is held-out text; greedy decoding; correct when the reply contains the key (the
usual passkey scoring), exact when the reply's first number is the key and nothing more.
"""

from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import httpx
import numpy as np
import torch
import torch.nn.functional as F

from ..tokenizer import Tokenizer, render_chat
from .forward import train_forward_batch
from .tasks import passkey_messages, random_key

REPLY_TOKENS = 16


@torch.no_grad()
def heldout_nll(model, tokens: np.ndarray, seq_len: int, max_tokens: int, device, q_chunk: int | None | str = "auto",
                autocast: bool = False) -> tuple[float, int]:
    """Summed next-token NLL and the number of predictions over consecutive windows of `tokens`
    (each window of seq_len + 1 tokens predicts its last seq_len)."""
    total, count = 0.0, 0
    n = min(tokens.shape[0], max_tokens + 1)
    for a in range(0, n - 1, seq_len):
        ids = torch.as_tensor(np.asarray(tokens[a:min(n, a + seq_len + 1)], dtype=np.int64), device=device)
        if ids.shape[0] < 2:
            break
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            logits = train_forward_batch(model, ids[None, :-1], q_chunk)[0]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least, fp64 kept
        total += float(F.cross_entropy(logits, ids[1:], reduction="sum"))
        count += ids.shape[0] - 1
    return total, count


def perplexity(nll_sum: float, count: int) -> float:
    if count <= 0:
        raise ValueError("perplexity needs at least one prediction")
    return math.exp(nll_sum / count)


@dataclass
class PasskeyCase:
    length: int  # the context length the case stands for
    depth: float
    key: str
    prompt_tokens: int  # as this tokenizer counts the rendered prompt
    messages: list


def build_passkey_cases(tok: Tokenizer, filler: np.ndarray, lengths: list[int], samples: int,
                        seed: int = 0) -> list[PasskeyCase]:
    rng = np.random.default_rng(seed)
    drop = {tok.bos_id, tok.eos_id}
    clean = np.asarray([t for t in np.asarray(filler[: 4 * max(lengths) + 1024]) if int(t) not in drop],
                       dtype=np.int64)
    if clean.shape[0] < 2:
        raise ValueError("passkey filler needs held-out tokens")
    overhead = len(tok.encode(render_chat(passkey_messages("", "", "12345"))))
    cases = []
    for L in lengths:
        n_fill = L - REPLY_TOKENS - 8 - overhead
        if n_fill < 2:
            raise ValueError(f"passkey length {L} is too short for the prompt ({overhead} tokens)")
        for i in range(samples):
            depth = (i + 0.5) / samples
            start = int(rng.integers(0, max(1, clean.shape[0] - n_fill)))
            ids = np.resize(clean[start:], n_fill) if clean.shape[0] - start < n_fill else clean[start:start + n_fill]
            cut = int(round(depth * n_fill))
            key = random_key(rng, 5, 5)
            msgs = passkey_messages(tok.decode(ids[:cut].tolist()), tok.decode(ids[cut:].tolist()), key)
            n_tok = len(tok.encode(render_chat(msgs)))
            cases.append(PasskeyCase(L, depth, key, n_tok, msgs))
    return cases


def ask(client: httpx.Client, base_url: str, model: str, case: PasskeyCase) -> dict:
    body = {"model": model, "messages": case.messages, "max_tokens": REPLY_TOKENS, "temperature": 0.0}
    r = client.post(f"{base_url.rstrip('/')}/v1/chat/completions", json=body)
    if r.status_code != 200:
        return {"ok": False, "error": f"HTTP {r.status_code}: {r.text[:200]}", "reply": ""}
    data = r.json()
    reply = data["choices"][0]["message"].get("content") or ""
    return {"ok": True, "reply": reply, "usage": data.get("usage")}


def served_model(client: httpx.Client, base_url: str) -> str:
    r = client.get(f"{base_url.rstrip('/')}/v1/models")
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def run_passkey(client: httpx.Client, base_url: str, cases: list[PasskeyCase], concurrency: int = 1,
                log=print) -> dict:
    model = served_model(client, base_url)
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        results = list(pool.map(lambda c: ask(client, base_url, model, c), cases))
    by_len: dict[int, dict] = {}
    records = []
    for c, res in zip(cases, results):
        correct = bool(res["ok"] and c.key in res["reply"])
        number = re.search(r"\d+", res["reply"]) if res["ok"] else None
        exact = bool(number and number.group(0) == c.key)
        s = by_len.setdefault(c.length, {"n": 0, "correct": 0, "exact": 0, "errors": 0})
        s["n"] += 1
        s["correct"] += correct
        s["exact"] += exact
        s["errors"] += not res["ok"]
        rec = {k: v for k, v in asdict(c).items() if k != "messages"}
        records.append({**rec, "correct": correct, "exact": exact, **{k: v for k, v in res.items() if k != "ok"}})
    for L, s in sorted(by_len.items()):
        s["accuracy"] = s["correct"] / s["n"]
        s["exact_accuracy"] = s["exact"] / s["n"]
        log(f"passkey {L:>6} tokens: {s['correct']}/{s['n']} = {100 * s['accuracy']:.0f}% "
            f"(exact {s['exact']}/{s['n']})"
            + (f" ({s['errors']} request errors)" if s["errors"] else ""))
    return {"model": model, "by_length": {str(k): v for k, v in sorted(by_len.items())}, "cases": records}
