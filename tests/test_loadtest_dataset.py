"""nsa-loadtest's file workload (loadtest/dataset.py): the formats vllm bench serve reads, a seeded
draw from them, and clear errors for malformed files before any request is sent."""

import asyncio
import json

import pytest

import loadtest_deps  # noqa: F401  (first: skips on a GPU machine without the packages)
from nsa_loadtest.cli import build_parser, config_from_args
from nsa_loadtest.dataset import load_dataset
from nsa_loadtest.tokens import EstimatedTokenCounter
from nsa_loadtest.workloads import WorkloadConfig, build_workload

CHAT = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a prime."}]


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return path


def test_every_format_reads_to_prompts_chats_and_budgets(tmp_path):
    lines = _jsonl(tmp_path / "custom.jsonl", [
        {"prompt": "Once upon a time", "output_tokens": 7}, {"messages": CHAT, "max_tokens": 3}, {"prompt": "x"},
        {"custom_id": "a", "url": "/v1/chat/completions", "body": {"messages": CHAT, "max_completion_tokens": 5}}])
    got = load_dataset(lines)
    assert [(e.prompt, e.messages, e.output_tokens) for e in got] == [
        ("Once upon a time", None, 7), (None, CHAT, 3), ("x", None, None), (None, CHAT, 5)]
    assert got[1].text() == "Be terse.\nName a prime."
    share = tmp_path / "sharegpt.json"
    share.write_text(json.dumps([
        {"id": "1", "conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello! " * 9}]},
        {"id": "2", "conversations": [{"from": "human", "value": "no reply"}]},  # skipped, as vLLM does
        {"prompt": "an array of request objects works too"}]))
    got = load_dataset(share)
    assert [(e.prompt, e.reply) for e in got] == [("Hi there", "Hello! " * 9),
                                                  ("an array of request objects works too", None)]


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a"}\n{"prompt": 3}\n', "bad.jsonl:2: needs a string 'prompt'"),
    ('{"prompt": "a"}\nnot json\n', "bad.jsonl:2: not valid JSON"),
    ('{"prompt": "a", "output_tokens": 0}\n', "bad.jsonl:1: output_tokens must be a positive integer"),
    ('{"messages": [{"role": "robot", "content": "x"}]}\n', "each message needs a role"),
    ('[{"conversations": "x"}]', r"bad.jsonl\[0\]: 'conversations' must be a list"),
    ("[1, 2", "not valid JSON"),
    ("\n\n", "no requests in it"),
])
def test_a_malformed_file_is_a_clear_error_naming_the_line(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        load_dataset(tmp_path / "bad.jsonl")


def test_the_draw_is_seeded_cycles_the_file_and_sizes_budgets(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": f"prompt number {i}", "output_tokens": i + 1} for i in range(4)]
                  + [{"messages": CHAT}])
    cfg = WorkloadConfig(name="file", dataset_path=str(path), output_len=9)
    cfg.validate()
    counter = EstimatedTokenCounter()
    a = asyncio.run(build_workload(cfg, counter, 12, seed=1))
    assert [s.prompt for s in a] == [s.prompt for s in asyncio.run(build_workload(cfg, counter, 12, seed=1))]
    assert [s.prompt for s in a] != [s.prompt for s in asyncio.run(build_workload(cfg, counter, 12, seed=2))]
    picked = [s.tags["entry"] for s in a]
    assert sorted(picked[:5]) == sorted(picked[5:10]) == list(range(5))  # every entry once a pass
    for s in a:
        entry = cfg.entries[s.tags["entry"]]
        assert s.max_tokens == (entry.output_tokens or 9) and s.messages == entry.messages
        assert s.target_prompt_tokens == asyncio.run(counter.count(entry.text()))
    # A ShareGPT reply's length, in the server's tokens, is the budget.
    share = tmp_path / "s.json"
    share.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Hi"},
                                                    {"from": "gpt", "value": "word " * 40}]}]))
    scfg = WorkloadConfig(name="file", dataset_path=str(share))
    scfg.validate()
    (spec,) = asyncio.run(build_workload(scfg, counter, 1, seed=0))
    assert spec.max_tokens == asyncio.run(counter.count("word " * 40)) and spec.messages is None


def test_the_command_line_refuses_what_cannot_run(tmp_path):
    chats = _jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT}])

    def config(*argv):
        cfg = config_from_args(build_parser().parse_args(list(argv)))
        cfg.validate()
        return cfg

    assert config("--workload", "file", "--dataset-path", str(chats)).workload.entries[0].messages == CHAT
    for argv, message in ((("--workload", "file"), "go together"),
                          (("--dataset-path", str(chats)), "go together"),
                          (("--workload", "file", "--dataset-path", str(tmp_path / "nope.jsonl")), "--dataset-path"),
                          (("--workload", "file", "--dataset-path", str(chats), "--endpoint", "completions"),
                           "--endpoint chat")):
        with pytest.raises(ValueError, match=message):
            config(*argv)


def test_vllm_bench_serve_spellings_give_the_same_run(tmp_path):
    share = tmp_path / "sharegpt.json"
    share.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}]))

    def config(*argv):
        cfg = config_from_args(build_parser().parse_args(list(argv)))
        cfg.validate()
        return cfg

    ours = config("--workload", "random", "--input-len", "64", "--output-len", "8", "--range-ratio", "0.5",
                  "--endpoint", "completions", "--percentiles", "50,99")
    theirs = config("--dataset-name", "random", "--random-input-len", "64", "--random-output-len", "8",
                    "--random-range-ratio", "0.5", "--backend", "vllm", "--metric-percentiles", "50,99",
                    "--save-result")
    assert ours == theirs and theirs.endpoint == "completions" and theirs.workload.range_ratio == 0.5
    file = config("--dataset-name", "sharegpt", "--dataset-path", str(share), "--backend", "openai-chat",
                  "--sharegpt-output-len", "5")
    assert file.workload.name == "file" and file.endpoint == "chat" and file.workload.dataset_output_len == 5
    (spec,) = asyncio.run(build_workload(file.workload, EstimatedTokenCounter(), 1, seed=0))
    assert spec.max_tokens == 5  # the fixed budget wins over the reply's length
    with pytest.raises(ValueError, match="disagree"):
        config("--workload", "chat", "--dataset-name", "random")
    with pytest.raises(ValueError, match="dataset-output-len"):
        config("--workload", "chat", "--custom-output-len", "5")
