"""A server started with speculative decoding (vLLM's --speculative-config, method ngram) answers
as the plain server does, through the official client: greedy text, streamed or not, stops, n = 2;
its /metrics count the drafts."""

from __future__ import annotations

import random

import pytest
from api_fixtures import start_server, wait_for

import openai  # noqa: F401  (after api_fixtures, which skips this module without the HTTP stack)
from engine_helpers import repeats_a_token


@pytest.fixture(scope="module")
def spec_server(tiny_model_dir):  # noqa: F811
    srv = start_server(tiny_model_dir, num_speculative_tokens=4, prompt_lookup_min=1)
    yield srv
    srv.stop()


def greedy(client, model, prompt, **kw):
    return client.completions.create(model=model, prompt=prompt, temperature=0,
                                     extra_body={"ignore_eos": True}, **{"max_tokens": 30, **kw})


@pytest.fixture(scope="module")
def looping(api_server):  # noqa: F811
    """Token prompts whose greedy answer (plain server) repeats a token three times in a row, so
    that one-token n-grams make drafts the model accepts."""
    client, model, rng = api_server.openai(), api_server.engine.model_name, random.Random(5)
    found = []
    for _ in range(60):
        prompt = [rng.randrange(8, 4000) for _ in range(rng.randint(10, 30))]
        if repeats_a_token(greedy(client, model, prompt, logprobs=0).choices[0].logprobs.tokens):
            found.append(prompt)
        if len(found) == 3:
            return found
    pytest.fail("no prompt makes the tiny model repeat itself")


def test_answers_equal_the_plain_servers(api_server, spec_server, looping):  # noqa: F811
    plain, spec = api_server.openai(), spec_server.openai()
    model = api_server.engine.model_name
    before = spec_server.metrics()
    for prompt in looping:
        want = greedy(plain, model, prompt).choices[0]
        got = greedy(spec, model, prompt).choices[0]
        assert (got.text, got.finish_reason) == (want.text, want.finish_reason)
        streamed = "".join(c.choices[0].text for c in greedy(spec, model, prompt, stream=True) if c.choices)
        assert streamed == want.text
        stop = want.text[len(want.text) // 2:len(want.text) // 2 + 2]
        w, g = greedy(plain, model, prompt, stop=[stop]).choices[0], greedy(spec, model, prompt, stop=[stop]).choices[0]
        assert (g.text, g.finish_reason) == (w.text, w.finish_reason) and g.finish_reason == "stop"
        w2, g2 = greedy(plain, model, prompt, n=2), greedy(spec, model, prompt, n=2)
        assert [c.text for c in g2.choices] == [c.text for c in w2.choices]
        assert g2.usage.completion_tokens == w2.usage.completion_tokens
    after = spec_server.metrics()
    d = lambda key: after.get(key, 0.0) - before.get(key, 0.0)  # noqa: E731
    assert d("nsa:spec_decode_num_drafts_total") > 0
    assert 0 < d("nsa:spec_decode_num_accepted_tokens_total") <= d("nsa:spec_decode_num_draft_tokens_total")
    assert wait_for(lambda: spec_server.engine.stats().num_running == 0)
    assert spec_server.metrics()["nsa:kv_cache_usage_perc"] == 0  # every page back
