"""Speculative decoding by n-gram lookup: the draft lookup against a brute-force twin, and the
engine with drafts against plain decoding — greedy tokens equal to the reference model's, token
for token, through preemption, stops, n > 1 and the prefix cache; no page leaked."""

from __future__ import annotations

import argparse
import random

import numpy as np
import pytest
import torch

from engine_helpers import looping_prompts, make_engine, random_prompts, reference_greedy, single_thread_torch
from nsa_serve.engine.ngram import TokenBuffer, find_draft
from nsa_serve.engine.protocol import SamplingParams
from prepare_reference import assert_same, prepare_reference

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread_torch)


def brute_force_draft(tokens: list[int], k: int, nmin: int, nmax: int) -> list[int]:
    L = len(tokens)
    for n in range(nmax, nmin - 1, -1):
        if n >= L:
            continue
        suffix = tokens[L - n:]
        for e in range(L - 2, n - 2, -1):  # latest occurrence ending before the last token
            if tokens[e - n + 1:e + 1] == suffix:
                return tokens[e + 1:e + 1 + k]
    return []


@pytest.mark.parametrize("seed", range(6))
def test_draft_lookup_equals_its_brute_force_twin(seed):
    rng = random.Random(seed)
    for _ in range(300):
        vocab = rng.choice([2, 3, 5, 20])
        tokens = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        nmin = rng.randint(1, 4)
        nmax = rng.randint(nmin, 6)
        k = rng.randint(1, 6)
        got = find_draft(np.asarray(tokens, dtype=np.int64), k, nmin, nmax)
        assert got == brute_force_draft(tokens, k, nmin, nmax), (tokens, k, nmin, nmax)


def test_token_buffer_follows_a_growing_list():
    buf, tokens, rng = TokenBuffer(), [], random.Random(0)
    for _ in range(50):
        tokens.extend(rng.randrange(100) for _ in range(rng.randint(0, 40)))
        assert buf.sync(tokens).tolist() == tokens


def prompts_that_repeat(n: int, seed: int) -> list[list[int]]:
    """Prompts with repeated stretches, so that n-gram drafts exist from the first step."""
    out = []
    for p in random_prompts(n, 12, 30, seed=seed):
        out.append(p + p[:len(p) // 2] + p)
    return out


class CheckedSteps(list):
    queries: list[int]

    def __init__(self):
        super().__init__()
        self.queries = []


def checked_prepare(engine) -> CheckedSteps:
    """Every step's inputs also built by the loop twin (tests/prepare_reference.py: the logits rows
    of verifying rows and attention's view of them included). Returns a list that gets, per step,
    how many extra rows drafts added; `.queries` gets, per step, how many more decode queries
    attention saw than the step had single-token rows (verifying tokens attending as decode rows)."""
    runner, fast = engine.runner, engine.runner.prepare
    extra_rows = CheckedSteps()

    def both(seqs, num_new):
        got = fast(seqs, num_new)
        assert_same(got, prepare_reference(runner, seqs, num_new), page_size=runner.P)
        extra_rows.append(len(got.sample_seqs) - len({id(s) for s in got.sample_seqs}))
        extra_rows.queries.append(got.num_decode - sum(1 for n in num_new if n == 1))
        return got

    runner.prepare = both
    return extra_rows


@pytest.mark.parametrize("k,as_decode", [(1, True), (3, True), (8, True), (3, False)],
                         ids=["k1", "k3", "k8", "k3-verify-as-chunks"])
def test_greedy_tokens_equal_the_reference_model_with_drafts(k, as_decode):
    # as_decode: verifying rows' tokens attend as decode rows (the default), or as the chunk they
    # are (what a piecewise step falls back to when its decode graphs hold fewer queries).
    engine = make_engine(num_speculative_tokens=k, prompt_lookup_min=1, prompt_lookup_max=3)
    engine.runner.verify_as_decode = as_decode
    extra = checked_prepare(engine)
    prompts = prompts_that_repeat(4, seed=40 + k) + random_prompts(2, 20, 50, seed=50 + k)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == reference_greedy(engine.model, prompt, 30)
    s = engine.stats()
    assert s.spec_decode_num_drafts_total > 0 and any(extra), "no step verified drafts"
    assert any(extra.queries) == as_decode and all(q >= 0 for q in extra.queries)
    assert 0 < s.spec_decode_num_accepted_tokens_total <= s.spec_decode_num_draft_tokens_total
    assert s.spec_decode_num_draft_tokens_total <= k * s.spec_decode_num_drafts_total
    # Fewer steps than tokens: accepted drafts came several a step.
    assert s.generation_tokens_total == 30 * len(prompts)
    engine.block_manager.check_all_free()


@pytest.mark.parametrize("decode_queries", [1, 4])
def test_piecewise_steps_verify_as_decode_rows_only_where_their_graphs_hold_the_queries(decode_queries):
    # A piecewise step's decode rows' graphs are sized for max_num_seqs × decode_queries rows. With
    # 1 a sequence (the engine's size without drafts) the verifying tokens of 3 sequences do not
    # fit, and the rows attend as chunks; with 1 + k they attend as decode rows. Either way the
    # inputs equal the loop twin's and the tokens the reference model's.
    from nsa_serve.engine.piecewise_graphs import PiecewiseSteps

    engine = make_engine(num_speculative_tokens=3, prompt_lookup_min=1, max_num_seqs=3)
    engine.runner.verify_as_decode = True  # (the engine's setting on CUDA)
    engine.runner.piecewise = PiecewiseSteps(engine.runner, 64, 3, engine.max_model_len,
                                             decode_queries=decode_queries)
    steps = checked_prepare(engine)
    prompts = prompts_that_repeat(3, seed=71)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == reference_greedy(engine.model, prompt, 16)
    assert any(steps), "no step verified drafts"
    assert any(steps.queries) == (decode_queries > 1)
    pw = engine.runner.piecewise
    assert pw is not None, "a piecewise step failed"  # (the engine detaches the path then)
    assert pw.decode_rows.steps > 0
    engine.block_manager.check_all_free()


def test_decode_graph_steps_verify_drafts_as_rows_of_their_own():
    # The fixed-shape (CUDA graph) decode path takes steps whose rows verify drafts when their
    # tokens attend as decode rows: a sequence's 1 + k tokens are 1 + k rows. Its host inputs equal
    # the loop twin's on every step (tests/prepare_reference.py), greedy tokens the reference
    # model's, and every page comes back. (On CPU the path runs the same inputs eagerly.)
    from nsa_serve.engine.decode_graphs import StaticDecode
    from prepare_reference import static_host_inputs_reference

    engine = make_engine(num_speculative_tokens=3, prompt_lookup_min=1, num_pages=48)
    engine.runner.verify_as_decode = True  # (the engine's setting on CUDA)
    static = engine.runner.static_decode = StaticDecode(engine.runner, 16, engine.max_model_len)
    fast, rows = static.host_inputs, []

    def both(seqs, size, out=None, num_new=None):
        got = fast(seqs, size, out, num_new)
        want = static_host_inputs_reference(static, seqs, size, num_new)
        for key in want:
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
        rows.append((len(seqs), sum(num_new) if num_new else len(seqs)))
        return got

    static.host_inputs = both
    prompts = prompts_that_repeat(4, seed=81)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == reference_greedy(engine.model, prompt, 24)
    assert any(r > n for n, r in rows), "no verifying step took the fixed-shape path"
    assert engine.runner.static_decode is static  # no step failed on it
    assert engine.stats().spec_decode_num_accepted_tokens_total > 0
    engine.block_manager.check_all_free()


def test_a_small_pool_preempts_and_drafts_never_cost_a_preemption():
    # 20 pages of 16 tokens for 6 sequences growing to ~110 tokens: preemption must happen, and the
    # tokens still equal the reference model's.
    engine = make_engine(num_speculative_tokens=6, prompt_lookup_min=1, num_pages=20,
                         max_num_batched_tokens=64, long_prefill_token_threshold=32)
    checked_prepare(engine)
    prompts = prompts_that_repeat(6, seed=61)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == reference_greedy(engine.model, prompt, 24)
    assert engine.stats().num_preemptions_total > 0
    assert engine.stats().spec_decode_num_accepted_tokens_total > 0
    engine.block_manager.check_all_free()


def test_a_sequence_with_drafts_drops_them_rather_than_preempt_another():
    engine = make_engine(num_speculative_tokens=8, prompt_lookup_min=1, num_pages=12)
    sched, bm = engine.scheduler, engine.block_manager
    P = bm.page_size
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    engine.add_request("a", [9, 10, 11, 12, 13] * 6, greedy)  # 30 tokens: 2 pages of 16, room for 2 more
    engine.add_request("b", [14, 15, 16] * 10, greedy)
    engine.step()  # both prefilled, each with its first token sampled
    a, b = sorted(sched.running, key=lambda s: s.request_id)
    assert bm.allocate(b, (len(b.block_table) + bm.num_free_pages) * P) and bm.num_free_pages == 0
    room = len(a.block_table) * P - a.num_tokens  # tokens a can still add without a new page
    assert room >= 0
    a.token_ids.extend([1] * (room + 2))  # drafts that need one more page
    a.num_draft = room + 2
    batch = sched.schedule()
    assert sched.num_preemptions == 0 and a.num_draft == 0 and b in sched.running
    assert dict(zip(batch.seqs, batch.num_new_tokens))[a] == 1


def test_stops_max_tokens_and_n_cut_verified_rows_where_plain_decoding_would():
    plain = make_engine()
    spec = make_engine(num_speculative_tokens=5, prompt_lookup_min=1)
    prompts = looping_prompts(plain, 3, seed=71)
    base = plain.generate(prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    for prompt, b in zip(prompts, base):
        toks = b.outputs[0].token_ids
        stop_id = toks[len(toks) // 2]
        text = b.outputs[0].text
        stop_str = text[len(text) // 3:len(text) // 3 + 3]
        cases = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (1, 2, 3, 7)]
        cases += [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=[stop_id]),
                  SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop_str]),
                  SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, n=2)]
        for sp in cases:
            want = plain.generate([prompt], sp)[0]
            got = spec.generate([prompt], sp)[0]
            assert [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in got.outputs] == \
                [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in want.outputs], sp
    assert spec.stats().spec_decode_num_accepted_tokens_total > 0
    spec.block_manager.check_all_free()


def test_sampling_with_drafts_keeps_the_distribution_of_each_token():
    plain = make_engine()
    engine = make_engine(num_speculative_tokens=4, prompt_lookup_min=1)
    prompts = looping_prompts(plain, 3, seed=81)
    # top_k = 1 at temperature 1 samples the argmax: the greedy reference, through the random path.
    outs = engine.generate(prompts, SamplingParams(temperature=1.0, top_k=1, max_tokens=20, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == reference_greedy(engine.model, prompt, 20)
    assert engine.stats().spec_decode_num_accepted_tokens_total > 0
    # Real sampling: the tokens after a fixed prompt are drawn from the model's distribution
    # whether a draft was accepted or rejected. The two engines' frequencies of the first four
    # tokens over 300 draws each agree (total variation of a few hundred draws: ~0.1).
    prompt = prompts[0] + outs[0].outputs[0].token_ids  # ends inside the model's loop: drafts from the start
    sp = SamplingParams(temperature=0.6, top_k=2, max_tokens=4, ignore_eos=True)
    freqs = []
    for e in (plain, engine):
        before = e.stats().spec_decode_num_accepted_tokens_total
        draws = [tuple(o.outputs[0].token_ids) for _ in range(3) for o in e.generate([prompt] * 100, sp)]
        freqs.append({t: draws.count(t) / len(draws) for t in set(draws)})
    assert engine.stats().spec_decode_num_accepted_tokens_total - before > 30  # both paths taken
    keys = set(freqs[0]) | set(freqs[1])
    tv = sum(abs(freqs[0].get(t, 0) - freqs[1].get(t, 0)) for t in keys) / 2
    assert tv < 0.2, freqs
    engine.block_manager.check_all_free()


def test_rows_with_penalties_min_tokens_and_bad_words_sample_each_position_with_its_own_history():
    # The drafts after a verifying row's position are not its history: penalties, bad words and
    # the min_tokens count see only the tokens before it, so the outputs are plain decoding's.
    plain = make_engine()
    spec = make_engine(num_speculative_tokens=4, prompt_lookup_min=1)
    tok = plain.tokenizer
    prompts = looping_prompts(plain, 3, seed=91)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    base = [o.outputs[0].token_ids for o in plain.generate(prompts, greedy)]
    accepted = 0
    for prompt, toks in zip(prompts, base):
        word = tok.decode(toks[4:6]).strip() or "x"
        cases = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=1.1),
                 SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, presence_penalty=0.3,
                                frequency_penalty=0.2),
                 SamplingParams(temperature=1.0, top_k=1, max_tokens=24, ignore_eos=True, repetition_penalty=1.1),
                 SamplingParams(temperature=0, max_tokens=24, min_tokens=12, stop_token_ids=[toks[2]]),
                 SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, bad_words=[word])]
        for sp in cases:
            before = spec.stats().spec_decode_num_accepted_tokens_total
            want = plain.generate([prompt], sp)[0].outputs[0]
            got = spec.generate([prompt], sp)[0].outputs[0]
            assert (got.token_ids, got.finish_reason) == (want.token_ids, want.finish_reason), sp
            accepted += spec.stats().spec_decode_num_accepted_tokens_total - before
    assert accepted > 0
    spec.block_manager.check_all_free()


def test_rows_with_a_seed_or_a_grammar_do_not_speculate():
    from nsa_serve.engine.structured import StructuredOutput

    engine = make_engine(num_speculative_tokens=4, prompt_lookup_min=1)
    prompts = prompts_that_repeat(2, seed=92)
    for sp in (SamplingParams(temperature=0.7, max_tokens=12, ignore_eos=True, seed=5),
               SamplingParams(temperature=0, max_tokens=12, structured=StructuredOutput("regex", "(ab)+"))):
        engine.generate(prompts, sp)
        assert engine.stats().spec_decode_num_drafts_total == 0, sp


def test_pages_cached_after_verified_rows_hold_the_right_tokens():
    # A second request whose prompt is the first's prompt and output finds the pages the verified
    # rows filled in the prefix cache; its greedy tokens are still the reference model's.
    engine = make_engine(num_speculative_tokens=6, prompt_lookup_min=1)
    prompt = looping_prompts(engine, 1, seed=101)[0]
    accepted = engine.stats().spec_decode_num_accepted_tokens_total
    first = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))[0]
    assert engine.stats().spec_decode_num_accepted_tokens_total > accepted
    follow = prompt + first.outputs[0].token_ids
    hits = engine.block_manager.prefix_hits
    second = engine.generate([follow], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    assert engine.block_manager.prefix_hits - hits >= len(follow) // 16 * 16 - 16
    assert second.outputs[0].token_ids == reference_greedy(engine.model, follow, 10)


def test_speculation_settings_are_checked():
    from nsa_serve.api.cli import speculative_config
    from nsa_serve.engine.args import EngineArgs

    assert speculative_config('{"method": "ngram", "num_speculative_tokens": 3}') == {"num_speculative_tokens": 3}
    assert speculative_config('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5}') == \
        {"num_speculative_tokens": 3, "prompt_lookup_max": 5, "prompt_lookup_min": 2}
    for bad, match in (('{"method": "eagle", "num_speculative_tokens": 3}', "not built"),
                       ('{"method": "ngram"}', "required"),
                       ('{"method": "ngram", "num_speculative_tokens": "3"}', "integer"),
                       ('{"method": "ngram", "num_speculative_tokens": 3, "model": "x"}', "unknown keys"),
                       ("[1]", "JSON object")):
        with pytest.raises(argparse.ArgumentTypeError, match=match):
            speculative_config(bad)
    with pytest.raises(ValueError, match="async scheduling"):
        EngineArgs(num_speculative_tokens=2, async_scheduling=True).validate()
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        EngineArgs(num_speculative_tokens=2, prompt_lookup_min=3, prompt_lookup_max=2).validate()
    assert not EngineArgs(num_speculative_tokens=2).resolved("cuda").async_scheduling
    with pytest.raises(ValueError, match="shared K/V"):
        make_engine(shared_kv=False, num_speculative_tokens=2)


def test_the_offline_class_and_the_cli_take_vllms_speculative_config():
    from engine_helpers import tiny_model_dir
    from nsa_serve import LLM
    from nsa_serve.cli import build_parser

    llm = LLM(str(tiny_model_dir(True)), device="cpu", dtype="float32", num_pages=64,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2})
    args = llm.engine.args
    assert (args.num_speculative_tokens, args.prompt_lookup_max, args.prompt_lookup_min) == (3, 2, 2)
    with pytest.raises(ValueError, match="not built"):
        LLM(str(tiny_model_dir(True)), device="cpu", speculative_config={"method": "eagle",
                                                                          "num_speculative_tokens": 3})
    parsed = build_parser().parse_args(["serve", "--speculative-config",
                                        '{"method": "ngram", "num_speculative_tokens": 5}'])
    assert parsed.speculative_config == {"num_speculative_tokens": 5}


@pytest.mark.gpu
@pytest.mark.parametrize("as_decode", [True, False], ids=["verify-as-decode", "verify-as-chunks"])
def test_gpu_speculation_keeps_the_greedy_tokens_of_plain_decoding(as_decode):
    """On CUDA as served (Triton kernels, decode graphs, piecewise graphs; float32, so that the
    prefill kernel's and the decode kernel's different rounding should not flip a greedy token):
    the tokens of plain decoding, with drafts accepted, and every page back — verifying rows
    attending as decode rows (the engine's way on CUDA) and as chunks (its fallback)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    plain = make_engine(True, device="cuda", num_pages=256, precompile=False)
    plain.warmup()
    prompts = looping_prompts(plain, 4, seed=111, max_tokens=40)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    spec = make_engine(True, device="cuda", num_pages=256, precompile=False, num_speculative_tokens=4,
                       prompt_lookup_min=1)
    spec.warmup()
    assert not spec.args.async_scheduling and spec.runner.static_decode is not None
    assert spec.runner.verify_as_decode  # the default on CUDA
    spec.runner.verify_as_decode = as_decode
    got = [o.outputs[0].token_ids for o in spec.generate(prompts, params)]
    assert got == want
    s = spec.stats()
    assert s.spec_decode_num_accepted_tokens_total > 0
    spec.block_manager.check_all_free()


def test_prefix_cache_pages_registered_after_verified_rows_hash_their_whole_tokens():
    # Every page the prefix cache holds is keyed by its P tokens (and the tail after them) and
    # chained onto its parent: registration after a verifying row must see the accepted tokens.
    engine = make_engine(num_speculative_tokens=6, prompt_lookup_min=1)
    bm = engine.block_manager
    prompts = looping_prompts(engine, 3, seed=121, max_tokens=80)
    engine.generate(prompts, SamplingParams(temperature=0, max_tokens=80, ignore_eos=True))
    assert engine.stats().spec_decode_num_accepted_tokens_total > 0
    keys = [(page, bm.page_key[page]) for page in range(bm.num_pages) if bm.page_hash[page] is not None]
    assert keys
    for page, (parent, tokens, tail) in keys:
        assert len(tokens) == bm.page_size and len(tail) == bm.summary_tail, page
        assert bm.chain_hash(parent, tokens) == bm.page_hash[page]
    # and a prompt made of a prompt and its whole answer finds all of its complete pages
    first = engine.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=80, ignore_eos=True))[0]
    follow = prompts[0] + first.outputs[0].token_ids
    hits = bm.prefix_hits
    engine.generate([follow], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    P = bm.page_size
    assert bm.prefix_hits - hits == (len(follow) - 1 - bm.summary_tail) // P * P


@pytest.mark.parametrize("decode_graphs", [False, True], ids=["mixed-step path", "decode graphs"])
def test_logprobs_of_verified_rows_are_each_positions_own(decode_graphs):
    # Rows asking for logprobs speculate: each token's logprob and top alternatives are the model's
    # at that token's position, as plain decoding reports them; greedy rows under a repetition
    # penalty keep plain decoding's tokens. decode_graphs: the verifying steps through the
    # fixed-shape decode path (its verifying tokens as rows, as on CUDA; eager here).
    from nsa_serve.engine.decode_graphs import StaticDecode

    plain = make_engine()
    spec = make_engine(num_speculative_tokens=4, prompt_lookup_min=1)
    verifying_steps = []
    if decode_graphs:
        spec.runner.verify_as_decode = True
        static = spec.runner.static_decode = StaticDecode(spec.runner, 16, spec.max_model_len)
        prepare = static.prepare

        def counted(seqs, num_new=None):
            verifying_steps.append(num_new is not None)
            return prepare(seqs, num_new)

        static.prepare = counted
    prompts = looping_prompts(plain, 2, seed=141)
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3)
    for want, got in zip(plain.generate(prompts, sp), spec.generate(prompts, sp)):
        w, g = want.outputs[0], got.outputs[0]
        assert g.token_ids == w.token_ids
        assert [lp.token_id for lp in g.logprobs] == g.token_ids
        for a, b in zip(g.logprobs, w.logprobs):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _, _ in a.top] == [t for t, _, _ in b.top]
            assert [v for _, _, v in a.top] == pytest.approx([v for _, _, v in b.top], abs=1e-4)
    penalised = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=1.3)
    assert ([o.outputs[0].token_ids for o in spec.generate(prompts, penalised)]
            == [o.outputs[0].token_ids for o in plain.generate(prompts, penalised)])
    assert spec.stats().spec_decode_num_accepted_tokens_total > 0
    assert any(verifying_steps) == decode_graphs
    spec.block_manager.check_all_free()


def test_a_verifying_rows_penalties_and_min_tokens_see_only_the_tokens_before_it():
    # Sequence: prompt [1, 2], output [3], drafts [4, 5, 6]; its 4 rows sample after 3, 4, 5, 6.
    from nsa_serve.engine.sampler import Sampler
    from nsa_serve.engine.sequence import Sequence

    def verifying(params):
        seq = Sequence("r", 0, [1, 2], params, 0.0)
        seq.token_ids += [3, 4, 5, 6]
        seq.num_draft = 3
        return seq

    logits = torch.full((4, 10), -1.0)
    logits[:, 5], logits[:, 7] = 2.0, 1.5  # 5 wins unless penalised (2.0 / 2 < 1.5)
    seq = verifying(SamplingParams(temperature=0, repetition_penalty=2.0))
    got = [r.token_id for r in Sampler(10, [9])(logits, [seq] * 4)]
    assert got == [5, 5, 7, 7]  # 5 is history from the row after draft 2 (token 5) on
    logits[:, 9] = 3.0  # the stop token, banned while fewer than 3 tokens are out
    seq = verifying(SamplingParams(temperature=0, min_tokens=3))
    got = [r.token_id for r in Sampler(10, [9])(logits, [seq] * 4)]
    assert got == [5, 5, 9, 9]  # rows see 1, 2, 3, 4 output tokens


def test_dense_attention_mode_speculates_with_the_same_tokens():
    # --attention dense (the comparison mode) verifies drafts through its own prefill path.
    plain = make_engine(attention="dense")
    spec = make_engine(attention="dense", num_speculative_tokens=4, prompt_lookup_min=1)
    prompts = looping_prompts(plain, 2, seed=151)
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in spec.generate(prompts, sp)] == \
        [o.outputs[0].token_ids for o in plain.generate(prompts, sp)]
    assert spec.stats().spec_decode_num_accepted_tokens_total > 0
    spec.block_manager.check_all_free()
