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
