"""A server that errors, drops connections, hangs or sends garbage is measured, not a crash of the
tool: every failure is counted by kind, the run ends by itself, and the JSON is still written.

The peer is a small real HTTP/1.1 server on loopback (asyncio streams), so the client meets real
sockets: chunked streams cut mid-body, connections closed before any response, and silence."""

import asyncio
import json
import socket
import threading
import time

import pytest

import loadtest_deps  # noqa: F401  (first: skips on a GPU machine without the packages)
from nsa_loadtest.cli import main

MODES = ("good", "http_500", "incomplete_stream", "stream_error", "timeout", "bad_response", "disconnected")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _sse(obj) -> bytes:
    return _chunk(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")


class MisbehavingServer:
    """Answers /v1/models; 404 for /tokenize and /metrics; chat completions cycle through MODES
    (or always `fixed_mode`). Runs its own event loop in a thread."""

    def __init__(self, fixed_mode: str | None = None):
        self.fixed_mode = fixed_mode
        self.count = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def _shutdown(self):
        self.server.close()
        handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in handlers:  # e.g. the ones still "hanging"
            t.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    async def _handle(self, reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            length = next((int(ln.split(":", 1)[1]) for ln in lines if ln.lower().startswith("content-length:")), 0)
            if length:
                await reader.readexactly(length)
            if path == "/v1/models":
                body = json.dumps({"object": "list", "data": [{"id": "misbehaving", "object": "model"}]}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                             b"Connection: close\r\n\r\n%s" % (len(body), body))
            elif path == "/v1/chat/completions":
                mode = self.fixed_mode or MODES[self.count % len(MODES)]
                self.count += 1
                await self._chat(mode, writer)
            else:
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _chat(self, mode, writer):
        if mode == "disconnected":
            return  # close without a byte
        if mode == "timeout":
            await asyncio.sleep(3600)
        if mode == "http_500":
            body = b'{"error": {"message": "boom", "type": "internal_error"}}'
            writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                     b"Connection: close\r\n\r\n")
        delta = lambda d, fin=None: {"choices": [{"index": 0, "delta": d, "finish_reason": fin}]}  # noqa: E731
        writer.write(_sse(delta({"role": "assistant", "content": ""})))
        if mode == "bad_response":
            writer.write(_sse(b"{not json"))
            writer.write(b"0\r\n\r\n")
            return
        for word in ("alpha", " beta", " gamma"):
            await asyncio.sleep(0.02)
            writer.write(_sse(delta({"content": word})))
            await writer.drain()
            if mode == "incomplete_stream":
                return  # the body's chunked encoding is cut: the peer vanished mid-stream
            if mode == "stream_error":
                writer.write(_sse({"error": {"message": "engine died", "type": "internal_error", "code": 500}}))
                writer.write(b"0\r\n\r\n")
                return
        writer.write(_sse(delta({}, "length")))
        writer.write(_sse({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 3,
                                                    "total_tokens": 14}}))
        writer.write(_sse(b"[DONE]"))
        writer.write(b"0\r\n\r\n")


def _run_cli(tmp_path, port, *extra):
    rc = main(["--base-url", f"http://127.0.0.1:{port}", "--workload", "random", "--input-len", "32",
               "--output-len", "4", "--warmup", "0", "--no-progress", "--result-dir", str(tmp_path),
               "--result-name", "run", "--metrics-interval", "0", *extra])
    return rc, json.loads((tmp_path / "run.json").read_text())


def test_every_failure_kind_is_counted_and_the_run_completes(tmp_path, capsys):
    with MisbehavingServer() as srv:
        t = time.monotonic()
        rc, res = _run_cli(tmp_path, srv.port, "--num-requests", str(2 * len(MODES)), "--max-concurrency", "4",
                           "--request-timeout", "1", "--goodput", "ttft:10000")
        elapsed = time.monotonic() - t
    assert rc == 0 and elapsed < 20
    assert res["completed"] == 2 and res["failed"] == 2 * (len(MODES) - 1)
    assert res["failures"] == {m: 2 for m in MODES if m != "good"}
    assert res["model_id"] == "misbehaving"  # found through /v1/models
    assert res["token_counts_estimated"] is True  # no /tokenize there, and the result says so
    assert res["server_metrics"] == {"available": False}
    # The good streams: usage tokens, 3 text chunks → 2 ITL gaps each, TTFT after the first word's delay.
    assert res["total_output_tokens"] == 6 and res["total_input_tokens"] == 22
    good = [i for i, k in enumerate(res["error_kinds"]) if k is None]
    assert [len(res["itls"][i]) for i in good] == [2, 2]
    assert all(res["ttfts"][i] >= 0.015 for i in good)
    assert res["request_goodput"] == pytest.approx(2 / res["duration"])
    assert "incomplete_stream" in capsys.readouterr().out  # the table lists failures by kind
    for png in ("latency_cdf", "ttft_vs_prompt", "throughput"):
        assert (tmp_path / f"run_{png}.png").stat().st_size > 1000


def test_a_hanging_server_is_stopped_by_the_duration_bound(tmp_path):
    with MisbehavingServer(fixed_mode="timeout") as srv:
        t = time.monotonic()
        rc, res = _run_cli(tmp_path, srv.port, "--num-requests", "20", "--arrival", "fixed",
                           "--request-rate", "4", "--duration", "1.2", "--request-timeout", "600", "--no-plots")
        elapsed = time.monotonic() - t
    assert rc == 0 and elapsed < 10
    # sends at 0, 0.25, ..., 1.0 (5 requests); the rest fall after the deadline and are never sent
    assert res["sent"] == 5 and res["not_sent"] == 15
    assert res["failures"] == {"cancelled_at_deadline": 5} and res["completed"] == 0
    assert 1.2 <= res["duration"] < 3


def test_unreachable_server(tmp_path, capsys):
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = main(["--base-url", f"http://127.0.0.1:{port}", "--no-progress", "--result-dir", str(tmp_path)])
    assert rc == 1 and "cannot reach" in capsys.readouterr().err
    # With the model named, the run goes ahead and counts every request as a connect error.
    rc, res = _run_cli(tmp_path, port, "--model", "m", "--num-requests", "3", "--no-plots")
    assert rc == 0 and res["failures"] == {"connect_error": 3}
