"""A model is a directory: config.json, the weights, tokenizer.model, optional
generation_config.json. Weights load through safetensors only (no pickle): one model.safetensors,
or Hugging Face's sharded layout — model-00001-of-0000N.safetensors files named by
model.safetensors.index.json's weight_map — as a large checkpoint comes. Loading checks every
tensor from the files' headers, then reads one tensor at a time straight to the target device (no
host copy of the whole state dict first)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ConfigError, NSAConfig
from .nsa_model import NSAModel

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# safetensors dtype names of the floating-point tensors a checkpoint may hold.
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


class CheckpointError(ValueError):
    """A model directory that cannot be loaded; the message names the file or tensor."""


def save_model(model: NSAModel, out_dir: str | Path, tokenizer_path: str | Path | None = None,
               generation_config: dict | None = None, max_shard_bytes: int | None = None) -> Path:
    """Write the model directory. `max_shard_bytes`: above it, the weights go into shards of at
    most that size (a tensor larger than it gets a shard of its own) with an index, as Hugging
    Face's save_pretrained writes them; weight files of an earlier save are removed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.cfg.save(out / "config.json")
    # Copies: after `fuse_for_inference` the projection weights are views of one buffer, and
    # safetensors refuses tensors that share memory.
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    earlier = weight_paths(out)
    meta = {"format": "pt", "model": "nsa"}
    shards = _shards(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(state, str(out / SINGLE), metadata=meta)
        written = {SINGLE}
    else:
        weight_map = {}
        for i, names in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: state[k] for k in names}, str(out / name), metadata=meta)
            weight_map.update(dict.fromkeys(names, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        # The index last: a reader that finds it finds every shard it names.
        (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                            indent=2) + "\n")
        written = {*weight_map.values(), INDEX}
    remove_stale_weights(out, earlier, written)
    if tokenizer_path is not None and Path(tokenizer_path).resolve() != (out / "tokenizer.model").resolve():
        shutil.copyfile(tokenizer_path, out / "tokenizer.model")
    if generation_config:
        (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    return out


def load_config(model_dir: str | Path) -> NSAConfig:
    return NSAConfig.load(Path(model_dir) / "config.json")


def _shards(state: dict[str, torch.Tensor], max_bytes: int | None) -> list[list[str]]:
    """Tensor names in shards of at most max_bytes each, in state order (one shard without a limit)."""
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_bytes}")
    shards, size = [[]], 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if max_bytes is not None and shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def weight_paths(model_dir: Path) -> list[Path]:
    """The weight files (and index) a save wrote into model_dir, sorted: shards first."""
    return sorted([p for p in model_dir.glob("model-*-of-*.safetensors")]
                  + [p for p in (model_dir / SINGLE, model_dir / INDEX) if p.is_file()])


def remove_stale_weights(model_dir: Path, earlier: list[Path], written: set[str]) -> None:
    """Remove the weight files of `earlier` whose names the save just made did not write. Called
    once the new files are in place, so a concurrent loader reads the old model or the new one
    (it prefers model.safetensors: a new one replaced the old; an old one goes only now)."""
    for p in earlier:
        if p.name not in written:
            p.unlink(missing_ok=True)


def tensor_index(model_dir: str | Path) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """Tensor name → (its file, shape, safetensors dtype name), from the headers only:
    model.safetensors if present (as transformers prefers it), else the files
    model.safetensors.index.json's weight_map names."""
    d = Path(model_dir)
    if (d / SINGLE).is_file():
        return _header(d / SINGLE)
    index = d / INDEX
    if not index.is_file():
        raise CheckpointError(f"no {SINGLE} or {INDEX} in {d}")
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise CheckpointError(f"{index} is not a JSON object with a weight_map: {exc}") from exc
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
    out = {}
    for file in sorted(set(weight_map.values())):
        if Path(file).name != file or not (d / file).is_file():
            raise CheckpointError(f"{index} names shard {file!r}, which is not a file in {d}")
        held = _header(d / file)
        for name in (n for n, f in weight_map.items() if f == file):
            if name not in held:
                raise CheckpointError(f"{index} puts tensor '{name}' in {file}, which does not hold it")
            out[name] = held[name]
    return out


def _header(path: Path) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}
            return {name: (path, tuple(sl.get_shape()), sl.get_dtype()) for name, sl in slices.items()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def load_model(model_dir: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> NSAModel:
    """Load and check a model directory. Raises ConfigError / CheckpointError naming what is wrong.
    Every name, shape and dtype is checked from the files' headers before any weight is read."""
    d = Path(model_dir)
    if not d.is_dir():
        raise CheckpointError(f"model directory {d} does not exist")
    cfg = load_config(d)
    tensors = tensor_index(d)
    with torch.device("meta"):
        model = NSAModel(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    where = d / SINGLE if (d / SINGLE).is_file() else d / INDEX
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"{where}: missing tensor(s): {', '.join(missing[:10])}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensor(s) for this config: {', '.join(unexpected[:10])}")
    by_file: dict[Path, list[str]] = {}
    for name, (path, shape, stored) in tensors.items():
        if shape != expected[name]:
            raise CheckpointError(f"{path}: tensor '{name}' has shape {shape}, config needs {expected[name]}")
        if stored not in FLOAT_DTYPES:
            raise CheckpointError(f"{path}: tensor '{name}' must be floating point, got {stored}")
        by_file.setdefault(path, []).append(name)
    # Materialised in the target dtype, then each tensor copied in from the file as it is read
    # (to the device directly): through the default float32 first, a float64 checkpoint lost its
    # low bits, and reading the whole file first held a host copy of every weight.
    model = model.to_empty(device=device).to(dtype=dtype)
    params = model.state_dict()
    dev = torch.device(device)
    read_on = "cpu"  # elsewhere than CUDA, read to the host and copy
    if dev.type == "cuda":
        read_on = f"cuda:{dev.index if dev.index is not None else torch.cuda.current_device()}"
    with torch.no_grad():
        for path, names in by_file.items():
            try:
                with safe_open(str(path), framework="pt", device=read_on) as f:
                    for name in names:
                        params[name].copy_(f.get_tensor(name))
            except SafetensorError as exc:
                raise CheckpointError(f"cannot read {path}: {exc}") from exc
    return model.eval()


def load_generation_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


SHIPPED_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "default-model"


def default_model_dir() -> Path:
    """Where the bundled default model lives: the trained model shipped in the package
    (docs/training.md) if present, else a tiny random model created on first use in the user's cache
    directory (an install without the assets still serves something)."""
    shipped = SHIPPED_MODEL_DIR
    if (shipped / "model.safetensors").is_file():
        return shipped
    cache = Path(os.environ.get("NSA_SERVE_CACHE", Path.home() / ".cache" / "nsa-serve"))
    return cache / "tiny-random"
