"""`nsa-serve serve` as a user runs it: a real process, then SIGTERM while a stream is in flight."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from api_fixtures import free_port, start_server, wait_for


def test_serve_default_model_and_graceful_sigterm(tmp_path):
    # No MODEL_DIR: the server takes the bundled default, the trained model shipped in
    # nsa_serve/assets/default-model (the cache folder would only be used if none shipped).
    port = free_port()
    env = {**os.environ, "NSA_SERVE_CACHE": str(tmp_path / "cache"), "NSA_SERVE_API_KEY": "k"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nsa_serve.cli", "serve", "--port", str(port), "--device", "cpu",
         "--max-model-len", "256", "--num-pages", "128", "--shutdown-timeout", "60", "--log-level", "info",
         # vLLM's flags for uvicorn's log and the API pages, as a copied command line carries them.
         "--uvicorn-log-level", "warning", "--disable-uvicorn-access-log", "--disable-fastapi-docs",
         "--disable-log-requests", "--log-stats-interval", "0", "--enable-request-id-headers",
         "--enable-prompt-tokens-details"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            try:
                return httpx.get(f"{url}/ready", timeout=1).status_code == 200
            except httpx.TransportError:
                assert proc.poll() is None, proc.communicate()[1]
                return False
        assert wait_for(up, timeout=120, interval=0.2), "server did not come up"
        headers = {"Authorization": "Bearer k"}
        models = httpx.get(f"{url}/v1/models", headers=headers).json()["data"]
        assert [m["id"] for m in models] == ["default-model"]
        assert [httpx.get(f"{url}{page}", headers=headers).status_code for page in ("/docs", "/openapi.json")] == [404] * 2

        result: dict = {}

        def stream():
            body = {"prompt": "Draining:", "max_tokens": 120, "ignore_eos": True, "stream": True}
            events = []
            with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        result.setdefault("started", True)
            result["events"] = events

        t = threading.Thread(target=stream)
        t.start()
        assert wait_for(lambda: result.get("started"), timeout=60)
        proc.send_signal(signal.SIGTERM)
        # Stop admitting: the listening socket closes while the stream is still going.
        def refused():
            try:
                httpx.get(f"{url}/health", timeout=1)
                return False
            except httpx.TransportError:
                return True
        assert wait_for(refused, timeout=10)
        assert "events" not in result, "the stream ended before the server stopped admitting (make it longer)"
        t.join(timeout=120)
        assert proc.wait(timeout=60) == 0
        events = result["events"]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(1 for c in chunks if c["choices"][0]["text"]) >= 1
        stderr = proc.stderr.read()
        assert "nsa-serve: ready" in stderr and "| 3/3" in stderr  # the startup progress bar completed
        assert "start-up objects out of garbage collection" in stderr  # the heap frozen before serving
        assert "Uvicorn running" not in stderr and '"POST /v1/completions' not in stderr  # uvicorn kept to warnings
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_shutdown_timeout_aborts_what_is_left(tiny_model_dir):
    """Past the graceful period, in-flight requests are cut and the engine stops with its pages free."""
    srv = start_server(tiny_model_dir, api_key=None, max_model_len=2048)
    srv.server.config.timeout_graceful_shutdown = 1
    events: list[str] = []

    def stream():
        body = {"prompt": "Never finishes", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    events.append(line)
        except httpx.TransportError:
            events.append("<cut>")

    t = threading.Thread(target=stream)
    t.start()
    assert wait_for(lambda: len(events) > 2)
    started = time.monotonic()
    srv.stop()
    t.join(timeout=30)
    assert time.monotonic() - started < 20
    assert "data: [DONE]" not in events
    stats = srv.engine.stats()
    assert stats.num_running == 0 and stats.num_pages_used == 0
    assert not srv.engine.is_ready


def test_cors_answers_a_preflight_before_the_key_and_marks_answers(tiny_model_dir):  # noqa: F811
    server = start_server(tiny_model_dir, cors_origins=["https://app.example"])
    try:
        with server.http(auth=False) as h:
            pre = h.options("/v1/chat/completions", headers={
                "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type"})
            assert pre.status_code == 200
            assert pre.headers["access-control-allow-origin"] == "https://app.example"
            other = h.options("/v1/models", headers={"Origin": "https://evil.example",
                                                     "Access-Control-Request-Method": "GET"})
            assert "access-control-allow-origin" not in other.headers
        with server.http() as h:
            r = h.get("/v1/models", headers={"Origin": "https://app.example"})
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    finally:
        server.stop()
    plain = start_server(tiny_model_dir)  # the default: no CORS headers at all
    try:
        with plain.http() as h:
            r = h.get("/v1/models", headers={"Origin": "https://app.example"})
            assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    finally:
        plain.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_https_and_a_root_path(tmp_path, tiny_model_dir):  # noqa: F811
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "nsa_serve.cli", "serve", str(tiny_model_dir), "--port", str(port), "--device", "cpu",
         "--ssl-keyfile", str(key), "--ssl-certfile", str(cert), "--root-path", "/llm", "--log-level", "warning",
         "--max-model-len", "256", "--num-pages", "64"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"https://127.0.0.1:{port}"
    try:
        def up():
            try:
                return httpx.get(f"{url}/health", timeout=1, verify=False).status_code == 200
            except httpx.TransportError:
                assert proc.poll() is None, proc.communicate()[1]
                return False
        assert wait_for(up, timeout=120, interval=0.2), "server did not come up"
        with pytest.raises(httpx.TransportError):  # plain HTTP is not served
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, verify=False, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        spec = httpx.get(f"{url}/openapi.json", verify=False, timeout=10).json()
        assert spec.get("servers") == [{"url": "/llm"}]  # links a proxy serves under /llm point there
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_generation_config_flags_choose_the_sampling_defaults(tmp_path):
    from nsa_serve.api.cli import sampling_defaults
    from nsa_serve.cli import build_parser

    model, other = tmp_path / "model", tmp_path / "other"
    for folder, config in ((model, {"temperature": 0.3, "top_p": 0.9, "bos_token_id": 1}), (other, {"top_k": 7})):
        folder.mkdir()
        (folder / "generation_config.json").write_text(json.dumps(config))

    def defaults(*flags):
        return sampling_defaults(build_parser().parse_args(["serve", str(model), *flags]))

    assert defaults() == {"temperature": 0.3, "top_p": 0.9}  # auto: the model's, sampling fields only
    assert defaults("--generation-config", "vllm") == {}
    assert defaults("--generation-config", str(other)) == {"top_k": 7}
    assert defaults("--override-generation-config", '{"temperature": 0, "max_tokens": 9}') == {
        "temperature": 0, "top_p": 0.9, "max_tokens": 9}
    for flags, message in ((("--generation-config", str(tmp_path / "missing")), "not 'auto', 'vllm' or a folder"),
                           (("--override-generation-config", '{"temprature": 0}'), "unknown field"),
                           (("--override-generation-config", "[1]"), "JSON object")):
        with pytest.raises(SystemExit, match=message):
            defaults(*flags)


def test_fastapi_docs_are_served_unless_disabled(api_server):
    # vLLM serves FastAPI's pages by default (its --disable-fastapi-docs turns them off: the
    # real-process test above); they describe the routes, and a browser opens them without a key.
    with httpx.Client(base_url=api_server.url) as h:
        spec = h.get("/openapi.json")
        assert spec.status_code == 200 and "/v1/chat/completions" in spec.json()["paths"]
        assert h.get("/docs").status_code == 200
        ids = [op["operationId"] for path in spec.json()["paths"].values() for op in path.values()]
        assert len(ids) == len(set(ids))  # FastAPI warns of duplicates; clients generated from the spec break
        assert h.get("/v1/models").status_code == 401  # the API itself still needs the key


def test_contradicting_request_log_flags_end_before_loading():
    from nsa_serve.cli import build_parser

    args = build_parser().parse_args(["serve", "/nonexistent", "--disable-log-requests", "--enable-log-requests"])
    with pytest.raises(SystemExit, match="contradict"):
        args.func(args)


def test_a_copied_vllm_command_line_runs_or_says_why_not():
    from nsa_serve.api.cli import engine_args_from
    from nsa_serve.cli import build_parser

    def engine_args(*flags, command=("serve", "/m")):
        return engine_args_from(build_parser().parse_args([*command, *flags]))

    # vLLM's spellings of what this server does anyway.
    taken = engine_args("-tp", "1", "--pipeline-parallel-size", "1", "--kv-cache-dtype", "auto", "--enable-chunked-prefill",
                        "--enable-auto-tool-choice", "--tool-call-parser", "nsa", "--trust-remote-code",
                        "--enable-prefix-caching")
    assert taken == engine_args() and taken.enable_prefix_caching
    assert not engine_args("--no-enable-prefix-caching").enable_prefix_caching
    assert not engine_args("--no-enable-prefix-caching", command=("run-batch", "-i", "a", "-o", "b")).enable_prefix_caching
    # What it cannot honour ends before any weight loads, with the reason.
    for flags, message in ((("--tensor-parallel-size", "2"), "one GPU"), (("-dp", "4"), "one GPU"),
                           (("--kv-cache-dtype", "fp8"), "quantized caches"), (("-q", "awq"), "quantized weights"),
                           (("--enable-auto-tool-choice", "--tool-call-parser", "hermes"), "its own format")):
        with pytest.raises(SystemExit, match=message):
            engine_args(*flags)


def test_max_logprobs_flag_reaches_the_engine_and_names_the_requests_field(tiny_model_dir):  # noqa: F811
    from nsa_serve.api.cli import engine_args_from
    from nsa_serve.cli import build_parser

    assert engine_args_from(build_parser().parse_args(["serve", "/m", "--max-logprobs", "40"])).max_logprobs == 40
    assert engine_args_from(build_parser().parse_args(["serve", "/m"])).max_logprobs == 20  # vLLM's default
    server = start_server(tiny_model_dir, max_logprobs=30)
    try:
        with server.http() as h:
            chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logprobs": True}
            r = h.post("/v1/chat/completions", json={**chat, "top_logprobs": 30})
            assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 30
            for path, body, param in (("/v1/chat/completions", {**chat, "top_logprobs": 31}, "top_logprobs"),
                                      ("/v1/responses", {"input": "hi", "top_logprobs": 31,
                                                         "include": ["message.output_text.logprobs"]}, "top_logprobs"),
                                      ("/v1/completions", {"prompt": "hi", "logprobs": 31}, "logprobs"),
                                      ("/v1/completions", {"prompt": "hi", "prompt_logprobs": 31}, "prompt_logprobs")):
                r = h.post(path, json=body)
                assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, r.text)
                assert "between 0 and 30" in r.json()["error"]["message"]
    finally:
        server.stop()
    # A beam search's steps ask for 2 × its width: past the bound it is said as such.
    server = start_server(tiny_model_dir, max_logprobs=5)
    try:
        with server.http() as h:
            body = {"prompt": "hi", "max_tokens": 2, "n": 3, "use_beam_search": True}
            r = h.post("/v1/completions", json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == "n" and "--max-logprobs 5" in r.text
            assert h.post("/v1/completions", json={**body, "n": 2}).status_code == 200
    finally:
        server.stop()


def test_server_wide_token_ids_and_forced_usage(tiny_model_dir):  # noqa: F811
    # vLLM's --return-tokens-as-token-ids (a request's own field still decides) and
    # --enable-force-include-usage (every stream ends with its usage, as if it had asked).
    server = start_server(tiny_model_dir, return_tokens_as_token_ids=True, force_include_usage=True)
    try:
        with server.http() as h:
            body = {"prompt": "The capital of", "max_tokens": 3, "logprobs": 2, "ignore_eos": True}
            tokens = h.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]["tokens"]
            assert len(tokens) == 3 and all(t.startswith("token_id:") for t in tokens)
            own = h.post("/v1/completions", json={**body, "return_tokens_as_token_ids": False}).json()
            assert not any(t.startswith("token_id:") for t in own["choices"][0]["logprobs"]["tokens"])
            chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "logprobs": True}
            content = h.post("/v1/chat/completions", json=chat).json()["choices"][0]["logprobs"]["content"]
            assert content and all(t["token"].startswith("token_id:") for t in content)
            for path, req in (("/v1/chat/completions", chat), ("/v1/completions", body)):
                with h.stream("POST", path, json={**req, "stream": True}) as r:
                    events = [json.loads(line[6:]) for line in r.iter_lines()
                              if line.startswith("data: ") and line != "data: [DONE]"]
                assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 3, path
                assert all(e.get("usage") is None for e in events[:-1]), path
    finally:
        server.stop()
