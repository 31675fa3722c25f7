"""Jinja chat templates, as Hugging Face tokenizers and vLLM take them.

A model directory may carry `chat_template.jinja` (Hugging Face's file name), and `nsa-serve serve
--chat-template` may name one; either replaces the built-in template (`tokenizer.render_chat`). The
template sees what Hugging Face's `apply_chat_template` gives it — `messages`, `tools`, `documents`,
`add_generation_prompt`, `bos_token`, `eos_token`, `unk_token`, `raise_exception`, `strftime_now`,
a `tojson` filter that keeps non-ASCII text — plus a request's `chat_template_kwargs`. It runs in
Jinja's immutable sandbox (as in transformers), so a template cannot reach Python objects' internals.

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

    def render(self, messages: list[dict], *, tools: list[dict] | None = None, documents: list[dict] | None = None,
               add_generation_prompt: bool = True, continue_final_message: bool = False,
               special_tokens: dict[str, str] | None = None, kwargs: dict[str, Any] | None = None) -> str:
        if continue_final_message and add_generation_prompt:
            raise ChatTemplateError("continue_final_message and add_generation_prompt cannot both be true: "
                                    "set add_generation_prompt to false to continue the final message")
        check_template_kwargs(kwargs)
        import jinja2

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


def _cut_after_final_message(text: str, messages: list[dict]) -> str:
    """Hugging Face's continue_final_message: the rendered prompt ends where the last message's
    text does, so whatever the template closes a turn with is left off and the model continues."""
    final = messages[-1].get("content") if messages else None
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
