"""Sampling through the whole engine: seeds independent of batch mates, stop strings that span
tokens, stop token ids, logprobs, n > 1."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import make_engine, random_prompts, reference_greedy, single_thread_torch
from nsa_serve.engine.protocol import SamplingParams

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread_torch)


@pytest.fixture(scope="module")
def engine():
    return make_engine(True, num_pages=256)


def run(engine, requests):
    """requests: [(prompt, params)] → (final outputs, all streamed outputs) per request, in order."""
    ids = [f"q{i}-{id(requests)}" for i in range(len(requests))]
    for rid, (prompt, params) in zip(ids, requests):
        engine.add_request(rid, prompt, params)
    streams = {rid: [] for rid in ids}
    while engine.has_unfinished_requests():
        for out in engine.step():
            streams[out.request_id].append(out)
    return [streams[r][-1] for r in ids], [streams[r] for r in ids]


def test_seeded_sampling_is_the_same_whatever_else_is_in_the_batch(engine):
    prompt = random_prompts(1, 30, 30, seed=10)[0]
    p = SamplingParams(temperature=1.0, top_p=0.95, top_k=200, seed=1234, max_tokens=12, ignore_eos=True)
    (alone,), _ = run(engine, [(prompt, p)])
    mates = [(q, SamplingParams(temperature=t, max_tokens=m, ignore_eos=True, seed=s))
             for q, t, m, s in zip(random_prompts(6, 5, 90, seed=11), [1.0, 0, 0.7, 1.3, 1.0, 0.5],
                                   [3, 15, 9, 4, 20, 1], [None, None, 9, None, 4, None])]
    finals, _ = run(engine, mates[:3] + [(prompt, p)] + mates[3:])
    assert finals[3].outputs[0].token_ids == alone.outputs[0].token_ids
    # n = 2: completion 0 uses the request's seed, completion 1 its own stream.
    (pair,), _ = run(engine, [(prompt, SamplingParams(**{**p.__dict__, "n": 2}))])
    assert [o.index for o in pair.outputs] == [0, 1]
    assert pair.outputs[0].token_ids == alone.outputs[0].token_ids
    assert pair.outputs[1].token_ids != pair.outputs[0].token_ids


def _token_boundaries(engine, prompt, ids):
    """Character offsets in the output text where each token ends."""
    tok = engine.tokenizer
    ctx = prompt[-6:]
    base = tok.decode(ctx)
    return [len(tok.decode(ctx + ids[:k])) - len(base) for k in range(1, len(ids) + 1)]


def test_stop_strings_spanning_tokens_stop_and_are_excluded(engine):
    prompt = engine.tokenizer.encode("def read_config(path):\n    \"\"\"Return the")
    base_params = dict(temperature=0, max_tokens=16, ignore_eos=True)
    (plain,), _ = run(engine, [(prompt, SamplingParams(**base_params))])
    text, ids = plain.outputs[0].text, plain.outputs[0].token_ids
    ends = _token_boundaries(engine, prompt, ids)
    # A stop string from the middle of one token's text to the middle of a later token's text.
    stop = None
    for k in range(2, len(ends) - 2):
        a, b = ends[k - 1] - 1, ends[k] + 2
        cand = text[a:b]
        if (0 < a and b <= len(text) and len(cand.strip()) >= 3 and "\ufffd" not in cand
                and text.find(cand) == a and ends[k] - ends[k - 1] >= 1):
            stop = cand
            break
    assert stop is not None, f"no usable stop string in {text!r}"
    cut = text.find(stop)
    (out,), (stream,) = run(engine, [(prompt, SamplingParams(**base_params, stop=[stop, "never-there"]))])
    o = out.outputs[0]
    assert o.finish_reason == "stop" and o.stop_reason == stop
    assert o.text == text[:cut]
    assert "".join(s.outputs[0].delta_text for s in stream) == text[:cut]
    assert all(stop not in s.outputs[0].text for s in stream)
    (inc,), _ = run(engine, [(prompt, SamplingParams(**base_params, stop=[stop], include_stop_str_in_output=True))])
    assert inc.outputs[0].text == text[:cut + len(stop)]


def test_stop_token_ids_min_tokens_and_max_tokens(engine):
    prompt = random_prompts(1, 20, 20, seed=12)[0]
    ref = reference_greedy(engine.model, prompt, 8)
    stop_id = ref[3]
    if stop_id in ref[:3]:
        pytest.skip("greedy output repeats the chosen token early")
    (out,), _ = run(engine, [(prompt, SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_id]))])
    o = out.outputs[0]
    assert o.finish_reason == "stop" and o.stop_reason == stop_id and o.token_ids == ref[:4]
    (out,), _ = run(engine, [(prompt, SamplingParams(temperature=0, max_tokens=8, min_tokens=6,
                                                      stop_token_ids=[stop_id]))])
    assert len(out.outputs[0].token_ids) >= 6 and stop_id not in out.outputs[0].token_ids[:6]
    (out,), _ = run(engine, [(prompt, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))])
    assert out.outputs[0].finish_reason == "length" and out.outputs[0].token_ids == ref[:5]


def test_logprobs_are_the_reference_models_log_probabilities(engine):
    prompt = random_prompts(1, 25, 25, seed=13)[0]
    (out,), (stream,) = run(engine, [(prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3))])
    o = out.outputs[0]
    model = engine.model
    cache = model.new_cache()
    logits = model.step(torch.tensor(prompt), cache)[-1]
    for tok, lp in zip(o.token_ids, o.logprobs):
        ref = torch.log_softmax(logits.float(), -1)
        assert lp.token_id == tok and lp.logprob == pytest.approx(float(ref[tok]), abs=1e-4)
        assert [t for t, _, _ in lp.top] == ref.topk(3).indices.tolist()
        assert lp.token == engine.tokenizer.token_text(tok)
        logits = model.step(torch.tensor([tok]), cache)[-1]
    assert sum(len(s.outputs[0].delta_logprobs) for s in stream) == 4


def test_penalties_and_filters_run_through_the_engine(engine):
    prompts = random_prompts(3, 5, 40, seed=14)
    params = [SamplingParams(temperature=0.9, top_k=20, min_p=0.05, presence_penalty=1.0, max_tokens=6, seed=1),
              SamplingParams(temperature=0, repetition_penalty=1.5, frequency_penalty=0.5, max_tokens=6),
              SamplingParams(temperature=1.0, top_p=0.5, max_tokens=6, n=3, seed=2)]
    finals, _ = run(engine, list(zip(prompts, params)))
    assert [len(f.outputs) for f in finals] == [1, 1, 3]
    assert all(o.finish_reason in ("length", "stop") for f in finals for o in f.outputs)
    engine.block_manager.check_all_free()


def test_generation_without_max_tokens_stops_at_the_context_limit():
    engine = make_engine(True, num_pages=3)  # 48 tokens fit: max_model_len is lowered to 48
    assert engine.max_model_len == 48
    (out,), _ = run(engine, [([10] * 40, SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))])
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 8
    engine.block_manager.check_all_free()


def test_seeds_must_fit_64_bits():
    """A torch generator takes a 64-bit seed; a wider one is refused up front (it used to fail its
    request inside the engine, an HTTP 500), for a request's seed and for the server's."""
    from nsa_serve.engine.args import EngineArgs
    from nsa_serve.engine.protocol import InvalidRequestError

    for ok in (-2**63, 0, 2**63 - 1):
        SamplingParams(seed=ok).validate()
        EngineArgs(seed=ok).validate()
    for bad in (2**63, -2**63 - 1, 2**70):
        with pytest.raises(InvalidRequestError, match="seed"):
            SamplingParams(seed=bad).validate()
        with pytest.raises(ValueError, match="seed"):
            EngineArgs(seed=bad).validate()
    with pytest.raises(InvalidRequestError, match="seed"):
        SamplingParams(seed=True).validate()
