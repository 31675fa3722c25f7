"""vLLM's bad_words: the token sequences that spell a word are never completed by the sampler."""

from __future__ import annotations

import re

import pytest
import torch

from engine_helpers import make_engine, random_prompts, single_thread_torch
from nsa_serve.engine.bad_words import bad_word_token_ids, banned_next, depends_on_output
from nsa_serve.engine.protocol import InvalidRequestError, SamplingParams
from nsa_serve.engine.sampler import ban_bad_words

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread_torch)


@pytest.fixture(scope="module")
def engine():
    return make_engine(True, num_pages=256)


def run(engine, prompt, params, rid):
    engine.add_request(rid, prompt, params)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid:
                final = out
    return final


def contains(ids: list[int], word: tuple[int, ...]) -> bool:
    k = len(word)
    return any(tuple(ids[i:i + k]) == word for i in range(len(ids) - k + 1))


def two_token_word(tok) -> tuple[str, int, int]:
    """A word the tokenizer writes as a word-start piece and one continuation piece."""
    sp = tok.sp
    starts = [i for i in range(sp.get_piece_size()) if sp.id_to_piece(i).startswith("\u2581")
              and sp.id_to_piece(i)[1:].isalpha() and len(sp.id_to_piece(i)) >= 4]
    tails = [i for i in range(sp.get_piece_size()) if sp.id_to_piece(i).isalpha() and len(sp.id_to_piece(i)) >= 2]
    for a in starts[:50]:
        for b in tails[:50]:
            word = sp.id_to_piece(a)[1:] + sp.id_to_piece(b)
            if tok.encode(word, add_bos=False) == [a, b]:
                return word, a, b
    raise AssertionError("no two-token word in this vocabulary")


def one_token_word(tok) -> tuple[str, int]:
    sp = tok.sp
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581") and piece[1:].isalpha() and tok.encode(piece[1:], add_bos=False) == [i]:
            return piece[1:], i
    raise AssertionError("no one-token word in this vocabulary")


def test_banned_next_completes_only_matching_prefixes():
    bad = ((5,), (1, 2, 3), (7, 2))
    assert banned_next(bad, []) == [5]  # a longer word needs its first tokens generated first
    assert banned_next(bad, [9, 1, 2]) == [5, 3]
    assert banned_next(bad, [1, 2, 9]) == [5]
    assert banned_next(bad, [7]) == [5, 2]
    assert depends_on_output(bad) and not depends_on_output(((5,), (6,)))


class _ByteLevel:
    """A byte-level-BPE-like tokenizer: a leading space joins the first token ("Ġword")."""
    vocab = {"word": 1, "Ġword": 2, "s": 3, "Ġ": 4, "Ġx": 5}

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        out = []
        for part in re.findall(r" ?[^ ]+", text):
            part = part.replace(" ", "Ġ")
            if part in self.vocab:
                out.append(self.vocab[part])
            elif part.endswith("s") and part[:-1] in self.vocab:
                out += [self.vocab[part[:-1]], self.vocab["s"]]
            else:
                out.append(self.vocab["Ġ"])
        return out


def test_word_token_ids_keep_the_spaced_form_only_when_the_space_joins_the_first_token():
    assert bad_word_token_ids(_ByteLevel(), ["words", "  word"]) == ((1, 3), (2, 3), (1,), (2,))
    assert bad_word_token_ids(_ByteLevel(), []) == ()
    with pytest.raises(InvalidRequestError, match="tokenizer"):
        bad_word_token_ids(None, ["x"])


def test_the_ban_yields_when_nothing_else_is_left():
    logits = torch.tensor([0.5, -float("inf"), 2.0, -float("inf")])
    assert torch.equal(ban_bad_words(logits, [2]), torch.tensor([0.5, -float("inf"), -float("inf"), -float("inf")]))
    only = torch.tensor([-float("inf"), 1.0, -float("inf")])
    assert torch.equal(ban_bad_words(only, [1]), only)
    assert ban_bad_words(logits, []) is logits


def test_a_two_token_word_is_never_completed(engine):
    word, a, b = two_token_word(engine.tokenizer)
    prompt = random_prompts(1, 20, 20, seed=3)[0]
    base = dict(temperature=1.0, seed=7, max_tokens=40, ignore_eos=True, allowed_token_ids=[a, b], n=2)
    plain = run(engine, prompt, SamplingParams(**base), "plain")
    assert all(contains(o.token_ids, (a, b)) for o in plain.outputs), "the fixture must write the word unbanned"
    banned = run(engine, prompt, SamplingParams(**base, bad_words=[word]), "banned")
    for o, p in zip(banned.outputs, plain.outputs):
        assert not contains(o.token_ids, (a, b)) and len(o.token_ids) == 40
        # Up to the first place the word was completed, nothing changes (the same seeded draws).
        first = next(i for i in range(1, 40) if p.token_ids[i - 1:i + 1] == [a, b])
        assert o.token_ids[:first] == p.token_ids[:first] and o.token_ids[first] == a
        assert word not in o.text


def test_a_one_token_word_is_never_sampled_greedy_or_not(engine):
    word, t = one_token_word(engine.tokenizer)
    prompt = random_prompts(1, 20, 20, seed=4)[0]
    for temperature in (0.0, 1.0):
        base = dict(temperature=temperature, seed=1, max_tokens=12, ignore_eos=True, logit_bias={t: 8.0})
        plain = run(engine, prompt, SamplingParams(**base), f"plain-{temperature}")
        assert t in plain.outputs[0].token_ids, "the fixture must sample the word unbanned"
        out = run(engine, prompt, SamplingParams(**base, bad_words=[word, "unlikely words here"]), f"b-{temperature}")
        assert t not in out.outputs[0].token_ids and len(out.outputs[0].token_ids) == 12


def test_a_ban_on_every_allowed_token_is_refused_and_bad_values_name_the_field(engine):
    word, t = one_token_word(engine.tokenizer)
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request("x", [5, 6], SamplingParams(allowed_token_ids=[t], bad_words=[word]))
    assert e.value.param == "bad_words"
    for bad in (["ok", " "], "word", ["x"] * 257, ["y" * 257], [3]):
        with pytest.raises(InvalidRequestError) as e:
            engine.add_request("y", [5, 6], SamplingParams(bad_words=bad))
        assert e.value.param == "bad_words"
    assert not engine.has_unfinished_requests()
