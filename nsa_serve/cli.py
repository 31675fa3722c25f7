"""The `nsa-serve` command. Each subcommand lives in its own module and registers here."""

from __future__ import annotations

import argparse
import sys

import torch

from .help_format import DefaultsHelpFormatter

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str | None, device: str) -> torch.dtype:
    if name in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise SystemExit(f"unknown --dtype {name!r}; choose from auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def cmd_init_model(args) -> int:
    from .model.init_model import init_model

    overrides = {}
    for item in args.set or []:
        key, _, value = item.partition("=")
        overrides[key] = _parse_value(value)
    out = init_model(args.out, args.preset, seed=args.seed, max_shard_bytes=args.max_shard_size, **overrides)
    print(f"wrote {args.preset} model to {out}")
    return 0


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' (decimal units, as transformers reads max_shard_size), '500MiB' (binary) or bytes."""
    t = text.strip().upper()
    num = t.rstrip("KMGTIB")
    unit = t[len(num):]
    try:
        value = float(num) * _SIZE_UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MiB, 1000000)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be at least 1 byte, got {text!r}")
    return int(value)


def _parse_value(value: str):
    for conv in (int, float):
        try:
            return conv(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


def cmd_generate(args) -> int:
    from .generate import generate_tokens, stream_text
    from .model.checkpoint import load_model
    from .model.init_model import ensure_default_model
    from .tokenizer import Tokenizer

    model_dir = args.model or ensure_default_model()
    device = args.device or default_device()
    model = load_model(model_dir, device=device, dtype=resolve_dtype(args.dtype, device))
    tok = Tokenizer(f"{model_dir}/tokenizer.model")
    text = args.prompt
    if args.chat:  # the model directory's chat_template.jinja where it has one
        prompt = tok.encode_chat(tok.apply_chat_template([{"role": "user", "content": text}]))
    else:
        prompt = tok.encode(text)
    stop = [] if args.ignore_eos else tok.stop_token_ids
    tokens = generate_tokens(model, prompt, args.max_tokens, args.temperature, args.top_p, args.seed, stop)
    stream_text(tok, tokens)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nsa-serve", description="Serve Native Sparse Attention models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init-model", help="create a random-initialised NSA model directory",
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("--preset", default="tiny", help="tiny | small | paper-1b")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a config field")
    p.add_argument("--max-shard-size", type=parse_size, metavar="SIZE",
                   help="write the weights as shards of at most SIZE (e.g. 5GB, 500MiB, bytes) with "
                        "model.safetensors.index.json, as large checkpoints come (default: one file)")
    p.set_defaults(func=cmd_init_model)

    p = sub.add_parser("generate", help="stream a completion of one prompt to stdout",
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", help="model directory (default: the bundled default model)")
    p.add_argument("--prompt", required=True, help="the prompt (with --chat: the user's message)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the most likely tokens up to this probability")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--ignore-eos", action="store_true", help="go on past end-of-sequence tokens up to --max-tokens")
    p.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32")
    p.set_defaults(func=cmd_generate)

    for register in _plugins():
        register(sub)
    return parser


# Subcommands defined beside their code, as (module, commands it registers).
PLUGINS = (("nsa_serve.api.cli", ("serve",)), ("nsa_serve.api.run_batch", ("run-batch",)),
           ("nsa_serve.engine.cli", ("bench",)),
           ("nsa_serve.train.cli", ("prepare-data", "train", "eval")))


def _plugins():
    """Register functions of the plugin modules. A module whose own dependency is missing (e.g. a
    GPU image without uvicorn running `bench`) still leaves the other commands usable; its commands
    then exit with a message naming the missing package."""
    import importlib

    for module, commands in PLUGINS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                continue
            yield _unavailable(commands, exc.name)
            continue
        yield mod.register


def _unavailable(commands, missing: str):
    def fail(args):
        raise SystemExit(f"nsa-serve {args.command}: needs the Python package '{missing}', which is not "
                         f"installed (pip install -e . installs it)")

    def register(sub):
        for name in commands:
            p = sub.add_parser(name, help=f"(unavailable: needs {missing})", add_help=False)
            p.add_argument("rest", nargs=argparse.REMAINDER)
            p.set_defaults(func=fail)

    return register


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
