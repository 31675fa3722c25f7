"""One streaming request to an OpenAI-compatible server, timed chunk by chunk.

Every way a request can go wrong ends in a `RequestRecord` with `success=False` and an `error_kind`,
never in an exception out of `send`, so a misbehaving server is measured rather than crashing the run:

  http_<status>          the server answered with a non-200 status (body kept in `error`)
  connect_error          no connection could be made (refused, unreachable)
  disconnected           the server closed the connection before sending a response
  timeout                no complete answer within --request-timeout
  incomplete_stream      the stream ended or the connection dropped before `data: [DONE]`
  stream_error           the server sent an error object inside the stream
  bad_response           a data line that is not JSON
  cancelled_at_deadline  still running when the run's --duration ran out
  http_error             any other transport failure (message kept)
  client_error           anything else raised while handling the response (the message says what)

Timing follows vLLM bench-serve: the clock starts just before the request is sent; TTFT is the first
chunk that carries generated text; ITL entries are the gaps between text-bearing chunks (chunks with
no text, such as the role header or the final finish/usage chunks, are not tokens); E2EL ends at the
last data event before `[DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from .record import RequestRecord, RequestSpec

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"


def build_payload(spec: RequestSpec, model: str, chat: bool, temperature: float, ignore_eos: bool,
                  seed: int | None, extra: dict | None) -> dict:
    body: dict = {"model": model, "max_tokens": spec.max_tokens, "temperature": temperature,
                  "stream": True, "stream_options": {"include_usage": True}}
    if chat:
        body["messages"] = spec.messages or [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM extension: hold output lengths to the workload's draw
    if seed is not None:
        body["seed"] = seed
    if extra:
        body.update(extra)
    return body


async def send(client: httpx.AsyncClient, url: str, body: dict, headers: dict[str, str], rec: RequestRecord,
               t0: float, timeout_s: float, chat: bool) -> RequestRecord:
    """Stream one request into `rec` (already holding its spec). `t0` is the measured phase's start.
    On cancellation (the run's deadline) the record is marked and the cancellation propagates."""
    st = time.perf_counter()
    rec.start = st - t0
    last_event = st
    last_text = st
    text: list[str] = []
    answered = False  # response headers arrived: a drop after this is a broken stream

    def fail(kind: str, msg: str) -> RequestRecord:
        rec.success, rec.error_kind, rec.error = False, kind, msg[:500]
        rec.latency = time.perf_counter() - st
        rec.generated_text = "".join(text)
        return rec

    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", url, json=body, headers=headers) as resp:
                answered = True
                if resp.status_code != 200:
                    raw = await resp.aread()
                    return fail(f"http_{resp.status_code}", raw.decode("utf-8", "replace"))
                done = False
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, `event:` lines
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    now = time.perf_counter()
                    try:
                        obj = json.loads(data)
                    except json.JSONDecodeError:
                        return fail("bad_response", f"data line is not JSON: {data[:200]}")
                    if not isinstance(obj, dict):
                        return fail("bad_response", f"data line is not a JSON object: {data[:200]}")
                    if obj.get("error") and not obj.get("choices"):
                        return fail("stream_error", json.dumps(obj["error"])[:500])
                    for choice in obj.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                        if piece:
                            if rec.ttft is None:
                                rec.ttft = now - st
                            else:
                                rec.itl.append(now - last_text)
                            last_text = now
                            rec.chunk_times.append(now - st)
                            text.append(piece)
                        if choice.get("finish_reason"):
                            rec.finish_reason = choice["finish_reason"]
                    usage = obj.get("usage")
                    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                        rec.prompt_tokens = usage.get("prompt_tokens")
                        rec.output_tokens = usage.get("completion_tokens")
                        rec.usage_reported = True
                    last_event = now
                if not done:
                    return fail("incomplete_stream", "the stream ended before `data: [DONE]`")
    except asyncio.CancelledError:
        fail("cancelled_at_deadline", "still running when the run's duration ran out")
        raise
    except TimeoutError:
        return fail("timeout", f"no complete answer within {timeout_s:g} s")
    except httpx.TimeoutException as exc:
        return fail("timeout", f"{type(exc).__name__}: {exc}")
    except httpx.ConnectError as exc:
        return fail("connect_error", f"{type(exc).__name__}: {exc}")
    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
        kind = "incomplete_stream" if answered else "disconnected"
        return fail(kind, f"connection dropped: {type(exc).__name__}: {exc}")
    except httpx.HTTPError as exc:
        return fail("http_error", f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # e.g. a JSON shape no one expected: one failed request, not a dead run
        return fail("client_error", f"{type(exc).__name__}: {exc}")
    rec.success = True
    rec.latency = last_event - st
    rec.generated_text = "".join(text)
    return rec
