"""/v1/chat/completions: chat template -> engine request -> OpenAI chat.completion(.chunk) objects."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import AsyncIterator

import anyio
from starlette.requests import Request
from starlette.responses import Response

from ..engine.protocol import RequestOutput, TokenLogprob
from .beam_search import BeamSearchParams, beam_search, observed
from .errors import bad_request
from .generation import tracked_generate
from .protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, ChatMessageOut, ChatTokenLogprob, ChoiceLogprobs, DeltaMessage,
                       PromptTokensDetails, TokenizeRequest, TopLogprob, UsageInfo, check_continuation)
from .serving_common import (SSE_DONE, ServingContext, SSEResponse, TokenNames, clamp_logprob, final_output,
                             json_response, prompt_logprobs_body, raise_if_failed, request_id_for, run_to_end, sse,
                             stream_error_event)
from .tools import RequiredCallStream, Tool, ToolPlan, new_call_id, tool_calls_of, tools_system_text


@dataclass
class PreparedChat:
    """A chat request turned into what the engine runs: the prompt, its token budget, how the reply
    becomes tool calls, and the echoed text it starts with."""
    prompt_ids: list[int]
    max_tokens: int
    plan: ToolPlan | None
    echo: str


def chat_prompt_ids(ctx: ServingContext, req: ChatCompletionRequest | TokenizeRequest,
                    tools: list[Tool], add_special_tokens: bool = True) -> list[int]:
    """The conversation (and tools) through the chat template in effect, tokenized. The built-in
    template sees the tools in a system turn before the conversation (api/tools.py); a Jinja
    template gets them as `tools`, in the request's own shape, and shows them as it was written to."""
    check_continuation(req)
    template = ctx.chat_template_for(req)
    if template is None:
        messages = [m.as_template_dict() for m in req.messages]
        if tools:  # the model is shown the tools it may be asked to call
            messages.insert(0, {"role": "system", "content": tools_system_text(tools)})
    else:
        messages = [m.as_jinja_dict() for m in req.messages]
    try:
        text = ctx.tokenizer.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt,
                                                 continue_final_message=req.continue_final_message,
                                                 chat_template=template,
                                                 tools=req.tools if tools and template is not None else None,
                                                 documents=req.documents, template_kwargs=req.chat_template_kwargs,
                                                 content_format=ctx.chat_template_content_format)
    except ValueError as exc:
        raise bad_request(str(exc), param=getattr(exc, "param", "messages")) from None
    return ctx.encode_chat(text, "messages", template, add_special_tokens)


def prepare_chat(ctx: ServingContext, req: ChatCompletionRequest) -> PreparedChat:
    """The chat template over the messages (and tools), tokenized, truncated and budgeted; the 400s
    of all of that. Shared by /v1/chat/completions and /v1/responses."""
    tools, plan = req.tool_plan()
    if req.echo and plan is not None:
        raise bad_request("echo cannot be combined with a tool call, which has no text to prepend", param="echo")
    # vLLM's chat echo: a reply in the last message's role (a continued assistant message) starts
    # with that message's text.
    last = req.messages[-1].as_template_dict()
    echo = (last["content"] or "") if req.echo and last["role"] == "assistant" else ""
    prompt_ids = ctx.truncate(chat_prompt_ids(ctx, req, tools), req.truncate_prompt_tokens)
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = ctx.resolve_max_tokens(req.requested_max_tokens(), len(prompt_ids), param,
                                        default=ctx.defaults.get("max_tokens"))
    return PreparedChat(prompt_ids, max_tokens, plan, echo)


async def create_chat_completion(ctx: ServingContext, req: ChatCompletionRequest, raw: Request):
    model = ctx.check_model(req.model)
    ctx.check_admitting()
    prep = await ctx.off_loop(raw, prepare_chat, ctx, req)
    prompt_ids, max_tokens, plan, echo = prep.prompt_ids, prep.max_tokens, prep.plan, prep.echo
    if req.use_beam_search:
        return await _beam_search_reply(ctx, req, raw, model, prompt_ids, req.to_beam_search_params(max_tokens, plan),
                                        echo)
    params = ctx.check_sampling_ids(req.to_sampling_params(max_tokens, ctx.defaults, plan), "top_logprobs")
    request_id = request_id_for(raw, "chatcmpl", req.request_id)
    top_k = req.top_logprobs or 0
    names = ctx.token_names(req.return_tokens_as_token_ids)
    it = tracked_generate(ctx.engine, ctx.metrics, prompt_ids, params, request_id, req.priority, ctx.request_log)
    first = await ctx.first_output(raw, it)
    created = int(time.time())
    if req.stream:
        include_usage, continuous = ctx.stream_usage(req.stream_options)
        return SSEResponse(_stream(ctx, it, first, request_id, model, created, params.n, include_usage, top_k,
                                   names, plan, continuous, echo, req.return_token_ids),
                           headers={"Cache-Control": "no-cache", "X-Request-Id": request_id})

    final = await final_output(ctx, raw, it, first)
    return await ctx.assemble([final], _reply, req, final, params.logprobs is not None, top_k, names, plan, echo,
                              prompt_ids, request_id, created, model)


def _reply(req: ChatCompletionRequest, final: RequestOutput, logprobs: bool, top_k: int, names: TokenNames,
           plan: ToolPlan | None, echo: str, prompt_ids: list[int], request_id: str, created: int,
           model: str) -> Response:
    """The chat.completion answer to a non-streaming request."""
    choices = []
    for c in sorted(final.outputs, key=lambda c: c.index):
        calls = tool_calls_of(plan, c.text, c.finish_reason) if plan is not None else None
        message = ChatMessageOut(content=None, tool_calls=calls) if calls else ChatMessageOut(content=echo + c.text)
        lp = choice_logprobs(c.logprobs, top_k, names) if logprobs else None
        choices.append(ChatChoice(index=c.index, message=message, logprobs=lp,
                                  finish_reason=_finish_reason(plan, c.finish_reason, calls),
                                  stop_reason=c.stop_reason,
                                  token_ids=list(c.token_ids) if req.return_token_ids else None))
    completion_tokens = sum(c.num_tokens for c in final.outputs)
    usage = UsageInfo(prompt_tokens=len(prompt_ids), completion_tokens=completion_tokens,
                      total_tokens=len(prompt_ids) + completion_tokens,
                      prompt_tokens_details=PromptTokensDetails(cached_tokens=final.metrics.num_cached_tokens))
    body = ChatCompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=usage,
                                  prompt_logprobs=prompt_logprobs_body(final.prompt_logprobs),
                                  prompt_token_ids=list(prompt_ids) if req.return_token_ids else None)
    return json_response(body, request_id)


async def _beam_search_reply(ctx: ServingContext, req: ChatCompletionRequest, raw: Request, model: str,
                             prompt_ids: list[int], bp: BeamSearchParams, echo: str):
    """use_beam_search: the n best beams as the choices, best first. The search ends before the
    response starts, so a stream carries each choice whole."""
    ctx.check_beam_search(bp)
    request_id = request_id_for(raw, "chatcmpl", req.request_id)

    async def search():
        return [await beam_search(ctx.engine, prompt_ids, bp, request_id, ctx.tokenizer.stop_token_ids,
                                  req.priority)]

    beams, = await observed(ctx.metrics, [len(prompt_ids)], [bp], lambda: run_to_end(ctx, raw, search))
    created = int(time.time())
    completion_tokens = sum(len(b.tokens) for b in beams)
    usage = UsageInfo(prompt_tokens=len(prompt_ids), completion_tokens=completion_tokens,
                      total_tokens=len(prompt_ids) + completion_tokens,
                      prompt_tokens_details=PromptTokensDetails(cached_tokens=beams[0].cached_tokens))
    ids = req.return_token_ids
    if not req.stream:
        choices = [ChatChoice(index=i, message=ChatMessageOut(content=echo + b.text), finish_reason=b.finish_reason,
                              stop_reason=b.stop_reason, token_ids=list(b.tokens) if ids else None)
                   for i, b in enumerate(beams)]
        return json_response(ChatCompletionResponse(id=request_id, created=created, model=model, choices=choices,
                                                    usage=usage, prompt_token_ids=list(prompt_ids) if ids else None),
                             request_id)

    async def events():
        def chunk(choices, usage=None, prompt_token_ids=None):
            return sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices, usage=usage,
                                           prompt_token_ids=prompt_token_ids))

        for i, b in enumerate(beams):
            yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))],
                        prompt_token_ids=list(prompt_ids) if ids and i == 0 else None)
            yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(content=echo + b.text),
                                         finish_reason=b.finish_reason, stop_reason=b.stop_reason,
                                         token_ids=list(b.tokens) if ids else None)])
        if ctx.stream_usage(req.stream_options)[0]:
            yield chunk([], usage)
        yield SSE_DONE

    return SSEResponse(events(), headers={"Cache-Control": "no-cache", "X-Request-Id": request_id})


def _finish_reason(plan: ToolPlan | None, reason: str | None, calls: list | None) -> str | None:
    # OpenAI: "tool_calls" when the model chose to call ("required", "auto"); a named call ends
    # with "stop".
    return "tool_calls" if calls and plan is not None and plan.mode in ("required", "auto") else reason


async def _stream(ctx: ServingContext, it: AsyncIterator[RequestOutput], first: RequestOutput, request_id: str,
                  model: str, created: int, n: int, include_usage: bool, top_k: int, names: TokenNames,
                  plan: ToolPlan | None = None, continuous: bool = False, echo: str = "",
                  return_token_ids: bool = False) -> AsyncIterator[str]:
    def chunk(choices, usage=None, prompt_token_ids=None):
        return sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices, usage=usage,
                                       prompt_token_ids=prompt_token_ids))

    prompt_tokens = len(first.prompt_token_ids)
    completion_tokens = [0] * n

    def usage_of(i: int) -> UsageInfo | None:
        """continuous_usage_stats: the chunk's choice's usage so far, as vLLM reports it."""
        if not continuous:
            return None
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens[i],
                         total_tokens=prompt_tokens + completion_tokens[i])

    # Tool calls stream as they are generated: a named call's id and name first, then its
    # arguments; "required" calls each once their name has closed, then their arguments
    # (RequiredCallStream). A "required" reply cut before any call's name closed is sent as text
    # in its last chunk, as the non-streamed reply gives it.
    # An "auto" reply is text unless its first non-blank character is "[": from there it is held
    # until it ends, then sent as calls, or as the text it was when it is none.
    held = [""] * n
    named_started: set[int] = set()
    required = [RequiredCallStream() for _ in range(n)] if plan is not None and plan.mode == "required" else []
    auto_text: set[int] = set()  # "auto" choices known to be text: their deltas go out as they come
    # return_token_ids: each choice's tokens not yet sent, which go out with its next chunk (an
    # output held back, e.g. a partial UTF-8 character, sends no chunk of its own).
    pending: list[list[int]] = [[] for _ in range(n)]

    def sent_ids(i: int) -> list[int] | None:
        if not return_token_ids:
            return None
        ids, pending[i] = pending[i], []
        return ids

    def delta_of(i: int, text: str, reason: str | None) -> tuple[DeltaMessage, str | None]:
        if plan is None:
            return (DeltaMessage(content=text) if text or not reason else DeltaMessage()), reason
        if plan.mode == "named":
            calls = []
            if i not in named_started:
                named_started.add(i)
                calls.append({"index": 0, "id": new_call_id(), "type": "function",
                              "function": {"name": plan.name, "arguments": text}})
            elif text:
                calls.append({"index": 0, "function": {"arguments": text}})
            return DeltaMessage(tool_calls=calls or None), reason
        held[i] += text
        if plan.mode == "auto":
            if i in auto_text:
                return (DeltaMessage(content=text) if text or not reason else DeltaMessage()), reason
            start = held[i].lstrip()
            if start and not start.startswith("["):
                auto_text.add(i)
                return DeltaMessage(content=held[i]), reason
            if not reason:
                return DeltaMessage(), None  # blanks so far, or a list that may still be calls
            calls = tool_calls_of(plan, held[i], reason)
            if calls:
                return DeltaMessage(tool_calls=[{"index": k, **c} for k, c in enumerate(calls)]), "tool_calls"
            return DeltaMessage(content=held[i]), reason
        calls = required[i].feed(text)
        if not reason:
            return DeltaMessage(tool_calls=calls or None), None
        if tool_calls_of(plan, held[i], reason):  # the list closed
            return DeltaMessage(tool_calls=calls or None), "tool_calls"
        if not required[i].started:  # cut before any call: what was generated, as text
            return DeltaMessage(content=held[i]), reason
        return DeltaMessage(tool_calls=calls or None), reason  # cut inside a call: it stays as sent

    try:
        # OpenAI sends the role alone first, one chunk per choice.
        for i in range(n):
            yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))], usage_of(i),
                        prompt_token_ids=list(first.prompt_token_ids) if return_token_ids and i == 0 else None)
            if echo:
                yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(content=echo))], usage_of(i))
        out = first
        done: set[int] = set()  # the engine repeats a finished choice in later outputs of the request
        while True:
            for c in out.outputs:
                completion_tokens[c.index] = c.num_tokens
                if return_token_ids and c.index not in done:
                    pending[c.index] += c.delta_token_ids
                if c.index in done or not (c.delta_text or c.delta_logprobs or c.finish_reason):
                    continue  # finished already, or e.g. a partial UTF-8 character held back
                if c.finish_reason:
                    done.add(c.index)
                lp = choice_logprobs(c.delta_logprobs, top_k, names) if c.delta_logprobs is not None else None
                raise_if_failed(out, c.index)
                delta, reason = delta_of(c.index, c.delta_text, c.finish_reason)
                if (required or (plan is not None and plan.mode == "auto")) and not reason and lp is None \
                        and not delta.tool_calls and delta.content is None:
                    continue  # nothing to say yet (e.g. inside a call's name, or an "auto" reply held)
                yield chunk([ChatChunkChoice(index=c.index, delta=delta, logprobs=lp, finish_reason=reason,
                                             stop_reason=c.stop_reason, token_ids=sent_ids(c.index))],
                            usage_of(c.index))
            if out.finished:
                break
            out = await it.__anext__()
        if include_usage:
            total = sum(completion_tokens)
            yield chunk([], UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=total,
                                      total_tokens=prompt_tokens + total, prompt_tokens_details=PromptTokensDetails(
                                          cached_tokens=out.metrics.num_cached_tokens)))
    except asyncio.CancelledError:
        raise  # client gone: tracked_generate's cleanup aborts the request
    except Exception as exc:  # headers are out: report in-band, as OpenAI does
        yield stream_error_event(exc, ctx.retry_after_s)
    finally:
        with anyio.CancelScope(shield=True):
            await it.aclose()
    yield SSE_DONE


def choice_logprobs(lps: list[TokenLogprob] | None, top_k: int, names: TokenNames) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[
        ChatTokenLogprob(token=names.name(t.token_id, t.token), logprob=clamp_logprob(t.logprob),
                         bytes=names.utf8(t.token_id, t.token),
                         top_logprobs=[TopLogprob(token=names.name(i, s), logprob=clamp_logprob(lp),
                                                  bytes=names.utf8(i, s))
                                       for i, s, lp in t.top[:top_k]])
        for t in (lps or [])])
