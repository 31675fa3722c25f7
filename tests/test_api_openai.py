"""The OpenAI-compatible endpoints, driven by the official `openai` client against a real server."""

from __future__ import annotations

import json
import math
import re

import pytest
from api_fixtures import API_KEY

import openai  # after api_fixtures, which skips this module on a GPU machine without openai

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime number."}]
GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})
KEEP_MARKERS = {"ignore_eos": True, "skip_special_tokens": False}


@pytest.fixture(scope="module")
def client(api_server):
    return api_server.openai()


def test_models_lists_the_served_model(client, api_server):
    models = client.models.list().data
    assert [m.id for m in models] == [api_server.engine.model_name]
    assert models[0].object == "model"


def test_models_retrieve(client, api_server):
    name = api_server.engine.model_name
    card = client.models.retrieve(name)
    assert card.id == name and card.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such/model")
    assert e.value.body["code"] == "model_not_found"


def test_chat_non_streaming(client, api_server):
    r = client.chat.completions.create(model=api_server.engine.model_name, messages=MESSAGES, max_tokens=8,
                                       **GREEDY)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 8
    with api_server.http() as h:
        n_prompt = h.post("/tokenize", json={"messages": MESSAGES}).json()["count"]
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.total_tokens == n_prompt + 8


def test_chat_stream_matches_non_stream_and_ends_with_usage(client, api_server):
    kw = dict(model=api_server.engine.model_name, messages=MESSAGES, max_tokens=10, **GREEDY)
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    first = chunks[0]
    assert first.object == "chat.completion.chunk"
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert len({c.id for c in chunks}) == 1
    body, usage = chunks[:-1], chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 10
    assert all(c.usage is None for c in body)
    assert "".join(c.choices[0].delta.content or "" for c in body) == full
    assert [c.choices[0].finish_reason for c in body][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    # one chunk per emitted piece: never more content chunks than tokens
    assert sum(1 for c in body[1:] if c.choices[0].delta.content) <= 10


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_continuous_usage_stats_put_each_choices_usage_in_every_chunk(client, api_server, endpoint):
    """vLLM's stream_options.continuous_usage_stats: with include_usage, every chunk carries its
    choice's usage so far (counts that only grow, to max_tokens), then the total comes last."""
    name = api_server.engine.model_name
    options = {"include_usage": True, "continuous_usage_stats": True}
    if endpoint == "chat":
        create, kw = client.chat.completions.create, dict(messages=MESSAGES)
    else:
        create, kw = client.completions.create, dict(prompt="The quick brown fox")
    chunks = list(create(model=name, max_tokens=7, n=2, stream=True, stream_options=options, **kw, **GREEDY))
    body, total = chunks[:-1], chunks[-1]
    assert total.choices == [] and total.usage.completion_tokens == 14
    seen = {0: [], 1: []}
    for c in body:
        assert c.usage is not None and len(c.choices) == 1
        assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
        assert c.usage.prompt_tokens == total.usage.prompt_tokens  # one prompt, counted once
        seen[c.choices[0].index].append(c.usage.completion_tokens)
    for counts in seen.values():
        assert counts == sorted(counts) and counts[-1] == 7
    plain = list(create(model=name, max_tokens=3, stream=True, stream_options={"include_usage": True}, **kw,
                        **GREEDY))
    assert all(c.usage is None for c in plain[:-1])


def test_raw_sse_framing_ends_with_done(api_server):
    body = {"model": api_server.engine.model_name, "messages": MESSAGES, "max_tokens": 3, "stream": True,
            "temperature": 0}
    with api_server.http() as h, h.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    for e in events[:-1]:
        json.loads(e[len("data: "):])


def test_completions_non_streaming_and_streaming(client, api_server):
    kw = dict(model=api_server.engine.model_name, prompt="The quick brown fox", max_tokens=6, **GREEDY)
    r = client.completions.create(**kw)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert "".join(c.choices[0].text for c in chunks[:-1]) == r.choices[0].text
    echoed = client.completions.create(echo=True, **kw)
    assert echoed.choices[0].text == "The quick brown fox" + r.choices[0].text


def test_completions_batch_of_prompts_and_token_prompts(client, api_server):
    with api_server.http() as h:
        ids = h.post("/tokenize", json={"prompt": "Hello there"}).json()["tokens"]
    r = client.completions.create(model=api_server.engine.model_name, prompt=["Hello there", "Goodbye"], n=2,
                                  max_tokens=4, **GREEDY)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 16
    by_ids = client.completions.create(model=api_server.engine.model_name, prompt=ids, max_tokens=4, **GREEDY)
    first = next(c for c in r.choices if c.index == 0)
    assert by_ids.choices[0].text == first.text  # same prompt tokens, greedy: same text


def test_n_two_gives_two_choices(client, api_server):
    r = client.chat.completions.create(model=api_server.engine.model_name, messages=MESSAGES, n=2, max_tokens=5,
                                       temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.completion_tokens == 10
    chunks = list(client.chat.completions.create(model=api_server.engine.model_name, messages=MESSAGES, n=2,
                                                 max_tokens=5, stream=True, seed=7,
                                                 extra_body={"ignore_eos": True}))
    roles = [c.choices[0].index for c in chunks if c.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1]
    finished = sorted(c.choices[0].index for c in chunks if c.choices[0].finish_reason)
    assert finished == [0, 1]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_n_two_streams_finish_each_choice_once(client, api_server, endpoint):
    """Choices that stop at different steps: each gets exactly one finishing chunk, and the streamed
    text of each equals the non-streamed one."""
    model = api_server.engine.model_name
    for seed in (3, 4, 5):
        kw = dict(model=model, n=2, max_tokens=12, temperature=1.0, seed=seed, stop=["e"])
        if endpoint == "chat":
            kw["messages"] = MESSAGES
            full = client.chat.completions.create(**kw)
            chunks = list(client.chat.completions.create(stream=True, **kw))
            texts = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i)
                     for i in (0, 1)}
            expected = {c.index: c.message.content for c in full.choices}
        else:
            kw["prompt"] = "Evening"
            full = client.completions.create(**kw)
            chunks = list(client.completions.create(stream=True, **kw))
            texts = {i: "".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in (0, 1)}
            expected = {c.index: c.text for c in full.choices}
        finishes = [c.choices[0].index for c in chunks if c.choices[0].finish_reason]
        assert sorted(finishes) == [0, 1], finishes
        assert texts == expected


def test_seed_reproducibility(client, api_server):
    kw = dict(model=api_server.engine.model_name, prompt="Once upon a time", max_tokens=12, temperature=1.0,
              extra_body={"ignore_eos": True})
    a = client.completions.create(seed=1234, **kw).choices[0].text
    b = client.completions.create(seed=1234, **kw).choices[0].text
    others = {client.completions.create(seed=s, **kw).choices[0].text for s in (1, 2, 3)}
    assert a == b
    assert len(others | {a}) > 1  # the seed changes the sample (a random 4096-token model: surely)


def test_stop_string_cuts_the_output(client, api_server):
    kw = dict(model=api_server.engine.model_name, prompt="Data structures", max_tokens=24, **GREEDY)
    text = client.completions.create(**kw).choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert len(stop) == 3 and stop.strip()
    r = client.completions.create(stop=[stop], **kw)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[:text.index(stop)]
    kept = client.completions.create(stop=[stop], **{**kw, "extra_body": {"include_stop_str_in_output": True,
                                                                          "ignore_eos": True}})
    assert kept.choices[0].text == text[:text.index(stop) + len(stop)]


def test_logit_bias_and_allowed_token_ids(client, api_server):
    """OpenAI's logit_bias and vLLM's allowed_token_ids reach the sampler: +100 forces a token, -100
    bans one, a one-token allowed set leaves nothing else to sample. (Token 7 is the <|end|> marker:
    its text is shown only with skip_special_tokens off.)"""
    model = api_server.engine.model_name
    kw = dict(model=model, prompt="Data structures", max_tokens=4)
    with api_server.http() as h:
        text_of = {t: h.post("/detokenize", json={"tokens": [t] * 4}).json()["prompt"] for t in (7, 8)}
    assert text_of[7] != text_of[8]
    for t in (7, 8):
        r = client.completions.create(temperature=0, logit_bias={str(t): 100}, extra_body=KEEP_MARKERS, **kw)
        assert r.choices[0].text == text_of[t]
        r = client.completions.create(temperature=1.0, seed=3, extra_body={"allowed_token_ids": [t], **KEEP_MARKERS},
                                      **kw)
        assert r.choices[0].text == text_of[t]
    # Among two allowed tokens, -100 on one leaves the other, whichever the model prefers.
    for banned, left in ((7, 8), (8, 7)):
        r = client.completions.create(temperature=1.0, seed=5, logit_bias={str(banned): -100},
                                      extra_body={"allowed_token_ids": [7, 8], **KEEP_MARKERS}, **kw)
        assert r.choices[0].text == text_of[left]
    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, temperature=0,
                                          logit_bias={"7": 100}, extra_body=KEEP_MARKERS)
    assert chat.choices[0].message.content == text_of[7] and chat.usage.completion_tokens == 4


def test_structured_outputs_through_the_client(client, api_server):
    """OpenAI's response_format json_schema, vLLM's guided_choice / guided_regex and structured_outputs:
    the reply matches, whatever the random model would have said."""
    model = api_server.engine.model_name
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 99}},
              "required": ["ok", "n"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=40, temperature=0.7, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}})
    assert r.choices[0].finish_reason == "stop"
    obj = json.loads(r.choices[0].message.content)
    assert set(obj) == {"ok", "n"} and isinstance(obj["ok"], bool) and isinstance(obj["n"], int) and obj["n"] <= 99
    stream = list(client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=40, temperature=0.7, seed=1, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}))
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == r.choices[0].message.content
    c = client.completions.create(model=model, prompt="Pick one:", max_tokens=10, temperature=1.0, seed=2,
                                  extra_body={"guided_choice": ["red", "green", "blue"]})
    assert c.choices[0].text in {"red", "green", "blue"} and c.choices[0].finish_reason == "stop"
    c = client.completions.create(model=model, prompt="A code:", max_tokens=10, temperature=1.0, seed=3, n=2,
                                  extra_body={"structured_outputs": {"regex": "[A-Z]{2}[0-9]{3}"}})
    assert all(re.fullmatch("[A-Z]{2}[0-9]{3}", ch.text) for ch in c.choices), [ch.text for ch in c.choices]


def test_max_completion_tokens_is_honoured(client, api_server):
    r = client.chat.completions.create(model=api_server.engine.model_name, messages=MESSAGES,
                                       max_completion_tokens=3, **GREEDY)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_chat_logprobs_shapes(client, api_server):
    r = client.chat.completions.create(model=api_server.engine.model_name, messages=MESSAGES, max_tokens=6,
                                       logprobs=True, top_logprobs=3, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for t in content:
        assert t.logprob <= 0 and isinstance(t.token, str)
        # A byte piece's bytes are its one raw byte, any other token's its text's UTF-8.
        byte = re.fullmatch(r"<0x([0-9A-F]{2})>", t.token)
        assert t.bytes == ([int(byte.group(1), 16)] if byte else list(t.token.encode()))
        assert len(t.top_logprobs) == 3
        lps = [x.logprob for x in t.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        assert math.isclose(t.logprob, lps[0], abs_tol=1e-4)  # greedy: the chosen token is the best
        assert sum(math.exp(x) for x in lps) <= 1 + 1e-4
    stream = list(client.chat.completions.create(model=api_server.engine.model_name, messages=MESSAGES,
                                                 max_tokens=6, logprobs=True, top_logprobs=3, stream=True, **GREEDY))
    streamed = [t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    none = client.chat.completions.create(model=api_server.engine.model_name, messages=MESSAGES, max_tokens=2)
    assert none.choices[0].logprobs is None


def test_return_tokens_as_token_ids_names_logprobs_tokens_by_id(client, api_server):
    """vLLM's return_tokens_as_token_ids: every token in logprobs (chosen, top, echoed prompt) is
    "token_id:N"; bytes and text offsets stay those of the tokens' text."""
    name = api_server.engine.model_name
    tok = api_server.engine.tokenizer
    as_ids = {"ignore_eos": True, "return_tokens_as_token_ids": True}

    def token_id(s: str) -> int:
        assert re.fullmatch(r"token_id:\d+", s), s
        return int(s.split(":")[1])

    kw = dict(model=name, messages=MESSAGES, max_tokens=6, logprobs=True, top_logprobs=3, temperature=0.0)
    plain = client.chat.completions.create(extra_body={"ignore_eos": True}, **kw).choices[0].logprobs.content
    named = client.chat.completions.create(extra_body=as_ids, **kw).choices[0].logprobs.content
    for a, b in zip(plain, named, strict=True):
        n = token_id(b.token)
        assert a.token == tok.token_text(n) and a.bytes == b.bytes == list(tok.token_bytes(n))
        assert [tok.token_text(token_id(x.token)) for x in b.top_logprobs] == [x.token for x in a.top_logprobs]
    stream = client.chat.completions.create(extra_body=as_ids, stream=True, **kw)
    assert [t.token for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content] \
        == [t.token for t in named]
    prompt = [40, 41, 42, 43]
    ckw = dict(model=name, prompt=prompt, max_tokens=4, logprobs=2, echo=True, temperature=0.0)
    text_lp = client.completions.create(extra_body={"ignore_eos": True}, **ckw).choices[0].logprobs
    id_lp = client.completions.create(extra_body=as_ids, **ckw).choices[0].logprobs
    assert [token_id(t) for t in id_lp.tokens[:4]] == prompt
    assert [tok.token_text(token_id(t)) for t in id_lp.tokens] == text_lp.tokens
    assert id_lp.text_offset == text_lp.text_offset and id_lp.token_logprobs == text_lp.token_logprobs
    assert all(all(re.fullmatch(r"token_id:\d+", k) for k in top) for top in id_lp.top_logprobs[1:])
    # A byte piece (part of a UTF-8 character): its bytes are the one raw byte.
    byte_id = next(i for i in range(tok.vocab_size) if tok.sp.is_byte(i) and tok.sp.id_to_piece(i) == "<0xE2>")
    r = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=1, logprobs=True, extra_body={
        **as_ids, "allowed_token_ids": [byte_id]})
    assert r.choices[0].logprobs.content[0].bytes == [0xE2]
    assert token_id(r.choices[0].logprobs.content[0].token) == byte_id


def test_echo_with_logprobs_scores_the_prompt_as_decoding_scored_it(client, api_server):
    """echo + logprobs (what evaluation harnesses send to score a continuation): the prompt's tokens
    come back with their logprobs, the first null. A prompt ending in tokens the server generated
    scores them (to fp32 rounding) as the decode steps that generated them did: prefill rows against
    decode steps. The generated tokens are known ids: allowed_token_ids forces them, and logprobs
    report the raw distribution."""
    model = api_server.engine.model_name
    with api_server.http() as h:
        prompt = h.post("/tokenize", json={"prompt": "Lists and tuples"}).json()["tokens"]
    forced = 100
    gen = client.completions.create(model=model, prompt=prompt, max_tokens=4, logprobs=0,
                                    extra_body={"allowed_token_ids": [forced], "ignore_eos": True}, temperature=0)
    gen_lps = gen.choices[0].logprobs.token_logprobs
    full = prompt + [forced] * 4
    r = client.completions.create(model=model, prompt=full, max_tokens=1, logprobs=2, echo=True, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(full) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with api_server.http() as h:
        assert r.choices[0].text.startswith(h.post("/detokenize", json={"tokens": full}).json()["prompt"])
    assert lp.token_logprobs[len(prompt):len(full)] == pytest.approx(gen_lps, abs=1e-4)
    for chosen, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert chosen <= 0 and 1 <= len(top) <= 2 and max(top.values()) >= chosen - 1e-6
    # The same numbers through vLLM's prompt_logprobs field, and streamed: the first chunk carries them.
    with api_server.http() as h:
        v = h.post("/v1/completions", json={"model": model, "prompt": full, "max_tokens": 1, "temperature": 0,
                                            "prompt_logprobs": 2}).json()
        chat = h.post("/v1/chat/completions", json={"model": model, "messages": MESSAGES, "max_tokens": 1,
                                                    "prompt_logprobs": 0}).json()
        n_chat_prompt = h.post("/tokenize", json={"messages": MESSAGES}).json()["count"]
    plp = v["choices"][0]["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(full)
    assert [e[str(t)]["logprob"] for e, t in zip(plp[1:], full[1:])] == pytest.approx(lp.token_logprobs[1:len(full)],
                                                                                       abs=1e-6)
    assert all(e[str(t)]["rank"] >= 1 and len(e) <= 3 for e, t in zip(plp[1:], full[1:]))
    chunks = list(client.completions.create(model=model, prompt=full, max_tokens=1, logprobs=2, echo=True,
                                            stream=True, **GREEDY))
    first = chunks[0].choices[0].logprobs
    assert first.token_logprobs[:len(full)] == pytest.approx(lp.token_logprobs[:len(full)], abs=1e-6)
    assert len(chat["prompt_logprobs"]) == n_chat_prompt and chat["prompt_logprobs"][0] is None
    # A batch of token prompts, as lm-evaluation-harness sends them to score continuations: choice i
    # holds prompt i's tokens then the generated one; its slices line up with the single-prompt call.
    batch = client.completions.create(model=model, prompt=[full, prompt], max_tokens=1, logprobs=1, echo=True,
                                      **GREEDY)
    assert [len(ch.logprobs.token_logprobs) for ch in batch.choices] == [len(full) + 1, len(prompt) + 1]
    assert batch.choices[0].logprobs.token_logprobs[1:len(full)] == pytest.approx(lp.token_logprobs[1:len(full)],
                                                                                  abs=1e-6)
    assert batch.choices[1].logprobs.tokens[:len(prompt)] == lp.tokens[:len(prompt)]


def test_truncate_prompt_tokens_keeps_the_prompts_end(client, api_server):
    """vLLM's truncate_prompt_tokens: the model is given the prompt's last k tokens, and echo
    shows those; a chat prompt is cut the same way."""
    name = api_server.engine.model_name
    ids = list(range(10, 60))
    cut = client.completions.create(model=name, prompt=ids, max_tokens=6, echo=True, temperature=0.0,
                                    extra_body={"ignore_eos": True, "truncate_prompt_tokens": 12})
    given = client.completions.create(model=name, prompt=ids[-12:], max_tokens=6, echo=True, **GREEDY)
    assert cut.usage.prompt_tokens == 12
    assert cut.choices[0].text == given.choices[0].text
    chat = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=2, temperature=0.0,
                                          extra_body={"truncate_prompt_tokens": 5})
    assert chat.usage.prompt_tokens == 5


def test_bad_words_are_never_written(client, api_server):
    """vLLM's bad_words: between two allowed words, banning one leaves the other, on both
    endpoints; banning every allowed token is a 400 naming the field."""
    name = api_server.engine.model_name
    tok = api_server.engine.tokenizer
    words = [w for w in ("the", "and", "of", "to", "in", "is") if len(tok.encode(w, add_bos=False)) == 1][:2]
    assert len(words) == 2, "the fixture needs two one-token words"
    ids = [tok.encode(w, add_bos=False)[0] for w in words]
    kw = dict(model=name, prompt="Data structures", max_tokens=4, temperature=1.0, seed=2)
    for banned, left in ((0, 1), (1, 0)):
        forced = client.completions.create(logit_bias={str(ids[banned]): 100},
                                           extra_body={"allowed_token_ids": ids, "ignore_eos": True}, **kw)
        assert forced.choices[0].text.split() == [words[banned]] * 4
        r = client.completions.create(logit_bias={str(ids[banned]): 100}, extra_body={
            "allowed_token_ids": ids, "ignore_eos": True, "bad_words": [words[banned]]}, **kw)
        assert r.choices[0].text.split() == [words[left]] * 4
    chat = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=3, temperature=0.0, extra_body={
        "allowed_token_ids": ids, "ignore_eos": True, "bad_words": [words[0]]})
    assert chat.choices[0].message.content.split() == [words[1]] * 3
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(extra_body={"allowed_token_ids": ids[:1], "bad_words": words[:1]}, **kw)
    assert e.value.body["param"] == "bad_words"


def test_cached_prompt_tokens_are_reported_and_a_cache_salt_keeps_them_apart(client, api_server):
    """usage.prompt_tokens_details.cached_tokens counts prefix-cache hits (responses and a stream's
    usage chunk); vLLM's cache_salt lets only requests with the same salt share cached pages."""
    name = api_server.engine.model_name
    prompt = list(range(300, 380))

    def cached(salt=None, stream=False):
        extra = {"ignore_eos": True, **({"cache_salt": salt} if salt is not None else {})}
        kw = dict(model=name, prompt=prompt, max_tokens=2, temperature=0.0, extra_body=extra)
        if not stream:
            return client.completions.create(**kw).usage.prompt_tokens_details.cached_tokens
        chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        return chunks[-1].usage.prompt_tokens_details.cached_tokens

    assert cached() == 0
    unsalted = cached()
    assert 0 < unsalted < len(prompt) and cached(stream=True) == unsalted
    assert cached("tenant-a") == 0 and cached("tenant-b") == 0
    assert cached("tenant-a") == unsalted and cached("tenant-b", stream=True) == unsalted
    messages = [{"role": "user", "content": "Summarise this. " + "The cache keeps pages of tokens. " * 12}]
    first, second = (client.chat.completions.create(model=name, messages=messages, max_tokens=1, temperature=0.0)
                     for _ in range(2))
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=name, prompt="a", max_tokens=1, extra_body={"cache_salt": ""})
    assert e.value.body["param"] == "cache_salt"
    # vLLM's /reset_prefix_cache: the next request starts cold, the one after finds its pages again.
    with api_server.http() as h:
        r = h.post("/reset_prefix_cache")
        assert r.status_code == 200 and r.json()["pages_forgotten"] > 0
    assert cached() == 0 and cached() == unsalted and cached("tenant-a") == 0


def test_skip_special_tokens_by_default_and_kept_on_request(client, api_server):
    """vLLM's default: generated chat markers are left out of the text; skip_special_tokens=false
    keeps them. The token ids (logprobs) show them either way."""
    name = api_server.engine.model_name
    marker = [api_server.engine.tokenizer.sp.piece_to_id("<|tool|>")]
    kw = dict(model=name, prompt="The quick brown fox", max_tokens=3, temperature=0.0, logprobs=0)
    skipped = client.completions.create(**kw, extra_body={"ignore_eos": True, "allowed_token_ids": marker})
    kept = client.completions.create(**kw, extra_body={"ignore_eos": True, "allowed_token_ids": marker,
                                                       "skip_special_tokens": False})
    assert skipped.choices[0].text == "" and kept.choices[0].text == "<|tool|>" * 3
    assert skipped.choices[0].logprobs.tokens == kept.choices[0].logprobs.tokens == ["<|tool|>"] * 3


def test_completion_logprobs_shapes(client, api_server):
    r = client.completions.create(model=api_server.engine.model_name, prompt="Lists and tuples", max_tokens=5,
                                  logprobs=2, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for tok, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 2 and chosen <= 0
        assert math.isclose(max(top.values()), chosen, abs_tol=1e-4)


def test_continue_final_message_leaves_the_reply_open(client, api_server):
    """vLLM's continue_final_message: the model continues the last (assistant) message, whose
    prompt ends without the end marker; /tokenize renders the same prompt."""
    from nsa_serve.tokenizer import render_chat

    start = [{"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "Sure: the"}]
    flags = {"add_generation_prompt": False, "continue_final_message": True}
    expected = api_server.engine.tokenizer.encode(render_chat(start, **flags))
    with api_server.http() as h:
        assert h.post("/tokenize", json={"messages": start, **flags}).json()["tokens"] == expected
    r = client.chat.completions.create(model=api_server.engine.model_name, messages=start, max_tokens=3,
                                       temperature=0.0, extra_body=flags)
    assert r.usage.prompt_tokens == len(expected)
    opened = client.chat.completions.create(model=api_server.engine.model_name, messages=start, max_tokens=3,
                                            temperature=0.0)
    assert opened.usage.prompt_tokens > len(expected)  # closed message + a new assistant turn


def test_chat_echo_starts_a_continued_reply_with_the_message_it_continues(client, api_server):
    """vLLM's chat echo: with a continued assistant message, the reply (streamed or not) starts with
    that message's text; after a user message there is nothing to echo."""
    name = api_server.engine.model_name
    start = [{"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "Sure: the"}]
    kw = dict(model=name, messages=start, max_tokens=4, temperature=0.0, n=2)
    flags = {"add_generation_prompt": False, "continue_final_message": True, "ignore_eos": True}
    plain = client.chat.completions.create(extra_body=flags, **kw)
    echoed = client.chat.completions.create(extra_body={**flags, "echo": True}, **kw)
    assert [c.message.content for c in echoed.choices] == ["Sure: the" + c.message.content for c in plain.choices]
    assert echoed.usage == plain.usage
    stream = list(client.chat.completions.create(extra_body={**flags, "echo": True}, stream=True, **kw))
    for i, choice in enumerate(echoed.choices):
        deltas = [c.choices[0].delta.content or "" for c in stream if c.choices and c.choices[0].index == i]
        assert "".join(deltas) == choice.message.content and deltas[1] == "Sure: the"
    user_last = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=3, temperature=0.0,
                                               extra_body={"echo": True, "ignore_eos": True})
    again = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=3, temperature=0.0,
                                           extra_body={"ignore_eos": True})
    assert user_last.choices[0].message.content == again.choices[0].message.content
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=name, messages=MESSAGES, tools=[tool], extra_body={"echo": True},
                                       tool_choice={"type": "function", "function": {"name": "f"}})
    assert e.value.body["param"] == "echo"


def test_tokenize_detokenize_round_trip(api_server):
    with api_server.http() as h:
        r = h.post("/tokenize", json={"prompt": "hello world", "add_special_tokens": False}).json()
        assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 512
        assert h.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "hello world"


@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/models"), ("GET", "/v1/models/x"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
    ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/version"), ("GET", "/metrics"),
    ("POST", "/reset_prefix_cache"), ("POST", "/v1/responses"), ("GET", "/v1/responses/x")])
def test_every_route_but_the_probes_needs_the_key(api_server, method, path):
    with api_server.http(auth=False) as h:
        r = h.request(method, path, json={})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"


def test_probes_and_version(api_server):
    with api_server.http(auth=False) as h:
        assert h.get("/health").status_code == 200
        assert h.get("/ready").json() == {"status": "ready"}
        assert h.get("/ping").status_code == 200 and h.post("/ping").status_code == 200  # SageMaker's
    with api_server.http() as h:
        assert h.get("/version").json()["version"]


def test_invocations_dispatch_on_the_body_as_sagemaker_sends_it(api_server):
    """vLLM's /invocations: a chat, completions or responses body, answered as its own route would."""
    with api_server.http() as h:
        kw = {"max_tokens": 3, "temperature": 0.0, "ignore_eos": True}
        chat = {"messages": [{"role": "user", "content": "Hi"}], **kw}
        assert h.post("/invocations", json=chat).json()["choices"][0]["message"]["content"] == \
            h.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
        text = {"prompt": "Once upon", **kw}
        assert h.post("/invocations", json=text).json()["choices"][0]["text"] == \
            h.post("/v1/completions", json=text).json()["choices"][0]["text"]
        resp = {"input": "Hi", "max_output_tokens": 3, "temperature": 0.0, "ignore_eos": True}
        assert h.post("/invocations", json=resp).json()["object"] == "response"
        bad = h.post("/invocations", json={"question": "?"})
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        assert h.post("/invocations", json={"messages": "not a list"}).json()["error"]["param"] == "messages"
    with api_server.http(auth=False) as h:
        assert h.post("/invocations", json=chat).status_code == 401


def test_a_client_request_id_names_the_request(api_server):
    """vLLM's way with X-Request-Id: the id after the endpoint's prefix, in the body and the header;
    a malformed one is a 400, and none gives a fresh id."""
    body = {"prompt": "Trace me", "max_tokens": 2}
    with api_server.http() as h:
        r = h.post("/v1/completions", json=body, headers={"X-Request-Id": "trace-42.a"})
        assert r.json()["id"] == "cmpl-trace-42.a" == r.headers["x-request-id"]
        chat = h.post("/v1/chat/completions", headers={"X-Request-Id": "trace-43"},
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True})
        assert chat.headers["x-request-id"] == "chatcmpl-trace-43" and '"id":"chatcmpl-trace-43"' in chat.text
        bad = h.post("/v1/completions", json=body, headers={"X-Request-Id": "has space"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "request_id"
        fresh = h.post("/v1/completions", json=body)
        assert fresh.json()["id"].startswith("cmpl-") and len(fresh.json()["id"]) > 30
        # vLLM's body field request_id, when no header names the request (the header wins).
        by_body = h.post("/v1/completions", json={**body, "request_id": "job-7"})
        assert by_body.json()["id"] == "cmpl-job-7" == by_body.headers["x-request-id"]
        both = h.post("/v1/chat/completions", headers={"X-Request-Id": "hdr-1"},
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "request_id": "job-8"})
        assert both.json()["id"] == "chatcmpl-hdr-1"
        bad_body = h.post("/v1/completions", json={**body, "request_id": "a/b"})
        assert bad_body.status_code == 400 and bad_body.json()["error"]["param"] == "request_id"


def test_add_special_tokens_false_leaves_bos_off_a_text_prompt(api_server):
    """vLLM's completions field: the prompt is tokenized without BOS (one token fewer)."""
    body = {"prompt": "Trace me", "max_tokens": 1}
    with api_server.http() as h:
        with_bos = h.post("/v1/completions", json=body).json()["usage"]["prompt_tokens"]
        without = h.post("/v1/completions", json={**body, "add_special_tokens": False}).json()
        assert without["usage"]["prompt_tokens"] == with_bos - 1
        ids = h.post("/v1/completions", json={**body, "add_special_tokens": False, "return_token_ids": True}).json()
        bos = api_server.engine.tokenizer.bos_id
        assert bos not in ids["choices"][0]["prompt_token_ids"]


def test_wrong_key_is_an_authentication_error(api_server):
    bad = openai.OpenAI(base_url=f"{api_server.url}/v1", api_key=API_KEY + "x", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        bad.models.list()
    assert exc.value.status_code == 401 and exc.value.body["code"] == "invalid_api_key"


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 12},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                                       "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}}}}}
TOOL_MESSAGES = [{"role": "user", "content": "What is the weather in Oslo?"}]


def _check_call(call, names=("get_weather", "get_time")):
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert set(args) == {"city", "unit"} and args["unit"] in {"celsius", "fahrenheit"} and len(args["city"]) <= 12
    else:
        assert set(args) == {"zone"} and isinstance(args["zone"], int) and -12 <= args["zone"] <= 14
    return args


def _auto(client, api_server, regex, stream=False, **kw):
    """A tool_choice "auto" reply forced to `regex` (the random model would not write calls itself)."""
    args = dict(model=api_server.engine.model_name, messages=TOOL_MESSAGES, tools=[WEATHER, CLOCK], max_tokens=80,
                extra_body={"guided_regex": regex}, **kw)
    if not stream:
        return client.chat.completions.create(**args).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **args))
    return [c.choices[0] for c in chunks if c.choices]


def test_auto_tool_choice_returns_calls_when_the_reply_is_the_call_list(client, api_server):
    """tool_choice "auto" (also the default with tools): a reply that is the system turn's JSON
    list of known tools comes back as tool calls, streamed or not; anything else as text."""
    call = r'\[\{"name": "get_time", "parameters": \{"zone": -3\}\}, \{"name": "get_weather", ' \
           r'"parameters": \{"city": "Oslo", "unit": "celsius"\}\}\]'
    for kw in ({}, {"tool_choice": "auto"}):
        r = _auto(client, api_server, " " + call, **kw)
        assert r.finish_reason == "tool_calls" and r.message.content is None
        assert [(c.function.name, _check_call(c)) for c in r.message.tool_calls] == [
            ("get_time", {"zone": -3}), ("get_weather", {"city": "Oslo", "unit": "celsius"})]
    parts = _auto(client, api_server, call, stream=True)
    deltas = [d for p in parts if p.delta.tool_calls for d in p.delta.tool_calls]
    assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == [
        (0, "get_time", {"zone": -3}), (1, "get_weather", {"city": "Oslo", "unit": "celsius"})]
    assert all(d.id.startswith("call_") for d in deltas) and parts[-1].finish_reason == "tool_calls"
    assert not any(p.delta.content for p in parts)
    one = _auto(client, api_server, call, parallel_tool_calls=False)  # two calls where one is allowed: text
    assert one.message.tool_calls is None and one.message.content.startswith("[{")
    for regex in (r"It is sunny in Oslo\.", r"\[not a call\]", r"\[\{\"name\": \"get_date\", \"parameters\": \{\}\}\]"):
        whole = _auto(client, api_server, regex)
        parts = _auto(client, api_server, regex, stream=True)
        assert whole.message.tool_calls is None and whole.finish_reason == "stop"
        assert "".join(p.delta.content or "" for p in parts) == whole.message.content
        assert not any(p.delta.tool_calls for p in parts) and parts[-1].finish_reason == "stop"
    # Text streams as it comes; a list that may be calls is held until it ends.
    prose = _auto(client, api_server, r"Sunny, about twenty degrees, light wind from the west\.", stream=True)
    assert sum(1 for p in prose if p.delta.content) > 2
    held = _auto(client, api_server, r"\[not a call, but a long list of words\]", stream=True)
    assert [p.delta.content for p in held if p.delta.content] == ["[not a call, but a long list of words]"]


def test_named_tool_choice_returns_a_valid_call_streamed_or_not(client, api_server):
    """tool_choice naming a function: one call of it whose arguments obey its schema; finish_reason
    "stop" (OpenAI's for a forced call); the stream carries id and name first, then the arguments."""
    kw = dict(model=api_server.engine.model_name, messages=TOOL_MESSAGES, tools=[WEATHER, CLOCK], max_tokens=60,
              temperature=0.8, seed=5, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    r = client.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "stop" and msg.content is None and len(msg.tool_calls) == 1
    args = _check_call(msg.tool_calls[0], names=("get_weather",))
    chunks = [c for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert all(d.index == 0 and d.id is None for d in deltas[1:])
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == args
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_required_tool_choice_returns_calls_of_the_given_tools(client, api_server):
    """tool_choice "required": one or more calls, each of a given tool with valid arguments;
    finish_reason "tool_calls"; parallel_tool_calls=false gives exactly one; n = 2 and streaming
    give the same calls (ids aside) for the same seed, streamed call by call: index, id and name
    first, then the arguments in pieces as they are generated."""
    kw = dict(model=api_server.engine.model_name, messages=TOOL_MESSAGES, tools=[WEATHER, CLOCK], max_tokens=120,
              temperature=0.8, seed=11, tool_choice="required")
    r = client.chat.completions.create(n=2, **kw)
    for ch in r.choices:
        assert ch.finish_reason == "tool_calls" and ch.message.content is None and ch.message.tool_calls
        for call in ch.message.tool_calls:
            _check_call(call)
    one = client.chat.completions.create(parallel_tool_calls=False, **kw).choices[0]
    assert one.finish_reason == "tool_calls" and len(one.message.tool_calls) == 1
    want = [(c.function.name, json.loads(c.function.arguments)) for c in
            client.chat.completions.create(**kw).choices[0].message.tool_calls]
    chunks = [c for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    heads = [d for d in deltas if d.id is not None]
    assert [d.index for d in heads] == list(range(len(want)))
    assert all(d.id.startswith("call_") and d.type == "function" and d.function.name for d in heads)
    assert all(d.function.name is None and d.type is None for d in deltas if d.id is None)
    assert [d.index for d in deltas] == sorted(d.index for d in deltas)  # call after call
    args = ["".join(d.function.arguments or "" for d in deltas if d.index == k) for k in range(len(want))]
    assert [(h.function.name, json.loads(a)) for h, a in zip(heads, args)] == want
    assert len(deltas) > 2 * len(want)  # the arguments came in pieces, not whole
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_required_tool_calls_stream_per_choice_with_logprobs(client, api_server):
    """n = 2 with logprobs: each choice's streamed calls are its non-streamed calls (same seed),
    each choice finishes once with "tool_calls", and the tokens' logprobs ride along."""
    kw = dict(model=api_server.engine.model_name, messages=TOOL_MESSAGES, tools=[WEATHER, CLOCK], max_tokens=120,
              temperature=0.8, seed=11, tool_choice="required", n=2, logprobs=True)
    whole = client.chat.completions.create(**kw)
    chunks = [c for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    for ch in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices[0].index == ch.index]
        deltas = [tc for c in mine for tc in (c.delta.tool_calls or [])]
        heads = [d for d in deltas if d.id is not None]
        args = ["".join(d.function.arguments or "" for d in deltas if d.index == h.index) for h in heads]
        assert [(h.function.name, json.loads(a)) for h, a in zip(heads, args)] == \
            [(t.function.name, json.loads(t.function.arguments)) for t in ch.message.tool_calls]
        assert [c.finish_reason for c in mine if c.finish_reason] == ["tool_calls"]
        assert sum(len(c.logprobs.content) for c in mine if c.logprobs) == len(ch.logprobs.content)


def test_required_tool_choice_cut_by_max_tokens_is_text_streamed_or_not(client, api_server):
    """A "required" reply that max_tokens cuts before any call's name closed holds no call: both the
    reply and the stream give the generated text as content, with finish_reason "length"."""
    kw = dict(model=api_server.engine.model_name, messages=TOOL_MESSAGES, tools=[WEATHER, CLOCK], max_tokens=2,
              temperature=0.8, seed=11, tool_choice="required")
    r = client.chat.completions.create(**kw).choices[0]
    assert r.finish_reason == "length" and r.message.tool_calls is None and r.message.content.startswith("[")
    chunks = [c for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    assert not any(c.choices[0].delta.tool_calls for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_tool_conversation_round_trip_and_tool_choice_none(client, api_server):
    """A conversation that feeds a call's result back (assistant tool_calls, then a tool message) is
    accepted; tool_choice "none" answers in text."""
    model = api_server.engine.model_name
    first = client.chat.completions.create(model=model, messages=TOOL_MESSAGES, tools=[WEATHER], max_tokens=60,
                                           temperature=0.0, tool_choice="required").choices[0].message
    history = TOOL_MESSAGES + [first.model_dump(exclude_none=True),
                               {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "12 C, rain"}]
    r = client.chat.completions.create(model=model, messages=history, tools=[WEATHER], tool_choice="none",
                                       max_tokens=5, **GREEDY)
    assert r.choices[0].message.tool_calls is None and isinstance(r.choices[0].message.content, str)
    assert r.usage.completion_tokens == 5
    with api_server.http() as h:
        with_history = h.post("/tokenize", json={"messages": history}).json()["count"]
        without = h.post("/tokenize", json={"messages": TOOL_MESSAGES}).json()["count"]
    assert r.usage.prompt_tokens > with_history > without  # the calls, the result and the tool list are shown


def test_return_token_ids_gives_the_prompt_and_each_choices_tokens(client, api_server):
    """vLLM's return_token_ids: the prompt's ids (what /tokenize counts) and each choice's generated
    ids, whose text is the choice's text; streamed, the chunks' ids add up to the whole; absent when
    not asked for."""
    model = client.models.list().data[0].id
    tok = api_server.engine.tokenizer
    with api_server.http() as h:
        want_prompt = h.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    asked = {**GREEDY["extra_body"], "return_token_ids": True}
    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, n=2, temperature=0.0,
                                          extra_body=asked).model_dump()
    assert chat["prompt_token_ids"] == want_prompt
    for c in chat["choices"]:
        assert len(c["token_ids"]) == 12 and tok.decode(c["token_ids"]) == c["message"]["content"]
    plain = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=3, **GREEDY).model_dump()
    assert "prompt_token_ids" not in plain and "token_ids" not in plain["choices"][0]
    # Streamed: the prompt's ids in the first chunk, each choice's ids spread over its chunks.
    chunks = [c.model_dump() for c in client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=12, n=2, temperature=0.0, stream=True, extra_body=asked)]
    assert chunks[0]["prompt_token_ids"] == want_prompt and all("prompt_token_ids" not in c for c in chunks[1:])
    for i in range(2):
        ids = [t for c in chunks for ch in c["choices"] if ch["index"] == i for t in ch.get("token_ids") or []]
        assert ids == chat["choices"][i]["token_ids"]
    # Completions: per choice, prompt and generated ids, streamed or not, a token-id prompt too.
    prompts = ["def fib(n):", "The capital of"]
    done = client.completions.create(model=model, prompt=prompts, max_tokens=6, temperature=0.0,
                                     extra_body=asked).model_dump()
    assert [c["prompt_token_ids"] for c in done["choices"]] == [tok.encode(p) for p in prompts]
    by_ids = client.completions.create(model=model, prompt=[5, 9, 11, 40], max_tokens=2, extra_body=asked)
    assert by_ids.model_dump()["choices"][0]["prompt_token_ids"] == [5, 9, 11, 40]
    for c in done["choices"]:  # the text is what the ids add to the prompt's (a leading space included)
        p = c["prompt_token_ids"]
        assert len(c["token_ids"]) == 6 and tok.decode(p + c["token_ids"])[len(tok.decode(p)):] == c["text"]
    streamed = [c.model_dump() for c in client.completions.create(
        model=model, prompt=prompts, max_tokens=6, temperature=0.0, stream=True, extra_body=asked)]
    for c in done["choices"]:
        mine = [ch for s in streamed for ch in s["choices"] if ch["index"] == c["index"]]
        assert [ch.get("prompt_token_ids") for ch in mine if ch.get("prompt_token_ids")] == [c["prompt_token_ids"]]
        assert [t for ch in mine for t in ch.get("token_ids") or []] == c["token_ids"]
    # Beam search carries them too.
    beams = client.completions.create(model=model, prompt="def fib(n):", max_tokens=4, n=2,
                                      extra_body={"use_beam_search": True, "return_token_ids": True}).model_dump()
    assert all(c["prompt_token_ids"] == tok.encode("def fib(n):") and c["token_ids"] for c in beams["choices"])


def test_long_prompts_are_tokenized_off_the_event_loop(api_server, monkeypatch):
    # A long document's tokenization (~250 ms for 600 KB here) would stall every stream the event
    # loop serves; from OFF_LOOP_BYTES of body it runs in a worker thread, and its 400 still arrives.
    import threading

    from nsa_serve.api.serving_common import OFF_LOOP_BYTES

    tok = api_server.engine.tokenizer
    threads: list[str] = []
    for name in ("encode", "encode_chat"):
        original = getattr(tok, name)

        def recorded(*args, _original=original, **kw):
            threads.append(threading.current_thread().name)
            return _original(*args, **kw)

        monkeypatch.setattr(tok, name, recorded)
    long_text = "word " * (OFF_LOOP_BYTES // 5 + 100)
    bodies = [("/v1/chat/completions", {"messages": [{"role": "user", "content": "{}"}], "max_tokens": 1}),
              ("/v1/completions", {"prompt": "{}", "max_tokens": 1}),
              ("/v1/responses", {"input": "{}", "max_output_tokens": 1}),
              ("/tokenize", {"prompt": "{}"})]
    with api_server.http() as h:
        for path, body in bodies:
            for text, off_loop in (("hi", False), (long_text, True)):
                threads.clear()
                r = h.post(path, json=json.loads(json.dumps(body).replace('"{}"', json.dumps(text))))
                assert threads and all(t.startswith("uvicorn-") != off_loop for t in threads), (path, off_loop, threads)
                if off_loop and path != "/tokenize":  # far over the 512-token context: the usual 400
                    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
                else:
                    assert r.status_code == 200, r.text


def test_long_answers_are_built_off_the_event_loop(api_server, monkeypatch):
    # An answer of OFF_LOOP_ENTRIES token entries or more (a long echoed prompt with logprobs: 1 MB
    # of JSON for 2 000 tokens) is assembled and serialised in a worker thread, a short one inline;
    # either way the answer is the same shape.
    import threading

    from nsa_serve.api import serving_chat, serving_completions, serving_responses
    from nsa_serve.api.serving_common import OFF_LOOP_ENTRIES

    threads: list[str] = []

    def recorded(original):
        def wrapper(*args, **kw):
            threads.append(threading.current_thread().name)
            return original(*args, **kw)
        return wrapper

    monkeypatch.setattr(serving_completions, "json_response", recorded(serving_completions.json_response))
    monkeypatch.setattr(serving_chat, "json_response", recorded(serving_chat.json_response))
    monkeypatch.setattr(serving_responses, "JSONResponse", recorded(serving_responses.JSONResponse))
    prompt = " ".join(["alpha beta"] * 90)  # ~360 tokens: with 21 alternatives each, past the threshold
    gen = {"max_tokens": 200, "ignore_eos": True}
    cases = [
        ("/v1/completions", {"prompt": "hi", "max_tokens": 1, "echo": True, "logprobs": 1}, False),
        ("/v1/completions", {"prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 20}, True),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                  "logprobs": True, "top_logprobs": 20}, False),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                                  "top_logprobs": 20, **gen}, True),
        ("/v1/responses", {"input": "hi", "max_output_tokens": 200, "include": ["message.output_text.logprobs"],
                           "top_logprobs": 20, "ignore_eos": True, "store": False}, True),
    ]
    assert 200 * 21 >= OFF_LOOP_ENTRIES  # what the long cases rely on
    with api_server.http() as h:
        for path, body, off_loop in cases:
            threads.clear()
            r = h.post(path, json=body)
            assert r.status_code == 200, r.text
            assert threads and all(t.startswith("uvicorn-") != off_loop for t in threads), (path, off_loop, threads)
            data = r.json()
            if path == "/v1/completions":
                lp = data["choices"][0]["logprobs"]
                assert len(lp["tokens"]) == data["usage"]["prompt_tokens"] + 1 == len(lp["top_logprobs"])
            elif path == "/v1/chat/completions":
                content = data["choices"][0]["logprobs"]["content"]
                assert len(content) == data["usage"]["completion_tokens"]
                assert all(len(t["top_logprobs"]) == 20 for t in content)
            else:
                assert len(data["output"][0]["content"][0]["logprobs"]) == data["usage"]["output_tokens"] == 200
        # A stream's chunk that echoes a long prompt with its logprobs is built off the loop too.
        monkeypatch.setattr(serving_completions, "_echo_logprobs", recorded(serving_completions._echo_logprobs))
        monkeypatch.setattr(serving_completions, "_echo_chunk", recorded(serving_completions._echo_chunk))
        for text, off_loop in (("hi", False), (prompt, True)):
            threads.clear()
            body = {"prompt": text, "max_tokens": 2, "echo": True, "logprobs": 20, "stream": True}
            with h.stream("POST", "/v1/completions", json=body) as r:
                events = [json.loads(line[6:]) for line in r.iter_lines()
                          if line.startswith("data: ") and line != "data: [DONE]"]
            assert len(threads) == 2 and all(t.startswith("uvicorn-") != off_loop for t in threads), threads
            first = events[0]["choices"][0]
            assert first["text"].startswith(text) and len(first["logprobs"]["tokens"]) > len(text.split())
