"""How a model answers greetings: for each of the training task's greetings (tasks.GREETINGS), the
greedy reply and three sampled ones with the model's own generation_config.json defaults (what a
chat client gets), in process on the CPU. A reply counts as a greeting reply when it starts with the
first four words of one of tasks.GREETING_REPLIES.

    python scripts/greeting_eval.py MODEL_DIR [MODEL_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from nsa_serve.engine.args import EngineArgs
from nsa_serve.engine.llm_engine import LLMEngine
from nsa_serve.engine.protocol import SamplingParams
from nsa_serve.train.tasks import GREETING_REPLIES, GREETINGS

STARTS = {" ".join(r.split()[:4]) for r in GREETING_REPLIES}


def is_greeting_reply(text: str) -> bool:
    return " ".join(text.split()[:4]) in STARTS


def evaluate(model_dir: str) -> dict:
    engine = LLMEngine(EngineArgs(model=model_dir, device="cpu", dtype="float32", num_pages=512))
    tok = engine.tokenizer
    gen = json.loads((Path(model_dir) / "generation_config.json").read_text())
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": g}])) for g in GREETINGS]
    greedy = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=40))
    sampled = []
    for seed in (1, 2, 3):
        sampled += engine.generate(prompts, SamplingParams(
            temperature=gen.get("temperature", 1.0), top_p=gen.get("top_p", 1.0),
            repetition_penalty=gen.get("repetition_penalty", 1.0), seed=seed, max_tokens=40))
    g_text = [o.outputs[0].text for o in greedy]
    s_text = [o.outputs[0].text for o in sampled]
    return {"model": model_dir, "greedy_greeting_replies": sum(map(is_greeting_reply, g_text)),
            "sampled_greeting_replies": sum(map(is_greeting_reply, s_text)), "greetings": len(GREETINGS),
            "greedy": dict(zip(GREETINGS, g_text)), "sampled_seed1": dict(zip(GREETINGS, s_text[:len(GREETINGS)]))}


def main() -> None:
    torch.set_num_threads(2)
    for model_dir in sys.argv[1:]:
        r = evaluate(model_dir)
        print(f"{model_dir}: greedy {r['greedy_greeting_replies']}/{r['greetings']}, sampled (3 seeds) "
              f"{r['sampled_greeting_replies']}/{3 * r['greetings']} greeting replies")
        for g in GREETINGS[:4]:
            print(f"  {g!r:28} greedy: {r['greedy'][g][:70]!r}")
            print(f"  {'':28} seed 1: {r['sampled_seed1'][g][:70]!r}")


if __name__ == "__main__":
    main()
