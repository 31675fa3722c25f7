"""Model configuration: every NSA hyperparameter, validated, stored as config.json."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from nsa_kernels.reference import SparsityParams


class ConfigError(ValueError):
    """An invalid or unreadable model config; the message names the field."""


PHI_VARIANTS = ("mlp", "linear", "mean")
GATE_FORMS = ("linear", "mlp")


@dataclass
class NSAConfig:
    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4  # query heads
    num_kv_heads: int = 2  # GQA groups
    head_dim_k: int = 32  # the paper uses 192
    head_dim_v: int = 32  # the paper uses 128
    intermediate_size: int = 352  # SwiGLU MLP width
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    # NSA (paper: l=32, d=16, l'=64, n=16 with 1 initial + 2 local forced, w=512)
    cmp_block: int = 32  # l
    cmp_stride: int = 16  # d
    select_block: int = 64  # l' (also the cache page size)
    num_select: int = 16  # n, forced blocks included
    num_init_blocks: int = 1
    num_local_blocks: int = 2
    window: int = 512  # w
    phi: str = "mlp"  # mlp | linear | mean
    gate: str = "linear"  # linear | mlp
    shared_kv: bool = True  # one K/V for all branches (False: independent per-branch K/V, as the paper)
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    bos_token_id: int = 1
    eos_token_id: int = 2
    extra: dict = field(default_factory=dict)  # free-form notes (e.g. provenance), ignored by the model

    def __post_init__(self) -> None:
        self.validate()

    # -- validation -------------------------------------------------------------------------------
    def validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                    "head_dim_k", "head_dim_v", "intermediate_size", "max_position_embeddings",
                    "cmp_block", "cmp_stride", "select_block", "num_select", "window")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"config field '{name}' must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"config field 'num_heads' ({self.num_heads}) must be a multiple of "
                              f"'num_kv_heads' ({self.num_kv_heads})")
        if self.head_dim_k % 2:
            raise ConfigError(f"config field 'head_dim_k' must be even for RoPE, got {self.head_dim_k}")
        if self.phi not in PHI_VARIANTS:
            raise ConfigError(f"config field 'phi' must be one of {PHI_VARIANTS}, got {self.phi!r}")
        if self.gate not in GATE_FORMS:
            raise ConfigError(f"config field 'gate' must be one of {GATE_FORMS}, got {self.gate!r}")
        if self.cmp_stride > self.cmp_block or self.cmp_block % self.cmp_stride:
            raise ConfigError(f"config field 'cmp_stride' ({self.cmp_stride}) must divide 'cmp_block' "
                              f"({self.cmp_block})")
        if self.select_block % self.cmp_stride:
            raise ConfigError(f"config field 'select_block' ({self.select_block}) must be a multiple of "
                              f"'cmp_stride' ({self.cmp_stride})")
        if self.cmp_block > self.select_block:
            raise ConfigError(f"config field 'cmp_block' ({self.cmp_block}) must not exceed "
                              f"'select_block' ({self.select_block})")
        if self.num_init_blocks < 0 or self.num_local_blocks < 1:
            raise ConfigError("config fields 'num_init_blocks' >= 0 and 'num_local_blocks' >= 1 required")
        if self.num_select < self.num_init_blocks + self.num_local_blocks:
            raise ConfigError(f"config field 'num_select' ({self.num_select}) must be at least "
                              f"num_init_blocks + num_local_blocks")
        if not (0 <= self.bos_token_id < self.vocab_size and 0 <= self.eos_token_id < self.vocab_size):
            raise ConfigError("config fields 'bos_token_id'/'eos_token_id' must lie inside the vocabulary")
        if not self.norm_eps > 0:
            raise ConfigError(f"config field 'norm_eps' must be > 0, got {self.norm_eps}")
        if not self.rope_theta > 0:
            raise ConfigError(f"config field 'rope_theta' must be > 0, got {self.rope_theta}")

    # -- derived ----------------------------------------------------------------------------------
    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def sparsity(self) -> SparsityParams:
        return SparsityParams(block=self.cmp_block, stride=self.cmp_stride, select_block=self.select_block,
                              num_select=self.num_select, window=self.window,
                              num_init=self.num_init_blocks, num_local=self.num_local_blocks)

    # -- io ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "NSAConfig":
        if not isinstance(data, dict):
            raise ConfigError("config must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:  # e.g. a string where a number belongs, caught by validate first
            raise ConfigError(str(exc)) from exc

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "NSAConfig":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"no config.json at {path}") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config.json at {path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


PRESETS: dict[str, dict] = {
    # Runs on a CPU in seconds; the engine and server tests use it. Scaled-down sparsity so short
    # prompts already exercise compression, selection and the window.
    "tiny": dict(vocab_size=4096, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim_k=32, head_dim_v=32, intermediate_size=352, max_position_embeddings=8192,
                 cmp_block=8, cmp_stride=4, select_block=16, num_select=4, window=32),
    # Paper sparsity (l=32, d=16, l'=64, n=16, w=512), small widths: the shape of the default model.
    "small": dict(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2,
                  head_dim_k=64, head_dim_v=64, intermediate_size=704, max_position_embeddings=65536),
    # Paper-like attention shape (64 q heads, 4 kv heads, dk 192, dv 128), ~1B parameters: GPU benches.
    "paper-1b": dict(vocab_size=32000, hidden_size=2048, num_layers=16, num_heads=64, num_kv_heads=4,
                     head_dim_k=192, head_dim_v=128, intermediate_size=5632, max_position_embeddings=131072),
}


def preset(name: str, **overrides) -> NSAConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return NSAConfig(**{**PRESETS[name], **overrides})
