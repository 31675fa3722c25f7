"""OpenAI's Responses API request (`POST /v1/responses`), translated into a chat request.

A response is a chat completion with another envelope: `instructions` become a system turn, `input`
(a string or a list of message, `function_call` and `function_call_output` items) the turns after
the stored conversation of `previous_response_id`, `text.format` the response format, flat function
`tools` the chat tools. vLLM's sampling extras (top_k, seed, stop, ...) pass through as on chat.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from .errors import bad_request
from .protocol import ChatCompletionRequest

# vLLM's extra sampling fields a Responses request may carry (through the client's extra_body).
PASSTHROUGH = ("top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "stop",
               "stop_token_ids", "ignore_eos", "min_tokens", "logit_bias", "allowed_token_ids", "bad_words",
               "priority", "cache_salt", "skip_special_tokens", "truncate_prompt_tokens", "guided_json",
               "guided_regex", "guided_choice", "guided_grammar", "structured_outputs", "chat_template",
               "chat_template_kwargs")
MAX_METADATA_KEYS = 16  # OpenAI's bounds on metadata
MAX_METADATA_VALUE = 512


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    text: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    reasoning: dict[str, Any] | None = None
    background: bool = False
    conversation: Any = None
    include: list[str] | None = None  # "message.output_text.logprobs" is the one honoured
    top_logprobs: int | None = None
    prompt: Any = None  # a stored prompt template (OpenAI dashboard): refused in check()
    max_tool_calls: int | None = None
    # "auto": a conversation too long for the context loses its oldest items (create_response)
    truncation: Literal["auto", "disabled"] | None = None

    @property
    def logprobs(self) -> bool:
        return "message.output_text.logprobs" in (self.include or [])

    def check(self) -> None:
        if self.background:
            raise bad_request("background responses are not supported: send the request without it (or stream)",
                              param="background")
        if self.conversation is not None:
            raise bad_request("conversations are not supported: use previous_response_id", param="conversation")
        if self.prompt is not None:
            raise bad_request("stored prompt templates are not supported: send the instructions and input",
                              param="prompt")
        if self.max_tool_calls is not None:
            raise bad_request("max_tool_calls is not supported: limit the calls with tool_choice and "
                              "parallel_tool_calls", param="max_tool_calls")
        if self.metadata is not None and (len(self.metadata) > MAX_METADATA_KEYS or any(
                len(k) > 64 or len(v) > MAX_METADATA_VALUE for k, v in self.metadata.items())):
            raise bad_request(f"metadata holds at most {MAX_METADATA_KEYS} keys of 64 characters with values of "
                              f"{MAX_METADATA_VALUE}", param="metadata")
        if self.reasoning and self.reasoning.get("effort") is not None:
            raise bad_request("reasoning is not supported by this model", param="reasoning")
        if self.top_logprobs is not None and self.top_logprobs < 0:  # the upper bound: --max-logprobs
            raise bad_request(f"top_logprobs must be a non-negative integer, got {self.top_logprobs}",
                              param="top_logprobs")
        if isinstance(self.input, list) and not self.input and not self.previous_response_id:
            raise bad_request("input must not be empty", param="input")

    def conversation_length(self, history: list[dict]) -> int:
        return len(history) + len(self.input_messages())

    def input_messages(self) -> list[dict]:
        """`input` as chat messages (template dicts of ChatMessage's shape)."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        out: list[dict] = []
        for i, item in enumerate(self.input):
            kind = item.get("type", "message")
            if kind == "message":
                out.append({"role": _role(item, i), "content": _text(item.get("content"), i)})
            elif kind == "function_call":
                call = {"id": _string(item, "call_id", i), "type": "function",
                        "function": {"name": _string(item, "name", i), "arguments": _string(item, "arguments", i)}}
                if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") and not out[-1]["content"]:
                    out[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
                else:
                    out.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif kind == "function_call_output":
                output = item.get("output")
                if not isinstance(output, str):
                    raise bad_request(f"input[{i}].output must be a string", param="input")
                out.append({"role": "tool", "tool_call_id": _string(item, "call_id", i), "content": output})
            else:
                raise bad_request(f"input[{i}] has type {kind!r}; message, function_call and function_call_output "
                                  f"items are supported", param="input")
        return out

    def to_chat(self, history: list[dict], raw: dict[str, Any], drop: int = 0) -> ChatCompletionRequest:
        """The chat request this response runs: instructions, then the stored conversation, then
        the input, less the conversation's first `drop` items (truncation "auto") and the tool
        results whose calls went with them. `raw` is the request body, for vLLM's extras."""
        conversation = (history + self.input_messages())[drop:]
        while drop and len(conversation) > 1 and conversation[0]["role"] == "tool":
            conversation = conversation[1:]
        messages = ([{"role": "system", "content": self.instructions}] if self.instructions else []) + conversation
        body: dict[str, Any] = {k: raw[k] for k in PASSTHROUGH if k in raw}
        body.update(messages=messages, stream=self.stream)
        for name, value in (("model", self.model), ("max_tokens", self.max_output_tokens),
                            ("temperature", self.temperature), ("top_p", self.top_p), ("user", self.user),
                            ("parallel_tool_calls", self.parallel_tool_calls)):
            if value is not None:
                body[name] = value
        if self.logprobs:
            body.update(logprobs=True, top_logprobs=self.top_logprobs or 0)
        if self.tools:
            body["tools"] = [_chat_tool(t, i) for i, t in enumerate(self.tools)]
        if self.tool_choice is not None:
            body["tool_choice"] = _chat_tool_choice(self.tool_choice)
        fmt = (self.text or {}).get("format")
        if fmt is not None:
            body["response_format"] = _response_format(fmt)
        try:
            return ChatCompletionRequest.model_validate(body)
        except Exception as exc:  # a passed-through extra of the wrong type
            raise bad_request(f"invalid request: {exc}".splitlines()[0]) from None


def _role(item: dict, i: int) -> str:
    role = item.get("role")
    if role not in ("user", "system", "developer", "assistant"):
        raise bad_request(f"input[{i}].role must be user, system, developer or assistant, got {role!r}",
                          param="input")
    return role


def _text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"input[{i}].content must be a string or a list of text parts", param="input")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text") or not isinstance(part.get("text"), str):
            raise bad_request(f"input[{i}].content: only input_text and output_text parts are supported, got "
                              f"{kind!r}", param="input")
        texts.append(part["text"])
    return "".join(texts)


def _string(item: dict, key: str, i: int) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise bad_request(f"input[{i}].{key} must be a string", param="input")
    return value


def _chat_tool(tool: Any, i: int) -> dict:
    """A Responses function tool ({"type", "name", "parameters", ...}) in the chat shape."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise bad_request(f"tools[{i}] has type {kind!r}; only function tools are supported", param="tools")
    fn = {k: tool[k] for k in ("name", "description", "parameters") if k in tool and tool[k] is not None}
    return {"type": "function", "function": fn}


def _chat_tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise bad_request("tool_choice must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", \"name\": ...}",
                      param="tool_choice")


def _response_format(fmt: Any) -> dict:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema":
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}
    raise bad_request(f"text.format.type must be text, json_object or json_schema, got {kind!r}", param="text")
