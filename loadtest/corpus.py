"""Offline English text for prompts and documents: the Python standard library's docstrings.

Every machine that runs the tool has them, so workloads need no download and are the same
everywhere for a given Python version. ~2 MB of text (~500k tokens for a 32k-vocab tokenizer);
documents longer than the corpus wrap around it.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
from pathlib import Path

_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo"}


# A triple-quoted string literal. A regex instead of ast.parse: the corpus needs text, not syntax, and
# scanning the stdlib this way is ~5x faster (about 1 s), which keeps every run and test quick.
_TRIPLE_QUOTED = re.compile(r'"""(.*?)"""', re.S)


@functools.lru_cache(maxsize=1)
def corpus_text() -> str:
    """Triple-quoted strings (nearly all docstrings) of the standard library, in sorted file order,
    dedented, paragraphs separated by blank lines."""
    root = Path(ast.__file__).parent
    parts: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS.intersection(path.relative_to(root).parts):
            continue
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for m in _TRIPLE_QUOTED.finditer(source):
            doc = inspect.cleandoc(m.group(1))
            if len(doc) > 40:
                parts.append(doc)
    text = "\n\n".join(parts)
    if len(text) < 10_000:
        raise RuntimeError(f"found only {len(text)} characters of docstrings under {root}; "
                           "the load tester needs the Python standard library sources")
    return text


@functools.lru_cache(maxsize=1)
def word_list() -> tuple[str, ...]:
    """Distinct plain words of the corpus (sorted, so a seed picks the same words everywhere)."""
    return tuple(sorted(set(re.findall(r"\b[a-zA-Z]{3,12}\b", corpus_text()))))


def text_span(start: int, n_chars: int) -> str:
    """`n_chars` characters of the corpus from `start`, wrapping around; cut at a word boundary."""
    text = corpus_text()
    start %= len(text)
    out = []
    need = n_chars
    while need > 0:
        piece = text[start:start + need]
        out.append(piece)
        need -= len(piece)
        start = 0
        if need > 0:
            out.append("\n\n")
            need -= 2
    s = "".join(out)[:max(0, n_chars)]
    # Start and end on whole words so token counts move smoothly with n_chars.
    cut = s.rfind(" ")
    return s[:cut] if cut > len(s) // 2 else s


def sentence_boundary(text: str, pos: int) -> int:
    """The index just after the sentence end nearest to `pos` (or `pos` when none is near)."""
    best = None
    for m in re.finditer(r"[.!?]\s", text[max(0, pos - 400):pos + 400]):
        cand = max(0, pos - 400) + m.end()
        if best is None or abs(cand - pos) < abs(best - pos):
            best = cand
    return pos if best is None else best
