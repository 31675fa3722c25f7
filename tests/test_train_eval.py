"""Evaluation: perplexity math on known cases, passkey scoring, and `nsa-serve eval` end to end
against a real server (the paged engine) on loopback."""

from __future__ import annotations

import json
import math
import shutil

import httpx
import numpy as np
import pytest
import torch

from nsa_serve.model.nsa_model import NSAModel
from nsa_serve.tokenizer import Tokenizer
from nsa_serve.train.evaluate import PasskeyCase, heldout_nll, perplexity, run_passkey
from nsa_serve.train.presets import model_config

from train_helpers import VOCAB, prepared_data, tiny_overrides


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    model = NSAModel(model_config("tiny", **tiny_overrides())).init_weights(0).double()
    with torch.no_grad():
        model.norm.weight.zero_()  # final norm 0 → every logit 0 → uniform next-token distribution
    tokens = np.random.default_rng(0).integers(0, VOCAB, 260).astype(np.uint16)
    nll, n = heldout_nll(model, tokens, seq_len=64, max_tokens=200, device="cpu")
    assert n == 200
    assert perplexity(nll, n) == pytest.approx(VOCAB, rel=1e-9)


def test_heldout_nll_sums_the_windows_cross_entropy():
    model = NSAModel(model_config("tiny", **tiny_overrides())).init_weights(1).double()
    tokens = np.random.default_rng(1).integers(0, VOCAB, 300).astype(np.uint16)
    nll, n = heldout_nll(model, tokens, seq_len=100, max_tokens=10_000, device="cpu", q_chunk=33)
    t = torch.as_tensor(tokens.astype(np.int64))
    want = 0.0
    for a in (0, 100, 200):  # windows predict tokens 1..100, 101..200, 201..299
        w = t[a:a + 101]
        with torch.no_grad():
            want += float(torch.nn.functional.cross_entropy(model(w[:-1]), w[1:], reduction="sum"))
    assert n == 299 and nll == pytest.approx(want, rel=1e-12)


def test_perplexity_math():
    assert perplexity(10 * math.log(4.0), 10) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        perplexity(1.0, 0)


def test_passkey_scoring_over_http():
    cases = [PasskeyCase(L, 0.5, key, L - 30, [{"role": "user", "content": f"... {key} ..."}])
             for L, key in ((4096, "11111"), (4096, "22222"), (16384, "33333"), (16384, "44444"))]
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "nsa-default"}]})
        body = json.loads(request.content)
        seen.append(body)
        key = body["messages"][0]["content"].split()[1]
        reply = {"11111": "The pass key is 11111.", "33333": "The pass key is 333331."}.get(key, "The pass key is 12345.")
        if key == "44444":
            return httpx.Response(503, json={"error": "busy"})
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": reply}}]})

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        res = run_passkey(client, "http://test", cases, concurrency=2, log=lambda m: None)
    assert res["model"] == "nsa-default"
    assert res["by_length"]["4096"] == {"n": 2, "correct": 1, "exact": 1, "errors": 0, "accuracy": 0.5,
                                        "exact_accuracy": 0.5}
    # "333331" contains the key (correct, the usual scoring) but is not exactly it.
    assert res["by_length"]["16384"] == {"n": 2, "correct": 1, "exact": 0, "errors": 1, "accuracy": 0.5,
                                         "exact_accuracy": 0.0}
    assert all(b["temperature"] == 0.0 and b["model"] == "nsa-default" for b in seen)


def test_eval_command_through_a_running_server(tmp_path):
    """Train a tiny model for a few steps, serve it with the real engine, run `nsa-serve eval`."""
    from api_fixtures import start_server

    from nsa_serve.train.cli import main
    from nsa_serve.train.trainer import Trainer, TrainArgs

    data = prepared_data()
    Trainer(TrainArgs(data=str(data / "train.bin"), out=str(tmp_path / "run"), config="tiny",
                      overrides=tiny_overrides(), seq_len=256, batch=1, steps=2, task_prob=0.5, device="cpu",
                      checkpoint_every=1000, log_every=1000, eval_tokens=128), log=lambda m: None).run()
    model_dir = tmp_path / "run" / "model"
    srv = start_server(model_dir, api_key="k")
    try:
        out = tmp_path / "eval.json"
        assert main(["eval", "--model", str(model_dir), "--data", str(data / "heldout.bin"),
                     "--base-url", srv.url, "--api-key", "k", "--lengths", "300", "--samples", "2",
                     "--ppl-tokens", "256", "--ppl-seq-len", "128", "--out", str(out)]) == 0
    finally:
        srv.stop()
    res = json.loads(out.read_text())
    assert res["heldout"]["tokens"] == 256 and res["heldout"]["ppl"] > 1
    pk = res["passkey"]["by_length"]["300"]
    assert pk["n"] == 2 and pk["errors"] == 0
    for case in res["passkey"]["cases"]:
        assert case["correct"] == (case["key"] in case["reply"])
        assert case["usage"]["prompt_tokens"] <= 300
    assert Tokenizer(model_dir / "tokenizer.model").vocab_size == VOCAB
    shutil.rmtree(tmp_path / "run")
