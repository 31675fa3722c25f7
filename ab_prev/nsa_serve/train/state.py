"""Checkpoints of a training run. Three forms, each for one purpose:

* exact state  (`STATE_DIR/`): fp32 weights, AdamW moments, step — resumes bit-for-bit. Kept in a
  git-ignored folder of the repo, which survives between calls while the device machine stays warm.
* compact resume (`OUT/resume/`): fp32 weights in shards under 15 MiB plus state.json, no optimizer
  moments — what fits the device tool's returned-file limits (8 files, 16 MiB each). Resuming from it
  restarts AdamW's moments with a short learning-rate re-warm-up (recorded in the run's state).
* model directory (`OUT/model/`): the servable model (`save_model`), weights stored in bf16.

Tensors go through safetensors only; metadata is JSON. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nsa_serve.model.checkpoint import save_model
from nsa_serve.model.nsa_model import NSAModel

SHARD_BYTES = 15 * 2**20


class ResumeError(ValueError):
    pass


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def save_exact(state_dir: str | Path, model: NSAModel, opt: torch.optim.Optimizer, meta: dict) -> Path:
    d = Path(state_dir)
    d.mkdir(parents=True, exist_ok=True)
    names = {id(p): n for n, p in model.named_parameters()}
    weights = {n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters()}
    moments, steps = {}, {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            if "exp_avg" in st:
                n = names[id(p)]
                moments[f"exp_avg.{n}"] = st["exp_avg"].detach().cpu().contiguous()
                moments[f"exp_avg_sq.{n}"] = st["exp_avg_sq"].detach().cpu().contiguous()
                steps[n] = float(st["step"])
    # Write tensors first and state.json last: a reader that sees the new step sees its tensors.
    save_file(weights, str(d / "weights.safetensors.tmp"))
    os.replace(d / "weights.safetensors.tmp", d / "weights.safetensors")
    save_file(moments, str(d / "optim.safetensors.tmp"))
    os.replace(d / "optim.safetensors.tmp", d / "optim.safetensors")
    _atomic_json(d / "state.json", {**meta, "kind": "exact", "adam_steps": steps})
    return d


def save_compact(resume_dir: str | Path, model: NSAModel, meta: dict) -> list[Path]:
    d = Path(resume_dir)
    d.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = [{}]
    size = 0
    for n, p in model.named_parameters():
        t = p.detach().float().cpu().contiguous()
        b = t.numel() * 4
        if shards[-1] and size + b > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][n] = t
        size += b
    for old in d.glob("weights-*.safetensors"):
        old.unlink()
    paths = []
    for i, shard in enumerate(shards):
        path = d / f"weights-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path))
        paths.append(path)
    _atomic_json(d / "state.json", {**meta, "kind": "compact", "shards": [p.name for p in paths]})
    return paths + [d / "state.json"]


def read_state(d: str | Path) -> dict | None:
    path = Path(d) / "state.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def load_weights_into(model: NSAModel, d: str | Path, state: dict) -> None:
    d = Path(d)
    if state["kind"] == "exact":
        tensors = load_file(str(d / "weights.safetensors"))
    else:
        tensors = {}
        for name in state["shards"]:
            tensors.update(load_file(str(d / name)))
    expected = dict(model.named_parameters())
    if set(tensors) != set(expected):
        missing = sorted(set(expected) - set(tensors))[:5]
        extra = sorted(set(tensors) - set(expected))[:5]
        raise ResumeError(f"resume state in {d} does not match the model: missing {missing}, extra {extra}")
    with torch.no_grad():
        for n, p in expected.items():
            if tuple(tensors[n].shape) != tuple(p.shape):
                raise ResumeError(f"resume state in {d}: '{n}' has shape {tuple(tensors[n].shape)}, "
                                  f"model needs {tuple(p.shape)}")
            p.copy_(tensors[n].to(p.device, p.dtype))


def load_optimizer_into(opt: torch.optim.Optimizer, model: NSAModel, d: str | Path, state: dict) -> None:
    """Restore AdamW moments through `load_state_dict`, which puts each `step` where the optimizer's
    implementation (fused / foreach / capturable) wants it."""
    moments = load_file(str(Path(d) / "optim.safetensors"))
    names = {id(p): n for n, p in model.named_parameters()}
    sd = opt.state_dict()
    index = 0
    sd["state"] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            n = names[id(p)]
            if n in state["adam_steps"]:
                sd["state"][index] = {"step": torch.tensor(state["adam_steps"][n], dtype=torch.float32),
                                      "exp_avg": moments[f"exp_avg.{n}"],
                                      "exp_avg_sq": moments[f"exp_avg_sq.{n}"]}
            index += 1
    opt.load_state_dict(sd)


def export_model(model: NSAModel, out_dir: str | Path, tokenizer_path: str | Path, dtype: torch.dtype,
                 generation_config: dict) -> Path:
    """The servable model directory, weights cast to `dtype` (the model itself is left as it is)."""
    with torch.device("meta"):
        shell = NSAModel(model.cfg)
    shell = shell.to_empty(device="cpu")
    with torch.no_grad():
        for (n, dst), (_, src) in zip(shell.state_dict().items(), model.state_dict().items()):
            dst.copy_(src.detach().float().cpu())
    return save_model(shell.to(dtype), out_dir, tokenizer_path=tokenizer_path,
                      generation_config=generation_config)
