"""What both generation endpoints share: the serving context, body parsing, prompt checks, SSE framing."""

from __future__ import annotations

import functools
import json
import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import anyio
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ..chat_template import ChatTemplate, ChatTemplateError, compile_template
from ..engine.protocol import EngineError, RequestOutput
from ..metrics import ServerMetrics
from .errors import APIError, bad_request, from_engine_error
from .generation import ClientDisconnected, cancel_on_disconnect
from .request_log import RequestLog

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

# JSON cannot carry -inf; vLLM clamps the same way.
_MIN_LOGPROB = -9999.0

# Request bodies from this size have their prompt rendered and tokenized in a worker thread
# (ServingContext.off_loop): a 600 KB document takes ~250 ms to tokenize, which on the event loop
# stalls every other stream for that long; sentencepiece releases the GIL while it encodes.
# Smaller ones stay inline, where a thread hop (~0.1 ms) would cost more than their encode.
OFF_LOOP_BYTES = 32 * 1024
# Answers with this many token entries or more (answer_entries) are assembled and serialised in a
# worker thread too (ServingContext.assemble): an echoed 2 000-token prompt with logprobs 5 is 1 MB
# of JSON, whose building held the loop (every stream) up to ~180 ms on the 2-core CPU.
OFF_LOOP_ENTRIES = 4096


async def _in_thread_if(big: bool, fn: Callable[..., T], *args: Any) -> T:
    if not big:
        return fn(*args)
    return await anyio.to_thread.run_sync(functools.partial(fn, *args))


def answer_entries(outputs) -> int:
    """How many token entries an answer built from `outputs` (RequestOutputs) carries at most:
    each prompt or generated token once, and, where logprobs are shown, once more for its own
    logprob and once for each alternative (every entry of a list has the same number of
    alternatives, so the last one's is taken)."""
    def entries(tokens: int, lps) -> int:
        last = lps[-1] if lps else None
        return tokens * (1 + (1 + len(last.top) if last is not None else 0))

    total = 0
    for out in outputs:
        if out.prompt_logprobs:
            total += entries(len(out.prompt_logprobs), out.prompt_logprobs)
        for c in out.outputs:
            total += entries(len(c.token_ids), c.logprobs)
    return total


def _check_utf8(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(f"{param} contains an unpaired UTF-16 surrogate (\\ud800-\\udfff escape)",
                          param=param) from None


@dataclass
class ServingContext:
    engine: Any  # nsa_serve.engine.protocol.AsyncEngine plus `tokenizer`, `model_name`
    metrics: ServerMetrics
    served_model_names: list[str]
    max_model_len: int
    model_root: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)  # generation_config.json sampling defaults
    retry_after_s: int = 1
    draining: bool = False  # set on SIGTERM: readiness goes false, new generation requests get 503
    request_log: RequestLog | None = None  # --enable-log-requests
    chat_template: ChatTemplate | None = None  # --chat-template (None: the model's own, else the built-in)
    trust_request_chat_template: bool = False  # --trust-request-chat-template
    chat_template_content_format: str = "auto"  # --chat-template-content-format (chat_template.py)
    return_tokens_as_token_ids: bool = False  # --return-tokens-as-token-ids: requests' default
    force_include_usage: bool = False  # --enable-force-include-usage: every stream ends with its usage

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def token_names(self, as_ids: bool | None) -> "TokenNames":
        """How a request's logprobs name tokens: its own return_tokens_as_token_ids, else the server's."""
        return TokenNames(self.tokenizer, self.return_tokens_as_token_ids if as_ids is None else as_ids)

    def stream_usage(self, options) -> tuple[bool, bool]:
        """(a last chunk with the usage, every chunk with its choice's usage so far) for a stream's
        stream_options; --enable-force-include-usage adds the first whatever the request says."""
        return (self.force_include_usage or bool(options and options.include_usage),
                bool(options and options.continuous))

    def check_model(self, name: str | None) -> str:
        if name is None:
            return self.served_model_names[0]
        if name not in self.served_model_names:
            raise APIError(404, f"The model `{name}` does not exist. Served models: "
                                f"{', '.join(self.served_model_names)}", param="model", code="model_not_found")
        return name

    def check_admitting(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down and admits no new requests", code="shutting_down")
        if not self.engine.is_alive:
            raise APIError(503, "the engine loop has stopped", code="engine_dead")

    # -- prompts -------------------------------------------------------------------------------------
    async def off_loop(self, raw: Request, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) — a request's prompt work: template, tokenizer, checks — in a worker thread when
        the request body is OFF_LOOP_BYTES or larger, so a long document does not hold up the event
        loop that streams everyone else's tokens; inline for smaller bodies. Its errors (APIError)
        propagate as if called here."""
        # The body is already read (and cached) by now.
        return await _in_thread_if(len(await raw.body()) >= OFF_LOOP_BYTES, fn, *args)

    async def assemble(self, outputs, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) — build and serialise an answer (or a stream's chunk) from `outputs` — in a
        worker thread when it carries OFF_LOOP_ENTRIES or more token entries (long echoed prompts
        with logprobs: megabytes of JSON), inline otherwise."""
        return await _in_thread_if(answer_entries(outputs) >= OFF_LOOP_ENTRIES, fn, *args)

    def encode(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        _check_utf8(text, param)
        return self.tokenizer.encode(text, add_bos=add_special_tokens)

    def encode_chat(self, text: str, param: str, chat_template: ChatTemplate | None,
                    add_special_tokens: bool = True) -> list[int]:
        """A rendered chat prompt's ids (Tokenizer.encode_chat: a Jinja template writes its own BOS;
        add_special_tokens=False leaves the built-in template's off)."""
        _check_utf8(text, param)
        return self.tokenizer.encode_chat(text, chat_template, add_bos=add_special_tokens)

    def chat_template_for(self, req) -> ChatTemplate | None:
        """The Jinja template a chat request renders with: its own `chat_template` (only when the
        server trusts requests' templates, as vLLM's --trust-request-chat-template), else
        --chat-template, else the model directory's chat_template.jinja; None: the built-in one.
        `req` None: the server's own."""
        if req is not None and req.chat_template is not None:
            if not self.trust_request_chat_template:
                raise bad_request("this server does not take chat templates from requests (start it with "
                                  "--trust-request-chat-template to allow them)", param="chat_template")
            try:
                return compile_template(req.chat_template)
            except ChatTemplateError as exc:
                raise bad_request(str(exc), param="chat_template") from None
        return self.chat_template or getattr(self.tokenizer, "chat_template", None)

    def truncate(self, ids: list[int], keep: int | None) -> list[int]:
        """The prompt's last `keep` tokens (truncate_prompt_tokens; -1: the context length), as vLLM
        cuts a prompt: from the left, so the end the model continues is kept."""
        if keep is None:
            return ids
        if keep == -1:
            keep = self.max_model_len
        if keep < 1:
            raise bad_request(f"truncate_prompt_tokens must be -1 or at least 1, got {keep}",
                              param="truncate_prompt_tokens")
        if keep > self.max_model_len:
            raise bad_request(f"truncate_prompt_tokens ({keep}) is greater than this model's maximum context "
                              f"length ({self.max_model_len})", param="truncate_prompt_tokens")
        return ids[-keep:]

    def check_token_ids(self, ids: list[int], param: str) -> list[int]:
        vocab = self.tokenizer.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"{param} holds token id {bad}, outside the vocabulary [0, {vocab})", param=param)
        return ids

    def check_sampling_ids(self, params, logprobs_param: str = "logprobs"):
        """The token ids sampling parameters name (logit_bias keys, allowed_token_ids) are in the
        vocabulary: a 400 naming the field, not an index error in the engine loop. And the logprobs
        asked for are within --max-logprobs, named as the request's API calls them (`logprobs_param`:
        chat and responses call them top_logprobs)."""
        self.check_token_ids(list(params.logit_bias), "logit_bias")
        if params.allowed_token_ids is not None:
            self.check_token_ids(params.allowed_token_ids, "allowed_token_ids")
        bound = self.engine.max_logprobs
        for value, param in ((params.logprobs, logprobs_param), (params.prompt_logprobs, "prompt_logprobs")):
            if value is not None and value > bound:
                raise bad_request(f"{param} must be between 0 and {bound} (the server's --max-logprobs), got {value}",
                                  param=param)
        return params

    def check_beam_search(self, bp) -> None:
        """A beam search's stop ids are in the vocabulary, and its steps' logprobs (2 × the width,
        beam_search.py) within --max-logprobs: said as such, not as a logprobs the request never set."""
        self.check_token_ids(list(bp.stop_token_ids), "stop_token_ids")
        if 2 * bp.width > self.engine.max_logprobs:
            raise bad_request(f"use_beam_search with n={bp.width} keeps 2 × n = {2 * bp.width} candidates a step, "
                              f"more than the server's --max-logprobs {self.engine.max_logprobs}", param="n")

    def resolve_max_tokens(self, requested: int | None, prompt_len: int, param: str,
                           default: int | None = None, prompt_param: str = "messages") -> int:
        """max_tokens for the engine, checked against the context the prompt leaves."""
        room = self.max_model_len - prompt_len
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                f"your prompt has {prompt_len} tokens, which leaves no room for a completion. "
                                f"Shorten the prompt.", param=prompt_param,
                           code="context_length_exceeded")
        if requested is None:
            return min(default, room) if default else room
        if isinstance(requested, int) and requested > room:
            raise APIError(400, f"{param} is too large: {requested}. This model's maximum context length is "
                                f"{self.max_model_len} tokens and your request has {prompt_len} input tokens "
                                f"({requested} > {self.max_model_len} - {prompt_len}).", param=param,
                           code="context_length_exceeded")
        return requested

    async def first_output(self, request: Request, it: AsyncIterator) -> Any:
        """The first item of a generation, mapping admission errors (queue full, ...) to HTTP errors
        before any response bytes go out, and aborting if the client leaves while it waits."""
        try:
            return await cancel_on_disconnect(request, it.__anext__)
        except StopAsyncIteration:
            raise APIError(500, "the engine finished the request without any output") from None
        except EngineError as exc:
            raise from_engine_error(exc, self.retry_after_s) from None
        except ClientDisconnected:
            raise


async def parse_body(request: Request, model: type[M]) -> M:
    """The request body as `model`; invalid UTF-8, malformed JSON and schema violations are 400s."""
    return validate_body(model, await parse_json(request))


def validate_body(model: type[M], data: dict) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None


async def parse_json(request: Request) -> dict:
    """The request body as a JSON object; invalid UTF-8 and malformed JSON are 400s."""
    body = await request.body()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"request body is not valid UTF-8 (bad byte at offset {exc.start})") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object")
    return data


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed in JSON")


def _validation_error(exc: ValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0]
    # Union members add their type name to `loc` (e.g. ('stop', 'str')); keep the path a client wrote.
    loc = [str(p) for p in first["loc"] if isinstance(p, int) or not _is_type_tag(p)]
    path = ".".join(loc) or "body"
    more = len({tuple(e["loc"][:1]) for e in errors}) - 1
    extra = f" (and {more} more invalid field{'s' if more > 1 else ''})" if more > 0 else ""
    if first["type"] == "missing":
        msg = f"{path} is required{extra}"
    else:
        got = first.get("input")
        got_s = json.dumps(got)[:80] if _jsonable(got) else type(got).__name__
        msg = f"{path}: {first['msg']} (got {got_s}){extra}"
    return bad_request(msg, param=loc[0] if loc else None)


def _is_type_tag(p: str) -> bool:
    return any(ch in p for ch in "[]") or p in ("str", "int", "float", "bool", "list", "dict") or \
        p.startswith(("function-", "constrained-"))


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_for(request: Request, prefix: str, body_id: str | None = None) -> str:
    """The request's id: the client's X-Request-Id after the prefix when it sends one (vLLM's way,
    so a trace through proxies finds the request in responses and logs), else the body's
    `request_id` (vLLM's field), else a fresh one. Two requests running with the same id are
    refused (400 naming request_id)."""
    given = request.headers.get("x-request-id", body_id)
    if given is None:
        return new_id(prefix)
    if not _CLIENT_ID.fullmatch(given):
        raise bad_request("X-Request-Id must be 1-128 letters, digits, '.', '_', ':' or '-'", param="request_id")
    return f"{prefix}-{given}"


def clamp_logprob(x: float) -> float:
    return _MIN_LOGPROB if not math.isfinite(x) or x < _MIN_LOGPROB else float(x)


@dataclass(frozen=True)
class TokenNames:
    """How logprobs name tokens: by their text, or (vLLM's return_tokens_as_token_ids) as
    "token_id:N", which tells apart tokens whose text is the same or not a whole character."""
    tokenizer: Any
    as_ids: bool = False

    def name(self, token_id: int, text: str) -> str:
        return f"token_id:{token_id}" if self.as_ids else text

    def utf8(self, token_id: int, text: str) -> list[int]:
        """OpenAI's `bytes`: the token's own bytes (a byte piece's raw byte), not its name's."""
        return list(self.tokenizer.token_bytes(token_id) if self.tokenizer is not None else text.encode("utf-8"))


def prompt_logprobs_body(lps) -> list | None:
    """Engine prompt logprobs as vLLM returns them: None for the first token, then per token a dict
    {token id: {logprob, rank, decoded_token}} holding the prompt's token and the top-k."""
    if lps is None:
        return None
    out = []
    for t in lps:
        if t is None:
            out.append(None)
            continue
        entry = {str(t.token_id): {"logprob": clamp_logprob(t.logprob), "rank": t.rank, "decoded_token": t.token}}
        for rank, (i, text, lp) in enumerate(t.top, start=1):
            entry.setdefault(str(i), {"logprob": clamp_logprob(lp), "rank": rank, "decoded_token": text})
        out.append(entry)
    return out


def sse(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def stream_error_event(exc: BaseException, retry_after_s: int = 1) -> str:
    """An error inside a stream that has already sent its headers: one `data: {"error": ...}` event,
    which the openai client raises as APIError."""
    if isinstance(exc, APIError):
        err = exc
    elif isinstance(exc, EngineError):
        err = from_engine_error(exc, retry_after_s)
    else:
        err = APIError(500, f"internal error while streaming: {type(exc).__name__}: {exc}")
    return sse(err.body())


def raise_if_failed(out: RequestOutput, index: int | None = None) -> None:
    """A sequence the engine ended with finish_reason "error" (its computation raised) fails the HTTP
    request with 500, as vLLM does, rather than passing off a truncated text as a normal answer."""
    for c in out.outputs:
        if c.finish_reason == "error" and (index is None or c.index == index):
            raise APIError(500, f"the engine failed while generating request {out.request_id} "
                                f"(choice {c.index}); see the server log", code="generation_error")


class SSEResponse(StreamingResponse):
    """A text/event-stream response that always closes its body generator, even when the client's
    disconnect cancels the send loop while the generator sits at a `yield` (Starlette leaves it to the
    garbage collector then, and the engine would keep the request's pages until it ran)."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


def json_response(body: BaseModel, request_id: str) -> Response:
    return Response(body.model_dump_json(), media_type="application/json", headers={"X-Request-Id": request_id})


async def final_output(ctx: ServingContext, request: Request, it: AsyncIterator, first: RequestOutput) -> RequestOutput:
    """A non-streaming request's last output (after `first`), its failures raised as HTTP errors."""
    async def drain() -> RequestOutput:
        last = first
        async for out in it:
            last = out
        return last

    final = await run_to_end(ctx, request, drain)
    raise_if_failed(final)
    return final


async def run_to_end(ctx: ServingContext, request: Request, fn: Callable[[], Awaitable[T]]) -> T:
    """Await fn() (draining a generation for a non-streaming response), aborting if the client leaves
    and mapping engine failures to HTTP errors."""
    try:
        return await cancel_on_disconnect(request, fn)
    except EngineError as exc:
        raise from_engine_error(exc, ctx.retry_after_s) from None
