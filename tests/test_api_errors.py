"""Bad input gets the right status and an OpenAI-shaped error body, and never disturbs good traffic.

One server runs a single sequence at a time with a one-slot waiting queue: a long greedy stream holds
the running slot and a second request holds the queue slot while every bad request of the matrix is
sent. The last case (queue full -> 429) can only pass while both are still in the engine, so the good
stream provably kept going through the whole matrix; it must then finish with the right text.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from api_fixtures import start_server, wait_for

CONTEXT = 512
BODY_LIMIT = 4096
GOOD = {"messages": [{"role": "user", "content": "Tell me about sets."}], "max_tokens": 400, "temperature": 0,
        "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    srv = start_server(tiny_model_dir, max_model_len=CONTEXT, max_num_seqs=1, max_queue=1,
                       max_body_bytes=BODY_LIMIT, retry_after_s=2)
    yield srv
    srv.stop()

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


def chat(**overrides):
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **overrides}


def raw(content: bytes):
    return {"content": content, "headers": {"content-type": "application/json"}}


# (name, method, path, request kwargs for httpx, expected status, expected param or None, expected code or None)
def matrix(model: str, long_prompt: str):
    c, x = "/v1/chat/completions", "/v1/completions"
    return [
        ("malformed JSON", c, raw(b'{"messages": [}'), 400, None, None),
        ("body not an object", c, {"json": [1, 2]}, 400, None, None),
        ("NaN literal", c, raw(b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}'), 400, None,
         None),
        ("invalid UTF-8", c, raw(b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'), 400, None, None),
        ("lone surrogate", c, raw(b'{"messages": [{"role": "user", "content": "\\ud800"}]}'), 400, "messages", None),
        ("max_tokens as string", c, {"json": chat(max_tokens="5")}, 400, "max_tokens", None),
        ("max_tokens as bool", c, {"json": chat(max_tokens=True)}, 400, "max_tokens", None),
        ("temperature as string", c, {"json": chat(temperature="hot")}, 400, "temperature", None),
        ("messages not a list", c, {"json": {"messages": "hi"}}, 400, "messages", None),
        ("missing messages", c, {"json": {"max_tokens": 3}}, 400, "messages", None),
        ("empty messages", c, {"json": chat(messages=[])}, 400, "messages", None),
        ("unknown role", c, {"json": chat(messages=[{"role": "robot", "content": "x"}])}, 400, "messages", None),
        ("unknown model", c, {"json": chat(model="gpt-9")}, 404, "model", "model_not_found"),
        ("too-long prompt", c, {"json": chat(messages=[{"role": "user", "content": long_prompt}])}, 400, "messages",
         "context_length_exceeded"),
        ("too-long completion prompt", x, {"json": {"prompt": long_prompt, "max_tokens": 1}}, 400, "prompt",
         "context_length_exceeded"),
        ("max_tokens past the context", c, {"json": chat(max_tokens=CONTEXT)}, 400, "max_tokens",
         "context_length_exceeded"),
        ("temperature out of range", c, {"json": chat(temperature=2.5)}, 400, "temperature", None),
        ("top_p zero", c, {"json": chat(top_p=0.0)}, 400, "top_p", None),
        ("top_k negative", c, {"json": chat(top_k=-5)}, 400, "top_k", None),
        ("seed wider than 64 bits", c, {"json": chat(seed=2**70)}, 400, "seed", None),
        ("text part without text", c, {"json": chat(messages=[{"role": "user", "content": [{"type": "text"}]}])},
         400, "messages", None),
        ("min_p above one", c, {"json": chat(min_p=1.5)}, 400, "min_p", None),
        ("presence_penalty too big", c, {"json": chat(presence_penalty=3)}, 400, "presence_penalty", None),
        ("repetition_penalty zero", c, {"json": chat(repetition_penalty=0)}, 400, "repetition_penalty", None),
        ("n zero", c, {"json": chat(n=0)}, 400, "n", None),
        ("max_tokens zero", c, {"json": chat(max_tokens=0)}, 400, "max_tokens", None),
        ("min_tokens above max_tokens", c, {"json": chat(min_tokens=5)}, 400, "min_tokens", None),
        ("top_logprobs too many", c, {"json": chat(logprobs=True, top_logprobs=50)}, 400, "top_logprobs", None),
        ("top_logprobs without logprobs", c, {"json": chat(top_logprobs=2)}, 400, "top_logprobs", None),
        ("completion logprobs too many", x, {"json": {"prompt": "a", "logprobs": 50}}, 400, "logprobs", None),
        ("empty prompt", x, {"json": {"prompt": ""}}, 400, "prompt", None),
        ("token id outside vocab", x, {"json": {"prompt": [1, 10 ** 9]}}, 400, "prompt", None),
        ("logit_bias key not a token id", c, {"json": chat(logit_bias={"five": 1.0})}, 400, "logit_bias", None),
        ("logit_bias token outside vocab", c, {"json": chat(logit_bias={"1000000000": 1.0})}, 400, "logit_bias",
         None),
        ("logit_bias value above 100", c, {"json": chat(logit_bias={"5": 150})}, 400, "logit_bias", None),
        ("logit_bias value a string", c, {"json": chat(logit_bias={"5": "1"})}, 400, "logit_bias", None),
        ("allowed_token_ids outside vocab", x, {"json": {"prompt": "a", "allowed_token_ids": [-1]}}, 400,
         "allowed_token_ids", None),
        ("stop_token_ids outside vocab", c, {"json": chat(stop_token_ids=[10 ** 9])}, 400, "stop_token_ids", None),
        ("stop_token_ids negative", x, {"json": {"prompt": "a", "stop_token_ids": [-1]}}, 400, "stop_token_ids",
         None),
        ("bad_words a string", x, {"json": {"prompt": "a", "bad_words": "word"}}, 400, "bad_words", None),
        ("bad_words blank", c, {"json": chat(bad_words=["ok", "  "])}, 400, "bad_words", None),
        ("bad_words too many", x, {"json": {"prompt": "a", "bad_words": ["w"] * 257}}, 400, "bad_words", None),
        ("truncate_prompt_tokens zero", x, {"json": {"prompt": "a", "truncate_prompt_tokens": 0}}, 400,
         "truncate_prompt_tokens", None),
        ("truncate_prompt_tokens past the context", c, {"json": chat(truncate_prompt_tokens=CONTEXT + 1)}, 400,
         "truncate_prompt_tokens", None),
        ("continue_final_message with add_generation_prompt", c,
         {"json": chat(continue_final_message=True)}, 400, "continue_final_message", None),
        ("prompt_logprobs with stream", c, {"json": chat(prompt_logprobs=1, stream=True)}, 400, "prompt_logprobs",
         None),
        ("prompt_logprobs too many", x, {"json": {"prompt": "a", "prompt_logprobs": 21}}, 400, "prompt_logprobs",
         None),
        ("echo with too many logprobs", x, {"json": {"prompt": "a", "echo": True, "logprobs": 21}}, 400, "logprobs",
         None),
        ("invalid guided_regex", x, {"json": {"prompt": "a", "guided_regex": "[a-z"}}, 400, "guided_regex", None),
        ("invalid Lark grammar", x, {"json": {"prompt": "a", "guided_grammar": "start: nope"}}, 400,
         "guided_grammar", None),
        ("two output constraints", c, {"json": chat(guided_choice=["a"], response_format={"type": "json_object"})},
         400, "guided_choice", None),
        ("response_format of an unknown type", c, {"json": chat(response_format={"type": "xml"})}, 400,
         "response_format", None),
        ("json_schema without a schema", c, {"json": chat(response_format={"type": "json_schema",
                                                                           "json_schema": {"name": "x"}})},
         400, "response_format", None),
        ("schema of an unknown type", c, {"json": chat(response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}})}, 400,
         "response_format", None),
        ("empty guided_choice", x, {"json": {"prompt": "a", "guided_choice": []}}, 400, "guided_choice", None),
        ("unknown structured_outputs key", x, {"json": {"prompt": "a", "structured_outputs": {"xml": "x"}}}, 400,
         "structured_outputs", None),
        ("tool_choice required without tools", c, {"json": chat(tool_choice="required")}, 400, "tool_choice", None),
        ("tool_choice naming an unknown function", c,
         {"json": chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "nope"}})}, 400,
         "tool_choice", None),
        ("tool_choice of an unknown shape", c, {"json": chat(tools=[TOOL], tool_choice="always")}, 400,
         "tool_choice", None),
        ("tool without a function", c, {"json": chat(tools=[{"type": "function"}], tool_choice="required")}, 400,
         "tools", None),
        ("tool name with a space", c, {"json": chat(tools=[{"type": "function", "function": {"name": "a b"}}],
                                                    tool_choice="required")}, 400, "tools", None),
        ("tool call beside response_format", c,
         {"json": chat(tools=[TOOL], tool_choice="required", response_format={"type": "json_object"})}, 400,
         "response_format", None),
        # Fields this server cannot honour are refused, never dropped as unknown extras.
        ("deprecated functions", c, {"json": chat(functions=[{"name": "f", "parameters": {}}])}, 400, "functions",
         None),
        ("deprecated function_call", c, {"json": chat(function_call="auto")}, 400, "function_call", None),
        ("audio modality", c, {"json": chat(modalities=["text", "audio"])}, 400, "modalities", None),
        ("audio output", c, {"json": chat(audio={"voice": "alloy", "format": "wav"})}, 400, "audio", None),
        ("web search", c, {"json": chat(web_search_options={})}, 400, "web_search_options", None),
        ("logits processors", x, {"json": {"prompt": "a", "logits_processors": ["pkg.Proc"]}}, 400,
         "logits_processors", None),
        ("structural tag", c, {"json": chat(structural_tag="{}")}, 400, "structural_tag", None),
        ("whitespace pattern", x, {"json": {"prompt": "a", "guided_whitespace_pattern": " "}}, 400,
         "guided_whitespace_pattern", None),
        ("documents with the built-in template", c, {"json": chat(documents=[{"title": "t", "text": "x"}])}, 400,
         "documents", None),
        ("a request's chat template untrusted", c, {"json": chat(chat_template="{{ messages }}")}, 400,
         "chat_template", None),
        ("chat_template_kwargs setting messages", c, {"json": chat(chat_template_kwargs={"messages": []})}, 400,
         "chat_template_kwargs", None),
        ("allowed_token_ids contradicting the grammar", c,
         {"json": chat(allowed_token_ids=[5], guided_regex="[a-z]+x")}, 400, "allowed_token_ids", None),
        ("allowed_token_ids empty", x, {"json": {"prompt": "a", "allowed_token_ids": []}}, 400,
         "allowed_token_ids", None),
        ("stream_options without stream", c, {"json": chat(stream_options={"include_usage": True})}, 400,
         "stream_options", None),
        ("oversized body (Content-Length)", c, {"json": chat(messages=[{"role": "user", "content": "x" * 5000}])},
         413, None, "request_too_large"),
        ("oversized body (chunked, no Content-Length)", c,
         {"content": iter([b'{"messages": [{"role": "user", "content": "' + b"y" * 1000] * 6 + [b'"}]}']),
          "headers": {"content-type": "application/json"}}, 413, None, "request_too_large"),
        ("missing API key", c, {"json": chat(), "noauth": True}, 401, None, "invalid_api_key"),
        ("wrong API key", c, {"json": chat(), "headers": {"Authorization": "Bearer nope"}}, 401, None,
         "invalid_api_key"),
        ("missing API key on /metrics", "/metrics", {"method": "GET", "noauth": True}, 401, None,
         "invalid_api_key"),
        ("unknown route", "/v2/nothing", {"json": {}}, 404, None, None),
        ("wrong method", c, {"method": "GET"}, 405, None, None),
        # Last: needs the running slot and the queue slot still taken (see the module docstring).
        ("full queue", c, {"json": chat(model=model)}, 429, None, "queue_full"),
    ]


def assert_openai_error(r: httpx.Response, status: int, param, code, name: str):
    assert r.status_code == status, f"{name}: got {r.status_code} {r.text}"
    body = r.json()
    assert set(body) == {"error"}, name
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, name
    assert isinstance(err["message"], str) and err["message"], name
    assert isinstance(err["type"], str) and err["type"], name
    if param is not None:
        assert err["param"] == param, f"{name}: param {err['param']!r}, message {err['message']!r}"
    if code is not None:
        assert err["code"] == code, f"{name}: code {err['code']!r}"


def test_bad_input_matrix_while_a_good_stream_runs(server):
    model = server.engine.model_name
    stream_result: dict = {}

    def good_stream():
        text, finish, usage = [], None, None
        body = {**GOOD, "model": model, "stream": True, "stream_options": {"include_usage": True}}
        with server.http() as h, h.stream("POST", "/v1/chat/completions", json=body) as r:
            stream_result["status"] = r.status_code
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                stream_result.setdefault("first_at", time.monotonic())
                if chunk["choices"]:
                    text.append(chunk["choices"][0]["delta"].get("content") or "")
                    finish = chunk["choices"][0]["finish_reason"] or finish
                usage = chunk.get("usage") or usage
        stream_result.update(text="".join(text), finish=finish, usage=usage)

    def queued_request():
        with server.http() as h:
            stream_result["queued"] = h.post("/v1/completions", json={"prompt": "queued", "max_tokens": 2})

    g = threading.Thread(target=good_stream)
    g.start()
    assert wait_for(lambda: "first_at" in stream_result), "the good stream never started"
    q = threading.Thread(target=queued_request)
    q.start()
    assert wait_for(lambda: server.engine.stats().num_waiting == 1), "the queued request never queued"

    long_prompt = "word " * (CONTEXT + 50)
    with server.http() as h, server.http(auth=False) as anonymous:
        for name, path, kw, status, param, code in matrix(model, long_prompt):
            kw = dict(kw)
            client = anonymous if kw.pop("noauth", False) else h
            r = client.request(kw.pop("method", "POST"), path, **kw)
            assert_openai_error(r, status, param, code, name)
            if status == 429:
                assert r.headers["retry-after"] == "2"
        assert "text" not in stream_result, "the good stream ended before the matrix did (raise its max_tokens)"
        assert h.get("/health").status_code == 200

    g.join(timeout=120)
    q.join(timeout=120)
    assert stream_result["status"] == 200 and stream_result["finish"] == "length"
    assert stream_result["usage"]["completion_tokens"] == GOOD["max_tokens"]
    assert stream_result["queued"].status_code == 200
    with server.http() as h:  # the same request again, alone: greedy, so the same text
        again = h.post("/v1/chat/completions", json={**GOOD, "model": model}).json()
    assert again["choices"][0]["message"]["content"] == stream_result["text"]
    assert server.engine.stats().num_pages_used == 0


def test_error_inside_a_stream_is_an_error_event(server, monkeypatch):
    """A failure after the headers went out arrives in-band, then [DONE] (the openai client raises it)."""
    import openai

    from nsa_serve.engine.protocol import EngineDeadError

    engine = server.engine
    real_generate = engine.generate

    async def failing_generate(*args, **kwargs):
        gen = real_generate(*args, **kwargs)
        yield await gen.__anext__()
        await gen.aclose()
        raise EngineDeadError("simulated engine failure")

    monkeypatch.setattr(engine, "generate", failing_generate)
    body = {**chat(max_tokens=20), "stream": True, "ignore_eos": True}
    with server.http() as h, h.stream("POST", "/v1/chat/completions", json=body) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200
    assert events[-1] == "data: [DONE]"
    err = json.loads(events[-2][6:])["error"]
    assert err["code"] == "engine_dead" and "simulated" in err["message"]
    with pytest.raises(openai.APIError, match="simulated"):
        list(server.openai().chat.completions.create(model=engine.model_name, stream=True, **chat(max_tokens=20)))
    monkeypatch.undo()
    assert wait_for(lambda: engine.stats().num_pages_used == 0 and engine.stats().num_running == 0)


def test_dead_engine_loop_turns_health_red(server, monkeypatch):
    """Runs last in this module: it kills the server's engine loop."""
    engine = server.engine
    result: dict = {}

    def stream():
        body = {**chat(max_tokens=200), "stream": True, "ignore_eos": True}
        with server.http() as h, h.stream("POST", "/v1/chat/completions", json=body) as r:
            result["events"] = [line for line in r.iter_lines() if line.startswith("data: ")]

    def broken_step():
        raise RuntimeError("simulated bookkeeping failure")

    t = threading.Thread(target=stream)
    t.start()
    assert wait_for(lambda: engine.stats().num_running == 1)
    monkeypatch.setattr(engine.engine, "step", broken_step)
    t.join(timeout=60)
    assert result["events"][-1] == "data: [DONE]"
    assert json.loads(result["events"][-2][6:])["error"]["code"] == "engine_dead"
    with server.http() as h:
        health = h.get("/health")
        assert_openai_error(health, 503, None, "engine_dead", "health")
        assert h.get("/ready").status_code == 503
        assert_openai_error(h.post("/v1/chat/completions", json=chat()), 503, None, "engine_dead", "generate")
