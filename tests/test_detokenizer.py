"""Incremental detokenizer and stop strings, with the tiny model's real sentencepiece tokenizer."""

from __future__ import annotations

import random

from engine_helpers import tiny_model_dir
from nsa_serve.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from nsa_serve.tokenizer import Tokenizer


def tokenizer():
    return Tokenizer(tiny_model_dir(True) / "tokenizer.model")


def stream(tok, prompt_ids, ids):
    d = IncrementalDetokenizer(tok, prompt_ids)
    deltas = [d.add(t) for t in ids]
    deltas.append(d.flush())
    return deltas


def test_deltas_add_up_to_the_full_decode_and_never_split_characters():
    tok = tokenizer()
    text = "Grüße aus Köln → 東京 and naïve café ✓, then plain words."
    prompt = tok.encode("Translate:")
    ids = tok.encode(" " + text, add_bos=False)
    assert any(tok.id_to_piece(i).startswith("<0x") for i in ids)  # multi-byte characters as bytes
    deltas = stream(tok, prompt, ids)
    full = tok.decode(prompt + ids)[len(tok.decode(prompt)):]
    assert "".join(deltas) == full
    assert all("\ufffd" not in d for d in deltas)


def test_random_token_streams_match_decode():
    tok = tokenizer()
    rng = random.Random(0)
    for _ in range(20):
        prompt = [rng.randrange(8, tok.vocab_size) for _ in range(rng.randint(1, 8))]
        ids = [rng.randrange(8, tok.vocab_size) for _ in range(rng.randint(1, 30))]
        joined = "".join(stream(tok, prompt, ids))
        # Random bytes may be invalid UTF-8; what was emitted is still what decoding says.
        assert joined == tok.decode(prompt[-6:] + ids)[len(tok.decode(prompt[-6:])):]


def test_invalid_bytes_do_not_stall_the_stream():
    tok = tokenizer()
    lone = tok.sp.piece_to_id("<0xE6>")  # a lead byte never completed
    d = IncrementalDetokenizer(tok, [])
    out = [d.add(lone)] + [d.add(lone) for _ in range(4)]
    assert "".join(out) != ""  # emitted (as U+FFFD) after at most 4 held tokens


def test_stop_string_matcher_finds_the_earliest_and_holds_back_a_possible_start():
    m = StopStringMatcher(["STOP", "xy"])
    assert m.find("abcST", 2) is None
    assert m.visible("abcST", finished=False) == 2  # "cST" could begin "STOP"
    assert m.find("abcSTOP and xy", 9) == (3, "STOP")
    assert StopStringMatcher(["STOP"], include_in_output=True).find("abSTOP", 4) == (6, "STOP")
    assert m.visible("abc", finished=True) == 3
