"""Chat replies of one or more model directories through the real server, scored the way
tests/test_default_model.py scores English, plus how often a question is answered with a pass key.

    python scripts/chat_compare.py MODEL_DIR [MODEL_DIR ...] [--out replies.json]

Each model is served in turn (`nsa-serve serve`, its generation_config.json sampling defaults) and
asked the same 10 questions with seeds 1, 2, 3, max 60 tokens, through the official openai client.
docs/training.md records what it printed for the shipped model and its predecessor.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
from openai import OpenAI

COMMON = {"the", "of", "and", "to", "a", "in", "is", "that", "for", "it", "as", "with", "be", "on", "this",
          "are", "by", "or", "an", "can", "not", "you", "from", "which", "if"}
PROMPTS = ["Hello!", "What is a kernel module?", "How do I install a Python package?",
           "Tell me about the Linux kernel.", "Summarise what a file system does.", "What does the grep command do?",
           "Explain how a Perl hash works.", "Can you help me with a network problem?", "What is a process?",
           "Describe the Python standard library."]
SEEDS = (1, 2, 3)


def is_english(text: str) -> bool:
    words = set(re.findall(r"[a-z]+", text.lower()))
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return len(words & COMMON) >= 4 and letters >= 0.8 * max(1, len(text))


def ask_all(model_dir: str, port: int) -> list[dict]:
    cmd = [sys.executable, "-m", "nsa_serve.cli", "serve", model_dir, "--port", str(port), "--log-level", "warning"]
    srv = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if srv.poll() is not None:
                raise RuntimeError(f"server for {model_dir} exited with {srv.returncode}")
            time.sleep(1)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        model = client.models.list().data[0].id
        out = []
        for q in PROMPTS:
            for seed in SEEDS:
                r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                                   max_tokens=60, seed=seed)
                text = r.choices[0].message.content
                out.append(dict(prompt=q, seed=seed, text=text, english=is_english(text),
                                pass_key="pass key" in text.lower(), finish_reason=r.choices[0].finish_reason,
                                capital_start=text.lstrip()[:1].isupper(),
                                sentence_end=text.rstrip().rstrip("\"')]")[-1:] in ".!?"))
        return out
    finally:
        srv.terminate()
        srv.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--port", type=int, default=8400)
    a = ap.parse_args()
    results = {}
    for i, m in enumerate(a.models):
        res = results[m] = ask_all(m, a.port + i)
        n = len(res)
        print(f"{m}: English {sum(r['english'] for r in res)}/{n}, pass-key replies "
              f"{sum(r['pass_key'] for r in res)}/{n}, ended their turn {sum(r['finish_reason'] == 'stop' for r in res)}/{n}, "
              f"start with a capital {sum(r['capital_start'] for r in res)}/{n}, end on . ! ? "
              f"{sum(r['sentence_end'] for r in res)}/{n}")
    if a.out:
        a.out.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
