"""How long the server's event loop stalls while long-document requests arrive at it.

One streamed completion (`--stream-tokens`, ignore_eos) runs, and a client polls /health (answered
on the event loop alone, no engine step involved); meanwhile `--docs` document requests arrive one
after another, of `--kind`:

- chat: a chat request carrying `--doc-chars` characters of offline text (the standard library's
  docstrings: ~180k tokens for 600 KB, more than the context, so each ends in a 400 once its prompt
  is tokenized — the tokenization is what is measured);
- echo-logprobs: a completion echoing that text, cut to `--prompt-tokens`, with logprobs 5 (an
  evaluation harness's request): megabytes of answer to build and serialise, after a prefill.

Prints, while those requests were being handled and otherwise, the gaps between the stream's
chunks (which also hold whole engine steps, the prefill's among them) and the /health round trips
(only the event loop and the GIL): a round trip as long as a document's tokenization or answer
means the loop was blocked.

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


def health_pings(base: str, out: list, stop: threading.Event) -> None:
    with httpx.Client(base_url=base, timeout=300) as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            c.get("/health")
            out.append((t0, time.perf_counter() - t0))
            time.sleep(0.002)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--kind", choices=("chat", "echo-logprobs"), default="chat")
    p.add_argument("--doc-chars", type=int, default=600_000)
    p.add_argument("--docs", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=2000, help="echo-logprobs: the prompt's tokens")
    # A GPU streams 400 tokens in under a second, before the first document arrives: give it more
    # (the stream must outlast every document request, or its gaps measure nothing).
    p.add_argument("--stream-tokens", type=int, default=400)
    p.add_argument("--start-after", type=float, default=1.0, help="seconds the stream runs before documents")
    args = p.parse_args()
    doc = stdlib_docstrings()[:args.doc_chars]
    with httpx.Client(base_url=args.base_url, timeout=300) as c:
        model = c.get("/v1/models").json()["data"][0]["id"]
    gaps: list = []
    pings: list = []
    stop = threading.Event()
    streamer = threading.Thread(target=stream_gaps, args=(args.base_url, model, args.stream_tokens, gaps))
    pinger = threading.Thread(target=health_pings, args=(args.base_url, pings, stop))
    streamer.start()
    pinger.start()
    time.sleep(args.start_after)
    windows = []
    with httpx.Client(base_url=args.base_url, timeout=600) as c:
        for _ in range(args.docs):
            t0 = time.perf_counter()
            if args.kind == "chat":
                r = c.post("/v1/chat/completions", json={"model": model, "max_tokens": 1,
                                                         "messages": [{"role": "user", "content": doc}]})
            else:
                r = c.post("/v1/completions", json={"model": model, "prompt": doc, "max_tokens": 1, "echo": True,
                                                    "logprobs": 5, "truncate_prompt_tokens": args.prompt_tokens})
            windows.append((t0, time.perf_counter() + 0.05, r.status_code, len(r.content)))
            time.sleep(0.3)
    streamer.join()
    stop.set()
    pinger.join()
    if gaps and gaps[-1][0] < windows[-1][1]:
        print("the stream ended before the last document request: raise --stream-tokens")
    print(f"{args.kind} requests ({len(doc)} characters): " + ", ".join(
        f"{(b - a - 0.05) * 1e3:.0f} ms (HTTP {s}, {n / 1e6:.2f} MB)" for a, b, s, n in windows))
    for what, series in (("stream gaps", gaps), ("/health round trips", pings)):
        inside = [x for t, x in series if any(a <= t <= b for a, b, _, _ in windows)]
        outside = [x for t, x in series if not any(a <= t <= b for a, b, _, _ in windows)]
        for name, xs in (("while they were handled", inside), ("otherwise", outside)):
            if xs:
                print(f"{what} {name}: max {max(xs) * 1e3:.1f} ms, median {statistics.median(xs) * 1e3:.1f} ms, "
                      f"{len(xs)}")


if __name__ == "__main__":
    main()
