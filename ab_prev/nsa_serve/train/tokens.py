"""Token files: a flat little-endian uint16 array (`*.bin`) plus `*.json` metadata beside it.

uint16 because the vocabulary is ≤ 65536 and the file must travel to the GPU machine under a 64 MiB
limit. Documents are concatenated as [bos] doc tokens [eos]; the metadata records the counts and a
sha256 so a training run can name exactly which data it saw.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np


class TokenFileError(ValueError):
    pass


def write_tokens(path: str | Path, docs: list[list[int]], meta: dict) -> dict:
    path = Path(path)
    n = sum(len(d) for d in docs)
    arr = np.empty(n, dtype="<u2")
    i = 0
    for d in docs:
        if d and max(d) > 65535:
            raise TokenFileError(f"token id {max(d)} does not fit uint16")
        arr[i:i + len(d)] = d
        i += len(d)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr.tofile(path)
    info = {**meta, "dtype": "uint16", "num_tokens": int(n), "num_docs": len(docs),
            "bytes": path.stat().st_size, "sha256": hashlib.sha256(arr.tobytes()).hexdigest()}
    Path(str(path) + ".json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def read_tokens(path: str | Path) -> np.ndarray:
    """Memory-map a token file (read-only). Checks the size against the metadata when present."""
    path = Path(path)
    if not path.is_file():
        raise TokenFileError(f"no token file at {path}; run `nsa-serve prepare-data` first")
    arr = np.memmap(path, dtype="<u2", mode="r")
    meta_path = Path(str(path) + ".json")
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("num_tokens") != arr.shape[0]:
            raise TokenFileError(f"{path} holds {arr.shape[0]} tokens but {meta_path} says "
                                 f"{meta.get('num_tokens')}; re-run prepare-data")
    if arr.shape[0] < 2:
        raise TokenFileError(f"{path} holds fewer than 2 tokens")
    return arr


def read_meta(path: str | Path) -> dict:
    meta_path = Path(str(path) + ".json")
    return json.loads(meta_path.read_text()) if meta_path.is_file() else {}
