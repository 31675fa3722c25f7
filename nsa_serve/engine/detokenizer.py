"""Token ids → text, a few tokens at a time, never splitting a character.

A UTF-8 character may arrive as several byte tokens (`<0xE6>`, `<0x97>`, `<0xA5>`); decoding a
prefix of them yields U+FFFD. The detokenizer decodes a short window of recent ids and only moves
forward once the window's text no longer ends in U+FFFD (the offsets scheme vLLM uses, which also
gets sentencepiece's word-boundary spaces right by starting the window inside the prompt). A
window that still ends in U+FFFD after 4 more tokens is genuinely invalid and is emitted as is
(U+FFFD is valid text), so a model producing junk bytes cannot stall the stream.

Stop strings are matched on the accumulated text, so they are found whatever token boundaries
they straddle; `StopStringMatcher.visible` holds back the characters that could still be the start
of a stop string, so a streamed delta never shows text that is later cut.
"""

from __future__ import annotations

from ..tokenizer import Tokenizer

_PROMPT_CONTEXT = 6  # prompt tokens kept as decoding context for the first output tokens
_MAX_HELD_TOKENS = 4  # a UTF-8 character has at most 4 bytes


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        # Generated special tokens left out of the text, as vLLM's skip_special_tokens does: they
        # are not decoded at all (the prompt's, kept as context, still are).
        self._skip = getattr(tokenizer, "special_token_ids", frozenset()) if skip_special_tokens else frozenset()
        self.ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        # Fast path: an ordinary piece after an ordinary piece, nothing held, adds its own text
        # (Tokenizer.appended_texts); two decodes a token cost ~3 µs on the 2-core VM.
        appended = getattr(tokenizer, "appended_texts", None)
        self._appended = appended() if appended is not None else None

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (maybe empty while a character is open)."""
        if token_id in self._skip:
            return ""
        ids = self.ids
        ids.append(token_id)
        fast = self._appended
        if fast is not None and self.read_offset == len(ids) - 1 and self.read_offset > 0:
            delta = fast[token_id] if 0 <= token_id < len(fast) else None
            if delta is not None and fast[ids[-2]] is not None:
                self.prefix_offset = self.read_offset
                self.read_offset = len(ids)
                self.text += delta
                return delta
        return self._advance(force=len(ids) - self.read_offset >= _MAX_HELD_TOKENS)

    def flush(self) -> str:
        """At the end of generation: emit whatever is held, complete or not."""
        return self._advance(force=True)

    def _advance(self, force: bool) -> str:
        if self.read_offset == len(self.ids):
            return ""
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if new_text.endswith("\ufffd") and not force:
            return ""
        if new_text.startswith(prefix_text):
            delta = new_text[len(prefix_text):]
        else:  # the window re-tokenised its start differently: fall back to the common prefix
            k = 0
            while k < min(len(prefix_text), len(new_text)) and prefix_text[k] == new_text[k]:
                k += 1
            delta = new_text[k:]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        # Keep the window short so each token costs O(1), not O(length).
        self.text += delta
        return delta


class StopStringMatcher:
    """Finds the earliest stop string in a growing text."""

    def __init__(self, stop: list[str], include_in_output: bool = False):
        self.stop = [s for s in stop if s]
        self.include = include_in_output
        self.hold = max((len(s) for s in self.stop), default=1) - 1

    def find(self, text: str, new_chars: int) -> tuple[int, str] | None:
        """Search the region `new_chars` can have completed. Returns (cut position, stop string):
        the text to keep is text[:cut]."""
        if not self.stop or new_chars <= 0:
            return None
        start = max(0, len(text) - new_chars - self.hold)
        best = None
        for s in self.stop:
            pos = text.find(s, start)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is None:
            return None
        pos, s = best
        return (pos + len(s) if self.include else pos), s

    def visible(self, text: str, finished: bool) -> int:
        """How many characters of `text` may be shown now."""
        return len(text) if finished else max(0, len(text) - self.hold)
