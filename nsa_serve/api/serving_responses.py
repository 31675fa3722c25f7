"""/v1/responses (OpenAI's Responses API): a chat completion in the Responses envelope.

The request becomes a chat request (protocol_responses.py) and runs as one; its reply becomes a
`message` output item, or `function_call` items when tools were called. `store` (default true, as
OpenAI) keeps the response for `GET /v1/responses/{id}` and for a later `previous_response_id`,
which continues its conversation (the earlier `instructions` are not carried over, as OpenAI
specifies). Streams are the typed events the official client parses (`response.created`,
`response.output_text.delta`, ..., `response.completed`); a reply that may become tool calls is
held until it ends, then sent as its items.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import contextmanager
from typing import AsyncIterator

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..engine.protocol import RequestOutput
from .errors import APIError
from .generation import tracked_generate
from .protocol_responses import ResponsesRequest
from .response_store import ResponseStore, StoredResponse
from .protocol import ChatCompletionRequest
from .serving_chat import PreparedChat, choice_logprobs, prepare_chat
from .serving_common import (ServingContext, SSEResponse, TokenNames, final_output, raise_if_failed,
                             stream_error_event)
from .tools import ToolPlan, tool_calls_of

# Chat field names in errors, as a Responses client wrote them.
_PARAMS = {"max_tokens": "max_output_tokens", "messages": "input", "response_format": "text"}


def _hex_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@contextmanager
def _responses_params():
    try:
        yield
    except APIError as exc:
        exc.param = _PARAMS.get(exc.param, exc.param)
        raise


async def create_response(ctx: ServingContext, store: ResponseStore, req: ResponsesRequest, body: dict,
                          raw: Request):
    req.check()
    model = ctx.check_model(req.model)
    ctx.check_admitting()
    history: list[dict] = []
    if req.previous_response_id is not None:
        prev = store.get(req.previous_response_id)
        if prev is None:
            raise APIError(404, f"Previous response with id {req.previous_response_id!r} not found.",
                           param="previous_response_id", code="previous_response_not_found")
        history = prev.conversation
    with _responses_params():
        chat, prep = await ctx.off_loop(raw, _fitted_chat, ctx, req, history, body)
        params = ctx.check_sampling_ids(chat.to_sampling_params(prep.max_tokens, ctx.defaults, prep.plan),
                                        "top_logprobs")
    run = _Run(ctx, store, req, model, params.temperature, params.top_p, prep.plan, history,
               ctx.token_names(None) if req.logprobs else None)
    it = tracked_generate(ctx.engine, ctx.metrics, prep.prompt_ids, params, run.id, chat.priority,
                          ctx.request_log)
    first = await ctx.first_output(raw, it)
    if req.stream:
        return SSEResponse(run.events(it, first), headers={"Cache-Control": "no-cache", "X-Request-Id": run.id})

    final = await final_output(ctx, raw, it, first)
    c = final.outputs[0]
    # Long answers with logprobs are converted and serialised in worker threads; storing stays here,
    # on the loop that reads the store.
    response = run.finish(c.text, c.finish_reason, final, await ctx.assemble([final], run.logprobs, c.logprobs))
    return await ctx.assemble([final], lambda: JSONResponse(response, headers={"X-Request-Id": run.id}))


def _fitted_chat(ctx: ServingContext, req: ResponsesRequest, history: list[dict],
                 body: dict) -> tuple[ChatCompletionRequest, PreparedChat]:
    """The chat request and its prompt. Under truncation "auto" a conversation that leaves no room
    for the reply (or for max_output_tokens) loses its oldest items, as few as fit — found by
    bisection, a prompt's length falling as items go — keeping the instructions and the last item;
    if even that does not fit, the 400 is the untruncated request's."""
    chat = req.to_chat(history, body)
    try:
        return chat, prepare_chat(ctx, chat)
    except APIError as exc:
        if req.truncation != "auto" or exc.code != "context_length_exceeded":
            raise
        too_long = exc
    best, lo, hi = None, 1, req.conversation_length(history) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        chat = req.to_chat(history, body, drop=mid)
        try:
            best, hi = (chat, prepare_chat(ctx, chat)), mid - 1
        except APIError as exc:
            if exc.code != "context_length_exceeded":
                raise
            lo = mid + 1
    if best is None:
        raise too_long
    return best


class _Run:
    """One response: its envelope, its output items, and its storage."""

    def __init__(self, ctx: ServingContext, store: ResponseStore, req: ResponsesRequest, model: str,
                 temperature: float, top_p: float, plan: ToolPlan | None, history: list[dict],
                 names: TokenNames | None = None):
        self.ctx, self.store, self.req, self.model, self.plan, self.history = ctx, store, req, model, plan, history
        self.names = names  # set when the request includes message.output_text.logprobs
        self.temperature, self.top_p = temperature, top_p
        self.id = _hex_id("resp")
        self.created = int(time.time())
        self.message_id = _hex_id("msg")
        self.seq = 0

    def envelope(self, status: str, output: list[dict], usage: dict | None = None,
                 incomplete: bool = False) -> dict:
        req = self.req
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
            "model": self.model, "output": output, "usage": usage, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "metadata": req.metadata or {}, "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id, "store": req.store,
            "temperature": self.temperature, "top_p": self.top_p,
            "text": {"format": (req.text or {}).get("format") or {"type": "text"}},
            "tool_choice": req.tool_choice if req.tool_choice is not None else ("auto" if req.tools else "none"),
            "tools": req.tools or [], "truncation": req.truncation or "disabled", "user": req.user,
            "reasoning": None,
            "background": False,
        }

    def logprobs(self, lps) -> list[dict]:
        """Tokens' logprobs in the Responses shape (chat's: token, logprob, bytes, top_logprobs)."""
        if self.names is None or not lps:
            return []
        return [t.model_dump() for t in choice_logprobs(lps, self.req.top_logprobs or 0, self.names).content]

    def items(self, text: str, finish_reason: str | None,
              logprobs: list[dict] | None = None) -> tuple[list[dict], list[dict] | None]:
        """The output items of a finished reply, and its tool calls (chat shape) when it made any."""
        calls = tool_calls_of(self.plan, text, finish_reason) if self.plan is not None else None
        if calls:
            return [{"type": "function_call", "id": _hex_id("fc"), "call_id": c["id"], "name": c["function"]["name"],
                     "arguments": c["function"]["arguments"], "status": "completed"} for c in calls], calls
        status = "incomplete" if finish_reason == "length" else "completed"
        return [self.message(status, text, logprobs)], None

    def message(self, status: str, text: str | None, logprobs: list[dict] | None = None) -> dict:
        content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [],
                                            "logprobs": logprobs or []}]
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": content}

    def finish(self, text: str, finish_reason: str | None, final: RequestOutput,
               logprobs: list[dict] | None = None) -> dict:
        """The finished response object, stored when asked."""
        output, calls = self.items(text, finish_reason, logprobs)
        n_in, n_out = len(final.prompt_token_ids), final.outputs[0].num_tokens
        usage = {"input_tokens": n_in, "input_tokens_details": {"cached_tokens": final.metrics.num_cached_tokens},
                 "output_tokens": n_out, "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": n_in + n_out}
        incomplete = finish_reason == "length"
        response = self.envelope("incomplete" if incomplete else "completed", output, usage, incomplete)
        if self.req.store:
            reply = {"role": "assistant", "content": None, "tool_calls": calls} if calls else \
                {"role": "assistant", "content": text}
            self.store.put(self.id, StoredResponse(response, self.history + self.req.input_messages() + [reply]))
        return response

    # -- streaming -------------------------------------------------------------------------------
    def event(self, kind: str, **fields) -> str:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def events(self, it: AsyncIterator[RequestOutput], first: RequestOutput) -> AsyncIterator[str]:
        """The typed event stream. Text streams as generated; a reply that may be tool calls (any
        tool_choice but none) is held until it ends."""
        held = self.plan is not None
        text, lps = "", []
        try:
            yield self.event("response.created", response=self.envelope("in_progress", []))
            yield self.event("response.in_progress", response=self.envelope("in_progress", []))
            ids = dict(item_id=self.message_id, output_index=0, content_index=0)
            if not held:
                yield self.event("response.output_item.added", output_index=0, item=self.message("in_progress", None))
                yield self.event("response.content_part.added", item_id=self.message_id, output_index=0,
                                 content_index=0, part={"type": "output_text", "text": "", "annotations": []})
            out = first
            while True:
                c = out.outputs[0]
                raise_if_failed(out)
                delta_lps = self.logprobs(c.delta_logprobs)
                lps += delta_lps
                if c.delta_text or delta_lps:
                    text += c.delta_text
                    if not held:
                        yield self.event("response.output_text.delta", **ids, delta=c.delta_text, logprobs=delta_lps)
                if out.finished:
                    break
                out = await it.__anext__()
            response = self.finish(text, c.finish_reason, out, lps)
            for index, item in enumerate(response["output"]):
                if item["type"] == "function_call":
                    added = {**item, "arguments": "", "status": "in_progress"}
                    yield self.event("response.output_item.added", output_index=index, item=added)
                    yield self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                                     delta=item["arguments"])
                    yield self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                     name=item["name"], arguments=item["arguments"])
                    yield self.event("response.output_item.done", output_index=index, item=item)
                    continue
                if held:  # a held reply that is text after all: its events, with the text in one delta
                    yield self.event("response.output_item.added", output_index=0,
                                     item=self.message("in_progress", None))
                    yield self.event("response.content_part.added", item_id=self.message_id, output_index=0,
                                     content_index=0, part={"type": "output_text", "text": "", "annotations": []})
                    if text:
                        yield self.event("response.output_text.delta", **ids, delta=text, logprobs=lps)
                part = item["content"][0]
                yield self.event("response.output_text.done", **ids, text=part["text"], logprobs=part["logprobs"])
                yield self.event("response.content_part.done", **ids, part=part)
                yield self.event("response.output_item.done", output_index=0, item=item)
            kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
            yield self.event(kind, response=response)
        except asyncio.CancelledError:
            raise  # client gone: tracked_generate's cleanup aborts the request
        except Exception as exc:  # headers are out: an error event, the Responses way
            err = json.loads(stream_error_event(exc, self.ctx.retry_after_s)[len("data: "):])["error"]
            yield self.event("error", code=err.get("code"), message=err.get("message"), param=err.get("param"))
        finally:
            with anyio.CancelScope(shield=True):
                await it.aclose()


def retrieve(store: ResponseStore, response_id: str) -> dict:
    item = store.get(response_id)
    if item is None:
        raise APIError(404, f"No response found with id {response_id!r}.", param="response_id",
                       code="response_not_found")
    return item.body


def delete(store: ResponseStore, response_id: str) -> dict:
    if not store.delete(response_id):
        raise APIError(404, f"No response found with id {response_id!r}.", param="response_id",
                       code="response_not_found")
    return {"id": response_id, "object": "response.deleted", "deleted": True}

