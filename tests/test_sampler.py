"""Sampler: each knob against a slow, obviously-correct version on fresh random logits."""

from __future__ import annotations

import math

import pytest
import torch

from nsa_serve.engine.protocol import SamplingParams
from nsa_serve.engine.sampler import Sampler, apply_penalties, filter_probs
from nsa_serve.engine.sequence import Sequence

V = 50


def seq(params, prompt=(1, 2, 3), output=(), index=0):
    s = Sequence("r", index, list(prompt), params, 0.0)
    s.token_ids.extend(output)
    return s


def test_greedy_is_argmax():
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(0))
    got = Sampler(V, [0])(logits, [seq(SamplingParams(temperature=0)) for _ in range(5)])
    assert [r.token_id for r in got] == logits.argmax(-1).tolist()


def test_filters_match_a_slow_definition():
    gen = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(6, V, generator=gen) * 3, -1)
    top_k, top_p, min_p = [0, 5, 1, 0, 3, 0], [1.0, 1.0, 1.0, 0.6, 0.5, 1.0], [0, 0, 0, 0, 0, 0.2]
    got = filter_probs(probs.clone(), top_k, top_p, min_p)
    for b in range(6):
        order = sorted(range(V), key=lambda i: -float(probs[b, i]))
        keep = set(order[:top_k[b]] if top_k[b] else order)
        ranked = [i for i in order if i in keep]
        mass = sum(float(probs[b, i]) for i in ranked)
        kept_p, acc = set(), 0.0
        for i in ranked:  # smallest prefix of the (renormalised) ranking reaching top_p
            if acc >= top_p[b] - 1e-7 and kept_p:
                break
            kept_p.add(i)
            acc += float(probs[b, i]) / mass
        top = float(probs[b].max())
        final = {i for i in kept_p if float(probs[b, i]) >= min_p[b] * top}
        assert {i for i in range(V) if got[b, i] > 0} == final, b


def test_penalties_match_their_definitions():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(V, generator=gen)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.7)
    s = seq(p, prompt=[1, 2], output=[2, 7, 7, 9])
    got = apply_penalties(logits.clone(), s, p)
    want = logits.clone()
    for t in range(V):
        c = s.output_token_ids.count(t)
        want[t] -= 0.3 * c + (0.5 if c else 0.0)
        if t in s.token_ids:
            want[t] = want[t] / 1.7 if want[t] > 0 else want[t] * 1.7
    torch.testing.assert_close(got, want)


def test_sampling_follows_the_distribution():
    # The exponential race draws exactly from softmax(logits / T): check frequencies over many draws.
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0] + [-30.0] * (V - 4))
    p = SamplingParams(temperature=0.8, seed=7)
    sampler = Sampler(V, [])
    s = seq(p)
    n = 4000
    counts = torch.zeros(V)
    for _ in range(n):
        counts[sampler(logits.unsqueeze(0), [s])[0].token_id] += 1
    want = torch.softmax(logits / 0.8, -1)
    for i in range(4):  # within 4 standard deviations
        sd = math.sqrt(n * want[i] * (1 - want[i]))
        assert abs(counts[i] - n * want[i]) < 4 * sd + 1


def test_seeded_rows_do_not_depend_on_batch_mates():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, V, generator=gen)
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=123)
    alone = Sampler(V, [])
    s_alone = seq(p)
    a = [alone(logits[1:2], [s_alone])[0].token_id for _ in range(20)]
    batched, s_b = Sampler(V, [], seed=99), seq(p)
    others = [seq(SamplingParams(temperature=1.0)), seq(SamplingParams(temperature=0)), seq(SamplingParams(seed=5))]
    b = [batched(logits[[0, 1, 2, 3]], [others[0], s_b, others[1], others[2]])[1].token_id for _ in range(20)]
    assert a == b


def test_min_tokens_bans_stop_tokens_and_logprobs_are_raw():
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(4)) - 5.0
    logits[0, 2] = 5.0  # eos is by far the most likely
    p = SamplingParams(temperature=0, min_tokens=2, logprobs=3, stop_token_ids=[4])
    logits[0, 4] = 4.0
    r = Sampler(V, [2])(logits, [seq(p)])[0]
    assert r.token_id not in (2, 4)
    lp = torch.log_softmax(logits[0], -1)
    assert r.logprob.logprob == pytest.approx(float(lp[r.token_id]))
    assert [t for t, _, _ in r.logprob.top] == [2, 4, lp.argsort(descending=True)[2].item()]
    r2 = Sampler(V, [2])(logits, [seq(p, output=[9, 9])])[0]
    assert r2.token_id == 2  # min_tokens reached: eos allowed again


def test_logit_bias_and_allowed_tokens_match_their_definitions():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, V, generator=gen)
    top = logits.argmax(-1)
    bias = {int(top[0]): -100.0, 7: 2.5, 11: -0.5}
    ps = [SamplingParams(temperature=0, logit_bias=bias), SamplingParams(temperature=0, allowed_token_ids=[3, 9, 20]),
          SamplingParams(temperature=0, allowed_token_ids=[3, 9], logit_bias={3: 100.0}, presence_penalty=0.5)]
    seqs = [seq(p) for p in ps]
    got = [r.token_id for r in Sampler(V, [0])(logits, seqs)]
    want0 = logits[0].clone()
    for t, b in bias.items():
        want0[t] += b
    assert got[0] == int(want0.argmax()) and got[0] != int(top[0])
    assert got[1] == max((3, 9, 20), key=lambda t: float(logits[1, t]))
    assert got[2] == 3
    # Sampled rows stay inside allowed_token_ids over many draws, at the renormalised frequencies.
    p = SamplingParams(temperature=1.0, seed=3, allowed_token_ids=[1, 2])
    flat = torch.zeros(1, V)
    flat[0, 2] = math.log(3.0)  # token 2 three times as likely as token 1
    s, sampler = seq(p), Sampler(V, [])
    draws = [sampler(flat, [s])[0].token_id for _ in range(2000)]
    assert set(draws) == {1, 2}
    assert abs(draws.count(2) / 2000 - 0.75) < 4 * math.sqrt(0.75 * 0.25 / 2000)


def test_min_tokens_yields_when_only_stop_tokens_are_allowed():
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(6))
    p = SamplingParams(temperature=1.0, min_tokens=3, allowed_token_ids=[2], seed=1)
    assert Sampler(V, [2])(logits, [seq(p)])[0].token_id == 2  # not NaN, not an out-of-set token


@pytest.mark.parametrize("kw", [dict(logit_bias={5: 101.0}), dict(logit_bias={5: float("nan")}),
                                dict(logit_bias={"5": 1.0}), dict(allowed_token_ids=[])])
def test_bias_validation(kw):
    from nsa_serve.engine.protocol import InvalidRequestError

    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kw).validate()
    assert e.value.param == next(iter(kw))


def test_a_failed_sampling_undoes_its_seeded_draws(monkeypatch):
    """If sampling raises after the seeded rows drew (in the launch, or reading the results), their
    generators are put back, so the retried step draws the same tokens as an undisturbed one."""
    import nsa_serve.engine.sampler as sm

    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=5)
    want = [r.token_id for r in Sampler(50, [0])(logits, [seq(params), seq(params, index=1)])]
    # A generator made by the failed attempt is dropped; one that existed is rewound.
    rows = [seq(params), seq(params, index=1)]
    Sampler(50, [0])(torch.zeros(2, 50), rows[1:])  # row 1's generator exists and has drawn once
    before = rows[1].generator.get_state()
    real = sm.PendingSample

    class Failing(real):
        def __init__(self, *a, **kw):
            raise RuntimeError("fault after the draws")

    monkeypatch.setattr(sm, "PendingSample", Failing)
    with pytest.raises(RuntimeError, match="after the draws"):
        Sampler(50, [0])(logits, rows)
    assert rows[0].generator is None and torch.equal(rows[1].generator.get_state(), before)
    monkeypatch.setattr(sm, "PendingSample", real)
    pending = Sampler(50, [0]).launch(logits, rows)

    def broken():
        raise RuntimeError("read-back fault")

    pending._results = broken
    with pytest.raises(RuntimeError, match="read-back"):
        pending.results()
    assert rows[0].generator is None and torch.equal(rows[1].generator.get_state(), before)
    # Row 1 drew once before (in the zeros call), so compare it with a sampler that did the same.
    fresh = [seq(params), seq(params, index=1)]
    Sampler(50, [0])(torch.zeros(2, 50), fresh[1:])
    again = [r.token_id for r in Sampler(50, [0])(logits, rows)]
    assert again == [r.token_id for r in Sampler(50, [0])(logits, fresh)]
    assert again[0] == want[0]
