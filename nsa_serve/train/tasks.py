"""Synthetic long-context retrieval tasks, rendered through the chat template.

Both tasks put one fact at a random depth of a long user message and ask for it back, so the only way
to lower the answer's loss is to find the fact: through the compressed branch's scores, the selected
blocks, or (when near) the window. They teach the model to use its sparse branches at long range.

* passkey — "The pass key is 40213. Remember it. 40213 is the pass key." inside filler text (the
  classic format of the passkey test), question "What is the pass key?", reply "The pass key is 40213.".
* kv lookup — many "amber-river-42: 918273" records, question about one key, reply with its value.
* continuation chat — a passage of the corpus as the user turn, the passage that follows it as the
  assistant turn, closed by <|end|>: teaches the model to answer a chat request in the corpus's
  English and to end its turn (without it, every reply would look like a passkey answer).
* dialog (opt-in: the 4th share of `--task-mix`) — several short turns: a question about a word of a
  corpus passage ("What is {word}?", "Tell me about {word}.", ...) answered by that passage. Teaches
  that a question other than the pass key's gets prose back (the first default model answered
  "What is a kernel module?" with a pass key: docs/training.md). Replies are whole sentences (a
  passage starts at a sentence start and ends at a sentence end), so a reply begins like an answer
  and ends its turn; a quarter of the samples open with a greeting and its fixed reply (nothing in
  the corpus greets, and the first dialog model answered "Hello!" with documentation fragments).

The training loop builds these from token pieces (filler comes from the tokenized corpus, no decode /
re-encode at 16k tokens); `passkey_messages` builds the same prompt as text for the HTTP evaluation,
so training and evaluation see one format. Piece boundaries are the only difference: the server
tokenizes the whole string, which may merge a token across a seam.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..tokenizer import Tokenizer, render_chat

PASSKEY_HEADER = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                  "Find it and memorize it. I will quiz you about it.")
PASSKEY_QUESTION = "What is the pass key?"
DIALOG_QUESTIONS = ("What is {}?", "Tell me about {}.", "Explain {}.", "What does {} do?", "How do I use {}?",
                    "Describe {}.", "Can you tell me what {} means?")
# A greeting (or a question about the assistant) and the replies it is trained to give: the corpus
# has neither, so these are the only place the model learns them. Kept true of the shipped model.
GREETINGS = ("Hello!", "Hi!", "Hi there.", "Hello", "Hey!", "Good morning!", "Hello, who are you?",
             "Who are you?", "What can you do?", "Hi, what do you know about?")
GREETING_REPLIES = (
    "Hello! I am a small language model with native sparse attention, trained on the documentation of "
    "Linux, Python and Perl. Ask me about them.",
    "Hi! I am a small NSA model served by nsa-serve. I have read the Linux, Python and Perl "
    "documentation, so ask me a question about it.",
    "Hello. I can answer questions about the Linux kernel, Python and Perl from their documentation. "
    "What would you like to know?",
)
GREETING_SHARE = 0.25  # of dialog samples whose first turn is a greeting
CHAT_INSTRUCTIONS = ("Continue the following text.", "Here is part of a document. Write what comes next.",
                     "Read this passage and continue it.")
KV_HEADER = "Here is a list of keys and their values. Remember them. I will ask you for one of them."

_A, _B = "\x00A\x00", "\x00B\x00"  # sentinels for where filler goes; never produced by real text


def passkey_needle(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def passkey_answer(key: str) -> str:
    return f"The pass key is {key}."


def passkey_messages(filler_before: str, filler_after: str, key: str) -> list[dict]:
    """The evaluation prompt: the same text the training task renders, as chat messages."""
    content = (f"{PASSKEY_HEADER}\n\n{filler_before} {passkey_needle(key)} {filler_after}\n\n"
               f"{PASSKEY_QUESTION}")
    return [{"role": "user", "content": content}]


def random_key(rng: np.random.Generator, min_digits: int = 4, max_digits: int = 7) -> str:
    n = int(rng.integers(min_digits, max_digits + 1))
    return str(int(rng.integers(10 ** (n - 1), 10 ** n)))


def _ascii_byte(piece: str) -> str:
    """A byte-fallback piece of an ASCII character ("<0x21>") as that character; other pieces as they are."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">") and int(piece[3:5], 16) < 0x80:
        return chr(int(piece[3:5], 16))
    return piece


@dataclass
class Sample:
    """One training sequence: `ids` (T+1 tokens; inputs ids[:-1], targets ids[1:]) and `answer`, a
    boolean mask over the targets that marks the reply a task asks for (all False for plain text)."""

    ids: np.ndarray
    answer: np.ndarray
    kind: str
    needle: int = -1  # position in ids of the fact the answer needs (the key, the asked record); -1: none


class TaskBuilder:
    """Builds task samples of an exact length from a tokenizer and a filler token stream."""

    def __init__(self, tok: Tokenizer, filler: np.ndarray, greeting_share: float = GREETING_SHARE):
        if not 0.0 <= greeting_share <= 1.0:
            raise ValueError(f"greeting_share must be in [0, 1], got {greeting_share}")
        self.tok = tok
        self.filler = filler
        self.greeting_share = greeting_share
        self.drop = {t for t in (tok.bos_id, tok.eos_id) if t is not None and t >= 0}
        self._nl = tok.encode("\n", add_bos=False)
        # The rendered template around the filler, split at the sentinels: pieces before, between,
        # after. Rendering with the real template keeps training and serving in one format.
        text = render_chat([{"role": "user", "content": f"{PASSKEY_HEADER}\n\n{_A} {{needle}} {_B}\n\n"
                                                           f"{PASSKEY_QUESTION}"}])
        pre, rest = text.split(_A)
        mid, post = rest.split(_B)
        self.pk_pre = self._enc_start(pre)
        self.pk_mid_template = mid  # " {needle} "
        self.pk_post = self._enc(post)
        kv_text = render_chat([{"role": "user", "content": f"{KV_HEADER}\n\n{_A}\n{{question}}"}])
        kv_pre, kv_post = kv_text.split(_A)
        self.kv_pre = self._enc_start(kv_pre)
        self.kv_post_template = kv_post
        self.words = self._word_list()
        self.chat = []
        for instr in CHAT_INSTRUCTIONS:
            pre, post = render_chat([{"role": "user", "content": f"{instr}\n\n{_A}"}]).split(_A)
            self.chat.append((self._enc_start(pre), self._enc(post)))
        self.end = self._enc("<|end|>\n")
        # Per token id: ends a sentence ("." "!" "?", before closing quotes or brackets), is a newline,
        # starts with a capital letter. A passage starts after a sentence end, a newline or a document
        # boundary, on a capital; it ends after a sentence end.
        pieces = [_ascii_byte(tok.id_to_piece(i)) for i in range(tok.vocab_size)]
        self._ends_sentence = np.array([p.rstrip("\"')]").endswith((".", "!", "?")) for p in pieces])
        self._newline = np.array([p == "\n" for p in pieces])
        # (at most one "▁" before it: an indented line is not where a reply should start)
        self._capital = np.array([p[:1].isupper() or (p[:1] == "\u2581" and p[1:2].isupper()) for p in pieces])
        self._space = np.array([p == "\u2581" for p in pieces])  # a lone "▁" before a capital's piece
        self.greetings = []
        for g in GREETINGS:
            head = render_chat([{"role": "user", "content": g}])
            self.greetings.append((self._enc_start(head), head))
        self.greeting_replies = [self._enc(r) for r in GREETING_REPLIES]

    def _enc_start(self, text: str) -> list[int]:
        """Tokens of the text that starts a prompt, exactly as the server encodes a whole prompt."""
        return self.tok.encode(text, add_bos=False)

    def _enc(self, text: str) -> list[int]:
        """Tokens of a piece in the middle of a prompt. sentencepiece puts a dummy '▁' before every
        encode call's text; encoding after a newline (a byte token that never merges) and dropping
        the newline's tokens gives the piece's tokens without it, as the whole prompt would have them."""
        return self.tok.encode("\n" + text, add_bos=False)[len(self._nl):]

    def _word_list(self) -> list[str]:
        words = set()
        for i in range(self.tok.vocab_size):
            piece = self.tok.id_to_piece(i)
            if piece.startswith("\u2581") and piece[1:].isalpha() and piece[1:].islower() and 4 <= len(piece) - 1 <= 8:
                words.add(piece[1:])
        words = sorted(words)
        return words if len(words) >= 16 else ["amber", "river", "stone", "cloud", "maple", "delta", "orbit",
                                               "piano", "lemon", "tiger", "ocean", "frost", "cedar", "ember",
                                               "glade", "prism"]

    def _filler(self, rng: np.random.Generator, n: int) -> list[int]:
        if n <= 0:
            return []
        start = int(rng.integers(0, max(1, self.filler.shape[0] - n - 1)))
        out = [int(t) for t in self.filler[start:start + n + 64] if int(t) not in self.drop]
        while len(out) < n:  # tiny corpora (tests): wrap around
            out += [int(t) for t in self.filler[: n] if int(t) not in self.drop]
        return out[:n]

    def _passage(self, rng: np.random.Generator, n: int, tries: int = 4) -> list[int]:
        """About n tokens of one corpus document from a sentence start to a sentence end (what a reply
        looks like): the last sentence end within n tokens, else the first within 2n. A few draws
        look for one; the last draw is cut at n tokens when none has it (a very long sentence or
        code), and plain filler is used when no draw found a sentence start."""
        if n <= 0:
            return []
        span = 8 * n + 256
        fallback = None
        for _ in range(tries):
            start = int(rng.integers(0, max(1, self.filler.shape[0] - span)))
            seg = self.filler[start:start + span].astype(np.int64)
            boundary = np.isin(seg, list(self.drop)) if self.drop else np.zeros(seg.shape, dtype=bool)
            after_end = self._ends_sentence[seg[:-1]] | self._newline[seg[:-1]] | boundary[:-1]
            capital = self._capital[seg[1:]]
            capital[:-1] |= self._space[seg[1:-1]] & self._capital[seg[2:]]
            starts = np.nonzero(after_end & capital & ~boundary[1:])[0] + 1
            if starts.size == 0:
                continue
            i = int(starts[0])
            i += int(self._space[seg[i]])  # "▁" "▁These" (two spaces after a full stop): start at the word
            stop = np.nonzero(boundary[i:])[0]  # the document ends here
            doc = seg[i:i + min(2 * n, int(stop[0]) if stop.size else 2 * n)]
            ends = np.nonzero(self._ends_sentence[doc])[0] + 1  # lengths that end on a sentence end
            if ends.size:
                within = ends[ends <= n]
                return [int(t) for t in doc[:int(within[-1] if within.size else ends[0])]]
            fallback = doc[:n]
        if fallback is None:
            return self._filler(rng, n)
        return [int(t) for t in fallback]

    def _finish(self, body: list[int], answer: list[int], length: int, kind: str, needle: int = -1) -> Sample:
        ids = [self.tok.bos_id] + body + answer
        if len(ids) != length + 1:  # callers pass the exact target count
            raise ValueError(f"{kind} sample of {len(ids)} tokens, wanted {length + 1}")
        mask = np.zeros(length, dtype=bool)
        mask[length - len(answer):] = True  # targets ids[1:]: the answer is the last len(answer) targets
        return Sample(np.asarray(ids, dtype=np.int64), mask, kind, needle)

    def passkey(self, rng: np.random.Generator, length: int, depth: float | None = None,
                key: str | None = None) -> Sample:
        """A passkey sample of exactly length + 1 tokens; the needle at `depth` ∈ [0, 1] of the filler."""
        key = key or random_key(rng)
        depth = float(rng.random()) if depth is None else depth
        mid = self._enc(self.pk_mid_template.replace("{needle}", passkey_needle(key)))
        answer = self._enc(passkey_answer(key) + "<|end|>\n")
        fixed = 1 + len(self.pk_pre) + len(mid) + len(self.pk_post) + len(answer)
        n_fill = length + 1 - fixed
        if n_fill < 0:
            raise ValueError(f"passkey needs at least {fixed} tokens, got length {length}")
        before = int(round(depth * n_fill))
        body = self.pk_pre + self._filler(rng, before) + mid + self._filler(rng, n_fill - before) + self.pk_post
        needle = 1 + len(self.pk_pre) + before  # the needle sentence starts here (after bos)
        return self._finish(body, answer, length, "passkey", needle)

    def kv_lookup(self, rng: np.random.Generator, length: int) -> Sample:
        """Records `key: value` filling the context (at most length + 1 tokens; records are whole, so
        the sample may come out a few tokens short); the question asks for one at a random depth."""
        w = self.words
        records: list[tuple[str, str, list[int]]] = []
        used = 1 + len(self.kv_pre)
        reserve = 48  # typical question + answer; trimmed below if the chosen key needs more
        while True:
            key = f"{w[int(rng.integers(len(w)))]}-{w[int(rng.integers(len(w)))]}-{int(rng.integers(10, 100))}"
            if any(key == k for k, _, _ in records):
                continue
            value = str(int(rng.integers(100000, 1000000)))
            enc = self._enc(f"{key}: {value}\n")
            if used + len(enc) + reserve > length + 1:
                break
            records.append((key, value, enc))
            used += len(enc)
        if not records:
            raise ValueError(f"kv lookup needs more than {length} tokens")
        qi = int(rng.integers(len(records)))
        qkey, qvalue, _ = records[qi]
        post = self._enc(self.kv_post_template.replace("{question}", f"What is the value of {qkey}?"))
        answer = self._enc(f"The value of {qkey} is {qvalue}.<|end|>\n")
        while used + len(post) + len(answer) > length + 1:  # drop records other than the asked one
            drop = len(records) - 1 if len(records) - 1 != qi else len(records) - 2
            if drop < 0:
                raise ValueError(f"kv lookup question did not fit in {length} tokens")
            used -= len(records.pop(drop)[2])
            qi = qi if drop > qi else qi - 1
        body = list(self.kv_pre) + [t for _, _, enc in records for t in enc]
        needle = 1 + len(self.kv_pre) + sum(len(enc) for _, _, enc in records[:qi])
        return self._finish(body + post, answer, len(body) + len(post) + len(answer), "kv", needle)

    def dialog(self, rng: np.random.Generator, length: int) -> Sample:
        """Turns of (question about a word of a passage → that passage) filling exactly length + 1
        tokens; every assistant reply and its <|end|> is answer. A greeting_share of the samples (default
        GREETING_SHARE) open with a greeting turn. The sequence ends where the length does, inside a last turn if needed
        (as a context window cuts a document): a cut reply is still answer, a cut question is not."""
        ids, mask = [self.tok.bos_id], []
        first = True
        greet = float(rng.random()) < self.greeting_share
        while len(ids) < length + 1:
            room = length + 1 - len(ids)
            if first and greet:
                gi = int(rng.integers(len(self.greetings)))
                head = self.greetings[gi][0]
                reply = self.greeting_replies[int(rng.integers(len(self.greeting_replies)))]
            else:
                # The passage is drawn before its word is picked, so the question always asks about a
                # word its reply contains.
                reply = self._passage(rng, int(rng.integers(32, 257)))
                words = re.findall(r"[A-Za-z][A-Za-z_]{4,}", self.tok.decode(reply))
                word = words[int(rng.integers(len(words)))] if words else "this"
                question = DIALOG_QUESTIONS[int(rng.integers(len(DIALOG_QUESTIONS)))].format(word)
                text = render_chat([{"role": "user", "content": question}])
                # A later turn follows "<|end|>\n" in the middle of the sequence: encoded as such a piece.
                head = self._enc_start(text) if first else self._enc(text)
            if first and len(head) + 8 > room:
                raise ValueError(f"dialog needs more than {length} tokens")
            turn = head + reply + self.end
            turn_mask = [False] * len(head) + [True] * (len(reply) + len(self.end))
            ids += turn[:room]
            mask += turn_mask[:room]
            first = False
        ids = np.asarray(ids, dtype=np.int64)
        # mask[k] marks token ids[k + 1] (the targets are ids[1:]).
        return Sample(ids, np.asarray(mask, dtype=bool), "dialog")

    def continuation(self, rng: np.random.Generator, length: int) -> Sample:
        """User: an instruction and a passage; assistant: the next passage (¼ … ½ of the tokens, at
        most 384: chat replies are short)."""
        pre, post = self.chat[int(rng.integers(len(self.chat)))]
        n_text = length + 1 - 1 - len(pre) - len(post) - len(self.end)
        if n_text < 8:
            raise ValueError(f"continuation needs more than {length} tokens")
        n_reply = min(384, max(4, int(n_text * rng.uniform(0.25, 0.5))))
        text = self._filler(rng, n_text)
        body = pre + text[: n_text - n_reply] + post
        return self._finish(body, text[n_text - n_reply:] + self.end, length, "chat")
