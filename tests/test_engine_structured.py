"""Structured outputs: whatever the (random, tiny) model prefers, the output matches the grammar —
JSON schema, any JSON object, regex, a choice, a Lark grammar — and greedy decoding picks the
reference model's most likely token among those the grammar allows (CPU, fp32)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from engine_helpers import make_engine, random_prompts, single_thread_torch
from nsa_serve.engine.protocol import InvalidRequestError, SamplingParams
from nsa_serve.engine.structured import StructuredOutput, allowed_mask

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread_torch)

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}}


@pytest.fixture(scope="module")
def engine():
    return make_engine(True)


def run(engine, prompts, params):
    outs = engine.generate(prompts, params)
    engine.block_manager.check_all_free()
    return [o.outputs for o in outs]


def test_json_schema_outputs_parse_and_obey_the_schema(engine):
    prompts = random_prompts(3, 5, 60, seed=31)
    params = SamplingParams(temperature=1.0, seed=4, n=2, max_tokens=120,
                            structured=StructuredOutput("json", SCHEMA))
    for outs in run(engine, prompts, params):
        for c in outs:
            assert c.finish_reason == "stop", c.text
            obj = json.loads(c.text)
            assert set(obj) == {"name", "age", "tags"}
            assert isinstance(obj["name"], str) and len(obj["name"]) <= 6
            assert isinstance(obj["age"], int) and 0 <= obj["age"] <= 120
            assert isinstance(obj["tags"], list) and len(obj["tags"]) <= 3 and set(obj["tags"]) <= {"a", "b"}


@pytest.mark.parametrize("so, check", [
    (StructuredOutput("regex", r"[a-z]{3}-[0-9]{2}"), lambda t: re.fullmatch(r"[a-z]{3}-[0-9]{2}", t)),
    (StructuredOutput("choice", ["yes", "no", "not sure"]), lambda t: t in {"yes", "no", "not sure"}),
    (StructuredOutput("grammar", 'start: "(" NUM ("," NUM)* ")"\nNUM: /[0-9]{1,3}/'),
     lambda t: re.fullmatch(r"\(\d{1,3}(,\d{1,3})*\)", t)),
], ids=["regex", "choice", "lark"])
def test_other_constraints(engine, so, check):
    prompts = random_prompts(2, 5, 40, seed=32)
    for outs in run(engine, prompts, SamplingParams(temperature=0.8, seed=5, max_tokens=80, structured=so)):
        c = outs[0]
        assert c.finish_reason == "stop" and check(c.text), c.text


def test_any_json_object(engine):
    """A random model's free-form JSON may not close within max_tokens (a string can run on): what
    it wrote is then a prefix of an object, and what closed parses."""
    prompts = random_prompts(6, 5, 40, seed=34)
    outs = run(engine, prompts, SamplingParams(temperature=0.7, seed=6, max_tokens=60,
                                               structured=StructuredOutput("json_object", None)))
    closed = 0
    for c in (o[0] for o in outs):
        assert c.text.startswith("{"), c.text
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict), c.text
            closed += 1
        else:
            assert c.finish_reason == "length"
            with pytest.raises(json.JSONDecodeError):
                json.loads(c.text)
    assert closed >= 1


def test_greedy_picks_the_best_allowed_token(engine):
    """The engine's tokens against the reference forward: at every step the chosen token is the
    reference's arg-max among the tokens a fresh matcher (fed the same prefix) allows."""
    so = StructuredOutput("json", SCHEMA)
    prompt = random_prompts(1, 30, 30, seed=33)[0]
    got = run(engine, [prompt], SamplingParams(temperature=0, max_tokens=120, structured=so))[0][0]
    assert got.finish_reason == "stop"
    model, matcher = engine.model, engine.grammars.matcher(so)
    V = engine.config.vocab_size
    with torch.no_grad():
        logits = model.step(torch.tensor(prompt + got.token_ids), model.new_cache())
    for i, tok in enumerate(got.token_ids):
        row = logits[len(prompt) - 1 + i].double()
        allowed = allowed_mask(matcher, V)
        assert allowed[tok], i
        assert tok == int(row.masked_fill(~allowed, -float("inf")).argmax()), i
        assert matcher.consume_token(tok)
    assert matcher.is_stopped()


def test_a_bad_grammar_is_refused_and_the_engine_carries_on(engine):
    for so, param in ((StructuredOutput("regex", "[a-z", "guided_regex"), "guided_regex"),
                      (StructuredOutput("grammar", "start: undefined_rule", "guided_grammar"), "guided_grammar"),
                      (StructuredOutput("json", {"type": "no-such-type"}, "response_format"), "response_format"),
                      (StructuredOutput("choice", [], "guided_choice"), "guided_choice")):
        with pytest.raises(InvalidRequestError) as e:
            engine.add_request("bad", [5, 6, 7], SamplingParams(max_tokens=4, structured=so))
        assert e.value.param == param, e.value
    assert not engine.has_unfinished_requests()
    out = run(engine, [[9, 10, 11]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0][0]
    assert len(out.token_ids) == 3


def test_allowed_token_ids_that_contradict_the_grammar(engine):
    # First token impossible: a 400 naming allowed_token_ids, nothing scheduled. Possible at first
    # but not later (digits only, the regex then wants "x"): the completion ends with "error" after
    # the digits, no stray token appended, no pages held, and the engine carries on.
    sp = engine.tokenizer.sp
    digits = [i for i in range(sp.get_piece_size()) if sp.id_to_piece(i).lstrip("▁").isdigit()
              and sp.id_to_piece(i).lstrip("▁") != ""]
    assert digits
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request("contradiction", [5, 6, 7], SamplingParams(
            max_tokens=8, allowed_token_ids=digits, structured=StructuredOutput("regex", "[a-z]+")))
    assert e.value.param == "allowed_token_ids"
    assert not engine.has_unfinished_requests()
    so = StructuredOutput("regex", "[0-9]{3}x")
    outs = run(engine, [[5, 6, 7]], SamplingParams(temperature=1.0, seed=3, max_tokens=12, allowed_token_ids=digits,
                                                   structured=so))[0]
    c = outs[0]
    assert c.finish_reason == "error", (c.finish_reason, c.text)
    assert all(t in digits for t in c.token_ids) and len(c.text.strip()) == 3 and c.text.strip().isdigit(), c.text
    out = run(engine, [[9, 10, 11]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0][0]
    assert len(out.token_ids) == 3


def test_batched_masks_equal_one_by_one(engine):
    # The parallel executor path (several matchers, different states) gives each row the mask the
    # single-matcher path gives.
    from nsa_serve.engine.structured import allowed_masks

    V = engine.config.vocab_size
    matchers = []
    for k, so in enumerate([StructuredOutput("json", SCHEMA), StructuredOutput("regex", "[a-z]{2,5}-[0-9]+"),
                            StructuredOutput("choice", ["alpha", "beta"]), StructuredOutput("json_object", None)]):
        m = engine.grammars.matcher(so)
        g = torch.Generator().manual_seed(k)
        for _ in range(k + 1):  # a few tokens in, so the states differ
            ids = allowed_mask(m, V).nonzero().flatten()
            assert m.consume_token(int(ids[torch.randint(len(ids), (1,), generator=g)]))
        matchers.append(m)
    batch = allowed_masks(matchers, V)
    assert batch.shape == (4, V) and batch.dtype == torch.bool
    for k, m in enumerate(matchers):
        assert torch.equal(batch[k], allowed_mask(m, V)), k
    assert allowed_masks([], V).shape == (0, V)
