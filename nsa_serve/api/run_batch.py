"""`nsa-serve run-batch`: OpenAI's batch file format offline (vLLM's `vllm run-batch`).

    nsa-serve run-batch -i requests.jsonl -o results.jsonl [MODEL_DIR] [engine flags]

Each input line is `{"custom_id", "method": "POST", "url", "body"}` with url /v1/chat/completions,
/v1/completions or /v1/responses. Every request goes through the same app the server runs (its
validation, its errors), in-process, many at once; each output line, in input order, is
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}` as OpenAI's batch
output has it: an API error is a response with its status and error body; a line that is no
request at all (bad JSON, another url or method, a stream) has `response: null` and `error`.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from pathlib import Path

from ..help_format import DefaultsHelpFormatter

# At import, not inside `register`: the top-level CLI imports plugin modules under a guard that
# turns a missing package (uvicorn on a bare GPU image) into an unavailable command; an import
# inside `register` escaped it and broke every subcommand, `bench` included.
from .cli import add_chat_template_args, add_engine_args

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")


def register(subparsers) -> None:
    p = subparsers.add_parser("run-batch", help="run an OpenAI batch file (JSON lines) offline",
                              formatter_class=DefaultsHelpFormatter)
    p.add_argument("model", nargs="?", default=None, metavar="MODEL_DIR",
                   help="model directory (default: the bundled default model)")
    p.add_argument("-i", "--input-file", required=True, help="requests, one JSON object a line ('-': stdin)")
    p.add_argument("-o", "--output-file", required=True, help="results, one JSON object a line ('-': stdout)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="requests in flight at once (default: --max-num-seqs)")
    add_chat_template_args(p.add_argument_group("chat template"))
    add_engine_args(p)
    p.set_defaults(func=cmd_run_batch)


def cmd_run_batch(args) -> int:
    try:
        text = sys.stdin.read() if args.input_file == "-" else Path(args.input_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"nsa-serve run-batch: cannot read {args.input_file}: {exc}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    results = asyncio.run(run_batch(args, lines))
    out = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    if args.output_file == "-":
        sys.stdout.write(out)
    else:
        Path(args.output_file).write_text(out, encoding="utf-8")
    failed = sum(1 for r in results if r["error"] or r["response"]["status_code"] != 200)
    print(f"nsa-serve run-batch: {len(results)} requests, {len(results) - failed} succeeded, {failed} failed",
          file=sys.stderr)
    return 0


async def run_batch(args, lines: list[str]) -> list[dict]:
    import httpx
    from tqdm import tqdm

    from ..engine.async_engine import AsyncLLMEngine
    from ..engine.llm_engine import LLMEngine
    from ..model.init_model import ensure_default_model
    from .cli import chat_template_source, engine_args_from, sampling_defaults
    from .server import ServerSettings, build_app

    args.model = str(args.model or ensure_default_model())
    defaults = sampling_defaults(args)
    chat_template = chat_template_source(args, "nsa-serve run-batch")
    try:
        eargs = engine_args_from(args)
        engine = AsyncLLMEngine(eargs, engine=LLMEngine(eargs))
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"nsa-serve run-batch: {exc}") from None
    await engine.start()
    app = build_app(engine, ServerSettings(defaults=defaults, model_root=args.model, start_engine=False,
                                           log_stats_interval_s=0.0, responses_store_size=0,
                                           chat_template=chat_template,
                                           trust_request_chat_template=args.trust_request_chat_template,
                                           chat_template_content_format=args.chat_template_content_format))
    sem = asyncio.Semaphore(args.max_concurrency or eargs.max_num_seqs)
    bar = tqdm(total=len(lines), desc="nsa-serve run-batch", file=sys.stderr)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://batch",
                                     timeout=None) as client:
            async def one(n: int, line: str) -> dict:
                async with sem:
                    result = await _run_line(client, n, line)
                bar.update()
                return result

            return list(await asyncio.gather(*(one(n, line) for n, line in enumerate(lines))))
    finally:
        bar.close()
        await engine.shutdown(0)


async def _run_line(client, n: int, line: str) -> dict:
    result = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": None, "response": None, "error": None}
    try:
        req = json.loads(line)
    except ValueError as exc:
        return {**result, "error": {"code": "invalid_json", "message": f"line {n + 1} is not JSON: {exc}"}}
    if not isinstance(req, dict):
        return {**result, "error": {"code": "invalid_request", "message": f"line {n + 1} is not a JSON object"}}
    result["custom_id"] = req.get("custom_id")
    body, url, method = req.get("body"), req.get("url"), req.get("method", "POST")
    problem = None
    if method != "POST" or url not in URLS:
        problem = f"line {n + 1}: method and url must be POST and one of {', '.join(URLS)}, got {method} {url}"
    elif not isinstance(body, dict):
        problem = f"line {n + 1}: body must be a JSON object"
    elif body.get("stream"):
        problem = f"line {n + 1}: a batch request cannot stream"
    if problem:
        return {**result, "error": {"code": "invalid_request", "message": problem}}
    r = await client.post(url, json=body)
    return {**result, "response": {"status_code": r.status_code, "request_id": r.headers.get("x-request-id"),
                                   "body": r.json()}}
