"""A whole run: prepare prompts, warm up, send on the arrival schedule, stop at the bounds, measure.

Bounds: at most `num_requests` are sent, and the measured phase ends `duration` seconds after it
starts whatever is still running (those requests are cancelled and counted as
`cancelled_at_deadline`; requests whose send time falls after the deadline are never sent). Each
request also has its own `request_timeout`. So a run always ends by itself, even against a server
that hangs.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from dataclasses import dataclass, field

import httpx
from tqdm import tqdm

from . import client as http
from .arrivals import arrival_offsets
from .metrics import by_group, compute_metrics, needle_accuracy, timeline
from .prom import MetricsWatcher
from .record import RequestRecord, RequestSpec
from .tokens import detect_token_counter
from .workloads import WorkloadConfig, build_workload, needle_answer_found


@dataclass
class RunConfig:
    base_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    model: str | None = None  # None: the first model the server lists
    endpoint: str = "chat"  # chat | completions
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    num_requests: int = 100
    duration: float = 1800.0  # seconds, hard bound on the measured phase
    warmup: int = 2
    reset_prefix_cache: bool = False  # POST /reset_prefix_cache after the warm-up: measure a cold cache
    arrival: str = "poisson"
    request_rate: float | None = None
    burstiness: float = 1.0
    max_concurrency: int | None = None
    request_timeout: float = 600.0
    seed: int = 0
    temperature: float = 0.0
    ignore_eos: bool | None = None  # None: on for chat/random (lengths as drawn), off for longdoc/needle
    extra_body: dict | None = None
    slos_ms: dict[str, float] = field(default_factory=dict)
    percentiles: list[float] = field(default_factory=lambda: [90.0, 99.0])
    metrics_interval: float = 2.0
    progress: bool = True

    def validate(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"--base-url must start with http:// or https://, got {self.base_url!r}")
        if self.endpoint not in ("chat", "completions"):
            raise ValueError(f"--endpoint must be chat or completions, got {self.endpoint!r}")
        if self.num_requests < 1:
            raise ValueError("--num-requests must be at least 1")
        if not (math.isfinite(self.duration) and self.duration > 0):
            raise ValueError("--duration must be a positive number of seconds")
        if self.warmup < 0:
            raise ValueError("--warmup must be ≥ 0")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("--max-concurrency must be at least 1")
        if self.arrival == "closed" and self.max_concurrency is None:
            raise ValueError("--arrival closed needs --max-concurrency (the number of closed-loop clients)")
        if not (self.request_timeout > 0):
            raise ValueError("--request-timeout must be positive")
        self.workload.validate()
        if self.endpoint == "completions" and any(e.messages for e in self.workload.entries):
            raise ValueError("the dataset holds chats (messages): send them with --endpoint chat")
        # Fails early on a bad rate/burstiness rather than after preparing prompts.
        arrival_offsets(self.arrival, 2, self.request_rate, self.burstiness, self.seed)


@dataclass
class RunResult:
    result: dict
    records: list[RequestRecord]
    timeline: dict


async def list_models(client: httpx.AsyncClient, base_url: str, headers: dict[str, str]) -> list[dict]:
    """The server's model cards (id, and max_model_len where the server reports it, as vLLM does)."""
    url = base_url.rstrip("/") + "/v1/models"
    try:
        resp = await client.get(url, headers=headers, timeout=30.0)
    except httpx.HTTPError as exc:
        raise RuntimeError(f"cannot reach {url}: {type(exc).__name__}: {exc}. Is the server up?") from None
    if resp.status_code != 200:
        raise RuntimeError(f"{url} answered {resp.status_code}: {resp.text[:200]}; pass --model or --api-key")
    try:
        cards = [c for c in resp.json()["data"] if isinstance(c, dict) and "id" in c]
    except (ValueError, KeyError, TypeError):
        cards = []
    if not cards:
        raise RuntimeError(f"{url} listed no model ({resp.text[:200]}); pass --model")
    return cards


def warn_context(specs: list[RequestSpec], max_model_len: int | None) -> None:
    """Say up front when prompts will not fit: the server will reject them (counted as failures)."""
    if not max_model_len:
        return
    over = [s for s in specs if s.target_prompt_tokens + s.max_tokens > max_model_len]
    if over:
        worst = max(s.target_prompt_tokens for s in over)
        print(f"nsa-loadtest: warning: {len(over)} of {len(specs)} requests (prompts up to {worst} tokens plus "
              f"max_tokens) exceed the server's max_model_len {max_model_len}; expect them to fail",
              file=sys.stderr)


async def run(cfg: RunConfig) -> RunResult:
    cfg.validate()
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    chat = cfg.endpoint == "chat"
    url = cfg.base_url.rstrip("/") + (http.CHAT_PATH if chat else http.COMPLETIONS_PATH)
    ignore_eos = cfg.ignore_eos if cfg.ignore_eos is not None else cfg.workload.name in ("chat", "random")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=cfg.max_concurrency or 100)
    timeout = httpx.Timeout(cfg.request_timeout, connect=min(30.0, cfg.request_timeout))

    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        try:
            cards = await list_models(client, cfg.base_url, headers)
        except RuntimeError:
            if cfg.model is None:
                raise
            cards = []  # the model is named: go on, and let the requests show what is wrong
        model = cfg.model or cards[0]["id"]
        max_model_len = next((c.get("max_model_len") for c in cards if c["id"] == model), None)
        counter = await detect_token_counter(client, cfg.base_url, model, headers)
        with tqdm(total=cfg.num_requests + cfg.warmup, desc="preparing prompts", disable=not cfg.progress,
                  file=sys.stderr, leave=False) as bar:
            specs = await build_workload(cfg.workload, counter, cfg.num_requests, cfg.seed, 0, bar)
            warm_specs = await build_workload(cfg.workload, counter, cfg.warmup, cfg.seed, 1, bar)
        warn_context(specs, max_model_len if isinstance(max_model_len, int) else None)

        def payload(spec: RequestSpec) -> dict:
            seed = None if cfg.temperature == 0 else cfg.seed * 1_000_003 + spec.index
            return http.build_payload(spec, model, chat, cfg.temperature, ignore_eos, seed, cfg.extra_body)

        # Warm-up: same kind of traffic, excluded from every number (and from the /metrics deltas).
        warm_failures = 0
        if warm_specs:
            sem = asyncio.Semaphore(cfg.max_concurrency or len(warm_specs))

            async def warm(spec):
                async with sem:
                    return await http.send(client, url, payload(spec), headers, RequestRecord(spec),
                                           time.perf_counter(), cfg.request_timeout, chat)

            # Bounded like the measured phase, so a hanging server cannot stall the run here either.
            tasks = [asyncio.create_task(warm(s)) for s in warm_specs]
            finished, pending = await asyncio.wait(tasks, timeout=cfg.duration)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            warm_failures = len(pending) + sum(not t.result().success for t in finished)

        if cfg.reset_prefix_cache:
            await reset_prefix_cache(client, cfg.base_url, headers)

        offsets = arrival_offsets(cfg.arrival, len(specs), cfg.request_rate, cfg.burstiness, cfg.seed)
        watcher = MetricsWatcher(client, cfg.base_url, headers, cfg.metrics_interval)
        await watcher.start()
        records: list[RequestRecord] = []
        sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
        bar = tqdm(total=len(specs), desc="requests", disable=not cfg.progress, file=sys.stderr)
        t0 = time.perf_counter()

        async def go(spec: RequestSpec, offset: float) -> None:
            await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
            if sem is not None:
                await sem.acquire()
            try:
                rec = RequestRecord(spec)
                records.append(rec)  # before sending, so a deadline cancellation still leaves the record
                await http.send(client, url, payload(spec), headers, rec, t0, cfg.request_timeout, chat)
                bar.update(1)
            finally:
                if sem is not None:
                    sem.release()

        tasks = [asyncio.create_task(go(s, o)) for s, o in zip(specs, offsets)]
        _, pending = await asyncio.wait(tasks, timeout=cfg.duration)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        duration = time.perf_counter() - t0
        bar.close()
        await watcher.stop()

    for r in records:
        if r.spec.expected_answer is not None and r.success:
            r.correct = needle_answer_found(r.generated_text, r.spec.expected_answer)
    records.sort(key=lambda r: r.start)
    result = compute_metrics(records, duration, cfg.slos_ms, cfg.percentiles)
    result.update({
        "model_id": model,
        "base_url": cfg.base_url,
        "backend": "openai-chat" if chat else "openai",
        "num_prompts": cfg.num_requests,
        "sent": len(records),
        "not_sent": len(specs) - len(records),
        "warmup_requests": len(warm_specs),
        "warmup_failed": warm_failures,
        "prefix_cache_reset": cfg.reset_prefix_cache,
        "token_counting": counter.how,
        "token_counts_estimated": counter.estimated,
        "ignore_eos": ignore_eos,
    })
    if cfg.workload.name in ("longdoc", "needle"):
        result["by_doc_tokens"] = by_group(records, "doc_tokens", cfg.percentiles)
    if cfg.workload.name == "needle":
        result["needle_accuracy"] = needle_accuracy(records)
        graded = [r for r in records if r.correct is not None]
        result["needle_overall_accuracy"] = sum(r.correct for r in graded) / len(graded) if graded else None
    result["server_metrics"] = watcher.report()
    sm = result["server_metrics"]
    if sm.get("generation_tokens") is not None:
        # Client-vs-server agreement check: the server's counter over the measured phase.
        sm["client_total_output_tokens"] = result["total_output_tokens"]
    return RunResult(result, records, timeline(records, duration))


async def reset_prefix_cache(client, base_url: str, headers: dict[str, str]) -> None:
    """Empty the server's prefix cache (nsa-serve's and vLLM's /reset_prefix_cache)."""
    try:
        r = await client.post(base_url.rstrip("/") + "/reset_prefix_cache", headers=headers)
    except Exception as exc:
        raise RuntimeError(f"--reset-prefix-cache: POST /reset_prefix_cache failed: {exc}") from None
    if r.status_code >= 300:
        raise RuntimeError(f"--reset-prefix-cache: POST /reset_prefix_cache answered {r.status_code} "
                           "(vLLM serves it only with VLLM_SERVER_DEV_MODE=1)")
