"""`nsa-serve prepare-data`, `nsa-serve train`, `nsa-serve eval` (docs/training.md).

Also runnable as `python -m nsa_serve.train.cli ...`, which imports nothing of the HTTP server: the GPU
machine's image may lack fastapi/uvicorn, and training does not need them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..help_format import DefaultsHelpFormatter


def _overrides(items) -> dict:
    from nsa_serve.cli import _parse_value

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects FIELD=VALUE, got {item!r}")
        out[key] = _parse_value(value)
    return out


def cmd_prepare(args) -> int:
    from .prepare import DEFAULT_PACKAGES, PrepareArgs, prepare

    prepare(PrepareArgs(out=args.out, packages=tuple(args.packages or DEFAULT_PACKAGES),
                        source_dirs=tuple(args.source_dir or ()), deb_dir=args.deb_dir,
                        vocab_size=args.vocab_size, seed=args.seed,
                        heldout_frac=args.heldout_frac, max_train_tokens=args.max_train_tokens))
    return 0


def cmd_train(args) -> int:
    from .trainer import Trainer, TrainArgs

    a = TrainArgs(data=args.data, out=args.out, config=args.config, overrides=_overrides(args.set),
                  tokenizer=args.tokenizer, heldout=args.heldout, state_dir=args.state_dir, resume=args.resume,
                  init=args.init,
                  steps=args.steps, total_budget_min=args.total_budget_min, time_budget_min=args.time_budget_min,
                  seq_len=args.seq_len, batch=args.batch, lr=args.lr,
                  warmup=args.warmup, task_prob=args.task_prob, seed=args.seed,
                  checkpoint_every=args.checkpoint_every, log_every=args.log_every, q_chunk=args.q_chunk or None,
                  device=args.device, answer_weight=args.answer_weight, compile=args.compile,
                  eval_tokens=args.eval_tokens, task_mix=args.task_mix, attention=args.attention,
                  micro_batch_tokens=args.micro_batch_tokens, select_aux_weight=args.select_aux_weight,
                  stop_at_step=args.stop_at_step)
    if args.greeting_share is not None:
        a.greeting_share = args.greeting_share
    if args.curriculum:
        a.curriculum = args.curriculum
    status = Trainer(a, log=lambda m: print(m, flush=True)).run()
    return 0 if status in ("done", "paused") else 1


def cmd_eval(args) -> int:
    import httpx
    import torch

    from nsa_serve.model.checkpoint import load_model
    from nsa_serve.tokenizer import Tokenizer

    from .evaluate import build_passkey_cases, heldout_nll, perplexity, run_passkey
    from .tokens import read_tokens

    result: dict = {"model": str(args.model)}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(Path(args.model) / "tokenizer.model")
    held = read_tokens(args.data)
    if args.ppl_tokens > 0:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_model(args.model, device=device, dtype=torch.float32)
        nll, n = heldout_nll(model, held, args.ppl_seq_len, args.ppl_tokens, device,
                             autocast=device.startswith("cuda"))
        result["heldout"] = {"ppl": perplexity(nll, n), "tokens": n, "seq_len": args.ppl_seq_len}
        print(f"held-out perplexity {result['heldout']['ppl']:.3f} over {n:,} tokens "
              f"(windows of {args.ppl_seq_len})", flush=True)
        del model
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.base_url:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        result["passkey"] = {"by_length": {}, "cases": []}
        with httpx.Client(timeout=args.timeout, headers=headers) as client:
            # One length at a time, results written after each: a call that runs out of time keeps
            # the lengths it finished.
            for L in (int(x) for x in args.lengths.split(",")):
                cases = build_passkey_cases(tok, held, [L], args.samples, args.seed + L)
                res = run_passkey(client, args.base_url, cases, args.concurrency, log=lambda m: print(m, flush=True))
                result["passkey"]["model"] = res["model"]
                result["passkey"]["by_length"].update(res["by_length"])
                result["passkey"]["cases"] += res["cases"]
                if args.out:
                    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    else:
        print("no --base-url: passkey accuracy skipped (it is measured through a running server)")
    return 0


def register(subparsers) -> None:
    fmt = DefaultsHelpFormatter
    p = subparsers.add_parser("prepare-data", formatter_class=fmt,
                              help="Debian docs → tokenizer and uint16 token files for training")
    p.add_argument("--out", default=".data", help="folder for the tokenizer and token files")
    p.add_argument("--packages", nargs="+", help="Debian packages (default: linux-doc-6.1 python3.11-doc perl-doc)")
    p.add_argument("--source-dir", action="append", help="read this folder instead of downloading (repeatable)")
    p.add_argument("--deb-dir", help="keep the downloaded .deb files here (default: a temporary folder)")
    p.add_argument("--vocab-size", type=int, default=8192, help="tokenizer vocabulary size")
    p.add_argument("--seed", type=int, default=0, help="random seed (the held-out split is drawn with it)")
    p.add_argument("--heldout-frac", type=float, default=0.02, help="share of documents held out")
    p.add_argument("--max-train-tokens", type=int, default=12_000_000, help="cap on the training tokens written")
    p.set_defaults(func=cmd_prepare)

    p = subparsers.add_parser("train", formatter_class=fmt, help="train an NSA model from scratch")
    p.add_argument("--config", default="default", help="preset name or config .json")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a config field")
    p.add_argument("--data", default=".data/train.bin", help="uint16 token file")
    p.add_argument("--tokenizer", help="default: tokenizer.model beside --data")
    p.add_argument("--heldout", help="default: heldout.bin beside --data")
    p.add_argument("--out", required=True, help="where model/ and resume/ go")
    p.add_argument("--state-dir", help="exact resume state and train_log.jsonl (default: OUT/state)")
    p.add_argument("--resume", help="a state dir (exact or compact OUT/resume) to continue from")
    p.add_argument("--init", help="fine-tune: start from the weights in this state dir (e.g. an earlier "
                                   "run's OUT/resume) with a new optimizer and schedule")
    p.add_argument("--stop-at-step", type=int, default=0,
                   help="checkpoint and stop at this step (reproduces a run that was cut short)")
    p.add_argument("--steps", type=int, default=0, help="total optimizer steps (0: fit --total-budget-min)")
    p.add_argument("--total-budget-min", type=float, default=27.0, help="training minutes --steps 0 aims at")
    p.add_argument("--time-budget-min", type=float, default=0.0,
                   help="stop and checkpoint before this many minutes of this call (0: no limit)")
    p.add_argument("--seq-len", type=int, help="one fixed sequence length instead of --curriculum")
    p.add_argument("--curriculum", default=None, help="LEN:FRAC:TASK_PROB,... (see docs/training.md)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step at the first length")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (linear warm-up, then cosine decay)")
    p.add_argument("--warmup", type=int, default=100, help="warm-up steps")
    p.add_argument("--task-prob", type=float, help="override every phase's retrieval-task probability")
    p.add_argument("--task-mix", default="0.5,0.2,0.3", help="PASSKEY,KV,CHAT shares of the task sequences")
    p.add_argument("--greeting-share", type=float,
                   help="share of dialog samples that open with a greeting turn (default 0.25, tasks.GREETING_SHARE)")
    p.add_argument("--answer-weight", type=float, default=1.0,
                   help="extra loss weight on the answer tokens of task sequences")
    p.add_argument("--select-aux-weight", type=float, default=0.0,
                   help="weight of the selection's retrieval supervision on task sequences (0: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the batches")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    p.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    p.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens scored at each checkpoint")
    p.add_argument("--attention", choices=("sdpa", "reference"), default="sdpa",
                   help="sdpa: batched fused attention (tested equal to the reference); reference: the "
                        "reference attention, one sequence per forward")
    p.add_argument("--micro-batch-tokens", type=int, default=32768, help="tokens per forward (sdpa)")
    p.add_argument("--q-chunk", type=int, default=2048, help="reference attention's query chunk (0: none)")
    p.add_argument("--compile", action="store_true", help="torch.compile the attention chunks (CUDA)")
    p.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("eval", formatter_class=fmt,
                              help="held-out perplexity and passkey accuracy through a running server")
    p.add_argument("--model", required=True, help="model directory (tokenizer and perplexity)")
    p.add_argument("--data", default=".data/heldout.bin", help="held-out token file (also passkey filler)")
    p.add_argument("--base-url", help="running server, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", help="the server's API key, if it needs one")
    p.add_argument("--lengths", default="4096,16384,32768,65536", help="passkey prompt lengths in tokens")
    p.add_argument("--samples", type=int, default=20, help="passkey prompts per length")
    p.add_argument("--concurrency", type=int, default=4, help="passkey requests in flight at once")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds a passkey request may take")
    p.add_argument("--ppl-seq-len", type=int, default=1024, help="tokens a perplexity window")
    p.add_argument("--ppl-tokens", type=int, default=262144, help="0: skip perplexity")
    p.add_argument("--seed", type=int, default=0, help="seed of the passkeys and their filler")
    p.add_argument("--device", help="perplexity: cpu | cuda (default: cuda when available)")
    p.add_argument("--out", help="write the results as JSON here")
    p.set_defaults(func=cmd_eval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nsa-serve")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
