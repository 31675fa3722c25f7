"""Every Prometheus metric nsa-serve exposes, defined in one place (names: docs/api.md, metrics contract).

Prefix `nsa:`, suffixes as vLLM's `vllm:` metrics so dashboards port by renaming. Every series carries
a `model_name` label. Two sources feed them:

- per-request observations made by the HTTP layer as outputs stream by (latency and length histograms,
  finish reasons, HTTP status counts): `ServerMetrics.request_*` / `observe_http`;
- the engine's running totals and gauges (`EngineStats`), read at scrape time by a collector, so a
  scrape always sees the engine's current state and nothing can drift between two copies of a count.

Each server instance owns its own registry, so several servers (tests) can live in one process.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .engine.protocol import EngineStats
from .gc_pauses import GENERATIONS, GCPauses

# No `*_created` series: they double the exposition and no dashboard reads them (vLLM does the same).
# This is process-wide in prometheus_client, which is fine for a server process.
disable_created_metrics()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Bucket edges follow vLLM's, TTFT starting at 1 ms as the contract asks.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
               0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
                           30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISH_REASONS = ("stop", "length", "abort", "error")
# Tokens an engine step computes: power-of-two edges up to 2**20 (vLLM's iteration_tokens_total
# uses powers of two too); the engine counts steps by the same edges (EngineStats.iteration_tokens).
ITERATION_TOKEN_EDGES = 21
N_BUCKETS = (1, 2, 5, 10, 20)


def length_buckets(max_model_len: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to the context length (vLLM's build_1_2_5_buckets)."""
    out, exp = [], 0
    while True:
        for m in (1, 2, 5):
            v = m * 10 ** exp
            if v > max_model_len:
                return tuple(float(x) for x in out) or (1.0,)
            out.append(v)
        exp += 1


class _EngineStatsCollector:
    """Reads `EngineStats` at scrape time and exposes it as gauges and counters."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str,
                 info: Callable[[], dict[str, str]] | None = None):
        self._stats = stats
        self._model_name = model_name
        self._info = info

    def describe(self):
        return []  # no pre-registration checks; names are fixed below and unique in this registry

    def collect(self):
        s = self._stats()
        labels = [self._model_name]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(labels, float(value))
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(labels, float(value))
            return c

        yield gauge("nsa:num_requests_running", "Sequences in the running batch.", s.num_running)
        yield gauge("nsa:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield gauge("nsa:kv_cache_usage_perc", "Fraction of KV-cache pages in use (0-1).", s.kv_cache_usage)
        yield gauge("nsa:summaries_stored", "Compressed-block summaries held in the KV cache.", s.summaries_stored)
        yield counter("nsa:prompt_tokens", "Prompt tokens prefilled (prefix-cache hits included), counted as each chunk "
                      "completes, once per request.", s.prompt_tokens_total)
        yield counter("nsa:generation_tokens", "Tokens generated.", s.generation_tokens_total)
        yield counter("nsa:num_preemptions", "Sequences preempted (recomputed later).", s.num_preemptions_total)
        yield counter("nsa:engine_step_failures", "Engine steps that raised: their rows were retried in halves "
                      "(a culprit ends with finish reason error), or, read back asynchronously, ended with an error.",
                      s.num_failed_steps_total)
        yield counter("nsa:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      s.prefix_cache_queries_total)
        yield counter("nsa:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits_total)
        yield counter("nsa:kv_tokens_read", "K/V tokens read by NSA decode, per kv group, summed over steps.",
                      s.kv_tokens_read_total)
        yield counter("nsa:kv_tokens_dense_equivalent",
                      "K/V tokens dense attention would have read for the same decode steps.",
                      s.kv_tokens_dense_total)
        yield _iteration_tokens(s, labels)
        yield counter("nsa:spec_decode_num_drafts", "Speculative decoding: rows that verified draft tokens.",
                      s.spec_decode_num_drafts_total)
        yield counter("nsa:spec_decode_num_draft_tokens", "Speculative decoding: draft tokens verified.",
                      s.spec_decode_num_draft_tokens_total)
        yield counter("nsa:spec_decode_num_accepted_tokens", "Speculative decoding: draft tokens accepted.",
                      s.spec_decode_num_accepted_tokens_total)
        info = self._info() if self._info is not None else {}
        if info:  # vLLM's cache_config_info: the cache's configuration as labels of a constant 1
            names = sorted(info)
            g = GaugeMetricFamily("nsa:cache_config_info", "The KV cache's configuration (labels; value 1).",
                                  labels=["model_name"] + names)
            g.add_metric(labels + [info[k] for k in names], 1.0)
            yield g


class _GCPauseCollector:
    def __init__(self, pauses: GCPauses, model_name: str):
        self._pauses, self._model_name = pauses, model_name

    def describe(self):
        return []

    def collect(self):
        h = HistogramMetricFamily("nsa:gc_pause_seconds", "Python garbage collections (every thread stops "
                                  "while one runs), by generation.", labels=["model_name", "generation"])
        for gen in range(GENERATIONS):
            buckets, total = self._pauses.histogram(gen)
            h.add_metric([self._model_name, str(gen)], buckets, total)
        yield h


def _iteration_tokens(s: EngineStats, labels: list[str]) -> HistogramMetricFamily:
    counts = s.iteration_tokens
    buckets, total = [], 0
    for k in range(ITERATION_TOKEN_EDGES):
        total += counts[k] if k < len(counts) else 0
        buckets.append((str(float(2 ** k)), total))
    buckets.append(("+Inf", sum(counts)))
    h = HistogramMetricFamily("nsa:iteration_tokens_total", "Tokens computed per engine step.",
                              labels=["model_name"])
    h.add_metric(labels, buckets, float(s.iteration_tokens_sum))
    return h


class ServerMetrics:
    def __init__(self, model_name: str, max_model_len: int, stats: Callable[[], EngineStats] | None = None,
                 cache_info: Callable[[], dict[str, str]] | None = None):
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.registry = CollectorRegistry(auto_describe=False)
        r, L = self.registry, ["model_name"]

        def hist(name, doc, buckets):
            return Histogram(name, doc, L, buckets=buckets, registry=r).labels(model_name)

        self.ttft = hist("nsa:time_to_first_token_seconds", "Time from arrival to the first token.", TTFT_BUCKETS)
        self.itl = hist("nsa:inter_token_latency_seconds", "Time between successive tokens of a sequence.",
                        ITL_BUCKETS)
        self.e2e = hist("nsa:e2e_request_latency_seconds", "Time from arrival to finish.", REQUEST_LATENCY_BUCKETS)
        self.queue_time = hist("nsa:request_queue_time_seconds", "Time from arrival to first scheduled.",
                               REQUEST_LATENCY_BUCKETS)
        self.prefill_time = hist("nsa:request_prefill_time_seconds", "Time from first scheduled to first token.",
                                 REQUEST_LATENCY_BUCKETS)
        self.decode_time = hist("nsa:request_decode_time_seconds", "Time from first token to last token.",
                                REQUEST_LATENCY_BUCKETS)
        self.inference_time = hist("nsa:request_inference_time_seconds", "Time from first scheduled to finish.",
                                   REQUEST_LATENCY_BUCKETS)
        self.tpot = hist("nsa:request_time_per_output_token_seconds",
                         "Decode time of each request over its tokens after the first (its longest completion's).",
                         ITL_BUCKETS)
        lengths = length_buckets(max_model_len)
        self.prompt_len = hist("nsa:request_prompt_tokens", "Prompt length of each request.", lengths)
        self.generation_len = hist("nsa:request_generation_tokens", "Tokens generated by each sequence.", lengths)
        self.params_n = hist("nsa:request_params_n", "The n of each request.", N_BUCKETS)
        self.params_max_tokens = hist("nsa:request_params_max_tokens",
                                      "The max_tokens of each request (unset: the context length).", lengths)
        self._success = Counter("nsa:request_success", "Finished sequences by finish reason.",
                                L + ["finished_reason"], registry=r)
        for reason in FINISH_REASONS:  # exposed at 0 from the start, so rate() works from the first scrape
            self._success.labels(model_name, reason)
        self._http = Counter("nsa:http_requests", "HTTP requests answered, by route and status.",
                             L + ["route", "status"], registry=r)
        if stats is not None:
            r.register(_EngineStatsCollector(stats, model_name, cache_info))
        # Timed only while installed (the server's lifespan): gc.callbacks is process-wide.
        self.gc_pauses = GCPauses()
        r.register(_GCPauseCollector(self.gc_pauses, model_name))

    # -- observations --------------------------------------------------------------------------------
    def finished_sequence(self, reason: str, num_generated: int) -> None:
        self._success.labels(self.model_name, reason if reason in FINISH_REASONS else "error").inc()
        self.generation_len.observe(num_generated)

    def request_params(self, n: int, max_tokens: int | None) -> None:
        self.params_n.observe(n)
        self.params_max_tokens.observe(self.max_model_len if max_tokens is None else max_tokens)

    def observe_http(self, route: str, status: int) -> None:
        self._http.labels(self.model_name, route, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
