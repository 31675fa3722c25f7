"""Clients that hang up mid-request: their requests are aborted and every KV-cache page comes back."""

from __future__ import annotations

import asyncio
import json

import httpx
from api_fixtures import wait_for

LONG = {"max_tokens": 400, "ignore_eos": True, "temperature": 1.0}


async def _hang_up_mid_stream(url: str, headers: dict, path: str, body: dict, chunks_before_leaving: int) -> int:
    """Open a stream, read a few events, leave. Returns how many events were read."""
    seen = 0
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:
        async with client.stream("POST", path, json={**body, "stream": True}) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    assert line != "data: [DONE]", "the stream finished before the client left"
                    json.loads(line[6:])
                    seen += 1
                    if seen >= chunks_before_leaving:
                        break
    return seen  # leaving both `async with` blocks closes the connection


async def _hang_up_while_waiting(url: str, headers: dict, body: dict) -> None:
    """A non-streaming request whose client gives up (read timeout) before the answer."""
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(60, read=0.5)) as client:
        try:
            await client.post("/v1/completions", json=body)
        except httpx.ReadTimeout:
            return
    raise AssertionError("the long non-streaming request answered before the client gave up")


def test_twenty_clients_disconnecting_free_all_pages(api_server):
    engine = api_server.engine
    assert wait_for(lambda: engine.stats().num_pages_used == 0), "pages in use before the test"
    before = api_server.metrics()
    headers = {"Authorization": f"Bearer {api_server.api_key}"}
    chat = {"messages": [{"role": "user", "content": "Explain iterators at length."}], **LONG}
    completion = {"prompt": "A long essay on generators:", **LONG}

    async def main():
        jobs = []
        for i in range(16):
            path, body = ("/v1/chat/completions", chat) if i % 2 else ("/v1/completions", completion)
            jobs.append(_hang_up_mid_stream(api_server.url, headers, path, body, chunks_before_leaving=2 + i % 3))
        jobs += [_hang_up_while_waiting(api_server.url, headers, completion)
                 for _ in range(4)]
        return await asyncio.gather(*jobs)

    results = asyncio.run(main())
    assert all(n >= 2 for n in results[:16])

    def all_free():
        s = engine.stats()
        return s.num_running == 0 and s.num_waiting == 0 and s.num_pages_used == 0
    assert wait_for(all_free, timeout=30), f"pages not returned: {engine.stats()}"
    after = api_server.metrics()
    assert after["nsa:kv_cache_usage_perc"] == 0.0
    assert after["nsa:num_requests_running"] == 0.0
    aborted = after['nsa:request_success_total{finished_reason="abort"}'] - \
        before['nsa:request_success_total{finished_reason="abort"}']
    assert aborted == 20
    # The server still answers normally afterwards.
    r = api_server.openai().completions.create(model=engine.model_name, prompt="ok", max_tokens=3,
                                               extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3


def test_a_beam_search_whose_client_leaves_frees_every_page(api_server):
    """A beam search runs as many engine requests; a client that gives up (read timeout) aborts
    all of them, and its sequences count as aborted."""
    engine = api_server.engine
    assert wait_for(lambda: engine.stats().num_pages_used == 0), "pages in use before the test"
    before = api_server.metrics()
    headers = {"Authorization": f"Bearer {api_server.api_key}"}
    body = {"prompt": "A long essay on generators:", "max_tokens": 300, "n": 4, "use_beam_search": True,
            "ignore_eos": True}
    asyncio.run(_hang_up_while_waiting(api_server.url, headers, body))

    def all_free():
        s = engine.stats()
        return s.num_running == 0 and s.num_waiting == 0 and s.num_pages_used == 0
    assert wait_for(all_free, timeout=30), f"pages not returned: {engine.stats()}"
    after = api_server.metrics()
    key = 'nsa:request_success_total{finished_reason="abort"}'
    assert wait_for(lambda: api_server.metrics()[key] - before[key] == 4, timeout=10)
    assert after["nsa:num_requests_running"] == 0.0
    r = api_server.openai().completions.create(model=engine.model_name, prompt="ok", max_tokens=2, n=2,
                                               extra_body={"use_beam_search": True, "ignore_eos": True})
    assert len(r.choices) == 2 and r.usage.completion_tokens == 4


def test_a_responses_stream_whose_client_leaves_frees_its_pages(api_server):
    engine = api_server.engine
    assert wait_for(lambda: engine.stats().num_pages_used == 0), "pages in use before the test"
    headers = {"Authorization": f"Bearer {api_server.api_key}"}
    body = {"input": "A long essay on generators:", "max_output_tokens": 400, "ignore_eos": True}
    seen = asyncio.run(_hang_up_mid_stream(api_server.url, headers, "/v1/responses", body, chunks_before_leaving=6))
    assert seen == 6

    def all_free():
        s = engine.stats()
        return s.num_running == 0 and s.num_waiting == 0 and s.num_pages_used == 0
    assert wait_for(all_free, timeout=30), f"pages not returned: {engine.stats()}"
