"""Synthetic retrieval tasks and the curriculum: exact lengths, answers where the mask says, the chat
template the server uses, and per-step determinism (what makes resume exact)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from nsa_serve.tokenizer import Tokenizer, render_chat
from nsa_serve.train.batches import Phase, StepSampler, parse_curriculum, phase_at, seqs_per_step
from nsa_serve.train.evaluate import build_passkey_cases
from nsa_serve.train.tasks import (GREETING_REPLIES, GREETINGS, TaskBuilder, passkey_answer, passkey_messages,
                                   passkey_needle)
from nsa_serve.train.tokens import read_tokens

from train_helpers import prepared_data


@pytest.fixture(scope="module")
def builder():
    data = prepared_data()
    tok = Tokenizer(data / "tokenizer.model")
    return tok, TaskBuilder(tok, read_tokens(data / "train.bin"))


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_sample_layout(builder, depth):
    tok, tb = builder
    s = tb.passkey(np.random.default_rng(0), 400, depth=depth, key="40213")
    assert s.ids.shape == (401,) and s.answer.shape == (400,) and s.ids[0] == tok.bos_id
    text = tok.decode(s.ids.tolist())
    assert text.startswith(render_chat([{"role": "user", "content": ""}])[:9])  # "<|user|>\n"
    assert passkey_needle("40213") in text
    assert text.endswith("What is the pass key?<|end|>\n<|assistant|>\n" + passkey_answer("40213") + "<|end|>\n")
    # The mask covers exactly the reply (targets are ids[1:]).
    assert tok.decode(s.ids[1:][s.answer].tolist()) == passkey_answer("40213") + "<|end|>\n"
    # The needle sits at the requested depth of the filler.
    where = text.index(passkey_needle("40213")) / len(text)
    assert abs(where - (0.1 + 0.8 * depth)) < 0.25


def test_passkey_prompt_matches_the_eval_messages(builder):
    tok, tb = builder
    s = tb.passkey(np.random.default_rng(1), 300, depth=0.5, key="777")
    text = tok.decode(s.ids.tolist())
    prompt = text[: text.index("<|assistant|>\n") + len("<|assistant|>\n")]
    before, after = prompt.split(passkey_needle("777"))
    header = passkey_messages("", "", "777")[0]["content"].split("\n\n")[0]
    filler_before = before.split(header + "\n\n", 1)[1][:-1]
    filler_after = after[1:].rsplit("\n\nWhat is the pass key?", 1)[0]
    assert render_chat(passkey_messages(filler_before, filler_after, "777")) == prompt


def test_kv_lookup_answer_is_in_the_records(builder):
    tok, tb = builder
    s = tb.kv_lookup(np.random.default_rng(2), 300)
    assert s.ids.shape[0] <= 301
    text = tok.decode(s.ids.tolist())
    answer = tok.decode(s.ids[1:][s.answer].tolist())
    key, value = answer.removeprefix("The value of ").split(" is ")
    value = value.removesuffix(".<|end|>\n")
    assert f"\n{key}: {value}\n" in text
    assert f"What is the value of {key}?" in text
    # Whole-prompt tokenization (what the server does) gives the same ids.
    assert tok.encode(text) == s.ids.tolist()


def test_continuation_chat_ends_its_turn(builder):
    tok, tb = builder
    s = tb.continuation(np.random.default_rng(3), 200)
    assert s.ids.shape == (201,)
    reply = tok.decode(s.ids[1:][s.answer].tolist())
    assert reply.endswith("<|end|>\n") and len(reply) > 20
    assert "<|assistant|>\n" + reply in tok.decode(s.ids.tolist())


def test_too_short_lengths_fail_clearly(builder):
    _, tb = builder
    with pytest.raises(ValueError, match="passkey needs at least"):
        tb.passkey(np.random.default_rng(0), 10)


def test_curriculum_parse_and_phases():
    phases = parse_curriculum("128:2:0.1,256:1:0.5,512:1:0.9")
    assert [p.seq_len for p in phases] == [128, 256, 512]
    assert abs(sum(p.frac for p in phases) - 1) < 1e-9
    got = [phase_at(phases, s, 100).seq_len for s in (0, 49, 50, 74, 75, 99)]
    assert got == [128, 128, 256, 256, 512, 512]
    assert seqs_per_step(phases[0], 1024) == 8 and seqs_per_step(phases[2], 256) == 1
    for bad in ("128:1", "32:1:0.1", "256:1:0.1,128:1:0.1", "128:1:1.5"):
        with pytest.raises(ValueError):
            parse_curriculum(bad)


def test_step_samples_depend_only_on_seed_and_step(builder):
    tok, tb = builder
    data = read_tokens(prepared_data() / "train.bin")
    a, b = StepSampler(data, tb, seed=5), StepSampler(data, tb, seed=5)
    phase = Phase(320, 1.0, 0.5)
    for step in (7, 3, 7):
        x, y = a.step(step, phase, 4), b.step(step, phase, 4)
        assert [s.ids.tolist() for s in x] == [s.ids.tolist() for s in y]
    kinds = {s.kind for st in range(40) for s in a.step(st, phase, 4)}
    assert kinds == {"text", "passkey", "kv", "chat"}
    assert a.step(1, phase, 4)[0].ids.tolist() != StepSampler(data, tb, seed=6).step(1, phase, 4)[0].ids.tolist()


def test_eval_cases_hit_their_lengths(builder):
    tok, _ = builder
    held = read_tokens(prepared_data() / "heldout.bin")
    cases = build_passkey_cases(tok, held, [300, 600], samples=3, seed=0)
    assert [c.length for c in cases] == [300] * 3 + [600] * 3
    for c in cases:
        assert c.prompt_tokens <= c.length and c.prompt_tokens > c.length - 80
        assert passkey_needle(c.key) in c.messages[0]["content"] and len(c.key) == 5


def test_task_mix(builder):
    from nsa_serve.train.batches import parse_task_mix

    assert parse_task_mix("2,1,1") == (0.5, 0.25, 0.25)
    assert parse_task_mix("2,1,0,1") == (0.5, 0.25, 0.0)
    for bad in ("1,1", "a,b,c", "-1,1,1", "0,0,0", "1,1,1,1,1"):
        with pytest.raises(ValueError):
            parse_task_mix(bad)
    _, tb = builder
    only_passkey = StepSampler(read_tokens(prepared_data() / "train.bin"), tb, seed=0,
                               task_mix=parse_task_mix("1,0,0"))
    kinds = {s.kind for st in range(10) for s in only_passkey.step(st, Phase(320, 1.0, 1.0), 3)}
    assert kinds == {"passkey"}


QUESTION_WORDS = {"What", "is", "Tell", "me", "about", "Explain", "does", "do", "How", "I", "use", "Describe", "Can",
                  "you", "tell", "what", "means"}


@pytest.mark.parametrize("length", [300, 777, 2048])
def test_dialog_turns_fill_the_length_and_mark_the_replies(builder, length):
    tok, tb = builder
    whole = []
    for seed in range(4):
        s = tb.dialog(np.random.default_rng([length, seed]), length)
        assert s.ids.shape[0] == length + 1 and s.answer.shape[0] == length and s.kind == "dialog"
        assert s.ids[0] == tok.bos_id
        text = tok.decode(s.ids.tolist())
        turns = text.split("<|user|>")[1:]
        assert turns and text.startswith("<|user|>")
        # The answer mask covers exactly the assistant replies and their <|end|>: decoding the marked
        # targets gives every reply in order and no user text.
        answer_text = tok.decode(s.ids[1:][s.answer].tolist())
        assert "<|user|>" not in answer_text and "<|assistant|>" not in answer_text
        replies = [t.split("<|assistant|>\n", 1)[1] for t in turns if "<|assistant|>\n" in t]
        assert answer_text.replace(" ", "") == "".join(replies).replace(" ", "")
        # Every turn but the last is whole; the last is cut where the length ends.
        for i, turn in enumerate(turns):
            question, _, reply = turn.partition("<|assistant|>\n")
            if i < len(turns) - 1:
                assert question.endswith("<|end|>\n") and reply.endswith("<|end|>\n"), turn
                reply = reply[: -len("<|end|>\n")]
                # A whole reply is whole sentences: a capital first, a sentence end last (but for a
                # draw that found no sentence end within 2n tokens: rare in real text, see below).
                assert reply.lstrip()[:1].isupper(), reply
                whole.append(reply.rstrip().rstrip("\"')]")[-1:] in ".!?")
            if i < len(turns) - 1 and (i > 0 or reply not in GREETING_REPLIES):
                # Each whole question asks about a word that its reply contains.
                word = next(w for w in re.findall(r"[A-Za-z_]+", question.split("<|end|>")[0])
                            if w not in QUESTION_WORDS)
                assert word in reply or word == "this", (word, reply[:200])
    assert sum(whole) >= 0.9 * len(whole), whole


def test_dialog_greetings_open_a_quarter_of_the_samples(builder):
    tok, tb = builder
    greeted = 0
    for seed in range(200):
        text = tok.decode(tb.dialog(np.random.default_rng(seed), 400).ids.tolist())
        first = text.split("<|user|>\n", 1)[1].split("<|end|>")[0]
        if first in GREETINGS:
            greeted += 1
            reply = text.split("<|assistant|>\n", 1)[1].split("<|end|>")[0]
            assert reply in GREETING_REPLIES, reply
    assert 30 <= greeted <= 70, greeted  # GREETING_SHARE = 0.25 of 200: 50 ± 3 sd


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_dialog_greeting_share_is_the_builders(builder, share):
    # `--greeting-share` (TaskBuilder's greeting_share): none, or every sample, opens with a greeting.
    tok, tb = builder
    tb = TaskBuilder(tok, tb.filler, greeting_share=share)
    firsts = [tok.decode(tb.dialog(np.random.default_rng(seed), 400).ids.tolist()).split("<|user|>\n", 1)[1]
              .split("<|end|>")[0] for seed in range(30)]
    assert sum(f in GREETINGS for f in firsts) == round(share * 30), firsts
    with pytest.raises(ValueError):
        TaskBuilder(tok, tb.filler, greeting_share=1.5)


def test_passage_runs_from_a_sentence_start_to_a_sentence_end_inside_one_document(builder):
    tok, _ = builder
    docs = ["intro words then. First sentence of one. Second sentence is here! Third one, with more words?",
            "Another document starts. It has two sentences."]
    stream = []
    for d in docs:
        stream += [tok.bos_id] + tok.encode(d, add_bos=False) + [tok.eos_id]
    tb = TaskBuilder(tok, np.asarray(stream * 3, dtype=np.uint16))
    seen = set()
    for seed in range(40):
        n = 30 + seed % 20
        out = tb._passage(np.random.default_rng(seed), n)
        text = tok.decode(out).strip()
        assert 0 < len(out) <= 2 * n
        assert tok.bos_id not in out and tok.eos_id not in out  # never across a document boundary
        assert text[0].isupper() and text[-1] in ".!?", text
        assert any(text in d for d in docs), text
        seen.add(text)
    assert len(seen) > 1


def test_dialog_share_of_the_task_mix(builder):
    from nsa_serve.train.batches import parse_task_mix

    _, tb = builder
    tokens = read_tokens(prepared_data() / "train.bin")
    mixed = StepSampler(tokens, tb, seed=0, task_mix=parse_task_mix("0,0,1,1"))
    kinds = {s.kind for st in range(12) for s in mixed.step(st, Phase(320, 1.0, 1.0), 3)}
    assert kinds == {"chat", "dialog"}
    # Three numbers and "...,0" draw the same samples (the shipped model's recipe is unchanged).
    a = StepSampler(tokens, tb, seed=0, task_mix=parse_task_mix("0.5,0.2,0.3"))
    b = StepSampler(tokens, tb, seed=0, task_mix=parse_task_mix("0.5,0.2,0.3,0"))
    for st in range(5):
        for x, y in zip(a.step(st, Phase(320, 1.0, 1.0), 3), b.step(st, Phase(320, 1.0, 1.0), 3)):
            assert np.array_equal(x.ids, y.ids) and x.kind == y.kind
