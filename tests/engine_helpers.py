"""Shared helpers for the engine tests: tiny test models (made once per process) and the
reference generation loop through `NSAModel.step`, which the engine must reproduce token for token."""

from __future__ import annotations

import atexit
import functools
import random
import shutil
import tempfile
from pathlib import Path

import torch

from nsa_serve.engine.args import EngineArgs
from nsa_serve.engine.llm_engine import LLMEngine
from nsa_serve.engine.protocol import SamplingParams
from nsa_serve.model.init_model import init_model


@functools.lru_cache(maxsize=None)
def tiny_model_dir(shared_kv: bool = True) -> Path:
    """A tiny random model directory, created once per test process (tokenizer training ~4 s)."""
    root = Path(tempfile.mkdtemp(prefix="nsa-engine-test-"))
    atexit.register(shutil.rmtree, root, True)
    return init_model(root / ("shared" if shared_kv else "independent"), "tiny",
                      seed=11 if shared_kv else 12, shared_kv=shared_kv)


def make_engine(shared_kv: bool = True, **overrides) -> LLMEngine:
    args = dict(model=str(tiny_model_dir(shared_kv)), device="cpu", dtype="float32", num_pages=256,
                max_num_batched_tokens=96, long_prefill_token_threshold=40, max_num_seqs=16)
    args.update(overrides)
    return LLMEngine(EngineArgs(**args))


@torch.no_grad()
def reference_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy decoding of one request alone through the reference incremental API."""
    cache = model.new_cache()
    logits = model.step(torch.tensor(prompt), cache)[-1]
    out = []
    for _ in range(max_tokens):
        tok = int(logits.argmax())
        out.append(tok)
        if len(out) == max_tokens:
            break
        logits = model.step(torch.tensor([tok]), cache)[-1]
    return out


def random_prompts(n: int, min_len: int, max_len: int, seed: int, vocab: int = 4096) -> list[list[int]]:
    rng = random.Random(seed)
    # Skip ids 0-7 (unk, bos, eos, chat markers) so greedy runs are not cut by a prompt token.
    return [[rng.randrange(8, vocab) for _ in range(rng.randint(min_len, max_len))] for _ in range(n)]


def repeats_a_token(tokens: list, times: int = 3) -> bool:
    """Whether some token comes `times` times in a row (where one-token n-gram drafts succeed)."""
    return any(len(set(tokens[i:i + times])) == 1 for i in range(len(tokens) - times + 1))


def looping_prompts(engine, n: int, seed: int, max_tokens: int = 30) -> list[list[int]]:
    """Prompts whose greedy output repeats a token several times in a row (the tiny random model
    falls into such loops), where one-token n-grams give drafts the model accepts."""
    found = []
    for attempt in range(20):
        prompts = random_prompts(8, 12, 30, seed=seed + 1000 * attempt)
        outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        found += [p for p, o in zip(prompts, outs) if repeats_a_token(o.outputs[0].token_ids)]
        if len(found) >= n:
            return found[:n]
    raise AssertionError(f"only {len(found)} of 160 prompts make the model repeat a token")


def single_thread_torch():
    """Generator for an autouse fixture: tiny models run fastest on one intra-op thread, and on a
    shared 2-core CI box extra threads mostly spin (measured: 30 s → 1.7 s for the 50-request test)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
