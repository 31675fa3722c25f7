"""Does an L2 evict-first hint on the decode kernels' pipelined copies shorten the step?

    python3 scripts/cp_async_hint_probe.py [MODE ...]      # on a GPU, from the repo root (kernels/
                                                          # importable as nsa_kernels: source
                                                          # scripts/device_env.sh)
    TRITON_PTXAS_PATH=/path/to/ptxas-13.4 python3 scripts/cp_async_hint_probe.py none cmp cmp+attend attend

Why: under the benchmark's write flush the L2 holds ~50 MB of dirty lines, and the decode step's
streamed reads evict them, so their write-back shares HBM with the step (decode.md, fifteenth
round). Reads marked evict-first replace each other instead. Triton 3.6 (the GPU image's) drops
`eviction_policy` on loads its pipeliner turns into cp.async copies (twentieth round, item 5);
unpipelined loads keep it but were 11+ µs slower at batch 16 (twenty-first round).

This probe puts the hint back at the PTX: a compile-stage hook
(`triton.knobs.runtime.add_stages_inspection_hook`) gives every `cp.async.cg` copy of the kernels
a MODE names (MODES) an `L2::cache_hint` operand holding an evict-first policy made once at the
kernel's entry (HINT_AT_COPY=1 in the environment: made before every copy instead). Each mode runs
in its own process with its own Triton cache (the hook is not part of Triton's cache key). Prints
graph µs of the default `nsa_decode` at 64k, paper shape, batch 1 / 16 / 64, under both flushes
(three medians each), and whether the outputs equal the unhooked run's bit for bit.

What it found (decode.md, twenty-first round): with the ptxas Triton 3.6 bundles (12.8) the hinted
copies fault (illegal instruction): ptxas makes the policy, then has the copies read it from
uniform registers nothing writes — the miscompile for which Triton stopped emitting these hints
(triton-lang/triton#11660, restored for PTX ≥ 9.4 with ptxas 13.4 in #11848). With ptxas 13.4
(TRITON_PTXAS_PATH) they run and are bitwise equal.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

MODES = {"none": (), "cmp": ("_cmp_tile_kernel",), "attend": ("_attend_kernel",),
         "cmp+attend": ("_cmp_tile_kernel", "_attend_kernel")}
_COPY = re.compile(r"cp\.async\.cg\.shared\.global (\[[^\]]*\]), (\[[^\]]*\]), (0x10|16), (%r\d+);")
_MAKE = "createpolicy.fractional.L2::evict_first.b64 %rd_evf, 1.0;"


def add_evict_first(ptx: str) -> tuple[str, int]:
    """`ptx` with every cp.async.cg copy given an evict-first L2 cache-policy operand, and the
    number of copies changed. One policy register, made at the kernel's entry (HINT_AT_COPY: made
    again before every copy, as Triton 3.9 emits it)."""
    at_copy = bool(os.environ.get("HINT_AT_COPY"))
    hinted = r"cp.async.cg.shared.global.L2::cache_hint \1, \2, \3, \4, %rd_evf;"
    out, n = _COPY.subn((_MAKE + "\n\t" if at_copy else "") + hinted, ptx)
    if n:
        decl = re.search(r"\n(\s*)\.reg \.b64\s+%rd<\d+>;\n", out)
        if decl is None:
            raise RuntimeError("no .b64 register declaration to extend")
        ind = decl.group(1)
        extra = f"{ind}.reg .b64 %rd_evf;\n" + ("" if at_copy else f"{ind}{_MAKE}\n")
        out = out[:decl.end()] + extra + out[decl.end():]
    return out, n


def install(kernels: tuple[str, ...], log: list) -> None:
    from triton import knobs

    def hook(*args):
        if not args:  # newer Triton (3.9) first asks for the hook's part of the cache key
            key = f"cp_async_hint_probe:{','.join(kernels)}:{bool(os.environ.get('HINT_AT_COPY'))}"
            return key, key
        backend, stages, options, language, capability = args
        make_ptx = stages["ptx"]

        def ptx_stage(src, metadata):
            ptx = make_ptx(src, metadata)
            if metadata.get("name") in kernels:
                ptx, n = add_evict_first(ptx)
                log.append((metadata["name"], n))
            return ptx
        stages["ptx"] = ptx_stage

    knobs.runtime.add_stages_inspection_hook = hook


def child(mode: str, out_path: str) -> None:
    import torch
    from safetensors.torch import save_file

    from nsa_kernels import bench_decode as bd
    from nsa_kernels.nsa_decode import nsa_decode

    log: list = []
    install(MODES[mode], log)
    res = {"mode": mode}
    outs = {}
    for B in (1, 16, 64):
        q, gates, layer, tables, seq_lens = bd.make_inputs(B, 65536, **bd.SHAPES["paper"], p=bd.PAPER_P)
        fn = lambda: nsa_decode(q, gates, layer, tables, seq_lens, bd.PAPER_P)  # noqa: E731
        outs[f"b{B}"] = fn().float().cpu()
        g = bd.graph_of(fn)
        for flush in ("write", "read"):
            bd.FLUSH = flush
            res[f"{flush}{B}"] = [round(bd.bench(g.replay, rep=100), 2) for _ in range(3)]
        q = gates = layer = tables = seq_lens = g = None
        torch.cuda.empty_cache()
    res["rewrites"] = sorted(set(log))
    save_file(outs, out_path + ".safetensors")
    with open(out_path, "w") as f:
        json.dump(res, f)


def main() -> None:
    import torch
    from safetensors.torch import load_file

    tmp = tempfile.mkdtemp()
    results = {}
    order = sys.argv[1:] or ["none", "cmp", "cmp+attend", "attend", "none", "cmp"]
    for i, mode in enumerate(order):
        path = os.path.join(tmp, f"{i}_{mode}.json")
        env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(tmp, f"cache_{i}"))
        r = subprocess.run([sys.executable, __file__, "--child", mode, path], env=env, capture_output=True,
                           text=True)
        if r.returncode:
            err = (r.stderr.strip().splitlines() or ["?"])[-1]
            print(f"| {i} | {mode} | failed: {err[:160]} |", flush=True)
            continue
        with open(path) as f:
            results[(i, mode)] = json.load(f)
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90)
    print(f"ptxas {ptxas.version} ({ptxas.path})")
    outs = {key: load_file(os.path.join(tmp, f"{key[0]}_{key[1]}.json.safetensors")) for key in results}
    base = next((outs[key] for key in results if key[1] == "none"), None)
    print("| run | mode | copies rewritten | B=1 write µs | B=16 write | B=64 write | B=1 read | B=16 read "
          "| B=64 read | outputs equal to 'none' |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (i, mode), r in results.items():
        same = "n/a" if base is None else all(torch.equal(outs[(i, mode)][k], base[k]) for k in base)
        cols = [" / ".join(f"{x:.1f}" for x in r[f"{fl}{B}"]) for fl in ("write", "read")
                for B in (1, 16, 64)]
        print(f"| {i} | {mode} | {r['rewrites']} | " + " | ".join(cols) + f" | {same} |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    else:
        main()
