"""vLLM's use_beam_search through the official client, against a beam search run directly on the
reference model (its incremental forward, no engine, no pages)."""

from __future__ import annotations

import pytest
import torch
import api_fixtures  # noqa: F401  (skips this module on a GPU machine without the HTTP stack)

import openai  # after api_fixtures, which skips this module on a GPU machine without openai

PROMPT = [40, 41, 42, 43, 44, 45, 46, 47, 48]


@pytest.fixture(scope="module")
def client(api_server):  # noqa: F811
    return api_server.openai()


@torch.no_grad()
def next_logprobs(model, tokens: list[int]) -> torch.Tensor:
    cache = model.new_cache()
    return torch.log_softmax(model.step(torch.tensor(tokens), cache)[-1].double(), dim=-1)


def reference_beams(model, prompt, width, steps, stops, length_penalty=1.0):
    """Plain beam search: every live beam's 2·width best next tokens, the best width kept, a beam
    ending in a stop token finished; then ranked by cum / length ** length_penalty."""
    live, done = [([], 0.0)], []
    for _ in range(steps):
        candidates = []
        for tokens, cum in live:
            top = next_logprobs(model, prompt + tokens).topk(2 * width)
            candidates += [(tokens + [t], cum + v) for v, t in zip(top.values.tolist(), top.indices.tolist())]
        candidates.sort(key=lambda c: c[1], reverse=True)
        live = [c for c in candidates[:width] if c[0][-1] not in stops]
        done += [c for c in candidates[:width] if c[0][-1] in stops]
        if not live:
            break

    def score(c):
        n = len(prompt) + len(c[0]) - (1 if c[0][-1] in stops else 0)
        return c[1] / n ** length_penalty

    return sorted(done + live, key=score, reverse=True)[:width]


def text_of(tok, prompt, tokens, stops):
    shown = tokens[:-1] if tokens and tokens[-1] in stops else tokens
    return tok.decode(prompt + shown)[len(tok.decode(prompt)):]


def test_beams_equal_a_beam_search_on_the_reference_model(client, api_server):  # noqa: F811
    name = api_server.engine.model_name
    tok, model = api_server.engine.tokenizer, api_server.engine.engine.model
    r = client.completions.create(model=name, prompt=PROMPT, max_tokens=4, n=3,
                                  extra_body={"use_beam_search": True, "ignore_eos": True})
    want = reference_beams(model, PROMPT, 3, 4, stops=set())
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [text_of(tok, PROMPT, t, set()) for t, _ in want]
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.prompt_tokens == len(PROMPT) and r.usage.completion_tokens == 12
    # One step of width 10 is the ten most likely next tokens, most likely first.
    one = client.completions.create(model=name, prompt=PROMPT, max_tokens=1, n=10,
                                    extra_body={"use_beam_search": True, "ignore_eos": True})
    top = next_logprobs(model, PROMPT).topk(10).indices.tolist()
    assert [c.text for c in one.choices] == [text_of(tok, PROMPT, [t], set()) for t in top]


def test_a_stop_token_finishes_its_beam_and_length_penalty_ranks(client, api_server):  # noqa: F811
    name = api_server.engine.model_name
    tok, model = api_server.engine.tokenizer, api_server.engine.engine.model
    best = int(next_logprobs(model, PROMPT).argmax())
    orders = {}
    for penalty in (0.0, 1.0, 8.0):
        r = client.completions.create(model=name, prompt=PROMPT, max_tokens=3, n=3, extra_body={
            "use_beam_search": True, "ignore_eos": True, "stop_token_ids": [best], "length_penalty": penalty})
        want = reference_beams(model, PROMPT, 3, 3, stops={best}, length_penalty=penalty)
        assert [c.text for c in r.choices] == [text_of(tok, PROMPT, t, {best}) for t, _ in want]
        reasons = [("stop", best) if t[-1] == best else ("length", None) for t, _ in want]
        assert [(c.finish_reason, c.stop_reason) for c in r.choices] == reasons
        orders[penalty] = [t for t, _ in want]
    # The stopped one-token beam is the best by log-probability (one term against three); a strong
    # length penalty ranks the longer beams above it.
    assert orders[0.0][0] == [best] and orders[8.0][0] != [best]


def test_chat_streams_and_batches_give_the_same_beams(client, api_server):  # noqa: F811
    name = api_server.engine.model_name
    messages = [{"role": "user", "content": "Name a prime number."}]
    kw = dict(model=name, messages=messages, max_tokens=3, n=2, extra_body={"use_beam_search": True})
    plain = client.chat.completions.create(**kw)
    stream = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    for i, choice in enumerate(plain.choices):
        parts = [c.choices[0] for c in stream if c.choices and c.choices[0].index == i]
        assert "".join(p.delta.content or "" for p in parts) == choice.message.content
        assert parts[-1].finish_reason == choice.finish_reason
    assert stream[-1].usage.completion_tokens == plain.usage.completion_tokens
    # A batch of prompts: each its own search, numbered prompt_index * n + rank.
    single = [client.completions.create(model=name, prompt=p, max_tokens=2, n=2,
                                        extra_body={"use_beam_search": True, "ignore_eos": True})
              for p in (PROMPT, PROMPT[:5])]
    batch = client.completions.create(model=name, prompt=[PROMPT, PROMPT[:5]], max_tokens=2, n=2, echo=True,
                                      extra_body={"use_beam_search": True, "ignore_eos": True})
    tok = api_server.engine.tokenizer
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.text for c in batch.choices] == [tok.decode(p) + c.text for p, s in zip((PROMPT, PROMPT[:5]), single)
                                              for c in s.choices]
    stats = api_server.engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_cache_usage == 0


@pytest.mark.parametrize("field,extra", [
    ("n", {"n": 11}), ("stop", {"stop": ["x"]}), ("logprobs", {"logprobs": 2}),
    ("presence_penalty", {"presence_penalty": 0.5}), ("repetition_penalty", {"repetition_penalty": 1.2}),
    ("logit_bias", {"logit_bias": {"5": 1}}), ("guided_choice", {"guided_choice": ["a", "b"]}),
    ("min_tokens", {"min_tokens": 1}), ("length_penalty", {"length_penalty": 50}),
    ("stop_token_ids", {"stop_token_ids": [10 ** 9]}), ("bad_words", {"bad_words": ["the"]})])
def test_what_a_beam_search_cannot_honour_is_a_400(api_server, field, extra):  # noqa: F811
    with api_server.http() as h:
        r = h.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "use_beam_search": True, **extra})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_chat_tool_calls_and_logprobs_are_refused_with_beam_search(client, api_server):  # noqa: F811
    name = api_server.engine.model_name
    messages = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for kw, field in ((dict(tools=[tool], tool_choice="required"), "tool_choice"), (dict(logprobs=True), "logprobs")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=name, messages=messages, max_tokens=2,
                                           extra_body={"use_beam_search": True}, **kw)
        assert e.value.body["param"] == field


def test_a_search_counts_as_the_users_request_in_the_metrics(client, api_server):  # noqa: F811
    """The engine's one-token step requests are not requests: /metrics counts one request of n =
    width, whose width sequences finished; the steps' tokens show only as engine work."""
    before = api_server.metrics()
    r = client.completions.create(model=api_server.engine.model_name, prompt=PROMPT, max_tokens=3, n=2,
                                  extra_body={"use_beam_search": True, "ignore_eos": True})
    after = api_server.metrics()
    d = lambda key: after.get(key, 0.0) - before.get(key, 0.0)  # noqa: E731
    assert d("nsa:request_prompt_tokens_count") == 1 and d("nsa:request_prompt_tokens_sum") == len(PROMPT)
    assert d("nsa:request_params_n_count") == 1 and d("nsa:request_params_n_sum") == 2
    assert d("nsa:request_params_max_tokens_sum") == 3
    assert d('nsa:request_success_total{finished_reason="length"}') == 2
    assert d("nsa:request_generation_tokens_sum") == r.usage.completion_tokens == 6
    assert d("nsa:iteration_tokens_total_count") >= 3  # at least one engine step per search step


def test_usage_counts_the_prompt_tokens_the_prefix_cache_served(client, api_server):  # noqa: F811
    """prompt_tokens_details.cached_tokens of a search: what the cache served its first step (its
    prompt); a salt of its own keeps other tests' pages out of the count."""
    name = api_server.engine.model_name
    prompt = list(range(500, 580))
    extra = {"use_beam_search": True, "ignore_eos": True, "cache_salt": "beam-usage"}

    def cached(**kw):
        return client.completions.create(model=name, prompt=prompt, max_tokens=2, n=2, extra_body=extra,
                                         **kw).usage.prompt_tokens_details.cached_tokens

    assert cached() == 0
    again = cached()
    plain = client.completions.create(model=name, prompt=prompt, max_tokens=1, temperature=0.0,
                                      extra_body={"cache_salt": "beam-usage"})
    assert 0 < again < len(prompt) and again == plain.usage.prompt_tokens_details.cached_tokens
    # Two prompts in one request: the two searches' counts summed.
    two = client.completions.create(model=name, prompt=[prompt, prompt], max_tokens=1, n=2, extra_body=extra)
    assert two.usage.prompt_tokens_details.cached_tokens == 2 * again
    messages = [{"role": "user", "content": "Beam me. " + "The cache keeps pages of tokens. " * 12}]
    kw = dict(model=name, messages=messages, max_tokens=2, n=2, extra_body=extra)
    first = client.chat.completions.create(**kw)
    stream = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert stream[-1].usage.prompt_tokens_details.cached_tokens > 0
