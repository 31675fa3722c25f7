"""`nsa-serve serve [MODEL_DIR]`: the OpenAI-compatible HTTP server.

Startup order: resolve the model (the bundled default when none is given), build the engine (loads
weights), start its loop and warm up, and only then bind the port, so a listening server is a ready
one. SIGTERM/SIGINT: stop accepting, let in-flight requests finish for up to --shutdown-timeout
seconds, abort the rest, stop the engine, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import threading
from contextlib import contextmanager

import uvicorn

from ..chat_template import CONTENT_FORMATS
from ..engine.args import add_graph_args, check_vllm_options, speculative_config
from ..gc_pauses import freeze_heap
from ..help_format import DefaultsHelpFormatter

log = logging.getLogger("nsa_serve.api")


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                              formatter_class=DefaultsHelpFormatter)
    p.add_argument("model", nargs="?", default=None, metavar="MODEL_DIR",
                   help="model directory (default: the bundled default model)")
    g = p.add_argument_group("HTTP")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    g.add_argument("--port", type=int, default=8000, help="port to listen on")
    g.add_argument("--api-key", default=os.environ.get("NSA_SERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health and /ready "
                        "(default: $NSA_SERVE_API_KEY; unset: no key)")
    g.add_argument("--allowed-origins", type=_string_list, default=[],
                   help="CORS origins allowed to read answers, a JSON list as vLLM takes it ('[\"*\"]' for any; "
                        "default: none, no CORS headers)")
    g.add_argument("--allowed-methods", type=_string_list, default=["*"], help="CORS methods (JSON list)")
    g.add_argument("--allowed-headers", type=_string_list, default=["*"], help="CORS headers (JSON list)")
    g.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    g.add_argument("--ssl-keyfile", default=None, help="serve HTTPS with this private key (PEM)")
    g.add_argument("--ssl-certfile", default=None, help="... and this certificate chain (PEM)")
    g.add_argument("--ssl-ca-certs", default=None, help="CA certificates to verify client certificates")
    g.add_argument("--root-path", default="", help="path prefix a reverse proxy serves the API under")
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients use (default: the model directory's name)")
    g.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024,
                   help="larger request bodies get 413")
    g.add_argument("--retry-after", type=int, default=1, help="Retry-After seconds sent with 429")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may take to finish after SIGTERM")
    g.add_argument("--responses-store-size", type=int, default=1024,
                   help="/v1/responses kept in memory for GET and previous_response_id (oldest forgotten first; "
                        "0: none kept)")
    g.add_argument("--enable-log-requests", action="store_true",
                   help="log each request as it arrives (prompt, parameters) and ends (vLLM's flag; off: prompts "
                        "are users' data)")
    g.add_argument("--max-log-len", type=int, default=None,
                   help="prompt characters and token ids shown by --enable-log-requests (default: all)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="server log level (debug also logs each HTTP access, unless --uvicorn-log-level says "
                        "otherwise)")
    g.add_argument("--uvicorn-log-level", default=None,
                   choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's own log level (vLLM's flag; default: --log-level); debug or trace logs each "
                        "HTTP access")
    # vLLM's switches for the HTTP side (the last two name what this server always does).
    for flag, text in (
            ("--disable-uvicorn-access-log", "no line per HTTP access, even at debug"),
            ("--disable-log-requests", "no effect: requests are not logged unless --enable-log-requests"),
            ("--disable-fastapi-docs", "no /docs, /redoc and /openapi.json pages"),
            ("--return-tokens-as-token-ids", "logprobs name tokens 'token_id:N' unless a request says otherwise"),
            ("--enable-force-include-usage",
             "every stream ends with a usage chunk, as if it asked stream_options.include_usage"),
            ("--enable-request-id-headers", "always on: every answer carries X-Request-Id"),
            ("--enable-prompt-tokens-details", "always on: usage has prompt_tokens_details.cached_tokens")):
        g.add_argument(flag, action="store_true", help=f"{text} (vLLM's flag)")
    g.add_argument("--log-stats-interval", type=float, default=10.0,
                   help="seconds between lines of engine statistics in the log (throughputs, queue, KV cache; "
                        "0: none)")
    g.add_argument("--disable-log-stats", action="store_true", help="no lines of engine statistics (vLLM's flag)")
    add_chat_template_args(g)
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)


def add_chat_template_args(g) -> None:
    """vLLM's chat-template flags (serve and run-batch)."""
    g.add_argument("--chat-template", default=None,
                   help="a Jinja chat template, as a file or the template itself, in place of the model "
                        "directory's chat_template.jinja or the built-in template (docs/api.md)")
    g.add_argument("--trust-request-chat-template", action="store_true",
                   help="let requests bring their own chat_template (off: such requests get 400)")
    g.add_argument("--chat-template-content-format", choices=CONTENT_FORMATS, default="auto",
                   help="how a Jinja template gets a message's content: one string, or OpenAI's list of "
                        "text parts; auto: parts for a template that loops over a message's content")


def chat_template_source(args, prog: str) -> str | None:
    """--chat-template's text, checked to compile before any weight loads."""
    from ..chat_template import ChatTemplateError, compile_template, load_chat_template

    if args.chat_template is None:
        return None
    try:
        source = load_chat_template(args.chat_template)
        compile_template(source)
    except (ChatTemplateError, OSError) as exc:
        raise SystemExit(f"{prog}: --chat-template: {exc}") from None
    return source


def add_engine_args(p) -> None:
    """The engine's flags (serve and run-batch)."""
    g = p.add_argument_group("engine")
    g.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=64, help="sequences running at once")
    g.add_argument("--max-logprobs", type=int, default=20,
                   help="most alternatives a request may ask logprobs or prompt logprobs for (vLLM's flag; "
                        "-1: the vocabulary)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget of one engine step (default: 8192 on CUDA, 2048 on CPU)")
    g.add_argument("--long-prefill-token-threshold", type=int, default=None,
                   help="per-request prefill chunk cap per step (default: the whole step budget on "
                        "CUDA, 512 on CPU)")
    g.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory for weights and cache")
    g.add_argument("--cpu-kv-cache-gb", type=float, default=1.0, help="page pool size on CPU")
    g.add_argument("--num-pages", type=int, default=None, help="force the page pool size")
    g.add_argument("--attention", choices=["nsa", "dense"], default="nsa",
                   help="nsa: the model's sparse attention; dense: full attention over the same paged cache (the baseline)")
    g.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    g.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32")
    g.add_argument("--no-prefix-caching", "--no-enable-prefix-caching", dest="enable_prefix_caching",
                   action="store_false", help="disable the prefix cache")
    g.add_argument("--enable-prefix-caching", dest="enable_prefix_caching", action="store_true",
                   default=argparse.SUPPRESS, help="the prefix cache (on by default for shared-K/V models; vLLM's flag)")
    g.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default="fcfs",
                   help="fcfs: arrival order; priority: lower request `priority` first, then arrival")
    add_graph_args(g)
    g.add_argument("--cpu-threads", type=int, default=None,
                   help="CPU only: intra-op threads of engine steps (default: one per core)")
    g.add_argument("--cpu-reserved-cores", type=int, default=1,
                   help="CPU only: cores left to the HTTP server during decode steps (default 1)")
    g.add_argument("--warmup-context", type=int, default=0,
                   help="run a synthetic workload up to this context length at start-up, so Triton "
                   "compiles its kernel variants before the first request (default 0: off)")
    g.add_argument("--no-precompile", dest="precompile", action="store_false",
                   help="CUDA: do not compile the kernel variants of eager steps at start-up (they "
                   "then compile inside the first requests that meet them)")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampling of requests that give none")
    g.add_argument("--speculative-config", type=speculative_config, default=None,
                   help="speculative decoding, as vLLM's JSON: '{\"method\": \"ngram\", "
                        "\"num_speculative_tokens\": 4, \"prompt_lookup_max\": 4, \"prompt_lookup_min\": 2}' "
                        "(drafts from n-gram lookup in the sequence's own tokens; the only method here)")
    g.add_argument("--generation-config", default="auto",
                   help="sampling defaults for what requests leave out: 'auto' (the model directory's "
                        "generation_config.json), 'vllm' (none: the API's own defaults), or a folder holding a "
                        "generation_config.json (vLLM's flag)")
    g.add_argument("--override-generation-config", type=json.loads, default=None,
                   help="JSON object merged over those defaults, e.g. '{\"temperature\": 0.5}' (vLLM's flag)")
    add_vllm_compat_args(p)


# vLLM flags a copied `vllm serve` command line may carry, taken where their value means what this
# server does anyway and refused with the reason otherwise (engine.args.check_vllm_options), rather
# than argparse's bare "unrecognized arguments".
def add_vllm_compat_args(p) -> None:
    g = p.add_argument_group("vLLM flags taken for compatibility (docs/vllm.md)")
    for flag, short in (("--tensor-parallel-size", "-tp"), ("--pipeline-parallel-size", "-pp"),
                        ("--data-parallel-size", "-dp")):
        g.add_argument(flag, short, type=int, default=1, help="1 only: one GPU serves the model")
    g.add_argument("--kv-cache-dtype", default="auto",
                   help="auto only: the cache holds K/V in the model's dtype")
    g.add_argument("--quantization", "-q", default=None, help="not supported: the weights load as stored")
    g.add_argument("--enable-chunked-prefill", action="store_true", default=argparse.SUPPRESS,
                   help="always on: long prompts are chunked (--long-prefill-token-threshold)")
    g.add_argument("--enable-auto-tool-choice", action="store_true", default=argparse.SUPPRESS,
                   help='always on: tool_choice "auto" needs no flag here')
    g.add_argument("--tool-call-parser", default=None,
                   help="nsa only: the model's tool calls are this server's JSON list (docs/api.md)")
    g.add_argument("--trust-remote-code", action="store_true", default=argparse.SUPPRESS,
                   help="no effect: a model directory holds no code, and none is ever run from it")


def check_vllm_compat(args, prog: str) -> None:
    """The vLLM flags' values this server cannot honour, as a clear exit before any weight loads."""
    try:
        check_vllm_options(vars(args), spell=lambda name: "--" + name.replace("_", "-"))
    except ValueError as exc:
        raise SystemExit(f"{prog}: {exc}") from None


SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens")


def sampling_defaults(args) -> dict:
    """What a request that leaves a sampling field out gets (--generation-config and its override)."""
    from ..model.checkpoint import load_generation_config

    source = args.generation_config
    if source == "vllm":
        config = {}
    else:
        folder = args.model if source == "auto" else source
        if source != "auto" and not os.path.isdir(folder):
            raise SystemExit(f"nsa-serve: --generation-config {source!r} is not 'auto', 'vllm' or a folder")
        try:
            config = load_generation_config(folder)
        except ValueError as exc:
            raise SystemExit(f"nsa-serve: {exc}") from None
    override = args.override_generation_config or {}
    if not isinstance(override, dict):
        raise SystemExit("nsa-serve: --override-generation-config must be a JSON object")
    unknown = sorted(set(override) - set(SAMPLING_DEFAULTS))
    if unknown:
        raise SystemExit(f"nsa-serve: --override-generation-config: unknown field(s) {', '.join(unknown)}; "
                         f"known: {', '.join(SAMPLING_DEFAULTS)}")
    return {k: v for k, v in {**config, **override}.items() if k in SAMPLING_DEFAULTS}


def engine_args_from(args):
    from ..engine.args import EngineArgs

    check_vllm_compat(args, f"nsa-serve {args.command}")
    return EngineArgs(model=args.model, device=args.device, dtype=args.dtype, attention=args.attention,
                      max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                      max_logprobs=args.max_logprobs,
                      max_num_batched_tokens=args.max_num_batched_tokens,
                      long_prefill_token_threshold=args.long_prefill_token_threshold, max_queue=args.max_queue,
                      gpu_memory_utilization=args.gpu_memory_utilization, cpu_kv_cache_gb=args.cpu_kv_cache_gb,
                      num_pages=args.num_pages, enable_prefix_caching=args.enable_prefix_caching,
                      scheduling_policy=args.scheduling_policy, enforce_eager=args.enforce_eager, seed=args.seed,
                      piecewise_max_tokens=args.piecewise_max_tokens,
                      async_scheduling=args.async_scheduling,
                      cpu_threads=args.cpu_threads, cpu_reserved_cores=args.cpu_reserved_cores,
                      warmup_context=args.warmup_context, precompile=args.precompile,
                      **(args.speculative_config or {}))


def _string_list(text: str) -> list[str]:
    """A JSON list of strings (vLLM's form of the CORS flags); a bare word is taken as a one-item list."""
    try:
        value = json.loads(text)
    except ValueError:
        value = [text]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {text!r}")
    return value


def cmd_serve(args) -> int:
    if (args.ssl_keyfile is None) != (args.ssl_certfile is None):
        raise SystemExit("nsa-serve: --ssl-keyfile and --ssl-certfile go together")
    if args.responses_store_size < 0:
        raise SystemExit(f"nsa-serve: --responses-store-size must be ≥ 0, got {args.responses_store_size}")
    if args.log_stats_interval < 0:
        raise SystemExit(f"nsa-serve: --log-stats-interval must be ≥ 0 seconds, got {args.log_stats_interval}")
    if args.disable_log_requests and args.enable_log_requests:
        raise SystemExit("nsa-serve: --disable-log-requests and --enable-log-requests contradict each other")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 130


async def serve(args) -> int:
    from tqdm import tqdm

    from ..engine.async_engine import AsyncLLMEngine
    from ..engine.llm_engine import LLMEngine
    from ..model.init_model import ensure_default_model
    from .server import ServerSettings, build_app

    with tqdm(total=3, unit="stage", bar_format="{desc:<40} |{bar:20}| {n}/{total} [{elapsed}]") as bar:
        def stage(name: str) -> None:
            bar.set_description_str(f"nsa-serve: {name}")

        stage("resolving model")
        args.model = str(args.model or ensure_default_model())
        defaults = sampling_defaults(args)  # a bad --generation-config ends here, before the weights load
        chat_template = chat_template_source(args, "nsa-serve serve")  # and a bad --chat-template
        bar.update()
        stage("loading weights")
        eargs = engine_args_from(args)
        try:
            # Loads and checks the weights and sizes the page pool. Bad flags or a broken model
            # directory (ConfigError, CheckpointError are ValueErrors) end here with their message.
            engine = AsyncLLMEngine(eargs, engine=LLMEngine(eargs))
        except (ValueError, FileNotFoundError) as exc:
            raise SystemExit(f"nsa-serve serve: {exc}") from None
        bar.update()
        stage("warming up")
        await engine.start()
        bar.update()
        stage("ready")

    settings = ServerSettings(served_model_names=args.served_model_name or [], api_key=args.api_key,
                              max_body_bytes=args.max_body_bytes, retry_after_s=args.retry_after,
                              shutdown_timeout_s=args.shutdown_timeout, defaults=defaults, model_root=args.model,
                              start_engine=False,
                              log_stats_interval_s=0.0 if args.disable_log_stats else args.log_stats_interval,
                              responses_store_size=args.responses_store_size,
                              log_requests=args.enable_log_requests, max_log_len=args.max_log_len,
                              cors_origins=args.allowed_origins, cors_methods=args.allowed_methods,
                              cors_headers=args.allowed_headers, cors_credentials=args.allow_credentials,
                              chat_template=chat_template,
                              trust_request_chat_template=args.trust_request_chat_template,
                              chat_template_content_format=args.chat_template_content_format,
                              fastapi_docs=not args.disable_fastapi_docs,
                              return_tokens_as_token_ids=args.return_tokens_as_token_ids,
                              force_include_usage=args.enable_force_include_usage)
    app = build_app(engine, settings)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level or args.log_level,
                            timeout_graceful_shutdown=max(1, int(round(args.shutdown_timeout))),
                            access_log=(args.uvicorn_log_level or args.log_level) in ("debug", "trace")
                            and not args.disable_uvicorn_access_log,
                            root_path=args.root_path,
                            ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
                            ssl_ca_certs=args.ssl_ca_certs)
    server = GracefulServer(config, on_exit=lambda: setattr(app.state.ctx, "draining", True))
    log.info("serving %s as %s on http://%s:%d", args.model, ", ".join(app.state.ctx.served_model_names),
             args.host, args.port)
    template = app.state.ctx.chat_template_for(None)
    if template is not None:  # as vLLM, say which content format a Jinja template gets
        fmt = args.chat_template_content_format
        log.info("chat template: Jinja, content format %s", f"{template.content_format} (detected)"
                 if fmt == "auto" else fmt)
    # Start-up's objects (modules, weights' wrappers, the app) live as long as the process: out of
    # the collector's reach, a full collection walks only what requests made (gc_pauses.py).
    log.info("froze %d start-up objects out of garbage collection", freeze_heap())
    try:
        await server.serve()
    finally:
        # In-flight requests were given the graceful period by uvicorn; whatever remains is aborted.
        await engine.shutdown(0.0)
    log.info("stopped")
    return 0


class GracefulServer(uvicorn.Server):
    """uvicorn.Server that marks the app draining on SIGTERM/SIGINT and, unlike uvicorn, does not
    re-raise the signal after shutting down (that would kill the process before the engine stops)."""

    def __init__(self, config: uvicorn.Config, on_exit=lambda: None):
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)

    @contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach only the main thread (tests run servers in threads)
            return
        previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
