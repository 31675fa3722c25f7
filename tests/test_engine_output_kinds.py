"""Output kinds (SamplingParams.output_kind): the same generation reported three ways.

"cumulative" repeats text and token ids in every output; "delta" carries only what each output
adds (cumulative fields in the final output only); "final_only" emits one output when the request
ends, with the engine-timed gaps between tokens. The final output must be identical across kinds.
"""

from __future__ import annotations

import dataclasses

import pytest

from engine_helpers import make_engine, random_prompts, single_thread_torch
from nsa_serve.engine.protocol import InvalidRequestError, RequestMetrics, SamplingParams

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread_torch)


@pytest.fixture(scope="module")
def engine():
    return make_engine(True, num_pages=256)


def run(engine, prompt, params):
    rid = f"k-{params.output_kind}-{id(params)}"
    # Each run starts from an empty prefix cache, so every kind computes the same steps: fp32 sums
    # over a cached page and a short chunk may round differently from one long chunk's.
    engine.reset_prefix_cache()
    engine.add_request(rid, prompt, params)
    outs = []
    while engine.has_unfinished_requests():
        outs.extend(o for o in engine.step() if o.request_id == rid)
    return outs


def final_view(out):
    return [(c.index, c.text, c.token_ids, c.num_tokens, c.finish_reason, c.stop_reason,
             [(t.token_id, t.logprob) for t in c.logprobs or []]) for c in out.outputs]


@pytest.mark.parametrize("case", ["sampled n=2 with logprobs", "stop string"])
def test_every_kind_ends_with_the_same_final_output(engine, case):
    prompt = random_prompts(1, 20, 20, seed=3)[0]
    if case == "stop string":
        greedy = run(engine, prompt, SamplingParams(temperature=0, max_tokens=14, ignore_eos=True))[-1]
        text = greedy.outputs[0].text
        assert len(text) >= 6, text
        base = dict(temperature=0, max_tokens=14, ignore_eos=True, stop=[text[3:6]])
    else:
        base = dict(n=2, temperature=1.0, seed=7, max_tokens=11, ignore_eos=True, logprobs=2)
    streams = {k: run(engine, prompt, SamplingParams(**base, output_kind=k))
               for k in ("cumulative", "delta", "final_only")}
    finals = {k: s[-1] for k, s in streams.items()}
    assert all(f.finished for f in finals.values())
    assert final_view(finals["delta"]) == final_view(finals["cumulative"])
    assert final_view(finals["final_only"]) == final_view(finals["cumulative"])
    if case == "stop string":
        assert finals["cumulative"].outputs[0].finish_reason == "stop"

    # delta: the deltas add up to the final text / ids; earlier outputs carry no cumulative fields.
    for c in finals["cumulative"].outputs:
        parts = [o for out in streams["delta"] for o in out.outputs if o.index == c.index]
        assert "".join(o.delta_text for o in parts) == c.text
        assert [t for o in parts for t in o.delta_token_ids] == c.token_ids
        assert [t.token_id for o in parts for t in o.delta_logprobs or []] == \
            [t.token_id for t in c.logprobs or []]
        counts = [o.num_tokens for o in parts]
        assert counts == sorted(counts) and counts[-1] == len(c.token_ids)
    for out in streams["delta"][:-1]:
        assert all(o.text == "" and o.token_ids == [] and o.logprobs is None for o in out.outputs)
    assert len(streams["delta"]) > 1

    # final_only: one output; every completion's gaps between its tokens, none negative.
    assert len(streams["final_only"]) == 1
    for c in finals["final_only"].outputs:
        gaps = c.inter_token_latencies
        assert gaps is not None and len(gaps) == c.num_tokens - 1 and min(gaps, default=0) >= 0
    assert all(o.inter_token_latencies is None for f in ("cumulative", "delta") for o in finals[f].outputs)


def test_an_aborted_final_only_request_still_reports_once(engine):
    prompt = random_prompts(1, 12, 12, seed=4)[0]
    engine.add_request("abort-me", prompt, SamplingParams(max_tokens=50, ignore_eos=True, output_kind="final_only"))
    outs = []
    for _ in range(4):
        outs.extend(engine.step())
    assert outs == []  # running, nothing reported yet
    engine.abort_request("abort-me")
    outs = engine.step()
    assert len(outs) == 1 and outs[0].finished and outs[0].outputs[0].finish_reason == "abort"
    assert outs[0].outputs[0].num_tokens == len(outs[0].outputs[0].token_ids) > 0
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_used_pages == 0


def test_unknown_output_kind_is_refused():
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(output_kind="partial").validate()
    assert e.value.param == "output_kind"


def test_metrics_snapshot_copies_every_field():
    m = RequestMetrics(**{f.name: i + 1.5 for i, f in enumerate(dataclasses.fields(RequestMetrics))})
    snap = m.snapshot()
    assert snap == m and snap is not m
