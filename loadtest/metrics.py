"""The metric math, with vLLM bench-serve definitions (pure functions of records, no I/O).

Per successful request:
  TTFT = first text-bearing chunk − send time
  E2EL = last data event − send time
  TPOT = (E2EL − TTFT) / (output tokens − 1), only when output tokens > 1
  ITL  = gaps between consecutive text-bearing chunks, pooled over all requests
Aggregates: mean, median, std (population, like numpy's default), and percentiles with linear
interpolation (numpy's default, what vLLM uses). Throughputs divide by the measured duration.
Goodput counts requests meeting every SLO given (ms); like vLLM, a request with ≤ 1 output token has
TPOT 0 for the goodput test. Token counts come from the server's usage; when a server sends none the
text-chunk count stands in and `usage_missing` says how many requests that was.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np

from .record import RequestRecord


def parse_slos(items: list[str] | None) -> dict[str, float]:
    """`["ttft:500", "tpot:50"]` → {"ttft": 500.0, "tpot": 50.0} (milliseconds), as vLLM's --goodput."""
    slos: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        name = name.strip().lower()
        if not sep or name not in ("ttft", "tpot", "e2el"):
            raise ValueError(f"goodput SLO {item!r} must look like ttft:MS, tpot:MS or e2el:MS")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"goodput SLO {item!r}: {value!r} is not a number of milliseconds") from None
        if not (math.isfinite(ms) and ms > 0):
            raise ValueError(f"goodput SLO {item!r} must be a positive number of milliseconds")
        slos[name] = ms
    return slos


def output_tokens(r: RequestRecord) -> int:
    if r.output_tokens is not None:
        return r.output_tokens
    return len(r.chunk_times)  # no usage from the server: one token per text chunk, flagged upstream


def prompt_tokens(r: RequestRecord) -> int:
    return r.prompt_tokens if r.prompt_tokens is not None else r.spec.target_prompt_tokens


def tpot(r: RequestRecord) -> float | None:
    n = output_tokens(r)
    if not r.success or n <= 1 or r.ttft is None or r.latency is None:
        return None
    return (r.latency - r.ttft) / (n - 1)


def summarize(values_s: list[float], name: str, percentiles: list[float]) -> dict[str, float | None]:
    """mean/median/std/pNN of `values_s` (seconds) as `<stat>_<name>_ms` keys; None when empty."""
    out: dict[str, float | None] = {}
    arr = np.asarray(values_s, dtype=np.float64) * 1000.0
    empty = arr.size == 0
    out[f"mean_{name}_ms"] = None if empty else float(np.mean(arr))
    out[f"median_{name}_ms"] = None if empty else float(np.median(arr))
    out[f"std_{name}_ms"] = None if empty else float(np.std(arr))
    for p in percentiles:
        out[f"p{_pct_label(p)}_{name}_ms"] = None if empty else float(np.percentile(arr, p))
    return out


def _pct_label(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def is_good(r: RequestRecord, slos_ms: dict[str, float]) -> bool:
    if not r.success:
        return False
    # No text at all: the first token never came, so TTFT is the whole request.
    ttft = r.ttft if r.ttft is not None else r.latency
    values = {"ttft": ttft, "tpot": tpot(r) or 0.0, "e2el": r.latency}
    return all(values[k] is not None and values[k] * 1000.0 <= v for k, v in slos_ms.items())


def max_concurrency(records: list[RequestRecord]) -> int:
    """Most requests in flight at once (a finish at t frees its slot before a send at the same t)."""
    return max(concurrency_steps(records)[1])


def _token_events(records: list[RequestRecord]):
    """(time, tokens) per text chunk of successful requests; a request's usage token count is spread
    evenly over its text chunks (a chunk may carry more than one token)."""
    for r in records:
        n = output_tokens(r) if r.success else 0
        if r.chunk_times and n:
            per = n / len(r.chunk_times)
            for t in r.chunk_times:
                yield r.start + t, per


def peak_output_tokens_per_s(records: list[RequestRecord]) -> float:
    """vLLM's max_output_tokens_per_s: most output tokens in any whole second since the start."""
    bins: dict[int, float] = defaultdict(float)
    for t, n in _token_events(records):
        bins[int(t)] += n
    return max(bins.values(), default=0.0)


def concurrency_steps(records: list[RequestRecord]) -> tuple[list[float], list[int]]:
    """Requests in flight as a step function: after time ts[i] there are ns[i]."""
    events = sorted([(r.start, 1) for r in records if r.latency is not None]
                    + [(r.end, -1) for r in records if r.latency is not None], key=lambda e: (e[0], e[1]))
    ts, ns, cur = [0.0], [0], 0
    for t, d in events:
        cur += d
        ts.append(t)
        ns.append(cur)
    return ts, ns


def timeline(records: list[RequestRecord], duration: float, bin_s: float | None = None) -> dict[str, list[float]]:
    """Output tokens/s, finished requests/s and mean concurrency per time bin over the run.
    Default bins: about one second, at least 10 and at most 120 of them, all the same width."""
    if bin_s is None:
        nbins = min(120, max(10, math.ceil(duration)))
        bin_s = max(duration, 1e-9) / nbins
    nbins = max(1, math.ceil(max(duration, 1e-9) / bin_s - 1e-9))
    tokens = np.zeros(nbins)
    finished = np.zeros(nbins)
    busy = np.zeros(nbins)  # request-seconds in flight per bin → mean concurrency

    def at(t: float) -> int:
        return min(nbins - 1, max(0, int(t / bin_s)))

    for t, n in _token_events(records):
        tokens[at(t)] += n
    for r in records:
        if r.latency is None:
            continue
        if r.success:
            finished[at(r.end)] += 1
        a, b = r.start, r.end
        for i in range(at(a), at(b) + 1):
            lo, hi = max(a, i * bin_s), min(b, (i + 1) * bin_s)
            if hi > lo:
                busy[i] += hi - lo
    ts, ns = concurrency_steps(records)
    return {
        "bin_s": bin_s,
        "time_s": [float((i + 0.5) * bin_s) for i in range(nbins)],
        "output_tokens_per_s": (tokens / bin_s).tolist(),
        "requests_per_s": (finished / bin_s).tolist(),
        "concurrency": (busy / bin_s).tolist(),
        "concurrency_step_times_s": ts,
        "concurrency_steps": ns,
    }


def compute_metrics(records: list[RequestRecord], duration: float, slos_ms: dict[str, float] | None = None,
                    percentiles: list[float] = (90.0, 99.0)) -> dict:
    """The vLLM-named result keys for a finished run. `duration` is the measured phase's length (s)."""
    if duration <= 0:
        raise ValueError(f"duration must be positive, got {duration}")
    slos_ms = slos_ms or {}
    ok = [r for r in records if r.success]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    tpots = [t for t in (tpot(r) for r in ok) if t is not None]
    itls = [g for r in ok for g in r.itl]
    e2els = [r.latency for r in ok if r.latency is not None]
    total_in = sum(prompt_tokens(r) for r in ok)
    total_out = sum(output_tokens(r) for r in ok)
    failures = Counter(r.error_kind or "unknown" for r in records if not r.success)

    result = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "failures": dict(sorted(failures.items())),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "request_goodput": None,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "max_output_tokens_per_s": peak_output_tokens_per_s(records),
        "max_concurrent_requests": max_concurrency(records),
        "usage_missing": sum(1 for r in ok if not r.usage_reported),
    }
    if slos_ms:
        good = sum(1 for r in ok if is_good(r, slos_ms))
        result["request_goodput"] = good / duration
        result["good_completed"] = good
        result["goodput_slos_ms"] = dict(slos_ms)
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        result.update(summarize(values, name, list(percentiles)))
    return result


def needle_accuracy(records: list[RequestRecord]) -> dict[str, dict[str, dict]]:
    """{doc_tokens: {depth: {"n", "correct", "accuracy"}}} over requests that completed; failed
    requests are reported separately as failures, not as wrong answers."""
    cells: dict = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for r in records:
        if r.spec.expected_answer is None or not r.success:
            continue
        cell = cells[str(r.spec.tags["doc_tokens"])][f'{r.spec.tags["depth"]:g}']
        cell[0] += 1
        cell[1] += bool(r.correct)
    return {
        length: {depth: {"n": n, "correct": c, "accuracy": c / n} for depth, (n, c) in sorted(
            depths.items(), key=lambda kv: float(kv[0]))}
        for length, depths in sorted(cells.items(), key=lambda kv: int(kv[0]))
    }


def by_group(records: list[RequestRecord], tag: str, percentiles: list[float] = (90.0, 99.0)) -> dict:
    """TTFT/E2EL summaries per value of a spec tag (e.g. per document length)."""
    groups: dict = defaultdict(list)
    for r in records:
        if tag in r.spec.tags:
            groups[r.spec.tags[tag]].append(r)
    out = {}
    for key in sorted(groups):
        rs = groups[key]
        ok = [r for r in rs if r.success]
        row = {"requests": len(rs), "completed": len(ok),
               "mean_prompt_tokens": float(np.mean([prompt_tokens(r) for r in ok])) if ok else None}
        row.update(summarize([r.ttft for r in ok if r.ttft is not None], "ttft", list(percentiles)))
        row.update(summarize([t for t in map(tpot, ok) if t is not None], "tpot", list(percentiles)))
        row.update(summarize([r.latency for r in ok], "e2el", list(percentiles)))
        out[str(key)] = row
    return out
