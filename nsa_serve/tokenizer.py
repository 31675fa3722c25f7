"""Tokenizer (sentencepiece) and the chat template.

Chat template (docs/nsa.md, "Chat template"): every message becomes

    <|role|>\n{content}<|end|>\n

with role one of system / user / assistant / tool, and the prompt ends with `<|assistant|>\n` so
the model writes the reply. The model ends its turn with `<|end|>`, which is a stop token.

A `chat_template.jinja` beside tokenizer.model (or `nsa-serve serve --chat-template`) replaces that
built-in template with a Jinja one (nsa_serve/chat_template.py).
"""

from __future__ import annotations

import ast
import functools
import io
import re
import sys
from pathlib import Path
from typing import Any

import sentencepiece as spm

from .chat_template import ChatTemplate, ChatTemplateError, check_template_kwargs

SPECIAL_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"]
ROLES = ("system", "user", "assistant", "tool")


CHAT_TEMPLATE_FILE = "chat_template.jinja"  # Hugging Face's name for a model's template file


class Tokenizer:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no tokenizer.model at {self.path}")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.end_of_turn_id = self.sp.piece_to_id("<|end|>")
        if self.sp.id_to_piece(self.end_of_turn_id) != "<|end|>":
            self.end_of_turn_id = None
        # The model directory's own Jinja template, if it ships one; None: the built-in template.
        template_file = self.path.parent / CHAT_TEMPLATE_FILE
        self.chat_template: ChatTemplate | None = None
        if template_file.is_file():
            try:
                self.chat_template = ChatTemplate(template_file.read_text(encoding="utf-8"))
            except ChatTemplateError as exc:
                raise ChatTemplateError(f"{template_file}: {exc}") from None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def special_token_ids(self) -> frozenset[int]:
        """The chat markers (SPECIAL_TOKENS) this vocabulary holds: user-defined pieces, so decoding
        writes them out as text unless a request skips them (skip_special_tokens)."""
        if not hasattr(self, "_special"):
            ids = (self.sp.piece_to_id(t) for t in SPECIAL_TOKENS)
            self._special = frozenset(i for i, t in zip(ids, SPECIAL_TOKENS) if self.sp.id_to_piece(i) == t)
        return self._special

    @property
    def stop_token_ids(self) -> list[int]:
        """Tokens that end a generation unless ignore_eos: eos and the end-of-turn marker."""
        return [t for t in (self.eos_id, self.end_of_turn_id) if t is not None and t >= 0]

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.sp.encode(text)
        return [self.bos_id] + ids if add_bos and self.bos_id >= 0 else ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    def appended_texts(self) -> list[str | None] | None:
        """Per token id, the text it adds when decoded right after an ordinary piece — its piece with
        the word-boundary mark as a space — or None for ids whose text depends on their neighbours
        (byte pieces, which join into UTF-8 characters) or that decode to nothing or a placeholder
        (control, unknown, unused). The incremental detokenizer appends these instead of running two
        decodes a token. None overall when this model's decoder does not simply concatenate ordinary
        pieces (e.g. `treat_whitespace_as_suffix`), which `_concatenates` checks on sample pieces.
        Built once (a pass over the vocabulary)."""
        if not hasattr(self, "_appended"):
            sp = self.sp
            texts = [None if (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i))
                     else sp.id_to_piece(i).replace("\u2581", " ") for i in range(sp.get_piece_size())]
            self._appended = texts if _concatenates(sp, texts) else None
        return self._appended

    def token_text(self, token_id: int) -> str:
        """A display string for one token (logprobs): its piece with the word-boundary mark as space."""
        piece = self.sp.id_to_piece(token_id)
        if piece.startswith("<0x") and piece.endswith(">"):
            return piece  # a raw byte of a multi-byte character
        return piece.replace("\u2581", " ")

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes one token contributes (OpenAI's logprobs `bytes`): a byte piece's one raw
        byte, which may be part of a character, else its display text's encoding."""
        if self.sp.is_byte(token_id):
            return bytes([int(self.sp.id_to_piece(token_id)[3:5], 16)])
        return self.token_text(token_id).encode("utf-8")

    @functools.cached_property
    def special_tokens_map(self) -> dict[str, str]:
        """What a Jinja template sees as bos_token, eos_token, unk_token (the control pieces' text)."""
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id, "unk_token": self.sp.unk_id()}
        return {name: self.sp.id_to_piece(i) for name, i in names.items() if i is not None and i >= 0}

    @functools.cached_property
    def _control_pieces(self) -> tuple[re.Pattern | None, dict[str, int]]:
        """A pattern matching the control pieces' text (longest first) and their ids."""
        ids = {piece: self.sp.piece_to_id(piece) for piece in self.special_tokens_map.values()}
        if not ids:
            return None, ids
        return re.compile("(" + "|".join(re.escape(p) for p in sorted(ids, key=len, reverse=True)) + ")"), ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            continue_final_message: bool = False, *, chat_template: ChatTemplate | None = None,
                            tools: list[dict] | None = None, documents: list[dict] | None = None,
                            template_kwargs: dict[str, Any] | None = None, content_format: str = "auto") -> str:
        """The conversation as prompt text: through `chat_template` (a request's), else the model's
        Jinja template, else the built-in one (`render_chat`, which shows no `tools`: the API layer
        puts them in a system turn; nor `documents`, which it refuses). A Jinja template gets each
        message's content in `content_format` (chat_template.CONTENT_FORMATS). ValueError
        (ChatTemplateError) for what the template refuses."""
        template = chat_template or self.chat_template
        if template is None:
            check_template_kwargs(template_kwargs)  # the same rule whichever template renders
            if documents is not None:
                raise ChatTemplateError("the built-in chat template shows no documents: serve a Jinja chat template "
                                        "that does (--chat-template)", param="documents")
            return render_chat(messages, add_generation_prompt, continue_final_message)
        return template.render(messages, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
                               continue_final_message=continue_final_message,
                               special_tokens=self.special_tokens_map, kwargs=template_kwargs,
                               content_format=content_format)

    def encode_chat(self, text: str, chat_template: ChatTemplate | None = None, add_bos: bool = True) -> list[int]:
        """Token ids of a prompt that `apply_chat_template` rendered with the same `chat_template`.
        The built-in template's text gets BOS in front unless `add_bos` is false. A Jinja template's
        text is taken as Hugging Face and vLLM take it: the template writes BOS itself
        ({{ bos_token }}), so none is added, and the control tokens' text in it (bos_token,
        eos_token, unk_token) becomes those tokens — sentencepiece would otherwise spell "<s>" out
        as characters."""
        if (chat_template or self.chat_template) is None:
            return self.encode(text, add_bos=add_bos)
        pattern, specials = self._control_pieces
        if pattern is None:
            return self.encode(text, add_bos=False)
        ids: list[int] = []
        for k, part in enumerate(pattern.split(text)):
            if k % 2:
                ids.append(specials[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids


def _concatenates(sp, texts: list[str | None], samples: int = 64) -> bool:
    """Whether decode(ids + [b]) == decode(ids) + texts[b] for ordinary pieces, on samples that
    include pieces with the word-boundary mark at the start, at the end, and none."""
    ordinary = [i for i, t in enumerate(texts) if t is not None]
    if not ordinary:
        return False
    mark = "\u2581"
    lead = [i for i in ordinary if sp.id_to_piece(i).startswith(mark)]
    trail = [i for i in ordinary if sp.id_to_piece(i).endswith(mark)]
    plain = [i for i in ordinary if mark not in sp.id_to_piece(i)]
    pool = [g[(k * 7919) % len(g)] for g in (lead, trail, plain, ordinary) if g for k in range(samples)]
    for k, b in enumerate(pool):
        a, c = pool[(k * 31 + 7) % len(pool)], pool[(k * 17 + 3) % len(pool)]
        for ids in ([a], [c, a]):
            if sp.decode(ids + [b]) != sp.decode(ids) + texts[b]:
                return False
    return True


def render_chat(messages: list[dict], add_generation_prompt: bool = True,
                continue_final_message: bool = False) -> str:
    """The conversation as the model's prompt. `continue_final_message` (vLLM's): the last message is
    left open — no end marker, no new turn — so the model continues it (a reply's prefilled start)."""
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be true: "
                         "set add_generation_prompt to false to continue the final message")
    parts = []
    for m in messages:
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"message role must be one of {ROLES}, got {role!r}")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ValueError("message content must be a string or a list of text parts")
        parts.append(f"<|{role}|>\n{content}<|end|>\n")
    if continue_final_message and parts:
        parts[-1] = parts[-1][:-len("<|end|>\n")]
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)


def stdlib_docstrings(limit_bytes: int = 6_000_000) -> str:
    """English text found offline on any machine with Python: the standard library's docstrings."""
    root = Path(sys.modules["ast"].__file__).parent
    out, size = [], 0
    for path in sorted(root.rglob("*.py")):
        if any(part in ("test", "tests", "idlelib", "site-packages", "lib2to3") for part in path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    out.append(doc)
                    size += len(doc)
        if size > limit_bytes:
            break
    return "\n\n".join(out)


def train_tokenizer(text: str, out_path: str | Path, vocab_size: int) -> Tokenizer:
    """Train a BPE sentencepiece model on `text` with the chat special tokens and byte fallback
    (so any UTF-8 input encodes). Deterministic for a given text and vocab size."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, user_defined_symbols=SPECIAL_TOKENS,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, input_sentence_size=0,
        max_sentence_length=8192, minloglevel=2, split_digits=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity",
    )
    Path(out_path).write_bytes(model.getvalue())
    return Tokenizer(out_path)
