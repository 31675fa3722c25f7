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


class _SlowOnly:
    """The tokenizer without its per-piece texts: the detokenizer's two-decode path only."""

    def __init__(self, tok):
        self.decode = tok.decode


def test_fast_path_gives_the_same_deltas_as_two_decodes_a_token():
    # Ordinary pieces append their own text; bytes (multi-byte characters and junk), control and
    # unknown pieces, and whatever follows them, take the decode path. Step by step, the deltas
    # must be those of the decode-only detokenizer, and the fast path must actually be taken.
    tok = tokenizer()
    sp = tok.sp
    assert tok.appended_texts() is not None
    kinds = {"byte": [i for i in range(tok.vocab_size) if sp.is_byte(i)],
             "special": [0, 1, 2, 3, 7],  # unk, bos, eos, chat markers
             "ordinary": [i for i in range(tok.vocab_size) if tok.appended_texts()[i] is not None]}
    real = tok.encode(" Grüße aus Köln → 東京, naïve café ✓ and plain words again.", add_bos=False)
    rng = random.Random(1)
    fast_tokens = 0
    for trial in range(60):
        if trial % 3 == 0:
            ids = real[rng.randrange(len(real)):]
        else:
            pick = rng.choices(list(kinds), weights=[1, 1, 8], k=rng.randint(1, 40))
            ids = [rng.choice(kinds[k]) for k in pick]
        prompt = [rng.choice(kinds["ordinary"] + kinds["byte"]) for _ in range(rng.randint(1, 8))]
        fast, slow = IncrementalDetokenizer(tok, prompt), IncrementalDetokenizer(_SlowOnly(tok), prompt)
        for t in ids:
            before = fast.read_offset
            assert fast.add(t) == slow.add(t)
            fast_tokens += before == len(fast.ids) - 1 and tok.appended_texts()[t] is not None
        assert fast.flush() == slow.flush() and fast.text == slow.text
    assert fast_tokens > 200


def test_fast_path_is_off_when_the_decoder_does_not_concatenate_pieces():
    from nsa_serve.tokenizer import _concatenates

    tok = tokenizer()

    class SuffixSpace:  # a decoder that keeps the mark as a suffix: drops the last piece's space
        def __init__(self, sp):
            self.sp = sp

        def decode(self, ids):
            return self.sp.decode(ids).rstrip(" ")

        def __getattr__(self, name):
            return getattr(self.sp, name)

    texts = tok.appended_texts()
    assert _concatenates(tok.sp, texts)
    assert not _concatenates(SuffixSpace(tok.sp), texts)


def test_skip_special_tokens_leaves_generated_chat_markers_out_of_the_text():
    tok = tokenizer()
    marker = tok.sp.piece_to_id("<|tool|>")
    assert marker in tok.special_token_ids and len(tok.special_token_ids) == 5
    prompt = tok.encode("Say:")
    words = tok.encode(" hello there", add_bos=False)
    ids = words[:1] + [marker] + words[1:] + [marker]
    kept = "".join(stream(tok, prompt, ids))
    assert kept.count("<|tool|>") == 2
    d = IncrementalDetokenizer(tok, prompt, skip_special_tokens=True)
    skipped = "".join([d.add(t) for t in ids] + [d.flush()])
    assert skipped == "".join(stream(tok, prompt, words)) and "hello there" in skipped and "<|" not in skipped
