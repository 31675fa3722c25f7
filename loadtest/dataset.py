"""Request datasets read from a file (`--workload file --dataset-path PATH`): replay real traffic.

The formats `vllm bench serve` reads, told apart by their content:

- JSON Lines, one request a line: `{"prompt": "..."}` (vLLM's custom dataset) or `{"messages":
  [...]}` (a chat), with an optional output budget `output_tokens` (vLLM's key) or `max_tokens`.
  A line of an OpenAI batch file (`{"custom_id", "url", "body": {...}}`, what `nsa-serve run-batch`
  and vLLM's run-batch read) is taken by its `body`, so a batch file replays as load.
- A JSON array of ShareGPT conversations (`{"conversations": [{"from": "human", "value": ...},
  {"from": "gpt", "value": ...}, ...]}`): the first turn is the prompt and the second the reply
  whose length (in the server's tokens) becomes the output budget, as vLLM's ShareGPT dataset does;
  conversations of fewer than two turns are skipped. An array of request objects is read as the lines
  above.

A malformed entry is a ValueError naming the file and the line (or array index), before any request
is sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass
class DatasetEntry:
    """One request of a dataset: a completion prompt or chat messages, and its output budget (or the
    reference reply whose token count becomes it)."""

    prompt: str | None = None
    messages: list[dict] | None = None
    output_tokens: int | None = None
    reply: str | None = None

    def text(self) -> str:
        """The prompt's text: what its token target is counted on (messages: their contents joined)."""
        if self.prompt is not None:
            return self.prompt
        return "\n".join(m["content"] for m in self.messages or [] if isinstance(m.get("content"), str))


def load_dataset(path: str | Path) -> list[DatasetEntry]:
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"--dataset-path {path}: {exc.strerror or exc}") from None
    if raw.lstrip().startswith("["):
        try:
            items = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None
        entries = [_entry(item, f"{path}[{i}]") for i, item in enumerate(items)]
    else:
        entries = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON: {exc}") from None
            entries.append(_entry(item, f"{path}:{n}"))
    entries = [e for e in entries if e is not None]
    if not entries:
        raise ValueError(f"{path}: no requests in it (JSON Lines of prompt/messages, or ShareGPT conversations)")
    return entries


def _entry(item: Any, where: str) -> DatasetEntry | None:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
    if "conversations" in item:
        return _sharegpt(item["conversations"], where)
    if isinstance(item.get("body"), dict):  # an OpenAI batch file's line
        item = item["body"]
    budget = item.get("output_tokens", item.get("max_tokens", item.get("max_completion_tokens")))
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
        raise ValueError(f"{where}: output_tokens must be a positive integer, got {budget!r}")
    if isinstance(item.get("prompt"), str):
        return DatasetEntry(prompt=item["prompt"], output_tokens=budget)
    messages = item.get("messages")
    if isinstance(messages, list) and messages:
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in _CHAT_ROLES:
                raise ValueError(f"{where}: each message needs a role among {', '.join(_CHAT_ROLES)}")
        return DatasetEntry(messages=messages, output_tokens=budget)
    raise ValueError(f"{where}: needs a string 'prompt', a non-empty 'messages' list or ShareGPT 'conversations'")


def _sharegpt(turns: Any, where: str) -> DatasetEntry | None:
    if not isinstance(turns, list):
        raise ValueError(f"{where}: 'conversations' must be a list of turns")
    texts = []
    for turn in turns[:2]:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError(f"{where}: a ShareGPT turn needs a string 'value'")
        texts.append(turn["value"])
    if len(texts) < 2:
        return None  # no reply to size the output by (vLLM skips these too)
    return DatasetEntry(prompt=texts[0], reply=texts[1])  # sent as the user message on chat
