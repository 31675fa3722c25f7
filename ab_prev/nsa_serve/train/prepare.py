"""`nsa-serve prepare-data`: Debian documentation → deduplicated documents → train / held-out split →
sentencepiece BPE tokenizer → uint16 token files, all on the CPU machine, offline once the .deb files
are downloaded.

Output (OUT, git-ignored, carried to the GPU machine):
  train.bin (+ .json)     training tokens, documents as [bos] … [eos]
  heldout.bin (+ .json)   held-out documents (split by document, seeded)
  tokenizer.model         trained on the training documents only
  manifest.json           packages and versions, .deb sha256s, counts, sizes, the exact arguments
The .deb files go to a temporary folder (or --deb-dir to keep them), so OUT holds exactly what the GPU
machine needs and can be carried whole.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..tokenizer import train_tokenizer
from .extract import extract, has_sphinx_source, is_english_prose, kind_of
from .tokens import write_tokens

DEFAULT_PACKAGES = ("linux-doc-6.1", "python3.11-doc", "perl-doc")


@dataclass
class PrepareArgs:
    out: str = ".data"
    packages: tuple[str, ...] = DEFAULT_PACKAGES
    source_dirs: tuple[str, ...] = ()  # read these folders instead of downloading (tests, offline reuse)
    deb_dir: str | None = None  # keep downloaded .deb files here (default: a temporary folder)
    vocab_size: int = 8192
    seed: int = 0
    heldout_frac: float = 0.02
    max_heldout_tokens: int = 1_000_000
    max_train_tokens: int = 12_000_000  # 24 MB as uint16: with the 30 MB compact resume state and the
    # repo it stays under the device tool's 64 MiB working-tree limit
    tokenizer_sample_bytes: int = 16_000_000


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()[-500:]}")
    return res.stdout


def download_debs(packages: tuple[str, ...], deb_dir: Path) -> list[dict]:
    """`apt-get download` each package (skipped when its .deb is already there). Run `apt-get update`
    once beforehand if apt has no package lists."""
    deb_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for pkg in packages:
        have = sorted(deb_dir.glob(f"{pkg}_*.deb"))
        if not have:
            _run(["apt-get", "download", pkg], cwd=deb_dir)
            have = sorted(deb_dir.glob(f"{pkg}_*.deb"))
            if not have:
                raise RuntimeError(f"apt-get download {pkg} left no {pkg}_*.deb in {deb_dir}")
        deb = have[-1]
        version = _run(["dpkg-deb", "-f", str(deb), "Version"]).strip()
        out.append({"package": pkg, "version": version, "file": deb.name,
                    "sha256": hashlib.sha256(deb.read_bytes()).hexdigest()})
    return out


def collect_documents(roots: list[Path]) -> tuple[list[tuple[str, str]], dict]:
    """(relative path, text) of every readable English document under `roots`, exact duplicates
    (after whitespace/case normalisation) removed. Sorted by path, so the result is deterministic."""
    docs, seen = [], set()
    stats = {"files_seen": 0, "files_read": 0, "skipped_sphinx_html": 0, "not_english_or_short": 0,
             "duplicates": 0}
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            kind = kind_of(path.relative_to(root))
            if kind is None:
                continue
            stats["files_seen"] += 1
            if kind == "html" and has_sphinx_source(path):
                stats["skipped_sphinx_html"] += 1
                continue
            try:
                text = extract(path, kind)
            except (OSError, EOFError, ValueError):
                continue
            stats["files_read"] += 1
            if not is_english_prose(text):
                stats["not_english_or_short"] += 1
                continue
            key = hashlib.sha1(re.sub(r"\s+", " ", text.lower()).strip().encode()).hexdigest()
            if key in seen:
                stats["duplicates"] += 1
                continue
            seen.add(key)
            docs.append((f"{root.name}/{path.relative_to(root)}", text))
    return docs, stats


def split_documents(docs: list, heldout_frac: float, seed: int) -> tuple[list, list]:
    """Shuffle documents with `seed`; the first ⌈frac·n⌉ (at least 1) are held out."""
    order = np.random.default_rng(seed).permutation(len(docs))
    n_held = max(1, int(np.ceil(heldout_frac * len(docs)))) if len(docs) > 1 else 0
    held = [docs[i] for i in order[:n_held]]
    train = [docs[i] for i in order[n_held:]]
    return train, held


def _encode_docs(tok, docs: list[tuple[str, str]], max_tokens: int) -> list[list[int]]:
    out, total = [], 0
    for _, text in docs:
        ids = [tok.bos_id] + tok.sp.encode(text) + [tok.eos_id]
        if total + len(ids) > max_tokens:
            ids = ids[: max_tokens - total]
            if len(ids) > 1:
                out.append(ids)
            break
        out.append(ids)
        total += len(ids)
    return out


def prepare(a: PrepareArgs, log=print) -> dict:
    t0 = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    debs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="nsa-docs-") as tmp:
        if a.source_dirs:
            roots = [Path(d) for d in a.source_dirs]
        else:
            deb_dir = Path(a.deb_dir) if a.deb_dir else Path(tmp) / "debs"
            debs = download_debs(tuple(a.packages), deb_dir)
            roots = []
            for d in debs:
                root = Path(tmp) / d["package"]
                _run(["dpkg-deb", "-x", str(deb_dir / d["file"]), str(root)])
                roots.append(root)
            log(f"unpacked {len(debs)} packages: " + ", ".join(f"{d['package']} {d['version']}" for d in debs))
        docs, stats = collect_documents(roots)
    if len(docs) < 2:
        raise RuntimeError(f"found only {len(docs)} English documents; check the packages / folders")
    train, held = split_documents(docs, a.heldout_frac, a.seed)
    chars = sum(len(t) for _, t in train)
    log(f"{len(docs)} documents ({stats}); train {len(train)} docs / {chars / 1e6:.1f} M chars, "
        f"held out {len(held)} docs")
    # The tokenizer learns from (a prefix of) the shuffled training documents only.
    sample, size = [], 0
    for _, text in train:
        sample.append(text)
        size += len(text)
        if size >= a.tokenizer_sample_bytes:
            break
    tok = train_tokenizer("\n".join(sample), out / "tokenizer.model", a.vocab_size)
    log(f"tokenizer: {tok.vocab_size} pieces from {size / 1e6:.1f} M chars")
    common = {"vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id, "seed": a.seed}
    train_ids = _encode_docs(tok, train, a.max_train_tokens)
    held_ids = _encode_docs(tok, held, a.max_heldout_tokens)
    train_info = write_tokens(out / "train.bin", train_ids, {**common, "split": "train"})
    held_info = write_tokens(out / "heldout.bin", held_ids, {**common, "split": "heldout"})
    manifest = {"args": {**asdict(a), "packages": list(a.packages), "source_dirs": list(a.source_dirs)},
                "packages": debs, "documents": len(docs), "extract_stats": stats,
                "train": {"docs": len(train), "docs_used": len(train_ids), "chars": chars, **train_info},
                "heldout": {"docs": len(held), **held_info},
                "seconds": round(time.perf_counter() - t0, 1)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"wrote {out}: train {train_info['num_tokens']:,} tokens ({train_info['bytes'] / 2**20:.1f} MiB), "
        f"held out {held_info['num_tokens']:,} tokens ({held_info['bytes'] / 2**20:.1f} MiB) "
        f"in {manifest['seconds']} s")
    return manifest
