"""Structured outputs: a grammar (JSON schema, any JSON object, regex, a choice of strings, or a Lark
grammar) constrains which tokens a sequence may sample, through llguidance (the constrained-decoding
library vLLM uses; Rust, tokenizer-agnostic, ~µs per token mask at this vocabulary).

Per sequence, an `LLMatcher` follows the tokens sampled so far. Each step it writes a bitmask of
the tokens the grammar allows next (eos among them once the output is complete); the sampler
sends every other token's logit to -inf; after sampling, the matcher consumes the token, and the
sequence finishes with "stop" when the grammar is complete.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import Any

import torch

from .protocol import InvalidRequestError

KINDS = ("json", "json_object", "regex", "choice", "grammar")
# JSON without free whitespace: a weak model would spend tokens on blanks (llguidance allows any
# whitespace between tokens unless told otherwise). A schema's own "x-guidance" settings still apply.
JSON_DEFAULTS = {"whitespace_flexible": False}


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must match. `param` names the request field, for error messages."""

    kind: str
    spec: Any  # json: schema (dict or str); regex / grammar: str; choice: list[str]; json_object: None
    param: str = "structured_outputs"

    def grammar(self) -> str:
        """The llguidance grammar for this spec (not yet checked)."""
        import llguidance as llg

        if self.kind == "json":
            schema = json.loads(self.spec) if isinstance(self.spec, str) else self.spec
            return llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)
        if self.kind == "json_object":
            return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_DEFAULTS)
        if self.kind == "regex":
            return llg.LLMatcher.grammar_from_regex(self.spec)
        if self.kind == "choice":
            return llg.LLMatcher.grammar_from_regex("|".join(re.escape(c) for c in self.spec))
        if self.kind == "grammar":
            return llg.LLMatcher.grammar_from_lark(self.spec)
        raise InvalidRequestError(f"unknown structured output kind {self.kind!r}", param=self.param)

    def check_shape(self) -> None:
        """Type checks that need no tokenizer (SamplingParams.validate)."""
        ok = {"json": isinstance(self.spec, (dict, str)), "json_object": self.spec is None,
              "regex": isinstance(self.spec, str) and bool(self.spec),
              "choice": isinstance(self.spec, list) and bool(self.spec)
              and all(isinstance(c, str) and c for c in self.spec),
              "grammar": isinstance(self.spec, str) and bool(self.spec)}.get(self.kind)
        if not ok:
            want = {"json": "a JSON schema", "json_object": "nothing", "regex": "a non-empty regex",
                    "choice": "a non-empty list of non-empty strings", "grammar": "a non-empty Lark grammar"}
            raise InvalidRequestError(f"{self.param} must be {want.get(self.kind, 'one of ' + ', '.join(KINDS))}",
                                      param=self.param)


class _Vocab:
    """The sentencepiece vocabulary as llguidance's TokenizerWrapper wants it: every token's bytes
    (special tokens marked with a leading 0xFF, as llguidance expects) and a tokenize function."""

    def __init__(self, tokenizer, special: set[int]):
        sp = tokenizer.sp
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id if tokenizer.bos_id >= 0 else None
        self.tokens, self.special_token_ids = [], []
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):
                self.tokens.append(bytes([int(piece[3:5], 16)]))
            elif sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or i in special:
                self.tokens.append(b"\xff" + piece.encode())
                self.special_token_ids.append(i)
            else:
                self.tokens.append(piece.replace("\u2581", " ").encode())
        self._sp = sp
        self._nl = sp.encode("\n")

    def __call__(self, text: str | bytes) -> list[int]:
        # Tokens of text in the middle of an output: sentencepiece puts a dummy word-boundary mark
        # before whatever it encodes, so encode after a newline (a byte token) and drop it.
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._sp.encode("\n" + text)[len(self._nl):]


class GrammarCompiler:
    """Builds matchers for one tokenizer; the llguidance tokenizer is made on first use (~50 ms at
    8k tokens) so servers whose clients never ask for structured output never pay for it."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._ll = None
        self._lock = threading.Lock()

    def _llg_tokenizer(self):
        with self._lock:
            if self._ll is None:
                try:
                    import llguidance as llg
                except ImportError as exc:  # a declared dependency; a broken install says so
                    raise InvalidRequestError(f"structured output needs the llguidance package: {exc}",
                                              param="structured_outputs") from None
                from ..tokenizer import SPECIAL_TOKENS

                special = {self.tokenizer.sp.piece_to_id(t) for t in SPECIAL_TOKENS}
                self._ll = llg.LLTokenizer(llg.TokenizerWrapper(_Vocab(self.tokenizer, special)),
                                           n_vocab=self.vocab_size, eos_token=self.tokenizer.stop_token_ids)
            return self._ll

    def matcher(self, so: StructuredOutput):
        """A fresh matcher for `so`; InvalidRequestError (naming the request field) if the spec is
        not a valid grammar."""
        import llguidance as llg

        if self.tokenizer is None:
            raise InvalidRequestError("structured output needs the model's tokenizer", param=so.param)
        ll = self._llg_tokenizer()
        try:
            grammar = so.grammar()
        except (ValueError, TypeError) as exc:
            raise InvalidRequestError(f"{so.param}: {exc}", param=so.param) from None
        err = llg.LLMatcher.validate_grammar(grammar, ll)
        if err:
            raise InvalidRequestError(f"{so.param} is not a valid {so.kind.replace('_', ' ')}: {err}",
                                      param=so.param)
        m = llg.LLMatcher(ll, grammar, log_level=0)
        if m.is_error():
            raise InvalidRequestError(f"{so.param}: {m.get_error()}", param=so.param)
        return m


def allowed_mask(matcher, vocab_size: int) -> torch.Tensor:
    """[vocab_size] bool: the tokens `matcher` allows next (CPU)."""
    return allowed_masks([matcher], vocab_size)[0]


def allowed_masks(matchers: list, vocab_size: int) -> torch.Tensor:
    """[len(matchers), vocab_size] bool: the tokens each matcher allows next (CPU). More than one
    are computed in parallel on llguidance's thread pool (`LLExecutor`, which releases the GIL)."""
    # One bit per token, 32 to an int32 word (llguidance's layout), written straight into the tensor
    # (llguidance.torch would do the same, but importing it sets up torch.compile machinery).
    n = len(matchers)
    words = torch.zeros(n, (vocab_size + 31) // 32, dtype=torch.int32)
    row_bytes = words.shape[1] * 4
    if n == 1:
        matchers[0].unsafe_compute_mask_ptr(words.data_ptr(), row_bytes)
    elif n > 1:
        _executor().unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], words.data_ptr(),
                                            row_bytes, n)
    bits = (words.unsqueeze(-1) >> _SHIFTS) & 1
    return bits.reshape(n, words.shape[1] * 32)[:, :vocab_size].bool()


_SHIFTS = torch.arange(32, dtype=torch.int32)
_EXECUTOR = None
_EXECUTOR_LOCK = threading.Lock()


def _executor():
    """One process-wide llguidance executor (its default pool: 80 % of the CPUs, at most 32)."""
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            import llguidance as llg

            _EXECUTOR = llg.LLExecutor()
        return _EXECUTOR
