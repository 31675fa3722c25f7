"""nsa-loadtest end to end against a real `nsa-serve serve` on loopback (tiny random model, CPU):
the JSON and PNGs are produced, token counts agree with the server's usage and /metrics, the needle
grid is filled, and a request the server rejects is counted rather than crashing the run."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

import loadtest_deps  # noqa: F401  (first: skips on a GPU machine without the packages)
import httpx  # noqa: E402

from nsa_loadtest.cli import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from nsa_serve.model.init_model import init_model

    root = tmp_path_factory.mktemp("loadtest_e2e")
    model_dir = init_model(root / "tiny", "tiny", seed=0)
    port = _free_port()
    env = {**os.environ, "NSA_SERVE_CACHE": str(root / "cache")}
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "nsa_serve.cli", "serve", str(model_dir), "--port", str(port),
                             "--device", "cpu", "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"nsa-serve exited with {proc.returncode}:\n{(root / 'server.log').read_text()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("nsa-serve did not become healthy within 180 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _run(tmp_path, url, name, *args):
    rc = main(["--base-url", url, "--no-progress", "--result-dir", str(tmp_path), "--result-name", name,
               "--metrics-interval", "0.5", *args])
    assert rc == 0
    return json.loads((tmp_path / f"{name}.json").read_text())


VLLM_KEYS = ["duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
             "request_goodput", "output_throughput", "total_token_throughput", "input_lens", "output_lens", "ttfts",
             "itls", "generated_texts", "errors", "max_output_tokens_per_s", "max_concurrent_requests",
             "request_rate", "burstiness", "max_concurrency", "model_id", "num_prompts"]
VLLM_KEYS += [f"{s}_{m}_ms" for s in ("mean", "median", "std", "p90", "p99") for m in ("ttft", "tpot", "itl", "e2el")]


def test_chat_run_writes_json_and_plots_with_server_token_counts(server, tmp_path, capsys):
    res = _run(tmp_path, server, "chat", "--workload", "chat", "--input-len", "48", "--output-len", "12",
               "--num-requests", "10", "--max-concurrency", "4", "--warmup", "2", "--goodput", "ttft:60000")
    assert not [k for k in VLLM_KEYS if k not in res]
    assert res["completed"] == 10 and res["failed"] == 0 and res["failures"] == {}
    assert res["model_id"] == "tiny" and res["token_counting"] == "server /tokenize"
    assert res["usage_missing"] == 0 and res["max_concurrent_requests"] <= 4
    # ignore_eos holds each request to its drawn max_tokens, and the usage says so
    assert res["finish_reasons"] == ["length"] * 10
    assert sum(res["output_lens"]) == res["total_output_tokens"] > 10
    assert all(t is not None and t > 0 for t in res["ttfts"])
    assert res["request_goodput"] == pytest.approx(res["request_throughput"])  # a 60 s TTFT SLO is met
    # The server's own counters over the measured phase (warm-up excluded) agree with the client's usage.
    sm = res["server_metrics"]
    assert sm["available"]
    assert sm["prompt_tokens"] == res["total_input_tokens"]
    assert sm["generation_tokens"] == res["total_output_tokens"]
    assert sm["num_preemptions"] == 0 and sm["engine_step_failures"] == 0 and sm["nsa_sparsity_ratio"] > 0
    assert "kv_cache_usage_perc" in sm
    for png in ("latency_cdf", "ttft_vs_prompt", "throughput"):
        assert (tmp_path / f"chat_{png}.png").stat().st_size > 5000
    out = capsys.readouterr().out
    assert "Mean TTFT (ms)" in out and "NSA sparsity ratio" in out and "Failed engine steps:" in out


def test_needle_grid_and_token_targets(server, tmp_path):
    res = _run(tmp_path, server, "needle", "--workload", "needle", "--doc-lengths", "256,640",
               "--depths", "0,0.5,1", "--output-len", "6", "--arrival", "poisson", "--request-rate", "20",
               "--warmup", "0")
    assert res["completed"] == 6 and res["failed"] == 0
    acc = res["needle_accuracy"]
    assert sorted(acc) == ["256", "640"] and all(sorted(acc[L]) == ["0", "0.5", "1"] for L in acc)
    assert all(cell["n"] == 1 for L in acc for cell in acc[L].values())
    # A random-weight model will not find the needle; the grid records whatever it did.
    assert res["needle_overall_accuracy"] == sum(res["needle_correct"]) / 6
    # Prompts were sized with the server's tokenizer: usage prompt tokens within the chat template's
    # few tokens of the target.
    for got, want in zip(res["input_lens"], res["target_input_lens"]):
        assert want - 8 <= got <= want + 16, (got, want)
    assert (tmp_path / "needle_needle_accuracy.png").stat().st_size > 5000
    assert set(res["by_doc_tokens"]) == {"256", "640"}


def test_longdoc_over_the_context_is_counted_as_a_failure(server, tmp_path):
    # 9000 tokens does not fit the tiny model's 8192 context: the server answers 400, the run goes on.
    res = _run(tmp_path, server, "longdoc", "--workload", "longdoc", "--endpoint", "completions",
               "--doc-lengths", "512,9000", "--num-requests", "2", "--output-len", "4", "--warmup", "0",
               "--no-plots")
    assert res["completed"] == 1 and res["failures"] == {"http_400": 1}
    assert "context" in res["errors"][res["error_kinds"].index("http_400")]
    assert res["backend"] == "openai"


def test_reset_prefix_cache_makes_a_repeated_run_cold(server, tmp_path):
    """The same seeded prompt again hits the server's prefix cache; --reset-prefix-cache (after the
    warm-up) empties it first, so the measured request starts cold."""
    args = ("--workload", "longdoc", "--endpoint", "completions", "--doc-lengths", "600", "--num-requests", "1",
            "--output-len", "2", "--warmup", "0", "--no-plots")
    _run(tmp_path, server, "first", *args)
    warm = _run(tmp_path, server, "again", *args)
    cold = _run(tmp_path, server, "reset", *args, "--reset-prefix-cache")
    assert warm["server_metrics"]["prefix_cache_hit_rate"] > 0.5
    assert cold["server_metrics"]["prefix_cache_hit_rate"] == 0 and cold["prefix_cache_reset"] is True
    assert cold["completed"] == warm["completed"] == 1


def test_questions_per_doc_hit_the_prefix_cache(server, tmp_path):
    """Two questions about each document, one request at a time: the second of each pair finds the
    document's pages in the server's prefix cache (reset first, so earlier tests do not count)."""
    res = _run(tmp_path, server, "qa", "--workload", "longdoc", "--endpoint", "completions", "--doc-lengths",
               "500,700", "--questions-per-doc", "2", "--num-requests", "4", "--max-concurrency", "1",
               "--output-len", "2", "--warmup", "0", "--no-plots", "--reset-prefix-cache")
    assert res["completed"] == 4
    assert 0.25 < res["server_metrics"]["prefix_cache_hit_rate"] < 0.6


def test_a_dataset_file_replays_its_requests(server, tmp_path):
    # A run-batch file and a ShareGPT file replay as load; each request keeps its own chat and budget.
    batch = tmp_path / "batch.jsonl"
    batch.write_text("\n".join(json.dumps({"custom_id": str(i), "url": "/v1/chat/completions", "body": {
        "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": f"Question {i}?"}],
        "max_tokens": 3 + i}}) for i in range(3)))
    res = _run(tmp_path, server, "batch", "--workload", "file", "--dataset-path", str(batch), "--num-requests", "6",
               "--warmup", "1", "--ignore-eos", "--no-plots")
    assert res["completed"] == 6 and res["failed"] == 0 and res["workload"] == "file"
    assert sorted(res["output_lens"]) == [3, 3, 4, 4, 5, 5]  # every line twice, each to its own max_tokens
    assert res["server_metrics"]["prompt_tokens"] == res["total_input_tokens"]
    share = tmp_path / "sharegpt.json"
    share.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Tell me about grep."},
                                                    {"from": "gpt", "value": "grep searches text for patterns."}]}]))
    res = _run(tmp_path, server, "share", "--workload", "file", "--dataset-path", str(share), "--num-requests", "2",
               "--warmup", "0", "--ignore-eos", "--backend", "openai", "--no-plots",
               "--result-filename", "share.json")  # vllm bench serve's spellings
    with httpx.Client(base_url=server) as c:
        budget = c.post("/tokenize", json={"prompt": "grep searches text for patterns.",
                                           "add_special_tokens": False}).json()["count"]
    assert res["completed"] == 2 and res["output_lens"] == [budget, budget]
