"""Seeded random requests against the real server: malformed bodies get OpenAI-shaped 4xx errors,
valid parameter combinations finish normally, and afterwards nothing is left running or holding
cache pages. The matrix in test_api_errors.py names each rule; this looks for the combinations
nobody listed (a 500, a stream that stops without [DONE], a leaked page)."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

from api_fixtures import wait_for

CHAT_FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n",
               "stream", "stop", "seed", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty",
               "repetition_penalty", "logit_bias", "response_format", "tools", "tool_choice", "stream_options",
               "min_tokens", "min_p", "ignore_eos", "stop_token_ids", "allowed_token_ids", "guided_regex",
               "guided_choice", "guided_json", "guided_grammar", "prompt_logprobs", "echo", "priority",
               "add_generation_prompt", "continue_final_message", "include_stop_str_in_output",
               "truncate_prompt_tokens", "bad_words", "cache_salt", "return_tokens_as_token_ids",
               "use_beam_search", "length_penalty"]
COMPLETION_FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stop", "seed",
                     "logprobs", "echo", "suffix", "logit_bias", "prompt_logprobs", "stop_token_ids",
                     "stream_options", "min_tokens", "guided_choice", "allowed_token_ids", "truncate_prompt_tokens",
                     "bad_words", "cache_salt", "return_tokens_as_token_ids",
                     "use_beam_search", "length_penalty"]
ODD_VALUES = [None, True, False, 0, -1, 1, 2 ** 63, -2 ** 63, 2 ** 70, 1.5, -0.0, float("nan"), "", " ", "\x00",
              "1", "é\u2028", [], [1], ["a"], [None], {}, {"a": 1}, {"type": "text"}, "a" * 5000, [[1, 2]], 1e308]
MESSAGES = [[{"role": "user", "content": "hi"}],
            [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            [{"role": "user"}], [{"content": "x"}], [{"role": "robot", "content": "x"}],
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]]
PROMPTS = ["hi", [1, 2, 3], ["a", "b"], [[1, 2], [3]]]


def send(client, url: str, body: dict) -> tuple[int, str]:
    """POST the body (NaN allowed, as a careless client might send it); (status, whole text)."""
    raw = json.dumps(body, allow_nan=True)
    headers = {"content-type": "application/json"}
    if body.get("stream") is True:
        with client.stream("POST", url, content=raw, headers=headers) as r:
            return r.status_code, "".join(r.iter_text())
    r = client.post(url, content=raw, headers=headers)
    return r.status_code, r.text


def check_response(code: int, text: str, body: dict) -> str | None:
    """What is wrong with this response, or None."""
    if code not in (200, 400, 404):
        return f"status {code}"
    if code != 200:
        err = json.loads(text).get("error")
        if not (isinstance(err, dict) and err.get("message") and err.get("type")):
            return "error body not OpenAI-shaped"
        return None
    if body.get("stream") is True:
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return "stream without [DONE]"
        for e in events[:-1]:
            chunk = json.loads(e)
            if "error" in chunk or any(c.get("finish_reason") == "error" for c in chunk.get("choices", [])):
                return f"stream error {e[:200]}"
        return None
    reply = json.loads(text)
    if not reply.get("choices"):
        return "no choices"
    if any(c.get("finish_reason") not in ("stop", "length", "tool_calls") for c in reply["choices"]):
        return f"finish_reason {[c.get('finish_reason') for c in reply['choices']]}"
    return None


def assert_nothing_left(srv) -> None:
    idle = wait_for(lambda: (m := srv.metrics())["nsa:num_requests_running"] == 0
                    and m["nsa:num_requests_waiting"] == 0 and m["nsa:kv_cache_usage_perc"] == 0.0)
    assert idle, srv.metrics()
    with srv.http() as c:
        assert c.get("/health").status_code == 200


def test_malformed_fields_get_openai_errors_and_leave_nothing_behind(api_server):  # noqa: F811
    rnd = random.Random(20261205)
    problems = []
    with api_server.http() as c:
        for _ in range(160):
            chat = rnd.random() < 0.6
            if chat:
                url, fields = "/v1/chat/completions", CHAT_FIELDS
                body = {"model": "tiny", "messages": rnd.choice(MESSAGES), "max_tokens": 3}
            else:
                url, fields = "/v1/completions", COMPLETION_FIELDS
                body = {"model": "tiny", "prompt": rnd.choice(PROMPTS), "max_tokens": 3}
            body["model"] = api_server.engine.model_name
            for _ in range(rnd.randint(1, 3)):
                body[rnd.choice(fields)] = rnd.choice(ODD_VALUES)
            code, text = send(c, url, body)
            if (wrong := check_response(code, text, body)) is not None:
                problems.append(f"{wrong}: {json.dumps(body, allow_nan=True)[:300]} -> {text[:300]}")
    assert not problems, "\n".join(problems)
    assert_nothing_left(api_server)


def test_malformed_tokenize_and_detokenize_bodies_get_openai_errors(api_server):  # noqa: F811
    rnd = random.Random(7)
    fields = {"/tokenize": ["model", "prompt", "messages", "add_special_tokens", "add_generation_prompt"],
              "/detokenize": ["model", "tokens"]}
    odd = ODD_VALUES + [[-1], [10 ** 9], [5, "6"]]
    problems = []
    with api_server.http() as c:
        for _ in range(120):
            url = rnd.choice(sorted(fields))
            body = ({"prompt": "hello"} if url == "/tokenize" else {"tokens": [5, 6]}) | {
                "model": api_server.engine.model_name}
            for _ in range(rnd.randint(1, 2)):
                body[rnd.choice(fields[url])] = rnd.choice(odd)
            code, text = send(c, url, body)
            if code == 200:
                reply = json.loads(text)
                wrong = None if ("tokens" in reply if url == "/tokenize" else "prompt" in reply) else "reply"
            else:
                wrong = check_response(code, text, body)
            if wrong is not None:
                problems.append(f"{url} {wrong}: {json.dumps(body, allow_nan=True)[:300]} -> {text[:300]}")
    assert not problems, "\n".join(problems)


VALID = {"max_tokens": [1, 5, 12], "temperature": [0, 0.7, 1.5], "top_p": [0.1, 0.9, 1], "top_k": [-1, 1, 5],
         "n": [1, 2, 3], "stream": [True, False], "stop": ["e", ["a", "the"], []], "seed": [1, 42],
         "presence_penalty": [0, 1.5], "frequency_penalty": [-1, 0.5], "repetition_penalty": [1, 1.3],
         "logit_bias": [{"5": 10}, {"100": -100}], "min_tokens": [0, 2], "min_p": [0, 0.1],
         "ignore_eos": [True, False], "stop_token_ids": [[], [5]], "guided_choice": [["yes", "no"]],
         "guided_regex": ["[a-c]{3}"], "stream_options": [{"include_usage": True}], "prompt_logprobs": [0, 2],
         "include_stop_str_in_output": [True], "echo": [True, False], "allowed_token_ids": [[5, 6, 7, 8]],
         "truncate_prompt_tokens": [3, 40], "bad_words": [["the"], ["a", "hello world"]],
         "cache_salt": ["s1", "s2"], "return_tokens_as_token_ids": [True],
         "use_beam_search": [True, False], "length_penalty": [0.5, 2]}


def test_valid_parameter_combinations_finish_normally_under_concurrency(api_server):  # noqa: F811
    """Random combinations of valid parameters, eight requests at a time. A 400 is allowed (some
    pairs are documented conflicts: stream_options without stream, prompt_logprobs with stream);
    a 200 must finish with stop or length and the requested number of choices."""
    model = api_server.engine.model_name

    def one(i: int) -> str | None:
        rnd = random.Random(i)
        chat = rnd.random() < 0.6
        body = {"model": model, "max_tokens": 8}
        for k in rnd.sample(sorted(VALID), rnd.randint(1, 6)):
            body[k] = rnd.choice(VALID[k])
        if chat:
            url = "/v1/chat/completions"
            body["messages"] = [{"role": "user", "content": rnd.choice(["Hello", "Write about the sea. " * 20])}]
            body["logprobs"] = rnd.random() < 0.3
        else:
            url = "/v1/completions"
            body["prompt"] = rnd.choice(["Hello", "Write about the sea. " * 20, [3, 4, 5, 6], ["a", "b c"]])
        with api_server.http() as c:
            code, text = send(c, url, body)
        wrong = check_response(code, text, body)
        if wrong is None and code == 200 and not body.get("stream"):
            prompt = body.get("prompt")
            prompts = len(prompt) if isinstance(prompt, list) and isinstance(prompt[0], str) else 1  # a batch
            if len(json.loads(text)["choices"]) != body.get("n", 1) * prompts:
                wrong = "wrong number of choices"
        return None if wrong is None else f"{wrong}: {body} -> {text[:300]}"

    with ThreadPoolExecutor(8) as pool:
        problems = [p for p in pool.map(one, range(96)) if p is not None]
    assert not problems, "\n".join(problems)
    assert_nothing_left(api_server)


RESPONSES_FIELDS = ["model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "store",
                    "previous_response_id", "metadata", "text", "tools", "tool_choice", "parallel_tool_calls",
                    "reasoning", "include", "top_logprobs", "background", "top_k", "seed", "stop"]
RESPONSES_INPUTS = ["hi", [], [{"role": "user", "content": "hi"}], [{"type": "function_call_output"}],
                    [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}],
                    [{"role": "user", "content": [{"type": "input_text", "text": 5}]}], [{"role": "tool"}], [3]]


def test_malformed_responses_bodies_get_openai_errors_and_leave_nothing_behind(api_server):  # noqa: F811
    rnd = random.Random(39)
    problems = []
    with api_server.http() as c:
        for _ in range(120):
            body = {"model": api_server.engine.model_name, "input": rnd.choice(RESPONSES_INPUTS),
                    "max_output_tokens": 3}
            for _ in range(rnd.randint(1, 3)):
                body[rnd.choice(RESPONSES_FIELDS)] = rnd.choice(ODD_VALUES + RESPONSES_INPUTS)
            code, text = send(c, "/v1/responses", body)
            wrong = None
            if code not in (200, 400, 404):
                wrong = f"status {code}"
            elif code != 200:
                err = json.loads(text).get("error")
                if not (isinstance(err, dict) and err.get("message") and err.get("type")):
                    wrong = "error body not OpenAI-shaped"
            elif body.get("stream") is True:
                events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
                if not events or events[-1].get("type") not in ("response.completed", "response.incomplete"):
                    wrong = f"stream ended with {events[-1] if events else None}"
            elif json.loads(text).get("status") not in ("completed", "incomplete"):
                wrong = "response not completed"
            if wrong is not None:
                problems.append(f"{wrong}: {json.dumps(body, allow_nan=True)[:300]} -> {text[:300]}")
    assert not problems, "\n".join(problems)
    assert_nothing_left(api_server)
