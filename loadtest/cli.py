"""The `nsa-loadtest` command: parse arguments, run, write JSON + PNGs, print the table.

Exit status: 0 when the run finished (failed requests are results, not errors of the tool),
1 when the server could not be used at all (unreachable, no model), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
from pathlib import Path

from .arrivals import ARRIVALS
from .metrics import parse_slos
from .report import format_table, per_request, write_json
from .runner import RunConfig, run
from .workloads import LENGTH_DISTS, WORKLOADS, WorkloadConfig

DEFAULT_CLOSED_LOOP_CLIENTS = 8
# vllm bench serve's names for what this tool calls the endpoint and the workload.
_BACKENDS = {"openai-chat": "chat", "openai": "completions", "vllm": "completions"}
_DATASETS = {"random": "random", "sharegpt": "file", "custom": "file"}


def _resolved(args, own: str, vllm: str, mapping: dict[str, str], default: str) -> str:
    """This tool's flag, else vllm bench serve's spelling of it, else the default; both, disagreeing,
    are an error."""
    mine, theirs = getattr(args, own), getattr(args, vllm)
    mapped = mapping[theirs] if theirs is not None else None
    if mine is not None and mapped is not None and mine != mapped:
        raise ValueError(f"--{own} {mine} and --{vllm.replace('_', '-')} {theirs} disagree; give one")
    return mine or mapped or default


def _int_list(s: str) -> list[int]:
    # "8k" means 8192: context sizes are powers of two.
    try:
        return [int(x.strip()[:-1]) * 1024 if x.strip().lower().endswith("k") else int(x)
                for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (e.g. 8192,32k), got {s!r}") from None


def _float_list(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nsa-loadtest",
        description="Load-test an OpenAI-compatible server (nsa-serve, vLLM, ...) and report vLLM "
                    "bench-serve compatible metrics. See docs/loadtest.md.")
    g = p.add_argument_group("target")
    g.add_argument("--base-url", default="http://127.0.0.1:8000", help="server to test (default: %(default)s)")
    g.add_argument("--api-key", default=os.environ.get("NSA_LOADTEST_API_KEY") or os.environ.get("NSA_SERVE_API_KEY"),
                   help="sent as a Bearer token (default: $NSA_LOADTEST_API_KEY, else $NSA_SERVE_API_KEY)")
    g.add_argument("--model", help="model name (default: the first one /v1/models lists)")
    g.add_argument("--endpoint", choices=("chat", "completions"), default=None,
                   help="/v1/chat/completions or /v1/completions (default: chat)")
    g.add_argument("--backend", choices=sorted(_BACKENDS), default=None,
                   help="vllm bench serve's name for the endpoint: openai-chat is chat; openai and vllm are "
                        "completions")

    g = p.add_argument_group("workload")
    g.add_argument("--workload", choices=WORKLOADS, default=None,
                   help="chat: an instruction and a passage; random: random corpus words; longdoc: a document "
                        "and a question about it; needle: a fact planted in a document, then asked for; "
                        "file: the requests of --dataset-path (docs/loadtest.md) (default: chat)")
    g.add_argument("--dataset-name", choices=sorted(_DATASETS), default=None,
                   help="vllm bench serve's name for the workload: random is random; sharegpt and custom are "
                        "file (with --dataset-path)")
    g.add_argument("--dataset-path", default=None,
                   help="file workload: JSON Lines of {\"prompt\"} or {\"messages\"} (optional output_tokens), "
                        "an OpenAI batch file, or a ShareGPT JSON array")
    g.add_argument("--seed", type=int, default=0, help="one seed fixes prompts, lengths and arrival times")
    g.add_argument("--input-len", "--random-input-len", type=int, default=512,
                   help="chat/random: prompt tokens (median or centre)")
    g.add_argument("--output-len", "--random-output-len", type=int, default=None,
                   help="max_tokens (chat/random: median or centre; file: for entries without their own; "
                        "default 128, needle 32)")
    g.add_argument("--dataset-output-len", "--sharegpt-output-len", "--custom-output-len", type=int, default=None,
                   help="file: every request's max_tokens, in place of the entries' own budgets")
    g.add_argument("--length-dist", choices=LENGTH_DISTS, default=None,
                   help="chat/random length distribution (default: lognormal for chat, uniform for random)")
    g.add_argument("--range-ratio", "--random-range-ratio", type=float, default=0.0,
                   help="uniform: lengths in [L(1-r), L(1+r)]")
    g.add_argument("--sigma", type=float, default=0.5, help="lognormal: standard deviation of log length")
    g.add_argument("--doc-lengths", type=_int_list, default=[8192, 16384, 32768, 65536, 131072],
                   help="longdoc/needle document tokens, comma-separated (default: 8k,16k,32k,64k,128k)")
    g.add_argument("--questions-per-doc", type=int, default=1,
                   help="longdoc: requests asking different questions about each document (1-8; the prefix "
                        "cache serves the repeats)")
    g.add_argument("--depths", type=_float_list, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="needle depths as fractions of the document (default: 0,0.25,0.5,0.75,1)")

    g = p.add_argument_group("traffic and bounds")
    g.add_argument("--num-requests", "--num-prompts", type=int, default=None,
                   help="requests in the measured phase (default 100; needle: one per length × depth)")
    g.add_argument("--duration", type=float, default=1800.0,
                   help="hard limit on the measured phase in seconds; requests still running are cancelled")
    g.add_argument("--warmup", type=int, default=2, help="warm-up requests sent first and excluded")
    g.add_argument("--reset-prefix-cache", action="store_true",
                   help="empty the server's prefix cache after the warm-up (POST /reset_prefix_cache)")
    g.add_argument("--arrival", choices=ARRIVALS, default=None,
                   help="default: poisson with --request-rate, else closed loop")
    g.add_argument("--request-rate", type=float, default=None, help="requests per second (open loop)")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape (< 1 burstier, 1 = Poisson)")
    g.add_argument("--max-concurrency", type=int, default=None,
                   help=f"cap on requests in flight; the client count for closed loop "
                        f"(default {DEFAULT_CLOSED_LOOP_CLIENTS} there)")
    g.add_argument("--request-timeout", type=float, default=600.0, help="per-request limit in seconds")

    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature sent (default: %(default)s, greedy)")
    g.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=None,
                   help="ask the server to ignore EOS (vLLM extension; default on for chat/random)")
    g.add_argument("--extra-body", type=json.loads, default=None, help="JSON merged into every request body")

    g = p.add_argument_group("metrics and output")
    g.add_argument("--goodput", nargs="+", metavar="METRIC:MS", default=None,
                   help="SLOs for goodput, e.g. --goodput ttft:500 tpot:50 e2el:10000")
    g.add_argument("--percentiles", "--metric-percentiles", type=_float_list, default=[90.0, 99.0],
                   help="default: 90,99")
    g.add_argument("--metrics-interval", type=float, default=2.0,
                   help="seconds between /metrics scrapes during the run (0: before/after only)")
    g.add_argument("--result-dir", type=Path, default=Path("loadtest-results"),
                   help="folder for the JSON result and the plots (default: %(default)s)")
    g.add_argument("--result-name", "--result-filename", default=None,
                   help="file stem, a .json ending dropped (default: <workload>-<UTC time>)")
    g.add_argument("--save-result", action="store_true", default=argparse.SUPPRESS,
                   help="(vllm bench serve's flag) results are always saved")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument("--save-texts", action=argparse.BooleanOptionalAction, default=True,
                   help="keep generated texts in the JSON (default on, as vLLM)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def config_from_args(args) -> RunConfig:
    workload = _resolved(args, "workload", "dataset_name", _DATASETS, "chat")
    endpoint = _resolved(args, "endpoint", "backend", _BACKENDS, "chat")
    arrival = args.arrival or ("poisson" if args.request_rate is not None else "closed")
    max_conc = args.max_concurrency
    if arrival == "closed" and max_conc is None:
        max_conc = DEFAULT_CLOSED_LOOP_CLIENTS
    output_len = args.output_len or (32 if workload == "needle" else 128)
    num = args.num_requests
    if num is None:
        num = len(args.doc_lengths) * len(args.depths) if workload == "needle" else 100
    wl = WorkloadConfig(name=workload, input_len=args.input_len, output_len=output_len,
                        length_dist=args.length_dist, range_ratio=args.range_ratio, sigma=args.sigma,
                        doc_lengths=args.doc_lengths, depths=args.depths, questions_per_doc=args.questions_per_doc,
                        dataset_path=args.dataset_path, dataset_output_len=args.dataset_output_len)
    return RunConfig(base_url=args.base_url, api_key=args.api_key, model=args.model, endpoint=endpoint,
                     workload=wl, num_requests=num, duration=args.duration, warmup=args.warmup,
                     reset_prefix_cache=args.reset_prefix_cache,
                     arrival=arrival, request_rate=args.request_rate, burstiness=args.burstiness,
                     max_concurrency=max_conc, request_timeout=args.request_timeout, seed=args.seed,
                     temperature=args.temperature, ignore_eos=args.ignore_eos, extra_body=args.extra_body,
                     slos_ms=parse_slos(args.goodput), percentiles=args.percentiles,
                     metrics_interval=args.metrics_interval, progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        cfg.validate()
    except ValueError as exc:
        parser.error(str(exc))
    started = dt.datetime.now(dt.timezone.utc)
    try:
        out = asyncio.run(run(cfg))
    except RuntimeError as exc:
        print(f"nsa-loadtest: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nsa-loadtest: interrupted", file=sys.stderr)
        return 130

    stem = args.result_name.removesuffix(".json") if args.result_name else \
        f"{cfg.workload.name}-{started.strftime('%Y%m%d-%H%M%S')}"
    result = {
        "date": started.strftime("%Y%m%d-%H%M%S"),
        "workload": cfg.workload.name,
        "arrival": cfg.arrival,
        "request_rate": "inf" if cfg.arrival == "closed" else cfg.request_rate,
        "burstiness": cfg.burstiness,
        "max_concurrency": cfg.max_concurrency,
        "seed": cfg.seed,
        **out.result,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "api_key"},
        "timeline": out.timeline,
        **per_request(out.records, args.save_texts),
    }
    json_path = write_json(args.result_dir / f"{stem}.json", result)
    print(format_table(result, cfg.percentiles))
    print(f"results: {json_path}")
    if not args.no_plots:
        from .plots import plot_all  # matplotlib only when plotting

        for path in plot_all(out.records, out.timeline, result, args.result_dir, stem):
            print(f"plot:    {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
