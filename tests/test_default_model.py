"""The trained default model shipped in nsa_serve/assets/default-model (docs/training.md): what
`nsa-serve serve` runs with no arguments. Its size and format, and that it answers a chat request with
English through the real server and the official client (a random-weight model fails this)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from api_fixtures import start_server
from safetensors import safe_open

from nsa_serve.model.checkpoint import default_model_dir, load_generation_config, load_model
from nsa_serve.train.presets import model_config

SHIPPED = Path(__file__).resolve().parent.parent / "nsa_serve" / "assets" / "default-model"
# The most frequent English function words: a reply of readable English contains several of them.
COMMON = {"the", "of", "and", "to", "a", "in", "is", "that", "for", "it", "as", "with", "be", "on", "this",
          "are", "by", "or", "an", "can", "not", "you", "from", "which", "if"}


def test_shipped_model_is_the_default_and_fits_the_limits():
    assert default_model_dir() == SHIPPED
    weights = SHIPPED / "model.safetensors"
    total = sum(p.stat().st_size for p in SHIPPED.iterdir())
    assert total <= 25_000_000, total
    with safe_open(str(weights), framework="pt") as f:  # safetensors, no pickle
        assert len(list(f.keys())) > 0
    model = load_model(SHIPPED)
    cfg = model.cfg
    want = model_config("default")
    assert (cfg.cmp_block, cfg.cmp_stride, cfg.select_block, cfg.num_select, cfg.window) == (32, 16, 64, 16, 512)
    assert {k: v for k, v in cfg.to_dict().items() if k not in ("extra", "bos_token_id", "eos_token_id")} == \
        {k: v for k, v in want.to_dict().items() if k not in ("extra", "bos_token_id", "eos_token_id")}
    # The training record docs/training.md reproduces: stage 4, the 60-step greeting fine-tune (seed 3)
    # of stage 3 (the 160-step dialog fine-tune of the selection-supervised stage-2 model).
    assert (cfg.extra["trained_steps"], cfg.extra["total_steps"], cfg.extra["seed"]) == (60, 60, 3)
    assert cfg.extra["final"] is True


@pytest.fixture(scope="module")
def shipped_client():
    """The shipped model behind a real server on loopback, through the official client."""
    from openai import OpenAI

    srv = start_server(SHIPPED, api_key=None, max_model_len=1024, num_pages=64)
    try:
        client = OpenAI(base_url=f"{srv.url}/v1", api_key="none")
        yield client, client.models.list().data[0].id
    finally:
        srv.stop()


@pytest.mark.timeout(300)
def test_default_model_answers_in_english(shipped_client):
    client, model = shipped_client
    gen = load_generation_config(SHIPPED)
    replies = []
    for prompt in ("Tell me about the Linux kernel.", "Summarise what a file system does."):
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=60, seed=1,
            temperature=gen["temperature"], top_p=gen["top_p"],
            extra_body={"repetition_penalty": gen["repetition_penalty"]})
        replies.append(r.choices[0].message.content)
    words = [w for text in replies for w in re.findall(r"[a-z]+", text.lower())]
    assert len(set(words) & COMMON) >= 4, replies
    letters = sum(c.isalpha() or c.isspace() for text in replies for c in text)
    assert letters >= 0.8 * sum(len(t) for t in replies), replies


@pytest.mark.timeout(300)
def test_a_question_gets_prose_not_a_pass_key(shipped_client):
    """The stage-2 model answered short questions with "The pass key is 3486." (its only training
    questions were the retrieval tasks'); the dialog fine-tune fixed that (docs/training.md). The
    server's sampling defaults come from generation_config.json."""
    client, model = shipped_client
    replies = [client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                              max_tokens=40, seed=seed).choices[0].message.content
               for prompt in ("What is a kernel module?", "What is a process?") for seed in (1, 2)]
    assert not any("pass key" in r.lower() for r in replies), replies
    assert all(len(re.findall(r"[A-Za-z]{2,}", r)) >= 5 for r in replies), replies  # words, not blanks


def test_without_a_shipped_model_the_default_is_the_cached_tiny_one(monkeypatch, tmp_path, tiny_model_dir):
    """An install without the assets falls back to a tiny random model in $NSA_SERVE_CACHE."""
    import shutil

    import nsa_serve.model.checkpoint as ck
    from nsa_serve.model.init_model import ensure_default_model

    monkeypatch.setattr(ck, "SHIPPED_MODEL_DIR", tmp_path / "no-assets")
    monkeypatch.setenv("NSA_SERVE_CACHE", str(tmp_path / "cache"))
    shutil.copytree(tiny_model_dir, tmp_path / "cache" / "tiny-random")  # no second tokenizer training
    assert ensure_default_model() == tmp_path / "cache" / "tiny-random"
    assert load_model(tmp_path / "cache" / "tiny-random").cfg.hidden_size < model_config("default").hidden_size
