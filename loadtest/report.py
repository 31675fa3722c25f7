"""The run's outputs: the JSON file (vLLM bench-serve key names where the meaning matches) and the
short table on stdout."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .metrics import output_tokens, prompt_tokens
from .record import RequestRecord


def per_request(records: list[RequestRecord], save_texts: bool) -> dict:
    """Per-request lists in vLLM's layout (seconds), plus what vLLM lacks: send times and error kinds."""
    out = {
        "input_lens": [prompt_tokens(r) for r in records],
        "output_lens": [output_tokens(r) if r.success else 0 for r in records],
        "ttfts": [r.ttft for r in records],
        "itls": [r.itl for r in records],
        "e2els": [r.latency for r in records],
        "start_times": [r.start for r in records],
        "errors": [r.error for r in records],
        "error_kinds": [r.error_kind for r in records],
        "finish_reasons": [r.finish_reason for r in records],
        "target_input_lens": [r.spec.target_prompt_tokens for r in records],
        "request_tags": [r.spec.tags for r in records],
    }
    if any(r.spec.expected_answer is not None for r in records):
        out["needle_correct"] = [r.correct for r in records]
    if save_texts:
        out["generated_texts"] = [r.generated_text for r in records]
    return out


def _clean(obj):
    """JSON has no inf/nan: write them as null (an infinite request rate is also recorded as "inf")."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: Path, result: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(result), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return path


def _fmt(v, digits=2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def format_table(result: dict, percentiles: list[float]) -> str:
    """A vLLM-style summary block."""
    lines = []

    def row(label, value, digits=2):
        lines.append(f"{label:<42} {_fmt(value, digits):>12}")

    lines.append(" nsa-loadtest result ".center(56, "="))
    row("Workload:", result.get("workload"))
    row("Model:", result.get("model_id"))
    row("Successful requests:", result["completed"])
    row("Failed requests:", result["failed"])
    for kind, n in result["failures"].items():
        row(f"  {kind}:", n)
    row("Benchmark duration (s):", result["duration"])
    row("Total input tokens:", result["total_input_tokens"])
    row("Total generated tokens:", result["total_output_tokens"])
    row("Request throughput (req/s):", result["request_throughput"])
    if result.get("request_goodput") is not None:
        row("Request goodput (req/s):", result["request_goodput"])
    row("Output token throughput (tok/s):", result["output_throughput"])
    row("Peak output token throughput (tok/s):", result["max_output_tokens_per_s"])
    row("Peak concurrent requests:", result["max_concurrent_requests"])
    row("Total token throughput (tok/s):", result["total_token_throughput"])
    names = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
             "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    for m, title in names.items():
        lines.append(f" {title} ".center(56, "-"))
        row(f"Mean {m.upper()} (ms):", result.get(f"mean_{m}_ms"))
        row(f"Median {m.upper()} (ms):", result.get(f"median_{m}_ms"))
        for p in percentiles:
            label = str(int(p)) if float(p).is_integer() else str(p)
            row(f"P{label} {m.upper()} (ms):", result.get(f"p{label}_{m}_ms"))
    if result.get("needle_overall_accuracy") is not None:
        lines.append(" Needle in a haystack ".center(56, "-"))
        row("Overall accuracy:", result["needle_overall_accuracy"], 3)
        for length, depths in result.get("needle_accuracy", {}).items():
            cells = "  ".join(f"{d}:{c['accuracy']:.2f}" for d, c in depths.items())
            lines.append(f"  {length:>7} tokens  {cells}")
    sm = result.get("server_metrics") or {}
    if sm.get("available"):
        lines.append(" Server /metrics (measured phase) ".center(56, "-"))
        kv = sm.get("kv_cache_usage_perc")
        if kv:
            row("Peak KV cache usage (%):", 100.0 * kv["max"])
        row("Preemptions:", sm.get("num_preemptions"), 0)
        if sm.get("engine_step_failures") is not None:  # (nsa-serve only)
            row("Failed engine steps:", sm["engine_step_failures"], 0)
        row("NSA sparsity ratio (dense/read):", sm.get("nsa_sparsity_ratio"))
        if sm.get("prefix_cache_hit_rate") is not None:
            row("Prefix cache hit rate:", sm["prefix_cache_hit_rate"], 3)
        if sm.get("gc_pause_seconds") is not None:  # (nsa-serve only)
            row("GC pauses, all generations (s):", sm["gc_pause_seconds"], 3)
            row("Full GC collections:", sm.get("gc_full_collections"), 0)
        if sm.get("spec_acceptance_rate") is not None:
            row("Spec. decoding acceptance rate:", sm["spec_acceptance_rate"], 3)
            row("Spec. decoding mean accept len:", sm["spec_mean_acceptance_length"])
    if result.get("token_counts_estimated"):
        lines.append("note: prompt sizes were " + result["token_counting"])
    lines.append("=" * 56)
    return "\n".join(lines)
