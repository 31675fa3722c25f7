"""Shared helpers of the deployment tests (tests/test_deploy_*.py): where deploy/ lives, and the
PromQL of the Grafana dashboard with Grafana's variables replaced by concrete values."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose"
K8S = DEPLOY / "k8s"
DASHBOARD = COMPOSE / "grafana" / "dashboards" / "nsa-serve.json"
PROMETHEUS_CONFIG = COMPOSE / "prometheus.yml"
INSTALL_HINT = "run `bash deploy/ci/install-tools.sh` (Debian packages prometheus and docker-compose)"


def tool(name: str) -> str | None:
    """Path of a command-line tool, looking beside the running Python too (pip-installed binaries
    such as hadolint land in the virtual environment's bin/, which need not be on PATH)."""
    import sys

    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else None


def load_dashboard(path: Path = DASHBOARD) -> dict:
    return json.loads(path.read_text())


def _walk_panels(panels: list[dict]):
    for panel in panels:
        yield panel
        yield from _walk_panels(panel.get("panels", []))  # panels inside (collapsed) rows


def panel_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) for every query target of every panel."""
    return [(p.get("title", "?"), t["expr"]) for p in _walk_panels(dashboard.get("panels", []))
            for t in p.get("targets", []) if t.get("expr")]


def variable_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(variable name, query) of the dashboard's query variables (Grafana's label_values(...) syntax)."""
    out = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        q = var.get("query")
        out.append((var["name"], q["query"] if isinstance(q, dict) else q))
    return out


def substitute(expr: str, rate_interval: str, variables: dict[str, str]) -> str:
    """Replace Grafana's built-in interval variables with `rate_interval` and each dashboard variable
    with its value (the test uses the "All" value, `.*`). Raises on a variable left unresolved, so a
    new variable in the dashboard cannot slip past the test untested."""
    out = expr
    for builtin in ("$__rate_interval", "${__rate_interval}", "$__interval", "${__interval}", "$__range",
                    "${__range}"):
        out = out.replace(builtin, rate_interval)
    # Longest names first so $model does not eat the prefix of $model_name.
    for name in sorted(variables, key=len, reverse=True):
        value = variables[name]
        out = out.replace("${" + name + "}", value).replace("$" + name, value)
    left = re.findall(r"\$\{?\w+", out)
    if left:
        raise ValueError(f"unresolved Grafana variable(s) {left} in {expr!r}")
    return out


LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<match>.+?)\s*,\s*)?(?P<label>\w+)\s*\)\s*$")


def parse_label_values(query: str) -> tuple[str | None, str]:
    """Grafana's `label_values(series_selector, label)` -> (selector or None, label)."""
    m = LABEL_VALUES.match(query)
    if not m:
        raise ValueError(f"not a label_values(...) query: {query!r}")
    return m.group("match"), m.group("label")


def metric_names(expr: str) -> set[str]:
    """nsa:* metric names an expression reads (the server's metric families, suffixes included)."""
    return set(re.findall(r"\bnsa:[a-z0-9_]+", expr))
