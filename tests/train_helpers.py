"""Shared fixtures for the training tests: a small documentation-like corpus on disk, prepared once
per process (tokenizer training ~1 s), and a tiny model config that exercises all three branches
within a few hundred tokens."""

from __future__ import annotations

import atexit
import functools
import gzip
import shutil
import tempfile
from pathlib import Path

from nsa_serve.train.prepare import PrepareArgs, prepare

VOCAB = 320

_SENTENCES = [
    "The kernel schedules each task on a processor and keeps a queue of runnable tasks.",
    "A module can be loaded at run time and removed again when it is no longer needed.",
    "The file system caches pages of recently used files in memory to speed up reads.",
    "Python functions are objects; they can be passed around and called later.",
    "Each interrupt handler must finish quickly and defer longer work to a thread.",
    "The pass key for this paragraph is not written here, only ordinary prose is.",
    "Perl reads the script, compiles it to an internal form, and then runs it.",
    "Memory is allocated in pages, and the allocator keeps free lists for each size.",
]


def _doc(i: int, n: int = 12) -> str:
    lines = [_SENTENCES[(i + j) % len(_SENTENCES)] for j in range(n)]
    return f"Section {i}\n{'=' * 10}\n\n" + " ".join(lines) + f"\n\nThis is document number {i}.\n"


def write_fixture_tree(root: Path) -> Path:
    """A tiny tree shaped like unpacked Debian docs: rst (plain and gzipped), pod, a Sphinx HTML page
    with its source (read once), a duplicate, a translation and a short file (both skipped)."""
    doc = root / "usr/share/doc/fake-doc"
    (doc / "Documentation").mkdir(parents=True)
    for i in range(24):
        (doc / "Documentation" / f"page{i}.rst").write_text(_doc(i))
    (doc / "Documentation" / "zipped.rst.gz").write_bytes(gzip.compress(_doc(100).encode()))
    (doc / "Documentation" / "copy.rst").write_text(_doc(3))  # exact duplicate of page3
    (doc / "translations" / "zh_CN").mkdir(parents=True)
    (doc / "translations" / "zh_CN" / "page.rst").write_text("内核" * 200)
    (doc / "Documentation" / "short.txt").write_text("too short")
    html = doc / "html"
    (html / "_sources").mkdir(parents=True)
    (html / "_sources" / "intro.rst.txt").write_text(_doc(200))
    (html / "intro.html").write_text("<html><body><p>" + _doc(200) + "</p></body></html>")
    pod = root / "usr/share/perl/pod"
    pod.mkdir(parents=True)
    (pod / "perlfake.pod").write_text("=head1 NAME\n\nperlfake - B<bold> and C<code> text\n\n=cut\n"
                                      + _doc(300))
    return root


@functools.lru_cache(maxsize=None)
def prepared_data() -> Path:
    """Fixture docs → .data-like folder (train.bin, heldout.bin, tokenizer.model, manifest.json)."""
    root = Path(tempfile.mkdtemp(prefix="nsa-train-test-"))
    atexit.register(shutil.rmtree, root, True)
    src = write_fixture_tree(root / "src")
    prepare(PrepareArgs(out=str(root / "data"), source_dirs=(str(src),), vocab_size=VOCAB, seed=0,
                        heldout_frac=0.1), log=lambda m: None)
    return root / "data"


def tiny_overrides(**kw) -> dict:
    """The 'tiny' preset's scaled-down sparsity (l=8, d=4, l'=16, n=4, w=32) with this vocabulary."""
    return {"vocab_size": VOCAB, "num_layers": 2, **kw}
