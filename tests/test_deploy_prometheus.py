"""The monitoring stack end to end: a real Prometheus (Debian's `prometheus`) scrapes a real
`nsa-serve serve` on loopback with deploy/compose's scrape config, traffic flows, and then every
PromQL expression of the Grafana dashboard (and its variable queries, alert rules and the
autoscaler's adapter query) runs through Prometheus' HTTP API and must return data.

Everything listens on 127.0.0.1 only; the traffic is a fixed handful of requests."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy_support import (COMPOSE, INSTALL_HINT, K8S, PROMETHEUS_CONFIG, load_dashboard, panel_queries,
                            parse_label_values, substitute, tool, variable_queries)

yaml = pytest.importorskip("yaml", reason="PyYAML is in the `test` extra: pip install -e '.[test]'")
httpx = pytest.importorskip("httpx")

SCRAPE_INTERVAL_S = 1
# What $__rate_interval becomes: wide enough to hold every scrape of the test, so rates see both the
# first and the second round of traffic.
RATE_WINDOW = "2m"
DRAIN_S = 5  # the server's --shutdown-timeout here


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout_s: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            pytest.fail(f"{what}: process exited with {proc.returncode}\n{tail}")
        try:
            result = check()
            if result:
                return result
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        time.sleep(0.2)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    pytest.fail(f"timed out after {timeout_s}s waiting for {what} (last error: {last})\n{tail}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    exe = tool("prometheus")
    if exe is None:
        pytest.skip(f"the prometheus binary is not installed: {INSTALL_HINT}")
    return exe


@pytest.fixture(scope="module")
def server_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def server_process(tmp_path_factory, prometheus_bin, server_port):
    """`nsa-serve serve` on a free loopback port with a tiny random model: (base URL, process, log)."""
    from nsa_serve.model.init_model import init_model

    root = tmp_path_factory.mktemp("serve")
    model_dir = init_model(root / "tiny", "tiny")
    port = server_port
    log = root / "server.log"
    env = {**os.environ, "NSA_SERVE_CACHE": str(root / "cache")}
    env.pop("NSA_SERVE_API_KEY", None)  # the shipped scrape config sends no key
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nsa_serve.cli", "serve", str(model_dir), "--host", "127.0.0.1",
             "--port", str(port), "--device", "cpu", "--shutdown-timeout", str(DRAIN_S),
             # speculation on, so that the dashboard's speculative-decoding panel has data too
             "--speculative-config", SPECULATIVE],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{base}/ready", timeout=2).status_code == 200, 90, "the server's /ready",
                   proc, log)
        yield base, proc, log
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def server(server_process) -> str:
    return server_process[0]


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, prometheus_bin, server_port):
    """Prometheus with deploy/compose/prometheus.yml, only retargeted at loopback and sped up. Started
    before the server: its first target sync takes ~5 s, which then overlaps the server's start."""
    root = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    cfg = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    cfg["global"].update(scrape_interval=f"{SCRAPE_INTERVAL_S}s", scrape_timeout=f"{SCRAPE_INTERVAL_S}s",
                         evaluation_interval=f"{SCRAPE_INTERVAL_S}s")
    server_target = f"127.0.0.1:{server_port}"
    for job in cfg["scrape_configs"]:
        for static in job["static_configs"]:
            static["targets"] = [server_target if job["job_name"] == "nsa-serve" else f"127.0.0.1:{port}"]
    cfg["rule_files"] = [str(COMPOSE / f) for f in cfg["rule_files"]]  # relative to the shipped config
    config = root / "prometheus.yml"
    config.write_text(yaml.safe_dump(cfg))
    log = root / "prometheus.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [prometheus_bin, f"--config.file={config}", f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT, cwd=root)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{base}/-/ready", timeout=2).status_code == 200, 30, "Prometheus /-/ready",
                   proc, log)
        yield base
    finally:
        stop(proc)


SPECULATIVE = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}'


def send_traffic(server: str, model: str) -> None:
    """A few completions, one streamed, with a shared long prefix so the prefix cache sees queries
    and hits (pages are 64 tokens), decode runs past the window so NSA reads fewer K/V tokens
    than dense attention would, and speculative decoding has drafts to verify."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=60, max_retries=0)
    shared = " ".join(f"item {i} of the shared context;" for i in range(60))
    for i in range(2):
        out = client.completions.create(model=model, prompt=f"{shared} question {i}:", max_tokens=12,
                                        temperature=0)
        assert out.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": shared}],
                                            max_tokens=12, stream=True)
    chunks = list(stream)
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
    # A prompt holding every ordinary token id once: whatever the model says, its last token is in
    # the context, so every decode step has one-token n-gram drafts to verify.
    out = client.completions.create(model=model, prompt=list(range(8, 4096)), max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length"
    # One failing request (404), so the HTTP counters carry more than one status.
    assert httpx.get(f"{server}/v1/nope", timeout=10).status_code == 404


def query(prometheus: str, expr: str) -> list[dict]:
    r = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr!r}: {body}"
    return body["data"]["result"]


def wait_for_scrapes(prometheus: str, n: int) -> None:
    """Wait until the server has been scraped `n` more times."""
    def count():
        res = query(prometheus, 'count_over_time(up{job="nsa-serve"}[10m])')
        return int(res[0]["value"][1]) if res else 0

    start = count()
    wait_until(lambda: count() >= start + n, 30, f"{n} scrapes of the server")


@pytest.fixture(scope="module")
def scraped(prometheus, server):
    """Prometheus has scraped the server before, between and after two rounds of traffic, so every
    counter and histogram series has samples on both sides of an increase (rate() > 0)."""
    model = httpx.get(f"{server}/v1/models", timeout=10).json()["data"][0]["id"]
    targets = wait_until(lambda: [t for t in httpx.get(f"{prometheus}/api/v1/targets", timeout=5).json()
                                  ["data"]["activeTargets"]
                                  if t["labels"]["job"] == "nsa-serve" and t["health"] == "up"],
                         30, "the nsa-serve target to be up")
    assert targets[0]["scrapeUrl"] == f"{server}/metrics"
    wait_for_scrapes(prometheus, 2)
    send_traffic(server, model)
    wait_for_scrapes(prometheus, 2)
    send_traffic(server, model)
    wait_for_scrapes(prometheus, 3)
    return model


def _finite_values(result: list[dict]) -> list[float]:
    return [float(r["value"][1]) for r in result if math.isfinite(float(r["value"][1]))]


def test_every_dashboard_panel_query_returns_data(prometheus, scraped):
    queries = panel_queries(load_dashboard())
    assert len(queries) >= 20
    failures = []
    for title, expr in queries:
        concrete = substitute(expr, RATE_WINDOW, {"model_name": ".*", "instance": ".*"})
        result = query(prometheus, concrete)  # a parse error fails inside query()
        if not _finite_values(result):
            failures.append(f"{title}: {concrete} -> {result}")
    assert not failures, "queries without data:\n" + "\n".join(failures)


def test_dashboard_numbers_reflect_the_traffic(prometheus, scraped):
    """Spot checks that the data is the traffic we sent, not just any number."""
    ends = query(prometheus, 'sum by (finished_reason) (increase(nsa:request_success_total[5m]))')
    finished = {r["metric"]["finished_reason"]: float(r["value"][1]) for r in ends}
    # 2 rounds x 3 requests; increase() extrapolates, so allow slack but no zero.
    assert finished.get("stop", 0) + finished.get("length", 0) > 3, finished
    statuses = {r["metric"]["status"] for r in query(prometheus, 'nsa:http_requests_total')}
    assert {"200", "404"} <= statuses
    [waiting] = query(prometheus, 'sum(nsa:num_requests_waiting)')
    assert float(waiting["value"][1]) == 0  # all traffic finished
    [ttft] = query(prometheus, 'histogram_quantile(0.5, sum by (le) (rate(nsa:time_to_first_token_seconds_bucket'
                               f'[{RATE_WINDOW}])))')
    assert 0 < float(ttft["value"][1]) < 60
    [drafts] = query(prometheus, 'sum(nsa:spec_decode_num_draft_tokens_total)')
    assert float(drafts["value"][1]) >= 2 * 3  # two rounds of the all-tokens prompt, ≥ 3 drafts each


def test_dashboard_variable_queries_return_values(prometheus, scraped):
    for name, q in variable_queries(load_dashboard()):
        match, label = parse_label_values(substitute(q, RATE_WINDOW, {"model_name": ".*", "instance": ".*"}))
        params = {"match[]": match} if match else {}
        body = httpx.get(f"{prometheus}/api/v1/label/{label}/values", params=params, timeout=10).json()
        assert body["status"] == "success" and body["data"], f"variable {name}: {q} -> {body}"
        if name == "model_name":
            assert scraped in body["data"]


def test_autoscaler_adapter_query_returns_data(prometheus, scraped):
    """prometheus-adapter's metricsQuery, rendered as the adapter would for a pod (here the loopback
    target stands in for the pod: no Kubernetes labels in this setup)."""
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    [rule] = values["rules"]["custom"]
    series = rule["seriesQuery"].split("{")[0]
    expr = (rule["metricsQuery"].replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", 'job="nsa-serve"').replace("<<.GroupBy>>", "instance"))
    assert _finite_values(query(prometheus, expr)), expr


def test_alert_rules_load_and_evaluate(prometheus, scraped):
    body = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()
    rules = [r for g in body["data"]["groups"] for r in g["rules"]]
    assert len(rules) == len(yaml.safe_load((COMPOSE / "alerts.yml").read_text())["groups"][0]["rules"])
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    # Nothing is wrong with a healthy server under light load: no alert fires.
    assert [r["name"] for r in rules if r["state"] != "inactive"] == []


def _healthcheck_commands() -> dict[str, list[str]]:
    """The exec-form health checks of the Dockerfile and the compose file."""
    import json
    import re

    from deploy_support import REPO

    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    docker = json.loads(re.search(r"^HEALTHCHECK .*?CMD (\[.*\])\s*$", text, re.M).group(1))
    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())["services"]["nsa-serve"]
    test = compose["healthcheck"]["test"]
    assert test[0] == "CMD"
    return {"Dockerfile": docker, "compose": test[1:]}


def test_container_health_checks_pass_against_the_live_server(server, scraped):
    port = server.rsplit(":", 1)[1]
    for where, cmd in _healthcheck_commands().items():
        assert cmd[0] == "python3"
        cmd = [sys.executable] + [c.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for c in cmd[1:]]
        assert any(f"127.0.0.1:{port}/health" in c for c in cmd), (where, cmd)
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, (where, res.stderr)
        # ... and fails where nothing answers, so it can detect a dead server.
        dead = [c.replace(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}") for c in cmd]
        assert subprocess.run(dead, capture_output=True, timeout=30).returncode != 0, where


def test_the_query_check_can_fail(prometheus, scraped):
    """A metric the server does not expose returns no data and bad PromQL is refused, so the
    dashboard test above would catch a renamed metric or a typo."""
    assert query(prometheus, substitute("sum(rate(nsa:no_such_metric_total[$__rate_interval]))", RATE_WINDOW, {})) == []
    r = httpx.get(f"{prometheus}/api/v1/query", params={"query": "sum(rate(nsa:prompt_tokens_total[1m])"}, timeout=10)
    assert r.status_code == 400 and r.json()["errorType"] == "bad_data"


def test_server_exits_cleanly_within_its_drain_timeout_on_sigterm(server_process, scraped):
    """What the grace periods in deploy/ rely on (k8s terminationGracePeriodSeconds, compose
    stop_grace_period): SIGTERM -> exit 0 within --shutdown-timeout (+ interpreter teardown)."""
    base, proc, log = server_process
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=DRAIN_S + 15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"server still running {DRAIN_S + 15}s after SIGTERM\n{log.read_text()[-3000:]}")
    assert code == 0, log.read_text()[-3000:]
    assert time.monotonic() - start < DRAIN_S + 15
