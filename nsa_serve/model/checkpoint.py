"""A model is a directory: config.json, model.safetensors, tokenizer.model, optional
generation_config.json. Weights load through safetensors only (no pickle)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, NSAConfig
from .nsa_model import NSAModel


class CheckpointError(ValueError):
    """A model directory that cannot be loaded; the message names the file or tensor."""


def save_model(model: NSAModel, out_dir: str | Path, tokenizer_path: str | Path | None = None,
               generation_config: dict | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.cfg.save(out / "config.json")
    # Copies: after `fuse_for_inference` the projection weights are views of one buffer, and
    # safetensors refuses tensors that share memory.
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "model": "nsa"})
    if tokenizer_path is not None and Path(tokenizer_path).resolve() != (out / "tokenizer.model").resolve():
        shutil.copyfile(tokenizer_path, out / "tokenizer.model")
    if generation_config:
        (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    return out


def load_config(model_dir: str | Path) -> NSAConfig:
    return NSAConfig.load(Path(model_dir) / "config.json")


def load_model(model_dir: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> NSAModel:
    """Load and check a model directory. Raises ConfigError / CheckpointError naming what is wrong."""
    d = Path(model_dir)
    if not d.is_dir():
        raise CheckpointError(f"model directory {d} does not exist")
    cfg = load_config(d)
    weights = d / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"no model.safetensors in {d}")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {weights}: {exc}") from exc
    with torch.device("meta"):
        model = NSAModel(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{weights}: missing tensor(s): {', '.join(missing[:10])}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(f"{weights}: unexpected tensor(s) for this config: {', '.join(unexpected[:10])}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(f"{weights}: tensor '{name}' has shape {tuple(state[name].shape)}, "
                                  f"config needs {shape}")
        if not state[name].is_floating_point():
            raise CheckpointError(f"{weights}: tensor '{name}' must be floating point, got {state[name].dtype}")
    # Materialised in the target dtype before loading: through the default float32 first, a
    # float64 checkpoint lost its low bits.
    model = model.to_empty(device=device).to(dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
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
