"""The load tester's metric math against a synthetic trace computed by hand (vLLM bench-serve
definitions), plus the pieces around it: SLO parsing, arrivals, workloads, /metrics parsing."""

import asyncio
import math

import numpy as np
import pytest

import loadtest_deps  # noqa: F401  (first: skips on a GPU machine without the packages)
from nsa_loadtest.arrivals import arrival_offsets
from nsa_loadtest.metrics import compute_metrics, max_concurrency, needle_accuracy, parse_slos, timeline
from nsa_loadtest.prom import parse_metrics, summarize_scrapes
from nsa_loadtest.record import RequestRecord, RequestSpec
from nsa_loadtest.tokens import EstimatedTokenCounter, fit_to_tokens
from nsa_loadtest.workloads import WorkloadConfig, build_workload, needle_answer_found, sample_lengths


def rec(i, start, ttft=None, chunks=(), latency=None, out=None, prompt=None, ok=True, kind=None):
    spec = RequestSpec(i, "p", 16, target_prompt_tokens=99)
    r = RequestRecord(spec, start=start, success=ok, error_kind=kind, ttft=ttft, latency=latency,
                      chunk_times=list(chunks), prompt_tokens=prompt, output_tokens=out,
                      usage_reported=out is not None)
    r.itl = [b - a for a, b in zip(chunks, chunks[1:])]
    return r


@pytest.fixture
def trace():
    return [
        # 4 tokens in 3 chunks; TPOT = (0.7 - 0.1) / 3 = 0.2 s; ITL 0.2, 0.3
        rec(0, 0.0, ttft=0.1, chunks=(0.1, 0.3, 0.6), latency=0.7, out=4, prompt=10),
        # TPOT = (1.0 - 0.5) / 1 = 0.5 s; ITL 0.4
        rec(1, 1.0, ttft=0.5, chunks=(0.5, 0.9), latency=1.0, out=2, prompt=20),
        # a single token: no TPOT, no ITL
        rec(2, 2.0, ttft=0.2, chunks=(0.2,), latency=0.2, out=1, prompt=30),
        rec(3, 3.0, latency=0.05, ok=False, kind="http_500"),
        rec(4, 3.0, latency=0.5, ok=False, kind="incomplete_stream"),
    ]


def test_latency_statistics_match_hand_computation(trace):
    m = compute_metrics(trace, duration=10.0, percentiles=[90, 99])
    # TTFT ms [100, 500, 200]: mean 266.67, median 200, population std sqrt(86666.67/3),
    # p90 = 200 + 0.8 * 300 (linear interpolation at rank 1.8), p99 at rank 1.98.
    assert m["mean_ttft_ms"] == pytest.approx(800 / 3)
    assert m["median_ttft_ms"] == pytest.approx(200)
    assert m["std_ttft_ms"] == pytest.approx(math.sqrt((166.667**2 + 233.333**2 + 66.667**2) / 3), rel=1e-4)
    assert m["p90_ttft_ms"] == pytest.approx(440)
    assert m["p99_ttft_ms"] == pytest.approx(494)
    # TPOT ms [200, 500] (the 1-token request has none)
    assert m["mean_tpot_ms"] == pytest.approx(350)
    assert m["median_tpot_ms"] == pytest.approx(350)
    assert m["std_tpot_ms"] == pytest.approx(150)
    assert m["p90_tpot_ms"] == pytest.approx(470)
    # ITL pooled over requests, ms [200, 300, 400]
    assert m["mean_itl_ms"] == pytest.approx(300)
    assert m["std_itl_ms"] == pytest.approx(math.sqrt(20000 / 3))
    assert m["p90_itl_ms"] == pytest.approx(380)
    assert m["p99_itl_ms"] == pytest.approx(398)
    # E2EL ms [700, 1000, 200]; failures are not in any latency
    assert m["mean_e2el_ms"] == pytest.approx(1900 / 3)
    assert m["median_e2el_ms"] == pytest.approx(700)
    assert m["p90_e2el_ms"] == pytest.approx(940)


def test_throughput_counts_and_failures(trace):
    m = compute_metrics(trace, duration=10.0)
    assert (m["completed"], m["failed"]) == (3, 2)
    assert m["failures"] == {"http_500": 1, "incomplete_stream": 1}
    assert m["total_input_tokens"] == 60 and m["total_output_tokens"] == 7
    assert m["request_throughput"] == pytest.approx(0.3)
    assert m["output_throughput"] == pytest.approx(0.7)
    assert m["total_token_throughput"] == pytest.approx(6.7)
    assert m["request_goodput"] is None  # no SLOs given
    # Requests 3 and 4 overlap; request 1 ends exactly when request 2 starts (not an overlap).
    assert m["max_concurrent_requests"] == 2
    assert m["max_output_tokens_per_s"] == pytest.approx(4)  # request 0's 4 tokens all in second 0


def test_goodput_against_slos(trace):
    # ttft ≤ 300 and tpot ≤ 300: request 0 (100, 200) good, 1 (500, 500) not, 2 (200, tpot 0) good
    m = compute_metrics(trace, 10.0, parse_slos(["ttft:300", "tpot:300"]))
    assert m["good_completed"] == 2 and m["request_goodput"] == pytest.approx(0.2)
    # adding e2el ≤ 500 drops request 0 (700 ms)
    m = compute_metrics(trace, 10.0, parse_slos(["ttft:300", "tpot:300", "e2el:500"]))
    assert m["good_completed"] == 1 and m["request_goodput"] == pytest.approx(0.1)


def test_timeline_bins(trace):
    tl = timeline(trace, 4.0, bin_s=1.0)
    assert tl["output_tokens_per_s"] == pytest.approx([4, 2, 1, 0])
    # finishes at 0.7, 2.0 (1.0 + 1.0) and 2.2; failures are not counted as finished
    assert tl["requests_per_s"] == pytest.approx([1, 0, 2, 0])
    assert tl["concurrency"] == pytest.approx([0.7, 1.0, 0.2, 0.55])
    # the exact step function: up at each send, down at each finish (finish first at equal times)
    assert tl["concurrency_step_times_s"] == pytest.approx([0, 0, 0.7, 1, 2, 2, 2.2, 3, 3, 3.05, 3.5])
    assert tl["concurrency_steps"] == [0, 1, 0, 1, 0, 1, 0, 1, 2, 1, 0]
    default = timeline(trace, 4.0)  # at least 10 equal bins
    assert len(default["time_s"]) == 10 and default["bin_s"] == pytest.approx(0.4)
    assert sum(default["output_tokens_per_s"]) * 0.4 == pytest.approx(7)


def test_no_usage_falls_back_to_chunk_count_and_says_so():
    r = rec(0, 0.0, ttft=0.1, chunks=(0.1, 0.2, 0.3), latency=0.3, out=None, prompt=None)
    m = compute_metrics([r], 1.0)
    assert m["total_output_tokens"] == 3 and m["usage_missing"] == 1
    assert m["total_input_tokens"] == 99  # the workload's target stands in


def test_empty_run_reports_none_not_zero():
    m = compute_metrics([rec(0, 0.0, latency=0.1, ok=False, kind="connect_error")], 1.0)
    assert m["completed"] == 0 and m["mean_ttft_ms"] is None and m["p99_itl_ms"] is None
    with pytest.raises(ValueError):
        compute_metrics([], 0.0)


def test_max_concurrency_sweep():
    rs = [rec(i, s, latency=d) for i, (s, d) in enumerate([(0, 5), (1, 1), (1.5, 1), (2, 1)])]
    assert max_concurrency(rs) == 3  # at t in [1.5, 2): requests 0, 1, 2; request 1 ends at 2


@pytest.mark.parametrize("bad", ["ttft", "ttft:abc", "foo:10", "ttft:-5"])
def test_bad_slo_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="SLO"):
        parse_slos([bad])


def test_arrivals():
    assert arrival_offsets("fixed", 4, 2.0) == pytest.approx([0, 0.5, 1.0, 1.5])
    assert arrival_offsets("closed", 3, None) == [0, 0, 0]
    a = arrival_offsets("poisson", 4000, 5.0, seed=3)
    assert a == arrival_offsets("poisson", 4000, 5.0, seed=3)  # reproducible
    assert a != arrival_offsets("poisson", 4000, 5.0, seed=4)
    gaps = np.diff(a)
    assert gaps.mean() == pytest.approx(0.2, rel=0.06) and gaps.std() / gaps.mean() == pytest.approx(1, rel=0.08)
    gaps = np.diff(arrival_offsets("gamma", 4000, 5.0, burstiness=0.25, seed=3))
    # gamma shape k: mean stays 1/rate, coefficient of variation 1/sqrt(k) = 2
    assert gaps.mean() == pytest.approx(0.2, rel=0.1) and gaps.std() / gaps.mean() == pytest.approx(2, rel=0.1)
    with pytest.raises(ValueError, match="request-rate"):
        arrival_offsets("poisson", 3, None)


def test_sample_lengths():
    rng = np.random.default_rng(0)
    xs = sample_lengths(rng, 2000, 100, "uniform", 0.5, 0)
    assert min(xs) >= 50 and max(xs) <= 150 and len(set(xs)) > 50
    xs = sample_lengths(rng, 2000, 100, "lognormal", 0, 0.5)
    assert np.median(xs) == pytest.approx(100, rel=0.05) and max(xs) <= 800
    assert sample_lengths(rng, 3, 7, "fixed", 0, 0) == [7, 7, 7]


def test_fit_to_tokens_converges_on_a_nonlinear_count():
    # A count that is not proportional to size: 1.3 tokens per word plus a 5-token header.
    async def count(text):
        return 5 + round(1.3 * len(text.split()))

    words = [f"w{i}" for i in range(5000)]
    text, n = asyncio.run(fit_to_tokens(count, lambda k: " ".join(words[:k]), 1000, 1.0))
    assert abs(n - 1000) <= 5 and asyncio.run(count(text)) == n


@pytest.mark.parametrize("name", ["chat", "random", "longdoc", "needle"])
def test_workloads_reproducible_from_seed(name):
    cfg = WorkloadConfig(name=name, input_len=64, output_len=8, doc_lengths=[256, 512], depths=[0, 0.5, 1])
    counter = EstimatedTokenCounter()
    a = asyncio.run(build_workload(cfg, counter, 6, seed=1))
    b = asyncio.run(build_workload(cfg, counter, 6, seed=1))
    c = asyncio.run(build_workload(cfg, counter, 6, seed=2))
    warm = asyncio.run(build_workload(cfg, counter, 6, seed=1, stream=1))
    assert [s.prompt for s in a] == [s.prompt for s in b]
    assert [s.prompt for s in a] != [s.prompt for s in c]
    assert [s.prompt for s in a] != [s.prompt for s in warm]
    assert len({s.prompt for s in a}) == 6  # no two requests share a prompt
    for s in a:
        n = asyncio.run(counter.count(s.prompt))
        assert abs(n - s.target_prompt_tokens) <= max(8, s.target_prompt_tokens // 20), (n, s.target_prompt_tokens)
    if name == "needle":
        for s in a:
            assert s.expected_answer in s.prompt and s.tags["doc_tokens"] in (256, 512)
            depth = s.prompt.index(s.expected_answer) / len(s.prompt)
            assert abs(depth - s.tags["depth"]) < 0.15


def test_longdoc_questions_per_doc_share_each_document_up_to_the_question():
    cfg = WorkloadConfig(name="longdoc", output_len=8, doc_lengths=[300, 600], questions_per_doc=3)
    counter = EstimatedTokenCounter()
    specs = asyncio.run(build_workload(cfg, counter, 7, seed=4))  # three documents, the last asked once
    assert [s.index for s in specs] == list(range(7)) and len({s.prompt for s in specs}) == 7
    by_doc = {}
    for s in specs:
        by_doc.setdefault(s.tags["doc"], []).append(s)
    assert sorted(len(v) for v in by_doc.values()) == [1, 3, 3]
    for j, group in by_doc.items():
        docs = {s.prompt.rsplit("Question: ", 1)[0] for s in group}
        assert len(docs) == 1  # the same document text, then a different question each
        assert len({s.prompt.rsplit("Question: ", 1)[1] for s in group}) == len(group)
        assert all(s.tags["doc_tokens"] == [300, 600][j % 2] for s in group)
        n = asyncio.run(counter.count(group[0].prompt))
        assert abs(n - group[0].target_prompt_tokens) <= 40, n
    # Asked in a shuffled order: the first three requests are not one document's questions.
    assert len({s.tags["doc"] for s in specs[:3]}) > 1
    assert asyncio.run(build_workload(cfg, counter, 7, seed=4))[0].prompt == specs[0].prompt
    with pytest.raises(ValueError, match="questions-per-doc"):
        WorkloadConfig(name="longdoc", questions_per_doc=9).validate()


def test_needle_answer_check_and_accuracy_grid():
    assert needle_answer_found("The code is 4 821 337.", "4821337")
    assert needle_answer_found("4,821,337", "4821337")
    assert not needle_answer_found("48213", "4821337")
    specs = [RequestSpec(i, "p", 8, L, {"doc_tokens": L, "depth": d}, expected_answer="1")
             for i, (L, d) in enumerate([(256, 0.0), (256, 0.0), (256, 1.0), (512, 0.0)])]
    recs = [RequestRecord(s, success=True, correct=c) for s, c in zip(specs, [True, False, True, False])]
    recs.append(RequestRecord(RequestSpec(9, "p", 8, 512, {"doc_tokens": 512, "depth": 0.0}, expected_answer="1"),
                              success=False, error_kind="timeout"))
    acc = needle_accuracy(recs)
    assert acc["256"]["0"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert acc["256"]["1"]["accuracy"] == 1.0
    assert acc["512"]["0"] == {"n": 1, "correct": 0, "accuracy": 0.0}  # the failed request is not graded


PROM_BEFORE = """
# HELP nsa:kv_cache_usage_perc KV usage
# TYPE nsa:kv_cache_usage_perc gauge
nsa:kv_cache_usage_perc{model_name="m"} 0.0
# TYPE nsa:num_preemptions_total counter
nsa:num_preemptions_total{model_name="m"} 3.0
# TYPE nsa:engine_step_failures_total counter
nsa:engine_step_failures_total{model_name="m"} 7.0
# TYPE nsa:kv_tokens_read_total counter
nsa:kv_tokens_read_total{model_name="m"} 1000.0
# TYPE nsa:kv_tokens_dense_equivalent_total counter
nsa:kv_tokens_dense_equivalent_total{model_name="m"} 2000.0
# TYPE nsa:request_success_total counter
nsa:request_success_total{model_name="m",finished_reason="stop"} 4.0
nsa:request_success_total{model_name="m",finished_reason="length"} 1.0
"""


def test_prometheus_parsing_and_sparsity_ratio():
    before = parse_metrics(PROM_BEFORE)
    after = parse_metrics(PROM_BEFORE.replace("} 3.0", "} 5.0").replace("} 7.0", "} 8.0")
                          .replace("} 1000.0", "} 3000.0")
                          .replace("} 2000.0", "} 22000.0").replace("perc{model_name=\"m\"} 0.0",
                                                                    "perc{model_name=\"m\"} 0.1"))
    during = [{"kv_cache_usage_perc": 0.6}]
    rep = summarize_scrapes(before, after, during)
    assert rep["available"] and rep["num_preemptions"] == 2 and rep["engine_step_failures"] == 1
    assert rep["kv_cache_usage_perc"] == {"before": 0.0, "after": 0.1, "max": 0.6}
    assert rep["nsa_sparsity_ratio"] == pytest.approx(20000 / 2000)  # Δdense / Δread
    assert summarize_scrapes(None, None, []) == {"available": False}
    assert "spec_acceptance_rate" not in rep  # no speculation counted: no rate
    spec = 'nsa:spec_decode_num_drafts_total{model_name="m"} %d\n' \
           'nsa:spec_decode_num_draft_tokens_total{model_name="m"} %d\n' \
           'nsa:spec_decode_num_accepted_tokens_total{model_name="m"} %d\n'
    rep = summarize_scrapes(parse_metrics(spec % (10, 30, 12)), parse_metrics(spec % (30, 90, 57)), [])
    assert rep["spec_acceptance_rate"] == pytest.approx(45 / 60)
    assert rep["spec_mean_acceptance_length"] == pytest.approx(1 + 45 / 20)
    # vLLM's names are recognised too
    assert parse_metrics('vllm:gpu_cache_usage_perc{model_name="x"} 0.25\n')["kv_cache_usage_perc"] == 0.25


def test_garbage_collection_pauses_over_the_run():
    # nsa-serve's gc_pause_seconds histogram by generation: the run's pause time over every
    # generation, and how many of its collections were full ones.
    def scrape(sums, counts):
        lines = ["# TYPE nsa:gc_pause_seconds histogram"]
        for gen, (total, n) in enumerate(zip(sums, counts)):
            labels = f'generation="{gen}",model_name="m"'
            lines += [f'nsa:gc_pause_seconds_bucket{{{labels},le="+Inf"}} {n}',
                      f"nsa:gc_pause_seconds_count{{{labels}}} {n}", f"nsa:gc_pause_seconds_sum{{{labels}}} {total}"]
        return parse_metrics("\n".join(lines) + "\n")

    rep = summarize_scrapes(scrape([0.5, 0.25, 1.0], [900, 80, 3]), scrape([0.75, 0.5, 1.5], [1500, 130, 5]), [])
    assert rep["gc_pause_seconds"] == pytest.approx(1.0) and rep["gc_full_collections"] == 2
    from nsa_loadtest.metrics import compute_metrics
    from nsa_loadtest.report import format_table

    text = format_table({**compute_metrics([], 1.0), "server_metrics": rep}, [99])
    assert "GC pauses, all generations (s):" in text and "Full GC collections:" in text
    # Not reported against a server without the histogram (vLLM).
    assert "gc_pause_seconds" not in summarize_scrapes(parse_metrics(PROM_BEFORE), parse_metrics(PROM_BEFORE), [])
