"""Server-side view of the run from its Prometheus /metrics: scraped before, during and after.

Names are matched by suffix after the `prefix:` (nsa:, vllm:, ...), so the same report works against
nsa-serve and vLLM. Counters are differenced across the measured phase; gauges are sampled through it
so the report has the peak KV-cache usage and queue lengths, not just the idle values at the ends.
The NSA sparsity ratio is Δ kv_tokens_dense_equivalent_total / Δ kv_tokens_read_total: how many K/V
tokens dense attention would have read per token NSA actually read over the same decode steps.
With speculative decoding, the acceptance rate (accepted / draft tokens) and the mean acceptance
length (1 + accepted / verifying rows: tokens a verifying row gave) are vLLM's summary.
"""

from __future__ import annotations

import asyncio
import math

import httpx
from prometheus_client.parser import text_string_to_metric_families

GAUGES = {
    "kv_cache_usage_perc": ("kv_cache_usage_perc", "gpu_cache_usage_perc"),
    "num_requests_running": ("num_requests_running",),
    "num_requests_waiting": ("num_requests_waiting",),
    "summaries_stored": ("summaries_stored",),
}
COUNTERS = {
    "num_preemptions": ("num_preemptions_total",),
    "engine_step_failures": ("engine_step_failures_total",),
    "prompt_tokens": ("prompt_tokens_total",),
    "generation_tokens": ("generation_tokens_total",),
    "prefix_cache_queries": ("prefix_cache_queries_total", "gpu_prefix_cache_queries_total"),
    "prefix_cache_hits": ("prefix_cache_hits_total", "gpu_prefix_cache_hits_total"),
    "kv_tokens_read": ("kv_tokens_read_total",),
    "kv_tokens_dense_equivalent": ("kv_tokens_dense_equivalent_total",),
    # speculative decoding (the same names in vLLM)
    "spec_decode_num_drafts": ("spec_decode_num_drafts_total",),
    "spec_decode_num_draft_tokens": ("spec_decode_num_draft_tokens_total",),
    "spec_decode_num_accepted_tokens": ("spec_decode_num_accepted_tokens_total",),
    # Python garbage collections (nsa-serve's gc_pause_seconds histogram): time every server thread
    # stood still, all generations, and the full (generation 2) collections among them
    "gc_pause_seconds": ("gc_pause_seconds_sum",),
    "gc_full_collections": ("gc_pause_seconds_count{generation=2}",),
}


def parse_metrics(text: str) -> dict[str, float]:
    """Sample name → value summed over label sets, for the counters and gauges this report uses."""
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            sums[s.name] = sums.get(s.name, 0.0) + float(s.value)
            if "generation" in s.labels:  # a histogram by generation: each one's own too
                name = f"{s.name}{{generation={s.labels['generation']}}}"
                sums[name] = sums.get(name, 0.0) + float(s.value)
    wanted = {**GAUGES, **COUNTERS}
    out: dict[str, float] = {}
    for key, suffixes in wanted.items():
        for name, value in sums.items():
            bare = name.split(":", 1)[-1]
            if bare in suffixes:
                out[key] = out.get(key, 0.0) + value
    return out


async def scrape(client: httpx.AsyncClient, base_url: str, headers: dict[str, str]) -> dict[str, float] | None:
    """One scrape, or None when the server has no (readable) /metrics."""
    try:
        resp = await client.get(base_url.rstrip("/") + "/metrics", headers=headers, timeout=10.0)
        if resp.status_code != 200:
            return None
        return parse_metrics(resp.text)
    except (httpx.HTTPError, ValueError):
        return None


class MetricsWatcher:
    """Scrapes /metrics every `interval` seconds while the measured phase runs."""

    def __init__(self, client: httpx.AsyncClient, base_url: str, headers: dict[str, str], interval: float = 2.0):
        self.client, self.base_url, self.headers, self.interval = client, base_url, headers, interval
        self.before: dict[str, float] | None = None
        self.after: dict[str, float] | None = None
        self.samples: list[dict[str, float]] = []
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self.before = await scrape(self.client, self.base_url, self.headers)
        if self.before is not None and self.interval > 0:
            self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            snap = await scrape(self.client, self.base_url, self.headers)
            if snap is not None:
                self.samples.append(snap)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self.before is not None:
            self.after = await scrape(self.client, self.base_url, self.headers)

    def report(self) -> dict:
        return summarize_scrapes(self.before, self.after, self.samples)


def summarize_scrapes(before: dict | None, after: dict | None, during: list[dict]) -> dict:
    if before is None or after is None:
        return {"available": False}
    out: dict = {"available": True}
    for key in GAUGES:
        seen = [s[key] for s in [before, *during, after] if key in s]
        if seen:
            out[key] = {"before": before.get(key), "after": after.get(key), "max": max(seen)}
    for key in COUNTERS:
        if key in before and key in after:
            out[key] = after[key] - before[key]
    q, h = out.get("prefix_cache_queries"), out.get("prefix_cache_hits")
    if q:
        out["prefix_cache_hit_rate"] = h / q if h is not None else None
    read, dense = out.get("kv_tokens_read"), out.get("kv_tokens_dense_equivalent")
    if read is not None and dense is not None:
        out["nsa_sparsity_ratio"] = dense / read if read > 0 else None
        out["nsa_kv_read_fraction"] = read / dense if dense > 0 else None
    drafts, proposed = out.get("spec_decode_num_drafts"), out.get("spec_decode_num_draft_tokens")
    accepted = out.get("spec_decode_num_accepted_tokens")
    if drafts and proposed and accepted is not None:
        # vLLM's summary: the share of draft tokens accepted, and tokens a verifying row gave
        out["spec_acceptance_rate"] = accepted / proposed
        out["spec_mean_acceptance_length"] = 1 + accepted / drafts
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}
