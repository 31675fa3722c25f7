"""/v1/completions: prompt(s) -> engine request(s) -> OpenAI text_completion objects.

A batch of prompts becomes one engine request per prompt; choice `index` is prompt_index * n + i,
as OpenAI and vLLM number them.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

import anyio
from starlette.requests import Request
from starlette.responses import Response

from ..engine.protocol import RequestOutput, TokenLogprob
from .beam_search import BeamSearchParams, beam_search, observed
from .generation import merge, tracked_generate
from .protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse,
                       PromptTokensDetails, UsageInfo)
from .serving_common import (SSE_DONE, ServingContext, SSEResponse, TokenNames, clamp_logprob, json_response,
                             prompt_logprobs_body, raise_if_failed, request_id_for, run_to_end, sse,
                             stream_error_event)


def _prompt_ids(ctx: ServingContext, req: CompletionRequest, prompts: list) -> list[list[int]]:
    return [ctx.truncate(ctx.check_token_ids(p, "prompt") if isinstance(p, list)
                         else ctx.encode(p, "prompt", add_special_tokens=req.add_special_tokens),
                         req.truncate_prompt_tokens) for p in prompts]


async def create_completion(ctx: ServingContext, req: CompletionRequest, raw: Request):
    model = ctx.check_model(req.model)
    ctx.check_admitting()
    prompts = req.prompts()
    prompt_ids = await ctx.off_loop(raw, _prompt_ids, ctx, req, prompts)
    if req.truncate_prompt_tokens is not None:  # echo what the model was given
        prompts = prompt_ids
    longest = max(len(p) for p in prompt_ids)
    max_tokens = ctx.resolve_max_tokens(req.max_tokens, longest, "max_tokens", prompt_param="prompt")
    # Without an explicit max_tokens each prompt may use its own remaining context.
    budgets = [max_tokens if req.max_tokens is not None else
               ctx.resolve_max_tokens(None, len(p), "max_tokens", prompt_param="prompt") for p in prompt_ids]
    if req.use_beam_search:
        return await _beam_search_reply(ctx, req, raw, model, prompts, prompt_ids,
                                        [req.to_beam_search_params(m) for m in budgets])
    params = [ctx.check_sampling_ids(req.to_sampling_params(m, ctx.defaults)) for m in budgets]
    request_id = request_id_for(raw, "cmpl", req.request_id)
    ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
    gens = [tracked_generate(ctx.engine, ctx.metrics, p, sp, rid, req.priority, ctx.request_log)
            for p, sp, rid in zip(prompt_ids, params, ids)]
    it = merge(gens)
    first = await ctx.first_output(raw, it)
    created = int(time.time())
    n = req.n
    echo = [_prompt_text(ctx, p) if req.echo else "" for p in prompts]
    names = ctx.token_names(req.return_tokens_as_token_ids)
    if req.stream:
        include_usage, continuous = ctx.stream_usage(req.stream_options)
        return SSEResponse(_stream(ctx, it, first, request_id, model, created, n, len(prompts), echo,
                                   include_usage, req.logprobs, names, continuous, req.return_token_ids),
                           headers={"Cache-Control": "no-cache", "X-Request-Id": request_id})

    async def drain() -> dict[int, RequestOutput]:
        finals = {first[0]: first[1]}
        async for src, out in it:
            finals[src] = out
        return finals

    finals = await run_to_end(ctx, raw, drain)
    for out in finals.values():
        raise_if_failed(out)
    return await ctx.assemble(finals.values(), _reply, ctx, req, [finals[i] for i in range(len(prompts))], echo,
                              names, request_id, created, model)


def _reply(ctx: ServingContext, req: CompletionRequest, finals: list[RequestOutput], echo: list[str],
           names: TokenNames, request_id: str, created: int, model: str) -> Response:
    """The text_completion answer to a non-streaming request: one RequestOutput a prompt, in order."""
    choices = []
    prompt_tokens = completion_tokens = cached_tokens = 0
    n = req.n
    for src, out in enumerate(finals):
        prompt_tokens += len(out.prompt_token_ids)
        cached_tokens += out.metrics.num_cached_tokens
        for c in sorted(out.outputs, key=lambda c: c.index):
            completion_tokens += c.num_tokens
            lp = None
            if req.logprobs is not None:
                lp = _logprobs(c.logprobs, req.logprobs, len(echo[src]), names)
                if req.echo:
                    lp = _join(_echo_logprobs(ctx, out, req.logprobs, names), lp)
            ids = req.return_token_ids
            choices.append(CompletionChoice(index=src * n + c.index, text=echo[src] + c.text, logprobs=lp,
                                            finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                            prompt_logprobs=prompt_logprobs_body(out.prompt_logprobs),
                                            prompt_token_ids=list(out.prompt_token_ids) if ids else None,
                                            token_ids=list(c.token_ids) if ids else None))
    usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                      total_tokens=prompt_tokens + completion_tokens,
                      prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))
    return json_response(CompletionResponse(id=request_id, created=created, model=model, choices=choices,
                                            usage=usage), request_id)


async def _beam_search_reply(ctx: ServingContext, req: CompletionRequest, raw: Request, model: str,
                             prompts: list, prompt_ids: list[list[int]], bps: list[BeamSearchParams]):
    """use_beam_search: per prompt, its n best beams, best first (choice prompt_index * n + rank). The
    searches end before the response starts, so a stream carries each choice whole."""
    for bp in bps:
        ctx.check_beam_search(bp)
    request_id = request_id_for(raw, "cmpl", req.request_id)

    async def search_all():
        return await asyncio.gather(*(
            beam_search(ctx.engine, p, bp, f"{request_id}-{k}", ctx.tokenizer.stop_token_ids, req.priority)
            for k, (p, bp) in enumerate(zip(prompt_ids, bps))))

    results = await observed(ctx.metrics, [len(p) for p in prompt_ids], bps,
                             lambda: run_to_end(ctx, raw, search_all))
    choices = []
    ids = req.return_token_ids
    for k, (prompt, beams) in enumerate(zip(prompts, results)):
        echo = _prompt_text(ctx, prompt) if req.echo else ""
        choices += [CompletionChoice(index=k * req.n + i, text=echo + b.text, finish_reason=b.finish_reason,
                                     stop_reason=b.stop_reason, prompt_token_ids=list(prompt_ids[k]) if ids else None,
                                     token_ids=list(b.tokens) if ids else None) for i, b in enumerate(beams)]
    prompt_tokens = sum(len(p) for p in prompt_ids)
    completion_tokens = sum(len(b.tokens) for beams in results for b in beams)
    usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                      total_tokens=prompt_tokens + completion_tokens,
                      prompt_tokens_details=PromptTokensDetails(
                          cached_tokens=sum(beams[0].cached_tokens for beams in results)))
    created = int(time.time())
    if not req.stream:
        return json_response(CompletionResponse(id=request_id, created=created, model=model, choices=choices,
                                                usage=usage), request_id)

    async def events():
        for c in choices:
            yield sse(CompletionResponse(id=request_id, created=created, model=model, choices=[c]))
        if ctx.stream_usage(req.stream_options)[0]:
            yield sse(CompletionResponse(id=request_id, created=created, model=model, choices=[], usage=usage))
        yield SSE_DONE

    return SSEResponse(events(), headers={"Cache-Control": "no-cache", "X-Request-Id": request_id})


def _prompt_text(ctx: ServingContext, prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else ctx.tokenizer.decode(prompt)


async def _stream(ctx: ServingContext, it, first, request_id: str, model: str, created: int, n: int,
                  num_prompts: int, echo: list[str], include_usage: bool, logprobs: int | None,
                  names: TokenNames, continuous: bool = False, return_token_ids: bool = False) -> AsyncIterator[str]:
    def chunk(choices, usage=None):
        return sse(CompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=usage))

    prompt_tokens: dict[int, int] = {}
    cached_tokens: dict[int, int] = {}
    completion_tokens: dict[tuple[int, int], int] = {}
    offsets: dict[tuple[int, int], int] = {}  # text_offset of the next token, per choice
    echoed: set[tuple[int, int]] = set()
    prompt_lps: dict[int, CompletionLogprobs | None] = {}
    done: set[tuple[int, int]] = set()  # the engine repeats a finished choice in later outputs
    # return_token_ids: a choice's tokens not yet sent go out with its next chunk.
    pending: dict[tuple[int, int], list[int]] = {}
    prompt_sent: set[tuple[int, int]] = set()
    try:
        src, out = first
        while True:
            prompt_tokens[src] = len(out.prompt_token_ids)
            cached_tokens[src] = out.metrics.num_cached_tokens
            if out.prompt_logprobs is not None and echo[src] and logprobs is not None and src not in prompt_lps:
                # A long prompt's logprobs are megabytes: built off the loop, as a whole answer is.
                prompt_lps[src] = await ctx.assemble([out], _echo_logprobs, ctx, out, logprobs, names)
            for c in out.outputs:
                key = (src, c.index)
                completion_tokens[key] = c.num_tokens
                prefix = ""
                if key not in echoed:
                    echoed.add(key)
                    prefix = echo[src]
                    offsets[key] = len(prefix)
                if return_token_ids and key not in done:
                    pending.setdefault(key, []).extend(c.delta_token_ids)
                if key in done or not (prefix or c.delta_text or c.delta_logprobs or c.finish_reason):
                    continue
                if c.finish_reason:
                    done.add(key)
                raise_if_failed(out, c.index)
                lp = head = None
                if logprobs is not None:
                    lp = _logprobs(c.delta_logprobs, logprobs, offsets[key], names)
                    offsets[key] += sum(len(t.token) for t in c.delta_logprobs or [])
                    if prefix:  # echo: the prompt's tokens come first
                        head = prompt_lps.get(src)
                # continuous_usage_stats: this choice's usage so far, as vLLM reports it.
                usage = UsageInfo(prompt_tokens=prompt_tokens[src], completion_tokens=c.num_tokens,
                                  total_tokens=prompt_tokens[src] + c.num_tokens) if continuous else None
                ids = prompt = None
                if return_token_ids:  # the prompt's ids in the choice's first chunk, as vLLM sends them
                    ids = pending.pop(key, [])
                    prompt = None if key in prompt_sent else list(out.prompt_token_ids)
                    prompt_sent.add(key)
                choice = CompletionChoice(index=src * n + c.index, text=prefix + c.delta_text, logprobs=lp,
                                          finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                          prompt_token_ids=prompt, token_ids=ids)
                # The chunk echoing a prompt with its logprobs (megabytes when long) is built off the loop.
                yield chunk([choice], usage) if head is None else \
                    await ctx.assemble([out], _echo_chunk, chunk, choice, head, usage)
            try:
                src, out = await it.__anext__()
            except StopAsyncIteration:
                break
        if include_usage:
            p, g = sum(prompt_tokens.values()), sum(completion_tokens.values())
            yield chunk([], UsageInfo(prompt_tokens=p, completion_tokens=g, total_tokens=p + g,
                                      prompt_tokens_details=PromptTokensDetails(
                                          cached_tokens=sum(cached_tokens.values()))))
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        yield stream_error_event(exc, ctx.retry_after_s)
    finally:
        with anyio.CancelScope(shield=True):
            await it.aclose()
    yield SSE_DONE


def _echo_chunk(chunk, choice: CompletionChoice, head: CompletionLogprobs, usage: UsageInfo | None) -> str:
    """A stream's chunk that echoes the prompt: the prompt's logprobs (`head`) before the choice's own."""
    choice.logprobs = _join(head, choice.logprobs)
    return chunk([choice], usage)


def _echo_logprobs(ctx: ServingContext, out: RequestOutput, k: int, names: TokenNames) -> CompletionLogprobs:
    """The echoed prompt's part of a choice's logprobs: its tokens, their logprobs given what comes
    before (null for the first token, as OpenAI's echo gives), offsets from 0."""
    first, rest = out.prompt_logprobs[0], out.prompt_logprobs[1:]
    head_id = out.prompt_token_ids[0]
    head = ctx.tokenizer.token_text(head_id) if first is None else first.token
    tail = _logprobs(rest, k, len(head), names)
    return _join(CompletionLogprobs(text_offset=[0], token_logprobs=[None], tokens=[names.name(head_id, head)],
                                    top_logprobs=[None]), tail)


def _join(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(text_offset=a.text_offset + b.text_offset, token_logprobs=a.token_logprobs +
                              b.token_logprobs, tokens=a.tokens + b.tokens, top_logprobs=a.top_logprobs + b.top_logprobs)


def _logprobs(lps: list[TokenLogprob] | None, k: int, start_offset: int,
              names: TokenNames) -> CompletionLogprobs:
    """Offsets count the tokens' text (the returned text's), whatever `names` calls them."""
    out = CompletionLogprobs()
    offset = start_offset
    for t in lps or []:
        out.tokens.append(names.name(t.token_id, t.token))
        out.token_logprobs.append(clamp_logprob(t.logprob))
        out.text_offset.append(offset)
        offset += len(t.token)
        top: dict[str, float] = {}
        for i, s, lp in t.top[:k]:
            top.setdefault(names.name(i, s), clamp_logprob(lp))
        out.top_logprobs.append(top)
    return out
