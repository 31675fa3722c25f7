"""`nsa-serve bench` runs end to end on CPU and reports both attention modes."""

from __future__ import annotations

import json

import pytest

from engine_helpers import single_thread_torch
from nsa_serve.cli import main

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread_torch)


def test_bench_reports_nsa_and_dense(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--preset", "tiny", "--set", "num_layers=1", "--num-requests", "3", "--input-len", "40",
               "--output-len", "4", "--device", "cpu", "--num-pages", "64", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| nsa |" in text and "| dense |" in text and "NSA / dense decode tokens/s" in text
    assert "prefill chunks of 512 tokens" in text  # the CPU default (EngineArgs.resolved)
    assert "synchronous scheduling" in text  # async scheduling is resolved off on CPU
    assert "prompt steps eager" in text  # piecewise CUDA graphs are CUDA-only
    rows = json.loads(out.read_text())
    assert [r["mode"] for r in rows] == ["nsa", "dense"]
    for r in rows:
        assert r["output_tokens"] == 12 and r["decode_steps"] > 0 and r["ttft_max_s"] > 0
        assert r["decode_step_ms"] >= r["decode_model_ms"] > 0
        assert r["prefill_chunk"] == 512 and r["async_scheduling"] is False and r["piecewise_max_tokens"] == 0
    assert rows[0]["kv_read_ratio"] != rows[1]["kv_read_ratio"] == 1.0


def test_bench_rejects_bad_sizes():
    with pytest.raises(SystemExit, match="num-requests"):
        main(["bench", "--preset", "tiny", "--num-requests", "0"])


def test_bench_warmup_rounds_are_not_counted(tmp_path):
    # Warm-up rounds run the same workload untimed: the timed round's counts must be the same
    # whatever their number (the scheduler is deterministic for this workload).
    rows = {}
    for w in (0, 2):
        out = tmp_path / f"bench{w}.json"
        rc = main(["bench", "--preset", "tiny", "--set", "num_layers=1", "--attention", "nsa",
                   "--num-requests", "3", "--input-len", "40", "--output-len", "4", "--device", "cpu",
                   "--num-pages", "64", "--warmup-rounds", str(w), "--json", str(out)])
        assert rc == 0
        rows[w] = json.loads(out.read_text())[0]
    for key in ("output_tokens", "decode_steps", "kv_read_ratio", "preemptions"):
        assert rows[0][key] == rows[2][key], key
    assert rows[2]["output_tokens"] == 12 and rows[2]["ttft_max_s"] <= rows[2]["wall_s"]
    with pytest.raises(SystemExit, match="warmup-rounds"):
        main(["bench", "--preset", "tiny", "--warmup-rounds", "-1"])


def test_bench_reports_decode_rows_and_warns_when_the_batch_is_never_full(tmp_path, capsys):
    # Short prompts prefill in one step: every decode-only step has all 3 rows, no note. Long
    # prompts prefill one 64-token chunk a step, so early requests finish their 3 tokens beside
    # later prompts' chunks: decode-only steps see fewer rows, and the bench says so.
    common = ["bench", "--preset", "tiny", "--set", "num_layers=1", "--attention", "nsa", "--num-requests", "3",
              "--output-len", "3", "--device", "cpu", "--num-pages", "64", "--warmup-rounds", "0"]
    rows = {}
    for name, extra in {"full": ["--input-len", "40"],
                        "tail": ["--input-len", "200", "--max-num-batched-tokens", "64",
                                 "--long-prefill-token-threshold", "64"]}.items():
        out = tmp_path / f"{name}.json"
        assert main(common + extra + ["--json", str(out)]) == 0
        rows[name] = (json.loads(out.read_text())[0], capsys.readouterr().out)
    full, text = rows["full"]
    assert full["decode_rows_max"] == 3 and full["decode_rows_mean"] == 3.0 and "note (nsa)" not in text
    tail, text = rows["tail"]
    assert 0 < tail["decode_rows_max"] < 3 and "note (nsa): decode-only steps ran at most" in text


def test_bench_takes_the_speculative_config_and_counts_verifying_steps_as_decode(tmp_path, capsys):
    # With drafts, the decode columns take the steps that verify them: the tokens they gave
    # (accepted drafts included) over their time. 1-token lookups make drafts from the random
    # prompts and the tiny model's repeats (30 draft tokens with this seed).
    rows = {}
    for spec in (None, '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}'):
        out = tmp_path / f"bench{bool(spec)}.json"
        argv = ["bench", "--preset", "tiny", "--set", "num_layers=1", "--attention", "nsa", "--num-requests", "3",
                "--input-len", "40", "--output-len", "24", "--device", "cpu", "--num-pages", "64",
                "--json", str(out)]
        rc = main(argv + (["--speculative-config", spec] if spec else []))
        assert rc == 0
        rows[bool(spec)] = json.loads(out.read_text())[0]
    text = capsys.readouterr().out
    plain, spec = rows[False], rows[True]
    assert plain["num_speculative_tokens"] == plain["spec_draft_tokens"] == 0
    assert spec["num_speculative_tokens"] == 3 and "speculative decoding, 3 drafts at most" in text
    assert spec["output_tokens"] == plain["output_tokens"] == 72
    assert 0 <= spec["spec_accepted_tokens"] <= spec["spec_draft_tokens"]
    assert spec["spec_draft_tokens"] > 0
    # Every step after the prefill is a decode step, verifying or not: an accepted draft saves at
    # most one step (without the verifying steps, about one in three of these would be left).
    assert plain["decode_steps"] >= spec["decode_steps"] >= plain["decode_steps"] - spec["spec_accepted_tokens"]
    assert spec["decode_rows_max"] == 3 and spec["decode_tok_s"] > 0
    with pytest.raises(SystemExit):
        main(["bench", "--preset", "tiny", "--speculative-config", '{"method": "eagle", "num_speculative_tokens": 2}'])


def test_bench_says_when_the_pool_cannot_hold_one_request():
    with pytest.raises(SystemExit, match="holds .* tokens a sequence, fewer than --input-len"):
        main(["bench", "--preset", "tiny", "--set", "num_layers=1", "--num-requests", "1", "--input-len", "300",
              "--output-len", "4", "--device", "cpu", "--num-pages", "3"])
