"""The periodic engine-statistics line in the server log (vLLM's LoggingStatLogger)."""

from __future__ import annotations

import logging

from api_fixtures import start_server, wait_for

from nsa_serve.api.stats_log import StatsLog
from nsa_serve.engine.protocol import EngineStats


def test_a_line_has_interval_rates_and_current_state_and_idles_down_to_debug():
    feed = [EngineStats(num_pages_total=100),
            EngineStats(num_running=3, num_waiting=1, num_pages_total=100, num_pages_used=25, prompt_tokens_total=400,
                        generation_tokens_total=50, prefix_cache_queries_total=400, prefix_cache_hits_total=100,
                        kv_tokens_read_total=30, kv_tokens_dense_total=300, num_preemptions_total=2)]
    feed.append(EngineStats(**{**feed[1].__dict__, "num_running": 0, "num_waiting": 0, "num_pages_used": 0}))
    feed.append(feed[2])
    it, clock = iter(feed), iter([100.0, 100.25, 101.25, 102.25])
    logger = StatsLog(lambda: next(it), clock=lambda: next(clock))
    level, text = logger.line()  # 0.25 s after the first sample
    assert level == logging.INFO
    assert text.startswith("prompt 1600.0 tok/s, generation 200.0 tok/s, ")
    assert "running 3 reqs, waiting 1 reqs, KV cache 25.0%" in text
    assert "prefix cache hits 25.0%" in text and "NSA decode read 10.0% of dense" in text
    assert text.endswith("preemptions 2, failed steps 0")  # no speculation: no draft figures
    level, text = logger.line()  # fell idle: said once at INFO, with nothing over the interval
    assert level == logging.INFO and "prompt 0.0 tok/s" in text and "prefix cache hits n/a" in text
    assert logger.line()[0] == logging.DEBUG  # idle again: quiet


def test_the_server_logs_statistics_while_it_works(tiny_model_dir, caplog):  # noqa: F811
    server = start_server(tiny_model_dir, log_stats_interval_s=0.2)
    try:
        with caplog.at_level(logging.INFO, logger="nsa_serve.stats"):
            r = server.openai().completions.create(model=server.engine.model_name, prompt="Logs:", max_tokens=40,
                                                   extra_body={"ignore_eos": True})
            assert r.usage.completion_tokens == 40

            def logged():
                return any("generation" in rec.getMessage() and "generation 0.0 tok/s" not in rec.getMessage()
                           for rec in caplog.records if rec.name == "nsa_serve.stats")
            assert wait_for(logged, timeout=10)
    finally:
        server.stop()


def test_enable_log_requests_logs_arrival_and_end_without_the_cache_salt(tiny_model_dir, caplog):  # noqa: F811
    server = start_server(tiny_model_dir, log_requests=True, max_log_len=8, log_stats_interval_s=0)
    try:
        with caplog.at_level(logging.INFO, logger="nsa_serve.requests"):
            r = server.openai().completions.create(
                model=server.engine.model_name, prompt="Request logging at work, with a long prompt.", max_tokens=5,
                temperature=0.0, extra_body={"ignore_eos": True, "cache_salt": "secret-salt"})
            lines = [rec.getMessage() for rec in caplog.records if rec.name == "nsa_serve.requests"]
    finally:
        server.stop()
    arrived = next(x for x in lines if x.startswith(f"request {r.id}:"))
    assert f"{r.usage.prompt_tokens} prompt tokens" in arrived and "prompt 'Request '" in arrived
    assert "temperature=0.0" in arrived and "max_tokens=5" in arrived and "ignore_eos=True" in arrived
    assert "cache_salt=<hidden>" in arrived and "secret-salt" not in arrived
    assert len(arrived.split("prompt ids [")[1].split("]")[0].split(",")) == 8
    finished = next(x for x in lines if x.startswith(f"request {r.id} finished"))
    assert "length, 5 tokens, TTFT" in finished


def test_an_interval_with_speculative_decoding_adds_acceptance_figures():
    spec = dict(spec_decode_num_drafts_total=10, spec_decode_num_draft_tokens_total=40,
                spec_decode_num_accepted_tokens_total=25)
    feed = iter([EngineStats(**spec), EngineStats(**{k: 2 * v for k, v in spec.items()}, generation_tokens_total=35)])
    clock = iter([0.0, 1.0])
    level, text = StatsLog(lambda: next(feed), clock=lambda: next(clock)).line()
    assert text.endswith("failed steps 0, draft acceptance 62.5%, mean acceptance length 3.50")
