"""Token counts for sizing prompts: the server's own tokenizer when it offers `/tokenize`, else an
estimate that says so.

Sizing only aims the prompt; the counts reported in results come from the server's usage.
`/tokenize` follows vLLM's shape: POST {"model", "prompt", "add_special_tokens"} → {"count", "tokens"}.
"""

from __future__ import annotations

import asyncio
import math
from typing import Awaitable, Callable

import httpx

# A common rule of thumb for English with 32k–128k vocabularies; only used when the server cannot count.
ESTIMATED_CHARS_PER_TOKEN = 4.0


class ServerTokenCounter:
    estimated = False
    how = "server /tokenize"

    def __init__(self, client: httpx.AsyncClient, base_url: str, model: str, headers: dict[str, str]):
        self.client, self.url, self.model, self.headers = client, base_url.rstrip("/") + "/tokenize", model, headers

    async def count(self, text: str) -> int:
        resp = await self.client.post(self.url, json={"model": self.model, "prompt": text,
                                                      "add_special_tokens": False}, headers=self.headers)
        resp.raise_for_status()
        return _count_from(resp.json())


class EstimatedTokenCounter:
    estimated = True
    how = f"estimated at {ESTIMATED_CHARS_PER_TOKEN:g} characters per token (server has no /tokenize)"

    async def count(self, text: str) -> int:
        return max(1, math.ceil(len(text) / ESTIMATED_CHARS_PER_TOKEN)) if text else 0


def _count_from(body) -> int:
    if isinstance(body, dict):
        if isinstance(body.get("count"), int):
            return body["count"]
        if isinstance(body.get("tokens"), list):
            return len(body["tokens"])
    raise ValueError(f"/tokenize answered without a count: {str(body)[:200]}")


async def detect_token_counter(client: httpx.AsyncClient, base_url: str, model: str,
                               headers: dict[str, str]) -> ServerTokenCounter | EstimatedTokenCounter:
    """Use the server's tokenizer when /tokenize answers sensibly, else the estimate."""
    counter = ServerTokenCounter(client, base_url, model, headers)
    try:
        # A short limit: a server that hangs here should cost seconds, not the request timeout.
        n = await asyncio.wait_for(counter.count("The quick brown fox jumps over the lazy dog."), 15.0)
        if n > 0:
            return counter
    except (httpx.HTTPError, ValueError, TimeoutError):
        pass
    return EstimatedTokenCounter()


async def fit_to_tokens(count: Callable[[str], Awaitable[int]], make_text: Callable[[int], str], target: int,
                        units_per_token: float, max_rounds: int = 8) -> tuple[str, int]:
    """Find a size for `make_text(size)` whose token count is close to `target`.

    `size` is in whatever unit make_text takes (characters, words); token counts are close to
    proportional to it, so a few proportional corrections converge. Returns the closest text found
    and its count; stops when within max(1 token, 0.5 %) of the target.
    """
    if target <= 0:
        raise ValueError(f"target token count must be positive, got {target}")
    tol = max(1, target // 200)
    size = max(1, round(target * units_per_token))
    best: tuple[str, int] | None = None
    tried = set()
    for _ in range(max_rounds):
        tried.add(size)
        text = make_text(size)
        n = await count(text)
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (text, n)
        if abs(n - target) <= tol:
            break
        nxt = max(1, round(size * target / max(n, 1)))
        if nxt in tried:  # proportional step lands where we have been: nudge by one unit
            nxt = size + (1 if n < target else -1)
            if nxt < 1 or nxt in tried:
                break
        size = nxt
    assert best is not None
    return best
