"""Fixtures for the HTTP API tests: a real engine with the tiny model behind a real uvicorn server on
loopback (a free port, in a background thread), driven by the official `openai` client and httpx.

The fixtures `tiny_model_dir` and `api_server` are in conftest.py (one of each a session); test
modules import the helpers (`start_server`, `wait_for`, ...) from here.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass

import pytest
import torch

# The device machines' image has torch, Triton and httpx but not the server's HTTP stack, and
# `pytest -m gpu tests/` must still collect there: on a GPU machine these API tests (CPU tests)
# skip, naming the missing package. Without a GPU (CI, a developer's machine) a missing package
# stays an import error.
if torch.cuda.is_available():
    for _package in ("fastapi", "uvicorn", "pydantic", "openai"):
        pytest.importorskip(_package, reason=f"the API tests need {_package}, not installed on this GPU machine")

import httpx  # noqa: E402
import openai  # noqa: E402

API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    engine: object
    app: object
    server: object
    thread: threading.Thread
    api_key: str | None

    def openai(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "none", max_retries=0,
                             timeout=kw.pop("timeout", 60), **kw)

    def http(self, auth: bool = True, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if auth and self.api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kw.pop("timeout", 60), **kw)

    def metrics(self) -> dict[str, float]:
        with self.http() as c:
            r = c.get("/metrics")
        r.raise_for_status()
        return parse_metrics(r.text)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> {'name{label="v",...}': value} with labels sorted, model_name dropped."""
    out = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, labels, value = m.groups()
        pairs = sorted(p for p in re.findall(r'(\w+)="([^"]*)"', labels or "") if p[0] != "model_name")
        key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}" if pairs else "")
        out[key] = float(value)
    return out


def start_server(model_dir, api_key: str | None = API_KEY, **engine_kw) -> RunningServer:
    import uvicorn

    from nsa_serve.api.cli import GracefulServer
    from nsa_serve.api.server import ServerSettings, build_app
    from nsa_serve.engine.args import EngineArgs
    from nsa_serve.engine.async_engine import AsyncLLMEngine
    from nsa_serve.engine.llm_engine import LLMEngine

    settings_kw = {k: engine_kw.pop(k) for k in ("max_body_bytes", "retry_after_s", "served_model_names",
                                                 "log_stats_interval_s", "log_requests", "max_log_len", "cors_origins",
                                                 "chat_template", "trust_request_chat_template",
                                                 "return_tokens_as_token_ids", "force_include_usage")
                   if k in engine_kw}
    args = EngineArgs(model=str(model_dir), device="cpu", **{"max_model_len": 512, "num_pages": 512, **engine_kw})
    # Built here (loads the weights) so the app can read the model's name and context; the server's
    # lifespan then starts the loop on uvicorn's event loop.
    engine = AsyncLLMEngine(args, engine=LLMEngine(args))
    app = build_app(engine, ServerSettings(api_key=api_key, **settings_kw))
    port = free_port()
    server = GracefulServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True, name=f"uvicorn-{port}")
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return RunningServer(f"http://127.0.0.1:{port}", engine, app, server, thread, api_key)


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
