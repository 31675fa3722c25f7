"""Single-prompt generation through the reference model's incremental API (`nsa-serve generate`)."""

from __future__ import annotations

import sys
from typing import Iterator

import torch

from .model.nsa_model import NSAModel
from .tokenizer import Tokenizer


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter_(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


def generate_tokens(model: NSAModel, prompt_ids: list[int], max_tokens: int, temperature: float = 0.0,
                    top_p: float = 1.0, seed: int = 0, stop_ids: list[int] = ()) -> Iterator[int]:
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    cache = model.new_cache()
    limit = model.cfg.max_position_embeddings
    if len(prompt_ids) >= limit:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in the context ({limit})")
    logits = model.step(torch.tensor(prompt_ids, device=device), cache)[-1]
    for _ in range(min(max_tokens, limit - len(prompt_ids))):
        tok = sample_next(logits, temperature, top_p, gen)
        if tok in stop_ids:
            return
        yield tok
        if cache.length >= limit:
            return
        logits = model.step(torch.tensor([tok], device=device), cache)[-1]


def stream_text(tokenizer: Tokenizer, token_iter: Iterator[int], out=sys.stdout) -> list[int]:
    """Print text as tokens arrive, holding back a trailing partial UTF-8 character."""
    ids: list[int] = []
    printed = ""
    for tok in token_iter:
        ids.append(tok)
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):
            continue
        out.write(text[len(printed):])
        out.flush()
        printed = text
    text = tokenizer.decode(ids)
    out.write(text[len(printed):] + "\n")
    out.flush()
    return ids
