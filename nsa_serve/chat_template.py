"""Jinja chat templates, as Hugging Face tokenizers and vLLM take them.

A model directory may carry `chat_template.jinja` (Hugging Face's file name), and `nsa-serve serve
--chat-template` may name one; either replaces the built-in template (`tokenizer.render_chat`). The
template sees what Hugging Face's `apply_chat_template` gives it — `messages`, `tools`, `documents`,
`add_generation_prompt`, `bos_token`, `eos_token`, `unk_token`, `raise_exception`, `strftime_now`,
a `tojson` filter that keeps non-ASCII text — plus a request's `chat_template_kwargs`. It runs in
Jinja's immutable sandbox (as in transformers), so a template cannot reach Python objects' internals.

A message's `content` reaches the template in one of vLLM's two content formats: "string" (one
string, text parts joined) or "openai" (a list of `{"type": "text", "text": ...}` parts, a plain
string becoming one part). "auto" picks "openai" for a template that loops over a message's content
and "string" otherwise, as vLLM's `--chat-template-content-format auto` does: templates written for
part lists (Llama 4's, Gemma 3's, ...) fail or drop the text when handed a string, and older ones
print a list's repr when handed parts.

jinja2 is the engine the field's templates are written for (transformers and vLLM render them with
it); a hand-written subset would fail on real templates. It is imported when a template is compiled,
so the tokenizer (and the engine on a bare GPU image) loads without it.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

# Names a request's chat_template_kwargs may not set: the variables the server itself passes, and
# the template (vLLM refuses `chat_template` there: it would bypass --trust-request-chat-template).
RESERVED_KWARGS = frozenset({"messages", "tools", "documents", "add_generation_prompt", "continue_final_message",
                             "chat_template", "tokenize", "bos_token", "eos_token", "unk_token"})

CONTENT_FORMATS = ("auto", "string", "openai")  # vLLM's --chat-template-content-format choices


class ChatTemplateError(ValueError):
    """A template that does not compile, or that fails (or calls raise_exception) while rendering;
    `param` names the request field a 400 should point at."""

    def __init__(self, message: str, param: str = "messages"):
        super().__init__(message)
        self.param = param


def check_template_kwargs(kwargs: dict[str, Any] | None) -> None:
    """A request's chat_template_kwargs, whichever template renders: none of RESERVED_KWARGS."""
    reserved = sorted(RESERVED_KWARGS & (kwargs or {}).keys())
    if reserved:
        raise ChatTemplateError(f"chat_template_kwargs may not set {reserved[0]!r}: the server passes it",
                                param="chat_template_kwargs")


def _raise_exception(message: str):
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; prompts want the JSON as written.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=1)
def _environment():
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """One compiled template. `render` returns the prompt text; special tokens in it (`bos_token`,
    `eos_token`) are turned into their ids by `Tokenizer.encode_template_text`."""

    def __init__(self, source: str):
        if not isinstance(source, str) or not source.strip():
            raise ChatTemplateError("a chat template must be a non-empty string", param="chat_template")
        import jinja2

        self.source = source
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"the chat template does not compile: {exc.message} (line {exc.lineno})",
                                    param="chat_template") from None
        self.content_format = detect_content_format(source)  # what "auto" means for this template

    def render(self, messages: list[dict], *, tools: list[dict] | None = None, documents: list[dict] | None = None,
               add_generation_prompt: bool = True, continue_final_message: bool = False,
               special_tokens: dict[str, str] | None = None, kwargs: dict[str, Any] | None = None,
               content_format: str = "auto") -> str:
        """The prompt text. A message's content may be a string, None or a list of text parts; the
        template gets it in `content_format` ("auto": this template's `content_format`)."""
        if continue_final_message and add_generation_prompt:
            raise ChatTemplateError("continue_final_message and add_generation_prompt cannot both be true: "
                                    "set add_generation_prompt to false to continue the final message")
        check_template_kwargs(kwargs)
        import jinja2

        if content_format not in CONTENT_FORMATS:
            raise ValueError(f"content_format must be one of {CONTENT_FORMATS}, got {content_format!r}")
        fmt = self.content_format if content_format == "auto" else content_format
        messages = [_with_content(m, fmt) for m in messages]
        context = {**(special_tokens or {}), **(kwargs or {}), "messages": messages, "tools": tools,
                   "documents": documents, "add_generation_prompt": add_generation_prompt}
        try:
            text = self._template.render(**context)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as exc:  # undefined-call errors, sandbox refusals, ...
            raise ChatTemplateError(f"the chat template failed: {exc}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as exc:
            raise ChatTemplateError(f"the chat template failed: {type(exc).__name__}: {exc}") from None
        if continue_final_message:
            text = _cut_after_final_message(text, messages)
        return text


def _text_parts(content: list) -> list[str]:
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ChatTemplateError("message content parts must be text parts ({'type': 'text', 'text': ...}), "
                                    f"got {part!r:.80}")
        texts.append(part["text"])
    return texts


def _with_content(message: dict, fmt: str) -> dict:
    """The message with its content in format `fmt` (a copy; the caller's dict is left alone)."""
    content = message.get("content")
    if fmt == "string":
        content = "".join(_text_parts(content)) if isinstance(content, list) else (content or "")
    elif isinstance(content, list):
        content = [{"type": "text", "text": t} for t in _text_parts(content)]
    else:  # vLLM's openai format: a string is one text part, no content none
        content = [{"type": "text", "text": content}] if isinstance(content, str) else []
    return {**message, "content": content}


def detect_content_format(source: str) -> str:
    """"openai" when the template loops over a message's content (`{% for part in
    message['content'] %}`, `message.content | selectattr(...)`, or a variable set to it first),
    else "string" — vLLM's auto-detection, read from the template's syntax tree rather than by
    trying it."""
    from jinja2 import nodes

    def unwrapped(node):
        while isinstance(node, (nodes.Filter, nodes.Test)):  # `x.content | selectattr(...)`
            node = node.node
        return node

    def is_content(node) -> bool:
        node = unwrapped(node)
        if isinstance(node, nodes.Getattr):
            return node.attr == "content"
        return isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and node.arg.value == "content"

    tree = _environment().parse(source)
    # `{% set parts = message['content'] %}` ... `{% for p in parts %}`
    aliases = {a.target.name for a in tree.find_all(nodes.Assign)
               if isinstance(a.target, nodes.Name) and is_content(a.node)}
    for loop in tree.find_all(nodes.For):
        it = unwrapped(loop.iter)
        if is_content(it) or (isinstance(it, nodes.Name) and it.name in aliases):
            return "openai"
    return "string"


def _cut_after_final_message(text: str, messages: list[dict]) -> str:
    """Hugging Face's continue_final_message: the rendered prompt ends where the last message's
    text does, so whatever the template closes a turn with is left off and the model continues."""
    final = messages[-1].get("content") if messages else None
    if isinstance(final, list):  # parts: the last one's text, as transformers takes it
        final = (_text_parts(final) or [""])[-1]
    final = final if isinstance(final, str) else ""
    for needle in (final, final.strip()):
        if needle and needle in text:
            return text[: text.rindex(needle) + len(needle)]
    raise ChatTemplateError("continue_final_message needs the final message's text in the rendered prompt, and "
                            "this template does not show it" if final.strip() else
                            "continue_final_message needs a final message with text to continue")


def load_chat_template(value: str | Path) -> str:
    """`--chat-template`: a file's path or the template itself, told apart as vLLM does — a value
    with braces or a newline is a template; anything else must be a file."""
    text = str(value)
    if any(c in text for c in "{}\n"):
        return text
    path = Path(text).expanduser()
    if not path.is_file():
        raise ChatTemplateError(f"--chat-template {text!r} looks like a path, but no such file exists")
    return path.read_text(encoding="utf-8")


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> ChatTemplate:
    """Compiled once per distinct source (requests that bring the same template reuse it)."""
    return ChatTemplate(source)
