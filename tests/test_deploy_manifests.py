"""Offline checks of everything under deploy/ plus the Dockerfile: the files parse and validate with
the real tools (promtool, Kubernetes schemas via kubernetes-validate, docker-compose, hadolint), and
their parts agree with each other and with the server (ports, probe paths, flags the CLI accepts,
drain time vs grace period, metric names the dashboard reads vs what /metrics exposes).

No Docker engine runs here: images are not built; the Dockerfile is linted and inspected instead.
System tools come from `bash deploy/ci/install-tools.sh`; a test needing one that is missing skips
and names it."""

from __future__ import annotations

import copy
import shlex
import subprocess

import pytest

from deploy_support import (COMPOSE, INSTALL_HINT, K8S, PROMETHEUS_CONFIG, REPO, load_dashboard,
                            metric_names, panel_queries, parse_label_values, substitute, tool, variable_queries)

yaml = pytest.importorskip("yaml", reason="PyYAML is in the `test` extra: pip install -e '.[test]'")

K8S_VERSIONS = ("1.29.0", "1.37.0")  # oldest Kubernetes still commonly run, and the newest schemas shipped
SERVE_PORT = 8000


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)


def need(name: str) -> str:
    path = tool(name)
    if path is None:
        pytest.skip(f"{name} not installed: {INSTALL_HINT}")
    return path


def k8s_docs() -> dict[str, dict]:
    """kind -> resource, over every manifest in deploy/k8s (kustomization.yaml aside)."""
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                assert doc["kind"] not in docs, f"two {doc['kind']} resources; the checks below assume one"
                docs[doc["kind"]] = doc
    return docs


def serve_parser():
    """The real `nsa-serve serve` argument parser."""
    import argparse

    from nsa_serve.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "serve" not in sub.choices:
        pytest.fail("`nsa-serve serve` is not registered (nsa_serve/api/cli.py); deploy/ runs it")
    return sub.choices["serve"]


# --------------------------------------------------------------------------------------------------
# Prometheus


def test_promtool_accepts_the_shipped_prometheus_config_and_alert_rules():
    promtool = need("promtool")
    res = run([promtool, "check", "config", str(PROMETHEUS_CONFIG)])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS: 1 rule files found" in res.stdout + res.stderr  # alerts.yml was found and checked
    res = run([promtool, "check", "rules", str(COMPOSE / "alerts.yml")])
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_rejects_a_broken_config(tmp_path):
    """The check above can fail: a config with a typo'd field does not pass."""
    promtool = need("promtool")
    cfg = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    cfg["scrape_configs"][0]["scrape_intervall"] = "5s"
    cfg.pop("rule_files")
    bad = tmp_path / "prometheus.yml"
    bad.write_text(yaml.safe_dump(cfg))
    res = run([promtool, "check", "config", str(bad)])
    assert res.returncode != 0 and "scrape_intervall" in res.stdout + res.stderr


def test_kubernetes_scrape_config_passes_promtool(tmp_path):
    """deploy/k8s/prometheus/scrape-config.yml discovers pods through the Kubernetes API. Debian's
    Prometheus is built without Kubernetes discovery, so promtool checks everything else (relabel
    regexes included) with the discovery swapped for a static target."""
    promtool = need("promtool")
    cfg = yaml.safe_load((K8S / "prometheus" / "scrape-config.yml").read_text())
    job = cfg["scrape_configs"][0]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    targets = {r.get("target_label") for r in job["relabel_configs"]}
    assert {"namespace", "pod"} <= targets, "prometheus-adapter needs namespace and pod labels"
    job.pop("kubernetes_sd_configs")
    job["static_configs"] = [{"targets": ["127.0.0.1:8000"]}]
    path = tmp_path / "scrape.yml"
    path.write_text(yaml.safe_dump(cfg))
    res = run([promtool, "check", "config", str(path)])
    assert res.returncode == 0, res.stdout + res.stderr


def test_compose_prometheus_scrapes_the_server_service():
    cfg = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "nsa-serve")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"nsa-serve:{SERVE_PORT}"]
    datasource = yaml.safe_load((COMPOSE / "grafana/provisioning/datasources/prometheus.yml").read_text())
    ds = datasource["datasources"][0]
    # $__rate_interval is derived from the datasource's timeInterval: it must be the scrape interval.
    assert ds["jsonData"]["timeInterval"] == cfg["global"]["scrape_interval"]
    assert ds["url"] == "http://prometheus:9090"


# --------------------------------------------------------------------------------------------------
# Grafana dashboard


REQUIRED_METRICS = {
    "TTFT": "nsa:time_to_first_token_seconds_bucket", "ITL": "nsa:inter_token_latency_seconds_bucket",
    "E2E": "nsa:e2e_request_latency_seconds_bucket", "prompt tokens/s": "nsa:prompt_tokens_total",
    "generation tokens/s": "nsa:generation_tokens_total", "running": "nsa:num_requests_running",
    "waiting": "nsa:num_requests_waiting", "KV cache usage": "nsa:kv_cache_usage_perc",
    "preemptions": "nsa:num_preemptions_total", "failed engine steps": "nsa:engine_step_failures_total",
    "finish reasons": "nsa:request_success_total",
    "error rate": "nsa:http_requests_total", "sparsity (dense)": "nsa:kv_tokens_dense_equivalent_total",
    "sparsity (read)": "nsa:kv_tokens_read_total",
}


def test_dashboard_has_every_required_panel():
    dash = load_dashboard()
    queries = panel_queries(dash)
    read = set().union(*(metric_names(e) for _, e in queries))
    missing = {what: m for what, m in REQUIRED_METRICS.items() if m not in read}
    assert not missing, f"dashboard lacks panels for {missing}"
    for q in (0.5, 0.9, 0.99):
        for m in ("time_to_first_token", "inter_token_latency", "e2e_request_latency"):
            assert any(f"histogram_quantile({q}," in e and m in e for _, e in queries), (q, m)
    sparsity = [e for t, e in queries if "sparsity" in t.lower()]
    assert sparsity and all("kv_tokens_dense_equivalent_total" in e.split("/")[0] and
                            "kv_tokens_read_total" in e.split("/")[1] for e in sparsity), sparsity


def test_dashboard_is_well_formed_for_grafana_provisioning():
    dash = load_dashboard()
    assert dash["uid"] == "nsa-serve" and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24, p["title"]
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "model_name", "instance"} <= names
    provider = yaml.safe_load((COMPOSE / "grafana/provisioning/dashboards/nsa-serve.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_every_dashboard_query_reads_only_metrics_the_server_exposes():
    """Names checked against a real scrape of nsa_serve.metrics (the live test runs the queries)."""
    from prometheus_client.parser import text_string_to_metric_families

    from nsa_serve.engine.protocol import EngineStats
    from nsa_serve.metrics import ServerMetrics

    metrics = ServerMetrics("m", 8192, stats=EngineStats)
    metrics.ttft.observe(0.1)
    metrics.observe_http("/v1/completions", 200)  # labelled by route and status: exists once used
    exposed = {s.name for fam in text_string_to_metric_families(metrics.render().decode()) for s in fam.samples}
    dash = load_dashboard()
    queries = panel_queries(dash) + variable_queries(dash)
    unknown = {(title, m) for title, e in queries for m in metric_names(e) if m not in exposed}
    assert not unknown, f"dashboard reads metrics /metrics does not expose: {sorted(unknown)}"


def test_dashboard_variables_substitute_cleanly():
    dash = load_dashboard()
    values = {"model_name": ".*", "instance": ".*"}
    for _, expr in panel_queries(dash):
        out = substitute(expr, "1m", values)
        assert "[1m]" in out or "rate(" not in out
    for _, query in variable_queries(dash):
        parse_label_values(substitute(query, "1m", values))
    with pytest.raises(ValueError, match="unresolved"):
        substitute('rate(x{a="$unknown"}[$__rate_interval])', "1m", values)


# --------------------------------------------------------------------------------------------------
# Kubernetes


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_validate_against_the_schemas(version):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the `test` extra")
    kinds = set()
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                kv.validate(doc, version, strict=True)  # strict: unknown fields are errors too
                kinds.add(doc["kind"])
    assert kinds == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}


def test_schema_validation_catches_mistakes():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the `test` extra")
    deploy = k8s_docs()["Deployment"]
    bad = copy.deepcopy(deploy)
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pth"] = "/ready"
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSIONS[-1], strict=True)
    bad = copy.deepcopy(deploy)
    bad["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "45s"
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files


def _container():
    return k8s_docs()["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def test_deployment_requests_a_gpu_and_probes_the_right_endpoints():
    docs = k8s_docs()
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    c = _container()
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": SERVE_PORT}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    ann = docs["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/port"] == str(SERVE_PORT) and ann["prometheus.io/path"] == "/metrics"


def test_grace_period_covers_prestop_and_the_servers_drain():
    pod = k8s_docs()["Deployment"]["spec"]["template"]["spec"]
    c = _container()
    args = serve_parser().parse_args(c["args"])
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # The kubelet counts preStop inside the grace period; SIGTERM (and the drain) only follows it.
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + args.shutdown_timeout


def test_service_pdb_and_hpa_point_at_the_deployment():
    docs = k8s_docs()
    pod_labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert docs["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    svc = docs["Service"]["spec"]
    assert svc["selector"].items() <= pod_labels.items()
    assert svc["ports"][0]["targetPort"] == "http"
    pdb = docs["PodDisruptionBudget"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": docs["Deployment"]["metadata"]["name"]}
    # With one replica, a PDB allowing one disruption would let a node drain take the service down.
    assert hpa["minReplicas"] > pdb["maxUnavailable"]


def test_hpa_metric_is_the_one_prometheus_adapter_exposes():
    import re

    hpa = k8s_docs()["HorizontalPodAutoscaler"]["spec"]
    [metric] = hpa["metrics"]
    assert metric["type"] == "Pods"
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    [rule] = values["rules"]["custom"]
    series = rule["seriesQuery"].split("{")[0]
    assert series == "nsa:num_requests_waiting"
    exposed = re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), series)
    assert metric["pods"]["metric"]["name"] == exposed


def test_k8s_container_args_are_flags_the_server_accepts():
    args = serve_parser().parse_args(_container()["args"])
    assert args.shutdown_timeout > 0


# --------------------------------------------------------------------------------------------------
# Compose


def compose_file() -> dict:
    return yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())


def test_compose_file_passes_docker_compose_config():
    exe = need("docker-compose")
    res = run([exe, "-f", str(COMPOSE / "docker-compose.yml"), "config", "--quiet"], cwd=COMPOSE)
    assert res.returncode == 0, res.stdout + res.stderr


def test_compose_wires_server_prometheus_and_grafana():
    compose = compose_file()
    services = compose["services"]
    assert set(services) == {"nsa-serve", "prometheus", "grafana"}
    server = services["nsa-serve"]
    assert server["build"]["context"] == "../.." and (COMPOSE / "../../Dockerfile").resolve().is_file()
    assert f"{SERVE_PORT}:{SERVE_PORT}" in server["ports"]
    devices = server["deploy"]["resources"]["reservations"]["devices"][0]
    assert devices["driver"] == "nvidia" and "gpu" in devices["capabilities"]
    assert any("/health" in part for part in server["healthcheck"]["test"])
    # Passed through by name only: an empty NSA_SERVE_API_KEY would mean "the key is the empty string".
    assert "NSA_SERVE_API_KEY" in server["environment"]
    # Every bind mount of Prometheus and Grafana points at a file or folder shipped in deploy/compose.
    for name in ("prometheus", "grafana"):
        for vol in services[name]["volumes"]:
            src = vol.split(":")[0]
            if src.startswith("./"):
                assert (COMPOSE / src).exists(), f"{name} mounts missing {src}"
    # Triton's kernel cache survives restarts (a named volume at the image's TRITON_CACHE_DIR).
    assert "triton-cache:/tmp/triton-cache" in server["volumes"] and "triton-cache" in compose_file()["volumes"]
    assert "TRITON_CACHE_DIR=/tmp/triton-cache" in (COMPOSE / "../../Dockerfile").read_text()
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]}
    assert mounts["/etc/prometheus/prometheus.yml"] == "./prometheus.yml"
    assert mounts["/etc/prometheus/alerts.yml"] == "./alerts.yml"


def test_compose_server_command_parses_and_stop_grace_covers_the_drain():
    server = compose_file()["services"]["nsa-serve"]
    # `${NSA_SERVE_ARGS:-default}`: the default is what runs when the variable is unset.
    command = server["command"]
    assert command.startswith("${NSA_SERVE_ARGS:-") and command.endswith("}")
    args = serve_parser().parse_args(shlex.split(command[len("${NSA_SERVE_ARGS:-"):-1]))
    grace = server["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) > args.shutdown_timeout


# --------------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines, buf = [], ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        op, _, rest = buf.partition(" ")
        lines.append((op.upper(), rest.strip()))
        buf = ""
    return lines


def test_hadolint_passes_on_the_dockerfile():
    hadolint = need("hadolint")
    res = run([hadolint, "--failure-threshold", "style", str(REPO / "Dockerfile")])
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_catches_problems(tmp_path):
    hadolint = need("hadolint")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install python3\n")
    res = run([hadolint, str(bad)])
    assert res.returncode != 0 and "DL3007" in res.stdout  # the :latest tag


def test_dockerfile_runs_nsa_serve_as_a_non_root_user_on_cuda():
    import json

    ins = dockerfile_instructions()
    froms = [a for op, a in ins if op == "FROM"]
    assert all(f.startswith("nvidia/cuda:") and "runtime" in f for f in froms), froms
    # The last USER (the runtime user) is a non-zero uid or a non-root name.
    user = [a for op, a in ins if op == "USER"][-1]
    assert user not in ("0", "root") and not user.startswith("0:")
    entry = json.loads(next(a for op, a in ins if op == "ENTRYPOINT"))  # exec form: PID 1 gets SIGTERM
    assert entry[:2] == ["nsa-serve", "serve"]
    args = serve_parser().parse_args(entry[2:])
    assert args.host == "0.0.0.0" and args.port == SERVE_PORT
    assert str(SERVE_PORT) in [a for op, a in ins if op == "EXPOSE"]
    assert ("COPY", ". .") in ins, "the build stage installs from the .dockerignore-filtered context"
    health = next(a for op, a in ins if op == "HEALTHCHECK")
    assert f"127.0.0.1:{SERVE_PORT}/health" in health
    runs = " ".join(a for op, a in ins if op == "RUN")
    assert "ensure_default_model" in runs or "init-model" in runs, "the default model is baked into the image"
    assert "torch==" in runs, "torch is pinned to a CUDA build"


def docker_context_files() -> list[str]:
    """Files of the repo that `docker build .` sends, after .dockerignore. Supports the pattern forms
    the file uses (a name glob matched at the top level, or `**/glob` at any depth) and fails on others."""
    import fnmatch
    import os

    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
    for pat in patterns:
        assert "/" not in pat.removeprefix("**/") and not pat.startswith("!"), f"unsupported pattern {pat}"

    def ignored(parts: tuple[str, ...]) -> bool:
        for pat in patterns:
            if pat.startswith("**/"):
                if any(fnmatch.fnmatch(p, pat[3:]) for p in parts):
                    return True
            elif fnmatch.fnmatch(parts[0], pat):
                return True
        return False

    out = []
    for root, dirs, files in os.walk(REPO):
        rel = os.path.relpath(root, REPO)
        base = () if rel == "." else tuple(rel.split(os.sep))
        dirs[:] = [d for d in dirs if not ignored(base + (d,))]
        out += ["/".join(base + (f,)) for f in files if not ignored(base + (f,))]
    return out


def test_docker_context_holds_the_package_and_nothing_else():
    files = docker_context_files()
    tops = {f.split("/")[0] for f in files}
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    package_dirs = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    assert "pyproject.toml" in tops and package_dirs <= tops, package_dirs - tops
    assert not tops & {".git", "tests", "deploy", "docs"}, tops
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)


def test_package_builds_from_the_docker_build_context(tmp_path):
    """The build stage's `pip install .`, offline: a wheel builds from exactly the files the Docker
    build context holds (a package directory left out by .dockerignore would fail here)."""
    import shutil
    import sys

    ctx = tmp_path / "ctx"
    for rel in docker_context_files():
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, ctx / rel)
    res = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
               "-w", str(tmp_path / "wheel"), str(ctx)])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    [wheel] = (tmp_path / "wheel").glob("nsa_serve-*.whl")
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "nsa_serve/api/cli.py" in names and "nsa_kernels/reference.py" in names
