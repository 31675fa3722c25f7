"""Where a decode step of the engine spends its device time: the random `paper-1b` model served by
the real engine (CUDA graphs as in production), a few sequences past their prefill, then the torch
profiler over decode-only steps. Prints each step's wall time, the device time its kernels add up
to, and the kernels that take most of it. Run on a GPU machine from the repo root (nsa_kernels
importable, as scripts/device_env.sh sets up):

    python3 scripts/profile_engine_decode.py --batch 4 --input-len 8192 --attention nsa
"""

import argparse
import time
from types import SimpleNamespace

import torch
from torch.profiler import ProfilerActivity, profile

from nsa_serve.engine.args import EngineArgs
from nsa_serve.engine.bench import build_model
from nsa_serve.engine import decode_graphs
from nsa_serve.engine.llm_engine import LLMEngine
from nsa_serve.engine.protocol import SamplingParams


def decode_step(engine):
    """One engine step; True when it was decode-only."""
    engine.step()
    t = engine.last_timing
    return bool(t.num_tokens) and t.num_tokens == t.num_decode


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--input-len", type=int, default=8192)
    ap.add_argument("--attention", default="nsa", choices=["nsa", "dense"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--plain-steps", type=int, default=20, help="steps timed without the profiler")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--preset", default="paper-1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--phi", choices=["kernel", "gemm"], default=None,
                    help="decode graphs' φ up to FUSED_PHI_MAX_BATCH sequences: nsa_kernels.phi_decode "
                         "(kernel) or gather + phi_pair + write (gemm); default: the engine's choice")
    ap.add_argument("--phi-max-batch", type=int, default=None,
                    help="override decode_graphs.FUSED_PHI_MAX_BATCH (the largest graph size with φ as the kernel)")
    ap.add_argument("--stagger", action="store_true",
                    help="prompt i is input-len + i tokens long, so sequences complete compression blocks in "
                         "different steps (equal lengths complete them all in one step of every d)")
    a = ap.parse_args()
    margs = SimpleNamespace(model=None, preset=a.preset, set=None, input_len=a.input_len, output_len=256 + a.batch, seed=0)
    dev = torch.device(a.device)
    model, _, name = build_model(margs, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    engine = LLMEngine(EngineArgs(device=a.device, attention=a.attention, max_num_seqs=max(8, a.batch),
                                  max_num_batched_tokens=8192, long_prefill_token_threshold=8192,
                                  enable_prefix_caching=False),
                       model=model, tokenizer=None, model_name=name)
    if a.phi_max_batch is not None:
        decode_graphs.FUSED_PHI_MAX_BATCH = a.phi_max_batch
    if a.phi is not None and engine.runner.static_decode is not None:
        engine.runner.static_decode.fused_phi = a.phi == "kernel"
    engine.warmup()
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    for i in range(a.batch):
        engine.add_request(f"p{i}", torch.randint(8, model.cfg.vocab_size, (a.input_len + (i if a.stagger else 0),),
                                                         generator=g).tolist(),
                           params)
    warm = 0
    while warm < 5:  # past every prefill, and a few decode steps (graphs replayed once)
        warm += decode_step(engine)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    plain = []  # wall times without the profiler (which adds host work to every launch)
    while len(plain) < a.plain_steps:
        sync()
        t0 = time.perf_counter()
        if decode_step(engine):
            sync()
            plain.append(time.perf_counter() - t0)
    plain.sort()
    print(f"decode step wall without the profiler: median {1e3 * plain[len(plain) // 2]:.2f} ms "
          f"(mean {1e3 * sum(plain) / len(plain):.2f}, min {1e3 * plain[0]:.2f}, max {1e3 * plain[-1]:.2f}) "
          f"over {len(plain)} steps")
    walls = []
    acts = [ProfilerActivity.CUDA] if dev.type == "cuda" else [ProfilerActivity.CPU]
    sync()
    with profile(activities=acts) as prof:
        n = 0
        while n < a.steps:
            t0 = time.perf_counter()
            ok = decode_step(engine)
            walls.append(time.perf_counter() - t0)
            n += ok
        sync()
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    evts = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    total = sum(getattr(e, key) for e in evts) / n
    t = engine.last_timing
    static = engine.runner.static_decode
    phi = "kernel" if static is not None and static.fused_phi and a.batch <= decode_graphs.FUSED_PHI_MAX_BATCH else "gemm"
    print(f"{name} {a.attention} (φ: {phi}), batch {a.batch}, context {a.input_len}"
          f"{' + i (staggered)' if a.stagger else ''}: wall per step "
          f"{1e3 * sum(walls) / len(walls):.2f} ms (last: model {1e3 * t.model_s:.2f} ms, host "
          f"{1e3 * (t.schedule_s + t.prepare_s + t.postprocess_s):.2f} ms); kernels add up to "
          f"{total / 1e3:.2f} ms a step; {sum(e.count for e in evts) / n:.0f} kernel launches a step")
    # Times first, names after: torch's templated kernel names run to hundreds of characters, and
    # cutting them at a fixed width left two elementwise kernels unidentified (engine.md).
    print(f"{'µs/step':>9s} {'calls/step':>10s}  kernel")
    for e in sorted(evts, key=lambda e: -getattr(e, key))[:a.top]:
        print(f"{getattr(e, key) / n:9.1f} {e.count / n:10.1f}  {e.key[:400]}")


if __name__ == "__main__":
    main()
