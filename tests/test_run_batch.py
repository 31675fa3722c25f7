"""`nsa-serve run-batch`: an OpenAI batch file in, results in input order out, answered by the same
app the server runs; lines that are no request are reported, not fatal."""

from __future__ import annotations

import json

from engine_helpers import tiny_model_dir

from nsa_serve import LLM, SamplingParams
from nsa_serve.cli import main


def test_a_batch_file_gives_one_result_a_line_in_order(tmp_path, capsys):
    model = str(tiny_model_dir(True))
    greedy = {"max_tokens": 5, "temperature": 0, "ignore_eos": True}
    lines = [
        {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "Name a prime."}], **greedy}},
        {"custom_id": "text", "method": "POST", "url": "/v1/completions", "body": {"prompt": "Once upon", **greedy}},
        {"custom_id": "resp", "url": "/v1/responses",
         "body": {"input": "Hi", "max_output_tokens": 3, "temperature": 0, "ignore_eos": True}},
        "not json",
        {"custom_id": "hot", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "temperature": 5}},
        {"custom_id": "where", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
        {"custom_id": "stream", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "stream": True}},
    ]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n\n")
    assert main(["run-batch", model, "-i", str(src), "-o", str(dst), "--device", "cpu", "--num-pages", "128",
                 "--max-concurrency", "3"]) == 0
    out = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [r["custom_id"] for r in out] == ["chat", "text", "resp", None, "hot", "where", "stream"]
    assert all(r["id"].startswith("batch_req_") for r in out) and len({r["id"] for r in out}) == 7
    ok = {r["custom_id"]: r["response"] for r in out[:3]}
    assert all(v["status_code"] == 200 and v["request_id"] == v["body"]["id"] for v in ok.values())
    want = LLM(model, device="cpu", num_pages=128).generate("Once upon", SamplingParams(**greedy))[0]
    assert ok["text"]["body"]["choices"][0]["text"] == want.outputs[0].text
    assert ok["chat"]["body"]["usage"]["completion_tokens"] == 5 and ok["resp"]["body"]["object"] == "response"
    assert out[3]["response"] is None and out[3]["error"]["code"] == "invalid_json"
    hot = out[4]["response"]
    assert hot["status_code"] == 400 and hot["body"]["error"]["param"] == "temperature" and out[4]["error"] is None
    assert out[5]["error"]["code"] == out[6]["error"]["code"] == "invalid_request"
    assert "3 succeeded, 4 failed" in capsys.readouterr().err


def test_run_batch_takes_the_chat_template_flags(tmp_path):
    model = str(tiny_model_dir(True))
    template = tmp_path / "parts.jinja"
    template.write_text("{% for m in messages %}{% if m.content is string %}S:{{ m.content }}{% else %}"
                        "{% for p in m.content %}P:{{ p.text }}{% endfor %}{% endif %}|{% endfor %}")
    body = {"messages": [{"role": "user", "content": "Name a prime."}], "max_tokens": 1,
            "return_token_ids": True}
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"custom_id": "c", "url": "/v1/chat/completions", "body": body}) + "\n")
    tok = LLM(model, device="cpu", num_pages=128).engine.tokenizer
    for fmt, shown in (("auto", "P:Name a prime.|"), ("openai", "P:Name a prime.|"), ("string", "S:Name a prime.|")):
        dst = tmp_path / f"{fmt}.jsonl"
        assert main(["run-batch", model, "-i", str(src), "-o", str(dst), "--device", "cpu", "--num-pages", "128",
                     "--chat-template", str(template), "--chat-template-content-format", fmt]) == 0
        (result,) = [json.loads(x) for x in dst.read_text().splitlines()]
        assert result["response"]["body"]["prompt_token_ids"] == tok.encode(shown, add_bos=False), fmt
