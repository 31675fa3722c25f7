"""`nsa-serve bench`: registered into the main command by nsa_serve/cli.py."""

from __future__ import annotations

from ..help_format import DefaultsHelpFormatter
from .args import add_graph_args, speculative_config


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="offline engine throughput benchmark (NSA vs dense attention)",
                              formatter_class=DefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="model directory (default: the bundled default model)")
    src.add_argument("--preset", help="random-initialised preset instead of a directory: tiny | small | paper-1b")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a preset config field")
    p.add_argument("--attention", default="both", choices=["nsa", "dense", "both"],
                   help="which attention to run; both: NSA, then dense, on the same model and workload, and their ratio")
    p.add_argument("--num-requests", type=int, default=16, help="requests, all arriving at once")
    p.add_argument("--input-len", type=int, default=512, help="prompt tokens a request")
    p.add_argument("--output-len", type=int, default=64, help="output tokens a request (end-of-sequence ignored)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences running at once")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget of one engine step (default: 8192 on CUDA, 2048 on CPU)")
    p.add_argument("--long-prefill-token-threshold", type=int, default=None,
                   help="per-request prefill chunk cap per step (default: the whole step budget on CUDA, "
                        "512 on CPU)")
    p.add_argument("--num-pages", type=int, default=None, help="page pool size (default: from memory)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="share of the GPU's memory the engine may use (weights, activations, pages)")
    p.add_argument("--cpu-kv-cache-gb", type=float, default=1.0, help="page pool size on CPU")
    add_graph_args(p)
    p.add_argument("--cpu-threads", type=int, default=None, help="CPU only: intra-op threads (default: one per core)")
    p.add_argument("--cpu-reserved-cores", type=int, default=0,
                   help="CPU only: cores left free during decode steps (default 0: no server here)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32")
    p.add_argument("--warmup-rounds", type=int, default=1,
                   help="untimed rounds of the same workload first (Triton compiles on first use)")
    p.add_argument("--warmup-context", type=int, default=0,
                   help="run a synthetic workload up to this context length at start-up, so Triton "
                   "compiles its kernel variants before the first request (default 0: off)")
    p.add_argument("--no-precompile", dest="precompile", action="store_false",
                   help="CUDA: do not compile the kernel variants of eager steps at start-up (they "
                   "then compile inside the first requests that meet them)")
    p.add_argument("--speculative-config", type=speculative_config, default=None,
                   help="speculative decoding, as the server's flag (vLLM's JSON; method \"ngram\"): "
                        "decode steps then include the steps that verify drafts")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts' random tokens, the random weights and the sampling")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=_run)


def _run(args) -> int:
    for name in ("num_requests", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup_rounds < 0:
        raise SystemExit("--warmup-rounds must be >= 0")
    from .bench import main

    return main(args)
