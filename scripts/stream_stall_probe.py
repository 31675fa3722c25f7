"""How long a token stream stalls while long-document requests arrive at the same server.

One streamed completion (`--stream-tokens`, ignore_eos) runs; meanwhile `--docs` chat requests each carry
`--doc-chars` characters of offline text (the standard library's docstrings: ~180k tokens for 600 KB,
more than the context, so each ends in a 400 once its prompt is tokenized — the tokenization is what
is measured). Prints the gaps between the stream's chunks while those requests were being handled
and otherwise: a gap as long as a document's tokenization means the event loop was blocked.

    nsa-serve serve --port 8000 &
    python scripts/stream_stall_probe.py --base-url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import httpx

from nsa_serve.tokenizer import stdlib_docstrings


def stream_gaps(base: str, model: str, tokens: int, out: list) -> None:
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": tokens, "ignore_eos": True, "stream": True}
    last = None
    with httpx.Client(base_url=base, timeout=300) as c, c.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                now = time.perf_counter()
                if last is not None:
                    out.append((now, now - last))
                last = now


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--doc-chars", type=int, default=600_000)
    p.add_argument("--docs", type=int, default=5)
    # A GPU streams 400 tokens in under a second, before the first document arrives: give it more
    # (the stream must outlast every document request, or the probe measures nothing).
    p.add_argument("--stream-tokens", type=int, default=400)
    p.add_argument("--start-after", type=float, default=1.0, help="seconds the stream runs before documents")
    args = p.parse_args()
    doc = stdlib_docstrings()[:args.doc_chars]
    with httpx.Client(base_url=args.base_url, timeout=300) as c:
        model = c.get("/v1/models").json()["data"][0]["id"]
    gaps: list = []
    streamer = threading.Thread(target=stream_gaps, args=(args.base_url, model, args.stream_tokens, gaps))
    streamer.start()
    time.sleep(args.start_after)
    windows = []
    with httpx.Client(base_url=args.base_url, timeout=300) as c:
        for _ in range(args.docs):
            t0 = time.perf_counter()
            r = c.post("/v1/chat/completions", json={"model": model, "max_tokens": 1,
                                                     "messages": [{"role": "user", "content": doc}]})
            windows.append((t0, time.perf_counter() + 0.05, r.status_code))
            time.sleep(0.3)
    streamer.join()
    if gaps and gaps[-1][0] < windows[-1][1]:
        print("the stream ended before the last document request: raise --stream-tokens")
    during = [g for t, g in gaps if any(a <= t <= b for a, b, _ in windows)]
    other = [g for t, g in gaps if not any(a <= t <= b for a, b, _ in windows)]
    print(f"document requests ({len(doc)} characters): "
          + ", ".join(f"{(b - a - 0.05) * 1e3:.0f} ms (HTTP {s})" for a, b, s in windows))
    for name, xs in (("while they were handled", during), ("otherwise", other)):
        if xs:
            print(f"stream gaps {name}: max {max(xs) * 1e3:.1f} ms, median {statistics.median(xs) * 1e3:.1f} ms, "
                  f"{len(xs)} chunks")


if __name__ == "__main__":
    main()
