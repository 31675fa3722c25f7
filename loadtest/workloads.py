"""Workloads: lists of `RequestSpec`s, the same for the same seed and server tokenizer.

- chat: an instruction plus a passage of offline text; prompt and output lengths drawn from a
  distribution (log-normal by default: most requests short, a long tail, as in real chat traffic).
- random: prompts of random words with lengths uniform in [L(1−r), L(1+r)] (vLLM's random dataset
  semantics for --range-ratio); nothing is shared between prompts, so no prefix-cache hits.
- longdoc: a document of 8k–128k tokens (lengths cycled from --doc-lengths) plus a question; with
  --questions-per-doc K, K requests ask different questions about each document (in a seeded
  shuffled order), as users querying one document do, so the prefix cache serves the repeats.
- needle: a unique fact planted at a given depth of a document; the reply is checked for the fact's
  value, giving accuracy per document length × depth.
- file: requests read from --dataset-path (dataset.py: JSON Lines of prompts or chats, an OpenAI
  batch file, ShareGPT conversations), drawn in a seeded shuffled order, repeated when the run
  asks for more requests than the file holds.

Length targets are for the text the workload writes (the user message or completion prompt); the
chat template adds a few tokens, and the counts reported come from the server's usage.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field

import numpy as np

from .corpus import corpus_text, sentence_boundary, text_span, word_list
from .dataset import DatasetEntry, load_dataset
from .record import RequestSpec
from .tokens import fit_to_tokens

WORKLOADS = ("chat", "random", "longdoc", "needle", "file")
LENGTH_DISTS = ("fixed", "uniform", "lognormal")

_CHAT_INSTRUCTIONS = (
    "Summarise the following text in a few sentences.",
    "Explain the following documentation to a new programmer.",
    "List the key points of the text below.",
    "Rewrite the following passage in plain, simple words.",
    "What questions does the following text leave open?",
)
_DOC_QUESTIONS = (
    "Which functions, classes or modules does the document describe? Answer briefly.",
    "Summarise the document in three sentences.",
    "What is the most important warning or caveat the document gives?",
    "Name three parameters the document mentions and what they do.",
    "What does the document say about errors and exceptions?",
    "Which example in the document is the most useful, and why?",
    "What would a beginner find hardest in the document?",
    "List the return values the document describes.",
)
MAX_QUESTIONS_PER_DOC = len(_DOC_QUESTIONS)
_DOC_HEAD = "Read the document below, then answer the question after it.\n\n<document>\n"
_DOC_CLOSE = "\n</document>\n\nQuestion: "
_NEEDLE_COLORS = ("amber", "cobalt", "crimson", "emerald", "golden", "indigo", "ivory", "scarlet", "silver", "violet")
_NEEDLE_ANIMALS = ("badger", "falcon", "heron", "lynx", "otter", "panther", "raven", "salmon", "tortoise", "walrus")


@dataclass
class WorkloadConfig:
    name: str = "chat"
    input_len: int = 512  # chat/random: median (chat) or centre (random) of prompt tokens
    output_len: int = 128  # max_tokens centre for chat/random; max_tokens for longdoc/needle
    length_dist: str | None = None  # None: lognormal for chat, uniform for random
    range_ratio: float = 0.0  # uniform: lengths in [L(1−r), L(1+r)]
    sigma: float = 0.5  # lognormal: spread of log-length
    doc_lengths: list[int] = field(default_factory=lambda: [8192, 16384, 32768, 65536, 131072])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    questions_per_doc: int = 1  # longdoc: requests that share each document
    dataset_path: str | None = None  # file: the requests (dataset.py)
    dataset_output_len: int | None = None  # file: every request's max_tokens (else each entry's own)
    entries: list[DatasetEntry] = field(default_factory=list, repr=False)  # file: read by validate()

    def validate(self) -> None:
        if self.name not in WORKLOADS:
            raise ValueError(f"unknown workload {self.name!r}; choose from {', '.join(WORKLOADS)}")
        if (self.name == "file") != (self.dataset_path is not None):
            raise ValueError("--workload file and --dataset-path go together")
        if self.dataset_output_len is not None and (self.name != "file" or self.dataset_output_len < 1):
            raise ValueError("--dataset-output-len is a positive max_tokens for --workload file")
        if self.name == "file" and not self.entries:
            self.entries = load_dataset(self.dataset_path)  # a bad file ends here, before any request
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError("--input-len and --output-len must be at least 1")
        if self.length_dist is not None and self.length_dist not in LENGTH_DISTS:
            raise ValueError(f"unknown --length-dist {self.length_dist!r}; choose from {', '.join(LENGTH_DISTS)}")
        if not 0 <= self.range_ratio < 1:
            raise ValueError(f"--range-ratio must be in [0, 1), got {self.range_ratio}")
        if self.sigma < 0:
            raise ValueError(f"--sigma must be ≥ 0, got {self.sigma}")
        if not self.doc_lengths or min(self.doc_lengths) < 64:
            raise ValueError("--doc-lengths must list document sizes of at least 64 tokens")
        if not self.depths or not all(0 <= d <= 1 for d in self.depths):
            raise ValueError("--depths must be fractions in [0, 1]")
        if not 1 <= self.questions_per_doc <= MAX_QUESTIONS_PER_DOC:
            raise ValueError(f"--questions-per-doc must be between 1 and {MAX_QUESTIONS_PER_DOC}")


def sample_lengths(rng: np.random.Generator, n: int, centre: int, dist: str, range_ratio: float,
                   sigma: float) -> list[int]:
    if dist == "fixed":
        return [centre] * n
    if dist == "uniform":
        lo, hi = int(np.floor(centre * (1 - range_ratio))), int(np.ceil(centre * (1 + range_ratio)))
        return [int(x) for x in rng.integers(max(1, lo), max(1, hi) + 1, size=n)]
    if dist == "lognormal":
        # Median `centre`; clipped at 8× so one draw cannot dwarf the run.
        xs = centre * np.exp(sigma * rng.standard_normal(n))
        return [int(x) for x in np.clip(np.rint(xs), 1, 8 * centre)]
    raise ValueError(f"unknown length distribution {dist!r}")


def needle_answer_found(reply: str, answer: str) -> bool:
    """The reply contains the planted value (digit groups may be written with spaces or commas)."""
    squeezed = re.sub(r"(?<=\d)[ ,](?=\d)", "", reply)
    return answer in squeezed


class _Builder:
    def __init__(self, cfg: WorkloadConfig, counter, chars_per_token: float, concurrency: int = 4):
        self.cfg, self.counter, self.cpt = cfg, counter, chars_per_token
        self.sem = asyncio.Semaphore(concurrency)

    async def fit_corpus(self, prefix: str, offset: int, target: int, suffix: str = "") -> tuple[str, int]:
        """prefix + corpus text from `offset` + suffix, with the whole text close to `target` tokens."""
        async with self.sem:
            return await fit_to_tokens(self.counter.count, lambda n: prefix + text_span(offset, n) + suffix,
                                       target, self.cpt)

    async def fit_words(self, words: list[str], target: int) -> tuple[str, int]:
        async with self.sem:
            return await fit_to_tokens(self.counter.count, lambda n: " ".join(words[:n]), target,
                                       1.0 / max(self.words_tokens, 1e-3))

    words_tokens = 1.5  # tokens per random word, refined in build()


async def build_workload(cfg: WorkloadConfig, counter, n: int, seed: int, stream: int = 0,
                         progress=None) -> list[RequestSpec]:
    """`n` request specs for `cfg`. `stream` separates independent draws from one seed (0: measured
    requests, 1: warm-up), so adding warm-up never changes the measured requests."""
    cfg.validate()
    if n <= 0:
        return []
    rng = np.random.default_rng([seed, stream])
    text = corpus_text()
    sample = text[:20_000]
    cpt = len(sample) / max(1, await counter.count(sample))  # characters per token on this tokenizer
    b = _Builder(cfg, counter, cpt)

    async def done(spec_coro):
        spec = await spec_coro
        if progress is not None:
            progress.update(1)
        return spec

    if cfg.name == "file":
        # A seeded shuffle of the file, cycled (each pass shuffled anew) when n exceeds it.
        picks = np.concatenate([rng.permutation(len(cfg.entries)) for _ in range(-(-n // len(cfg.entries)))])[:n]

        async def one(i):
            entry = cfg.entries[int(picks[i])]
            async with b.sem:
                prompt_tokens = await counter.count(entry.text())
                budget = cfg.dataset_output_len or entry.output_tokens or (
                    await counter.count(entry.reply) if entry.reply else cfg.output_len)
            return RequestSpec(i, entry.text(), max(1, budget), prompt_tokens, {"entry": int(picks[i])},
                               messages=entry.messages)

        return list(await asyncio.gather(*(done(one(i)) for i in range(n))))

    if cfg.name in ("chat", "random"):
        dist = cfg.length_dist or ("lognormal" if cfg.name == "chat" else "uniform")
        ins = sample_lengths(rng, n, cfg.input_len, dist, cfg.range_ratio, cfg.sigma)
        outs = sample_lengths(rng, n, cfg.output_len, dist, cfg.range_ratio, cfg.sigma)
        if cfg.name == "chat":
            offsets = rng.integers(0, len(text), size=n)
            instr = rng.integers(0, len(_CHAT_INSTRUCTIONS), size=n)

            async def one(i):
                prompt, _ = await b.fit_corpus(_CHAT_INSTRUCTIONS[instr[i]] + "\n\n", int(offsets[i]), ins[i])
                return RequestSpec(i, prompt, outs[i], ins[i], {"input_len": ins[i]})
        else:
            words = word_list()
            draws = [[words[j] for j in rng.integers(0, len(words), size=3 * ins[i] + 16)] for i in range(n)]
            probe = " ".join(draws[0][:200])
            b.words_tokens = await counter.count(probe) / 200

            async def one(i):
                prompt, _ = await b.fit_words(draws[i], ins[i])
                return RequestSpec(i, prompt, outs[i], ins[i], {"input_len": ins[i]})

        return list(await asyncio.gather(*(done(one(i)) for i in range(n))))

    if cfg.name == "longdoc":
        k = cfg.questions_per_doc
        if k == 1:  # one question a document (the draws as before --questions-per-doc existed)
            lengths = [cfg.doc_lengths[i % len(cfg.doc_lengths)] for i in range(n)]
            offsets = rng.integers(0, len(text), size=n)
            qs = rng.integers(0, len(_DOC_QUESTIONS), size=n)

            async def one(i):
                tail = f"{_DOC_CLOSE}{_DOC_QUESTIONS[qs[i]]}"
                prompt, _ = await b.fit_corpus(_DOC_HEAD, int(offsets[i]), lengths[i], tail)
                return RequestSpec(i, prompt, cfg.output_len, lengths[i], {"doc_tokens": lengths[i]})

            return list(await asyncio.gather(*(done(one(i)) for i in range(n))))

        # Request i asks question i % k of document i // k; the documents are sized once (for the
        # longest question), so the k prompts share the document's text up to the question.
        docs = -(-n // k)
        lengths = [cfg.doc_lengths[j % len(cfg.doc_lengths)] for j in range(docs)]
        offsets = rng.integers(0, len(text), size=docs)
        picks = [rng.permutation(len(_DOC_QUESTIONS))[:k] for _ in range(docs)]
        order = rng.permutation(n)
        longest = max(_DOC_QUESTIONS, key=len)

        async def document(j):
            fitted, _ = await b.fit_corpus(_DOC_HEAD, int(offsets[j]), lengths[j], _DOC_CLOSE + longest)
            return fitted[len(_DOC_HEAD):len(fitted) - len(_DOC_CLOSE) - len(longest)]

        bodies = await asyncio.gather(*(document(j) for j in range(docs)))
        specs = []
        for slot in range(n):
            i = int(order[slot])
            j = i // k
            prompt = _DOC_HEAD + bodies[j] + _DOC_CLOSE + _DOC_QUESTIONS[picks[j][i % k]]
            specs.append(RequestSpec(slot, prompt, cfg.output_len, lengths[j], {"doc_tokens": lengths[j], "doc": j}))
            if progress is not None:
                progress.update(1)
        return specs

    # needle: every (length, depth) cell, repeated to fill n, in a seeded shuffled order so lengths mix.
    grid = [(L, d) for L in cfg.doc_lengths for d in cfg.depths]
    cells = [grid[i % len(grid)] for i in range(n)]
    order = rng.permutation(n)
    offsets = rng.integers(0, len(text), size=n)
    keys = [(_NEEDLE_COLORS[rng.integers(len(_NEEDLE_COLORS))], _NEEDLE_ANIMALS[rng.integers(len(_NEEDLE_ANIMALS))])
            for _ in range(n)]
    values = [str(v) for v in rng.integers(1_000_000, 10_000_000, size=n)]

    async def one(slot):
        i = int(order[slot])
        length, depth = cells[i]
        color, animal = keys[i]
        fact = f" The secret code of the {color} {animal} is {values[i]}. "
        question = f"{_DOC_CLOSE}What is the secret code of the {color} {animal}? Reply with the number only."
        head = _DOC_HEAD
        # Size the haystack so the whole prompt reaches the target (as longdoc), then plant the fact.
        frame_tokens = await counter.count(head + fact + question)
        hay, _ = await b.fit_corpus("", int(offsets[i]), max(16, length - frame_tokens))
        at = 0 if depth <= 0 else len(hay) if depth >= 1 else sentence_boundary(hay, int(depth * len(hay)))
        prompt = head + hay[:at] + fact + hay[at:] + question
        return RequestSpec(slot, prompt, cfg.output_len, length,
                           {"doc_tokens": length, "depth": depth}, expected_answer=values[i])

    return list(await asyncio.gather(*(done(one(s)) for s in range(n))))
