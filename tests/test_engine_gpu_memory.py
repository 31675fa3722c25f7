"""GPU memory given back between engines built in turn in one process (`nsa-serve bench
--attention both` builds an NSA engine, then a dense one, over the same model)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from engine_helpers import make_engine, single_thread_torch
from nsa_serve.cli import main
from nsa_serve.engine import bench
from nsa_serve.engine.llm_engine import LLMEngine
from nsa_serve.engine.model_runner import ModelRunner

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread_torch)


def test_bench_releases_memory_once_no_engine_is_left(monkeypatch):
    # The release between modes must come when nothing refers to the finished engine or its runner
    # (their cache would stay allocated, out of the next engine's pool).
    made, alive = [], []

    def engine(*args, **kwargs):
        eng = LLMEngine(*args, **kwargs)
        made.extend([weakref.ref(eng), weakref.ref(eng.runner)])
        return eng

    def release():
        gc.collect()
        alive.append(sum(r() is not None for r in made))

    monkeypatch.setattr(bench, "LLMEngine", engine)
    monkeypatch.setattr(bench, "release_device_memory", release)
    rc = main(["bench", "--preset", "tiny", "--set", "num_layers=1", "--num-requests", "2", "--input-len", "30",
               "--output-len", "3", "--device", "cpu", "--num-pages", "64"])
    assert rc == 0 and len(made) == 4 and alive == [0, 0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_page_pool_counts_blocks_a_dropped_engine_left_cached():
    kw = dict(device="cuda", dtype="bfloat16", num_pages=None, gpu_memory_utilization=0.3, enforce_eager=True,
              precompile=False, max_num_seqs=4, max_num_batched_tokens=96, long_prefill_token_threshold=40)
    first = make_engine(**kw)
    n = first.block_manager.num_pages
    cache_bytes = torch.cuda.memory_allocated()
    del first
    gc.collect()
    # The precondition: torch's allocator keeps the dropped cache's blocks (reserved, not allocated).
    assert torch.cuda.memory_reserved() - torch.cuda.memory_allocated() > cache_bytes // 2
    second = make_engine(**kw)
    assert second.block_manager.num_pages >= 0.95 * n


@pytest.mark.parametrize("shared_kv", [True, False])
def test_memory_profile_runs_a_chunk_at_the_longest_context(monkeypatch, shared_kv):
    # A chunk's attention scratch grows with its context, so the profile's step must hold a chunk
    # ending at max_model_len, not fresh prompts alone.
    eng = make_engine(shared_kv=shared_kv, max_model_len=4000)
    steps = []
    prepare = ModelRunner.prepare

    def spy(self, seqs, num_new):
        steps.append([(s.num_computed_tokens + n, n) for s, n in zip(seqs, num_new)])
        return prepare(self, seqs, num_new)

    monkeypatch.setattr(ModelRunner, "prepare", spy)
    eng._profile_step()
    assert len(steps) == 1
    chunk = eng._max_chunk()
    # Rows are ordered by kind; every row here is a prompt chunk of the budget (96 = 40 + 40 + 16).
    assert sorted(n for _, n in steps[0]) == [16, chunk, chunk]
    assert max(ctx for ctx, _ in steps[0]) == 4000


def _profile_peak(eng) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    eng._profile_step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("attention", ["dense", "nsa"])
def test_gpu_memory_profile_counts_the_long_context_scratch(attention):
    # The profile's peak at max_model_len 8192 against 256 must grow by at least the scratch that
    # grows with the context: dense prefill's K and V gathered from their pages (every kv head, the
    # whole context, both alive while the chunk attends); NSA prefill's block scores (chunk rows ×
    # kv heads × blocks, fp32).
    kw = dict(device="cuda", dtype="bfloat16", enforce_eager=True, precompile=False, attention=attention)
    short, long = (_profile_peak(make_engine(max_model_len=n, **kw)) for n in (256, 8192))
    eng = make_engine(**kw)
    c, T = eng.config, eng._max_chunk()
    if attention == "dense":
        grows = c.num_kv_heads * (8192 - 256) * (c.head_dim_k + c.head_dim_v) * 2
    else:
        grows = T * c.num_kv_heads * (8192 - 256) // c.select_block * 4
    assert long - short >= grows, (short, long, grows)
