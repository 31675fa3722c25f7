"""Mixed traffic on a page pool small enough to force preemptions: chat and completions with n > 1,
beam searches and Responses (plain and streamed), sixteen at a time. Nothing is lost: every request
gets all its tokens, and afterwards nothing runs and every page is free."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

from api_fixtures import start_server, wait_for


def test_mixed_traffic_under_preemption_loses_nothing(tiny_model_dir):  # noqa: F811
    server = start_server(tiny_model_dir, num_pages=28, max_num_seqs=8, max_model_len=400)

    def one(i: int) -> str | None:
        rnd = random.Random(i)
        kind = ("chat", "completions", "beam", "responses", "responses-stream")[i % 5]
        words, m, n = "word " * rnd.randint(5, 150), rnd.randint(5, 40), rnd.randint(1, 3)
        with server.http(timeout=120) as h:
            if kind == "chat":
                r = h.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": words}],
                                                         "max_tokens": m, "n": n, "ignore_eos": True})
                got = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else None
            elif kind in ("completions", "beam"):
                m = m if kind == "completions" else m // 4  # a beam search costs a request per beam and step
                r = h.post("/v1/completions", json={"prompt": words, "max_tokens": m, "n": n, "ignore_eos": True,
                                                    "use_beam_search": kind == "beam"})
                got = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else None
            else:
                n = 1
                body = {"input": words, "max_output_tokens": m, "ignore_eos": True, "stream": kind.endswith("stream")}
                r = h.post("/v1/responses", json=body)
                if r.status_code != 200:
                    got = None
                elif body["stream"]:
                    last = json.loads([x for x in r.text.splitlines() if x.startswith("data: ")][-1][6:])
                    got = last["response"]["usage"]["output_tokens"]
                else:
                    got = r.json()["usage"]["output_tokens"]
        if got == n * m:
            return None
        return f"{kind} #{i}: status {r.status_code}, {got} tokens, want {n * m}: {r.text[:200]}"

    try:
        with ThreadPoolExecutor(16) as pool:
            problems = [p for p in pool.map(one, range(40)) if p is not None]
        assert not problems, "\n".join(problems)
        stats = server.engine.stats()
        assert stats.num_preemptions_total > 0, "the pool was not small enough to preempt"
        assert wait_for(lambda: (s := server.engine.stats()).num_pages_used == 0 and s.num_running == 0, timeout=30)
    finally:
        server.stop()
