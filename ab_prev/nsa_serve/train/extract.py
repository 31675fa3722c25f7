"""Plain English text from documentation files: reStructuredText, plain text, Sphinx HTML, Perl POD.

Light cleaning only, aimed at prose the model should learn to write: markup that carries no words
(rst heading underlines, directives, POD commands, HTML tags) goes; the words stay. Gzipped files
(Debian compresses most of /usr/share/doc) are read through gzip.
"""

from __future__ import annotations

import gzip
import re
from html.parser import HTMLParser
from pathlib import Path

TEXT_SUFFIXES = (".rst", ".txt", ".pod", ".html", ".htm")
_SKIP_PARTS = {"translations", "_static", "_images", "_downloads", "changelog", "copyright"}


def kind_of(path: Path) -> str | None:
    """'rst' | 'txt' | 'pod' | 'html' for files worth reading, else None."""
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if any(part.lower() in _SKIP_PARTS for part in path.parts) or name.startswith(("changelog", "copyright")):
        return None
    if name.endswith(".rst.txt") or name.endswith(".rst"):
        return "rst"
    for suffix, kind in ((".txt", "txt"), (".pod", "pod"), (".html", "html"), (".htm", "html")):
        if name.endswith(suffix):
            return kind
    return None


def read_text(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    return raw.decode("utf-8", errors="replace")


class _HTMLText(HTMLParser):
    BLOCK = {"p", "div", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "tr", "table",
             "section", "dd", "dt", "blockquote"}
    SKIP = {"script", "style", "head", "nav"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    p = _HTMLText()
    p.feed(html)
    p.close()
    return "".join(p.parts)


_UNDERLINE = re.compile(r"^\s*([=\-~^*\"'#+`:.])\1{2,}\s*$")
_ROLE = re.compile(r":[\w:.+-]+:`([^`<]*?)(?:\s*<[^`>]*>)?`")
_LINK = re.compile(r"`([^`<]+?)(?:\s*<[^`>]*>)?`_{1,2}")


def rst_to_text(text: str) -> str:
    out = []
    in_directive = False
    for line in text.splitlines():
        if _UNDERLINE.match(line):
            continue
        if line.startswith(".. "):
            in_directive = True  # directive / comment; its indented options and body follow
            continue
        if in_directive:
            if not line.strip() or line[:1].isspace() and line.strip().startswith(":"):
                continue
            in_directive = False
        line = _ROLE.sub(r"\1", line)
        line = _LINK.sub(r"\1", line)
        line = line.replace("``", "")
        out.append(line)
    return "\n".join(out)


_POD_CODE = re.compile(r"[A-Z]<(?:<+\s)?([^<>]*?)(?:\s>+)?>")


def pod_to_text(text: str) -> str:
    out = []
    for line in text.splitlines():
        if line.startswith("="):
            cmd, _, rest = line.partition(" ")
            if cmd in ("=head1", "=head2", "=head3", "=head4", "=item"):
                out.append(rest.strip())
            continue  # =over, =back, =cut, =pod, =begin, =end, =for, =encoding
        out.append(line)
    s = "\n".join(out)
    for _ in range(4):  # nested codes: B<I<x>> → x
        s = _POD_CODE.sub(lambda m: m.group(1).split("|")[0], s)
    return s


def normalize(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\t", "    ")
    text = "".join(ch for ch in text if ch == "\n" or ch.isprintable())
    lines = [ln.rstrip() for ln in text.splitlines()]
    out, blank = [], 0
    for ln in lines:
        blank = blank + 1 if not ln else 0
        if blank <= 1:
            out.append(ln)
    return "\n".join(out).strip()


def is_english_prose(text: str, min_chars: int = 200) -> bool:
    """Long enough, nearly all ASCII (drops translations), and mostly letters (drops tables of numbers
    and hex dumps)."""
    if len(text) < min_chars:
        return False
    ascii_frac = sum(ch.isascii() for ch in text) / len(text)
    letters = sum(ch.isalpha() for ch in text)
    return ascii_frac > 0.98 and letters / len(text) > 0.5


def extract(path: Path, kind: str) -> str:
    raw = read_text(path)
    conv = {"rst": rst_to_text, "txt": lambda s: s, "pod": pod_to_text, "html": html_to_text}[kind]
    return normalize(conv(raw))


def has_sphinx_source(path: Path) -> bool:
    """A Sphinx HTML page whose source (`_sources/<page>.rst.txt`/`.txt`) sits in the same tree: read
    the source instead (cleaner, and the page would be a duplicate)."""
    for parent in path.parents:
        src = parent / "_sources"
        if src.is_dir():
            rel = path.relative_to(parent).with_suffix("")
            return any((src / f"{rel}{ext}").is_file() for ext in (".rst.txt", ".txt", ".rst"))
    return False
