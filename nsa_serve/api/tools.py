"""Tool calling for /v1/chat/completions through structured outputs (vLLM's "named" and "required"
function calling, which work with any model).

- `tool_choice: {"type": "function", "function": {"name": F}}`: the reply is constrained to F's
  `parameters` schema and returned as one tool call; finish_reason "stop" (as OpenAI and vLLM).
- `tool_choice: "required"`: the reply is constrained to a JSON array of `{"name", "parameters"}`
  objects, one of the tools each (one item when `parallel_tool_calls` is false), returned as tool
  calls; finish_reason "tool_calls". Streamed call by call (`RequiredCallStream`).
- `tool_choice: "none"`: plain text.
- `tool_choice: "auto"` (OpenAI's default when tools are given): the model decides. Its reply is
  not constrained; a reply that is exactly the JSON list the system turn describes, of known tools
  (one item when `parallel_tool_calls` is false), is returned as tool calls with finish_reason
  "tool_calls", anything else as text (`parse_auto_calls`: the parser of this server's own
  tool-call syntax, the part vLLM's --tool-call-parser plays). Streamed, a reply whose first
  non-blank character is "[" is held until it ends, then sent as calls or as text.

The tool list is shown to the model in a system turn (`tools_system_text`), and earlier assistant
tool calls are rendered in the same JSON the "required" grammar produces, so a conversation that
feeds tool results back (`role: "tool"`) reads the way the model answers.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from ..engine.structured import StructuredOutput
from .errors import bad_request

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict


@dataclass(frozen=True)
class ToolPlan:
    """How a request's reply becomes tool calls: `named` (one call of `name`), `required`, or
    `auto` (unconstrained: the reply is parsed for calls of `names`)."""

    mode: str
    name: str | None
    structured: StructuredOutput | None
    names: tuple[str, ...] = ()
    parallel: bool = True


def parse_tools(tools: list[Any] | None) -> list[Tool]:
    """The request's `tools` (OpenAI's function-tool shape), checked; 400 naming `tools` otherwise."""
    out: list[Tool] = []
    for i, t in enumerate(tools or []):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise bad_request(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}", param="tools")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise bad_request(f"tools[{i}].function.name must be 1-64 letters, digits, _ or -, got {name!r}",
                              param="tools")
        if any(x.name == name for x in out):
            raise bad_request(f"tools has two functions named {name!r}", param="tools")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise bad_request(f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
        desc = fn.get("description", "")
        if not isinstance(desc, str):
            raise bad_request(f"tools[{i}].function.description must be a string", param="tools")
        out.append(Tool(name, desc, params))
    return out


def plan_tool_calls(tools: list[Tool], tool_choice: Any, parallel: bool | None) -> ToolPlan | None:
    """The constraint a tool_choice asks for (None: a plain reply); 400 naming `tool_choice`."""
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if tool_choice == "none":
        return None
    if not tools:
        raise bad_request("tool_choice asks for a tool call but tools is empty", param="tool_choice")
    if tool_choice == "auto":
        return ToolPlan("auto", None, None, tuple(t.name for t in tools), parallel is not False)
    if tool_choice == "required":
        items = [{"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
                  "properties": {"name": {"const": t.name}, "parameters": t.parameters}} for t in tools]
        schema: dict = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
        if parallel is False:
            schema["maxItems"] = 1
        return ToolPlan("required", None, StructuredOutput("json", schema, "tool_choice"))
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not isinstance(fn, dict):
        raise bad_request("tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                          "\"function\": {\"name\": ...}}", param="tool_choice")
    match = [t for t in tools if t.name == fn.get("name")]
    if not match:
        raise bad_request(f"tool_choice names {fn.get('name')!r}, which is not in tools", param="tool_choice")
    return ToolPlan("named", match[0].name, StructuredOutput("json", match[0].parameters, "tool_choice"))


def tools_system_text(tools: list[Tool]) -> str:
    """What the model is shown about the tools (a system turn before the conversation)."""
    specs = [{"name": t.name, "description": t.description, "parameters": t.parameters} for t in tools]
    return ("You can call these functions. To call some, answer with a JSON list of "
            "{\"name\": ..., \"parameters\": {...}} objects.\n" + json.dumps(specs, ensure_ascii=False))


def render_tool_calls(calls: list[Any]) -> str:
    """An earlier assistant message's tool_calls (OpenAI shape) as the text the model would have
    produced under tool_choice "required"; arguments that are not JSON stay as strings."""
    out = []
    for c in calls:
        fn = c.get("function", {}) if isinstance(c, dict) else {}
        args = fn.get("arguments", "{}")
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            pass
        out.append({"name": fn.get("name"), "parameters": args})
    return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class RequiredCallStream:
    """The tool-call deltas of a "required" reply while it is generated (OpenAI's streamed
    `delta.tool_calls`). The reply is a JSON list of `{"name", "parameters"}` objects; the grammar
    guarantees that shape, not the order of the two keys. A call's first delta (index, id, name)
    goes out once its name string has closed; after it, the raw text of its `parameters` value as
    it grows, so the concatenated arguments are exactly the value the model wrote.

    A one-pass scanner over the characters fed so far: nesting depth, strings and escapes, and at
    depth 2 (inside a call's object) whether a key, its colon, its value or the comma after it is
    next."""

    def __init__(self) -> None:
        self._depth = 0
        self._in_str = False
        self._esc = False
        self._grab: list[str] | None = None  # raw text of a key or a depth-2 string value
        self._mode = ""  # at depth 2: "key", "colon", "value", "after"
        self._key: str | None = None
        self._started = False  # the current depth-2 value has started
        self._scalar = False  # ... and is a number or literal (it ends at its delimiter)
        self._cap = False  # characters belong to a parameters value
        self._calls: list[dict] = []  # per call: name, pending argument text, header sent

    @property
    def started(self) -> bool:
        """Whether a call has gone out (its first delta)."""
        return any(c["sent"] for c in self._calls)

    def feed(self, text: str) -> list[dict]:
        """Deltas for `text`, the reply's next characters: one per call that has news."""
        first = max(len(self._calls) - 1, 0)
        for ch in text:
            self._step(ch)
        out = []
        for i in range(first, len(self._calls)):
            call = self._calls[i]
            if call["name"] is None:
                continue
            args, call["pending"] = "".join(call["pending"]), []
            if not call["sent"]:
                call["sent"] = True
                out.append({"index": i, "id": new_call_id(), "type": "function",
                            "function": {"name": call["name"], "arguments": args}})
            elif args:
                out.append({"index": i, "function": {"arguments": args}})
        return out

    def _step(self, ch: str) -> None:
        if self._in_str:
            self._take(ch)
            if self._grab is not None:
                self._grab.append(ch)
            if self._esc:
                self._esc = False
            elif ch == "\\":
                self._esc = True
            elif ch == '"':
                self._in_str = False
                self._string_closed()
            return
        if self._depth == 2 and self._mode == "value":
            if not self._started:
                if ch.isspace():
                    return
                self._started, self._cap = True, self._key == "parameters"
                self._scalar = ch not in '"{['
            elif self._scalar and (ch in ",}" or ch.isspace()):
                self._value_done()  # the delimiter is handled below
        if ch == '"':
            self._in_str = True
            self._grab = [] if self._depth == 2 and self._mode in ("key", "value") else None
            self._take(ch)
        elif ch in "{[":
            self._take(ch)
            if self._depth == 1 and ch == "{":  # a new call
                self._calls.append({"name": None, "pending": [], "sent": False})
                self._mode = "key"
            self._depth += 1
        elif ch in "}]":
            self._take(ch)
            self._depth -= 1
            if self._depth == 2 and self._mode == "value":
                self._value_done()  # a container value closed
        elif self._depth == 2 and self._mode == "colon" and ch == ":":
            self._mode, self._started = "value", False
        elif self._depth == 2 and self._mode == "after" and ch == ",":
            self._mode = "key"
        else:
            self._take(ch)

    def _take(self, ch: str) -> None:
        if self._cap and self._calls:
            self._calls[-1]["pending"].append(ch)

    def _string_closed(self) -> None:
        if self._depth != 2 or self._grab is None:
            return
        value = json.loads('"' + "".join(self._grab))  # the grabbed text ends with its closing quote
        self._grab = None
        if self._mode == "key":
            self._key, self._mode = value, "colon"
        elif self._mode == "value":
            if self._key == "name" and self._calls:
                self._calls[-1]["name"] = value
            self._value_done()

    def _value_done(self) -> None:
        self._mode, self._cap, self._scalar = "after", False, False


def tool_calls_of(plan: ToolPlan, text: str, finish_reason: str | None) -> list[dict] | None:
    """The tool calls a finished reply holds (OpenAI's `message.tool_calls`), or None when it holds
    none: a "required" reply cut before its JSON list closed (`max_tokens`, a stop string) cannot be
    split into calls and stays text; a named call's arguments are its text as generated, even if
    `max_tokens` cut it (as OpenAI returns them)."""
    if plan.mode == "named":
        return [{"id": new_call_id(), "type": "function", "function": {"name": plan.name, "arguments": text}}]
    if finish_reason != "stop":
        return None
    if plan.mode == "auto":
        return parse_auto_calls(text, plan.names, plan.parallel)
    try:
        calls = json.loads(text)
    except ValueError:
        return None
    return [{"id": new_call_id(), "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["parameters"], ensure_ascii=False)}}
            for c in calls]


def parse_auto_calls(text: str, names: tuple[str, ...], parallel: bool = True) -> list[dict] | None:
    """The tool calls an unconstrained ("auto") reply makes, or None when it is text: it must be,
    blanks around it aside, a non-empty JSON list of `{"name", "parameters"}` objects naming known
    tools, with object parameters (one object unless `parallel`)."""
    body = text.strip()
    if not body.startswith("["):
        return None
    try:
        calls = json.loads(body)
    except ValueError:
        return None
    if not isinstance(calls, list) or not calls or (not parallel and len(calls) > 1):
        return None
    for c in calls:
        if not (isinstance(c, dict) and set(c) == {"name", "parameters"} and c["name"] in names
                and isinstance(c["parameters"], dict)):
            return None
    return [{"id": new_call_id(), "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["parameters"], ensure_ascii=False)}}
            for c in calls]
