"""Memory and time of one training forward + backward at several lengths. Prints a table.

    python -m nsa_serve.train.profile_step --seq-lens 512,1024,2048 --q-chunks 0,512
    python -m nsa_serve.train.profile_step --attention sdpa --batch 16 --seq-lens 2048 --profile

`--attention reference` (default): one sequence through the reference attention, whole (`q_chunk` 0)
or in recomputed query chunks. `--attention sdpa`: `--batch` sequences through the trainer's batched
fused-attention forward (`q_chunk` 0 = its automatic chunking). `--profile` adds torch.profiler's
table of the kernels that took the most GPU time.

On CUDA the memory column is torch.cuda.max_memory_allocated (bf16 autocast, attention in fp32, as
the trainer runs); on CPU it is the growth of the process's peak RSS, measured in a fresh
subprocess per cell so one cell's peak does not hide the next.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(cfg_name: str, seq_len: int, q_chunk: int, device: str, repeats: int, compile: bool = False,
        attention: str = "reference", batch: int = 1, profile: bool = False) -> dict:
    import torch
    import torch.nn.functional as F

    from nsa_serve.model.nsa_model import NSAModel
    from nsa_serve.train.forward import train_forward, train_forward_batch
    from nsa_serve.train.presets import model_config

    if compile:
        from nsa_serve.train.forward import compile_attention

        compile_attention()
    cfg = model_config(cfg_name)
    model = NSAModel(cfg).init_weights(0).to(device)
    cuda = device.startswith("cuda")
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device=device)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
            if attention == "sdpa":
                logits = train_forward_batch(model, tokens[:, :-1], q_chunk or "auto")
            else:
                logits = train_forward(model, tokens[0, :-1], q_chunk or None, attn_fp32=cuda)[None]
        F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()
        if cuda:
            torch.cuda.synchronize()
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    peak = (torch.cuda.max_memory_allocated() if cuda else
            (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
    if profile and cuda:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = (train_forward_batch(model, tokens[:, :-1], q_chunk or "auto") if attention == "sdpa"
                          else train_forward(model, tokens[0, :-1], q_chunk or None, attn_fp32=True)[None])
            F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60),
              flush=True)
    return {"seq_len": seq_len, "q_chunk": q_chunk, "s_per_seq": min(times) / batch, "peak_bytes": peak}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="default")
    p.add_argument("--seq-lens", default="512,1024,2048")
    p.add_argument("--q-chunks", default="0,512")
    p.add_argument("--device", default=None)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="torch.compile the attention chunks")
    p.add_argument("--attention", choices=("reference", "sdpa"), default="reference")
    p.add_argument("--batch", type=int, default=1, help="sequences per forward (sdpa)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top GPU kernels (CUDA)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    lens = [int(x) for x in a.seq_lens.split(",")]
    chunks = [int(x) for x in a.q_chunks.split(",")]
    if a.one:
        print(json.dumps(one(a.config, lens[0], chunks[0], device, a.repeats, a.compile, a.attention, a.batch)))
        return 0
    print(f"config {a.config}, device {device}, compile {a.compile}, attention {a.attention}, batch {a.batch}")
    print("| seq_len | q_chunk | s / sequence (fwd+bwd) | tokens/s | peak memory |")
    print("|---|---|---|---|---|")
    for L in lens:
        for c in chunks:
            if device == "cpu":  # fresh process: ru_maxrss is a high-water mark
                out = subprocess.run([sys.executable, "-m", "nsa_serve.train.profile_step", "--one",
                                      "--config", a.config, "--seq-lens", str(L), "--q-chunks", str(c),
                                      "--device", device, "--repeats", str(a.repeats),
                                      "--attention", a.attention, "--batch", str(a.batch)]
                                     + (["--compile"] if a.compile else []),
                                     capture_output=True, text=True)
                if out.returncode:
                    print(f"| {L} | {c} | failed: {out.stderr.strip().splitlines()[-1]} | | |", flush=True)
                    continue
                r = json.loads(out.stdout)
            else:
                try:
                    r = one(a.config, L, c, device, a.repeats, a.compile, a.attention, a.batch, a.profile)
                except torch.OutOfMemoryError:
                    print(f"| {L} | {c or 'none'} | out of memory | | |", flush=True)
                    torch.cuda.empty_cache()
                    continue
                torch.cuda.empty_cache()
            print(f"| {L} | {c or 'none'} | {r['s_per_seq']:.3f} | {L / r['s_per_seq']:,.0f} | "
                  f"{r['peak_bytes'] / 2**30:.2f} GiB |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
