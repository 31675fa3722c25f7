"""What keeps a finished engine's GPU memory alive (CUDA only).

`nsa-serve bench --attention both` builds an NSA engine, then a dense one over the same model. On an
80 GB H100 (2026-12-05) the second engine's page pool came out at 532 pages: the first engine's
~65 GB of cache were still allocated after `run_mode` dropped it and collected garbage. This probe
builds engines one after another on one model, runs a request on each, drops it, and prints the
memory still allocated and, for the largest CUDA tensors left, what refers to them.

    python3 scripts/engine_teardown_probe.py [--preset small] [--eager] [--sync] [--input-len N]
        [--attention nsa --attention dense]
"""

from __future__ import annotations

import argparse
import gc
import sys

import torch

from nsa_serve.engine.args import EngineArgs
from nsa_serve.engine.llm_engine import LLMEngine
from nsa_serve.engine.protocol import SamplingParams
from nsa_serve.model.config import preset
from nsa_serve.model.nsa_model import NSAModel


def referrers(obj, depth: int = 3, seen=None) -> list[str]:
    """A few referrer chains of `obj`, as type names (frames and this function's lists skipped)."""
    seen = seen if seen is not None else {id(obj)}
    out = []
    for r in gc.get_referrers(obj):
        if id(r) in seen or type(r).__name__ in ("frame", "list") and depth == 3:
            continue
        seen.add(id(r))
        name = type(r).__name__
        if isinstance(r, dict):
            keys = [k for k, v in r.items() if v is obj][:2]
            name = f"dict{keys}"
        if depth > 1:
            up = referrers(r, depth - 1, seen)[:3]
            out += [f"{name} <- {u}" for u in up] or [name]
        else:
            out.append(name)
        if len(out) > 6:
            break
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--eager", action="store_true", help="enforce_eager: no CUDA graphs")
    ap.add_argument("--sync", action="store_true", help="async scheduling off")
    ap.add_argument("--engines", type=int, default=2)
    ap.add_argument("--utilization", type=float, default=0.6)
    ap.add_argument("--input-len", type=int, default=295)
    ap.add_argument("--attention", action="append", help="nsa | dense per engine, in turn (default nsa)")
    a = ap.parse_args()
    dev = torch.device("cuda")
    cfg = preset(a.preset)
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, a.input_len + 8)
    model = NSAModel(cfg).to(dev, torch.bfloat16).eval()
    modes = a.attention or ["nsa"]
    weights = torch.cuda.memory_allocated(dev)
    print(f"weights {weights / 2**30:.2f} GiB; eager={a.eager} sync={a.sync}", flush=True)
    for i in range(a.engines):
        args = EngineArgs(device="cuda", gpu_memory_utilization=a.utilization, enforce_eager=a.eager,
                          async_scheduling=False if a.sync else None, max_num_seqs=8,
                          enable_prefix_caching=False, attention=modes[i % len(modes)])
        eng = LLMEngine(args, model=model, tokenizer=None, model_name="probe")
        eng.warmup()
        out = eng.generate([[5 + t % 200 for t in range(a.input_len)]], SamplingParams(max_tokens=8, ignore_eos=True))
        print(f"engine {i} ({args.attention}): {eng.block_manager.num_pages} pages, generated {out[0].outputs[0].num_tokens}, "
              f"allocated {torch.cuda.memory_allocated(dev) / 2**30:.2f} GiB", flush=True)
        del eng, out
        gc.collect()
        torch.cuda.empty_cache()
        left = torch.cuda.memory_allocated(dev) - weights
        print(f"  after drop: {left / 2**30:.2f} GiB beyond the weights", flush=True)
        if left > 2**28:
            big = sorted((o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.is_cuda
                          and o.untyped_storage().nbytes() > 2**26),
                         key=lambda t: -t.untyped_storage().nbytes())
            for t in big[:4]:
                print(f"  tensor {tuple(t.shape)} {t.dtype} {t.untyped_storage().nbytes() / 2**30:.2f} GiB:")
                for chain in referrers(t):
                    print(f"    {chain}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
