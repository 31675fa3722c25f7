"""The shape of the shipped default model.

Paper sparsity (l=32, d=16, l'=64, n=16 with 1 initial + 2 local forced blocks, w=512), GQA with
2 kv groups × 4 query heads, shared K/V across branches: the serving engine's fast path (Triton
prefill and decode kernels read one set of raw pages) and the smallest cache. Independent per-branch
K/V (the paper's choice) trains too: pass `--set shared_kv=false`.

Size: 7.59M parameters (hidden 256, 5 layers, SwiGLU 640), so the bf16 model.safetensors is
14.5 MiB (≤ 25 MB shipped, under the device tool's 16 MiB per returned file) and the fp32 master
weights (29 MiB) fit in two compact resume shards.
rope_theta 1e6 (long-context practice) keeps rotations slow enough that positions up to 64k stay in a
regime the model has seen phases of during 16k training.
"""

from __future__ import annotations

from nsa_serve.model.config import PRESETS, ConfigError, NSAConfig

TRAIN_PRESETS: dict[str, dict] = {
    "default": dict(vocab_size=8192, hidden_size=256, num_layers=5, num_heads=8, num_kv_heads=2,
                    head_dim_k=64, head_dim_v=64, intermediate_size=640, rope_theta=1_000_000.0,
                    max_position_embeddings=131072, cmp_block=32, cmp_stride=16, select_block=64,
                    num_select=16, num_init_blocks=1, num_local_blocks=2, window=512, phi="mlp",
                    gate="linear", shared_kv=True, tie_embeddings=True),
}


def model_config(name_or_path: str, **overrides) -> NSAConfig:
    """A preset name (train presets first, then the model presets) or a config.json path."""
    if name_or_path in TRAIN_PRESETS:
        return NSAConfig(**{**TRAIN_PRESETS[name_or_path], **overrides})
    if name_or_path in PRESETS:
        return NSAConfig(**{**PRESETS[name_or_path], **overrides})
    if name_or_path.endswith(".json"):
        cfg = NSAConfig.load(name_or_path)
        return NSAConfig.from_dict({**cfg.to_dict(), **overrides})
    raise ConfigError(f"unknown config {name_or_path!r}: give a preset "
                      f"({', '.join([*TRAIN_PRESETS, *PRESETS])}) or a config .json file")


def count_parameters(cfg: NSAConfig) -> int:
    import torch

    from nsa_serve.model.nsa_model import NSAModel

    with torch.device("meta"):
        model = NSAModel(cfg)
    return sum(p.numel() for p in model.parameters())
