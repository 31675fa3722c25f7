"""`nsa-serve init-model`: a random-initialised NSA model directory with a real tokenizer."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..tokenizer import stdlib_docstrings, train_tokenizer
from .checkpoint import remove_stale_weights, save_model, weight_paths
from .config import preset
from .nsa_model import NSAModel


def init_model(out_dir: str | Path, preset_name: str = "tiny", seed: int = 0, *,
               max_shard_bytes: int | None = None, **overrides) -> Path:
    """Create `out_dir` with config.json, random weights (from `seed`; sharded above
    `max_shard_bytes`, as `save_model` does) and a sentencepiece tokenizer trained on the Python
    standard library's docstrings (offline text every machine has)."""
    cfg = preset(preset_name, **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_path = out / "tokenizer.model"
    tok = train_tokenizer(stdlib_docstrings(), tok_path, cfg.vocab_size)
    cfg.bos_token_id, cfg.eos_token_id = tok.bos_id, tok.eos_id
    cfg.extra = {"preset": preset_name, "seed": seed, "weights": "random"}
    model = NSAModel(cfg).init_weights(seed)
    # Write atomically enough for concurrent first use: weights last, so a reader that sees
    # model.safetensors sees the rest.
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        save_model(model, tmp, tokenizer_path=tok_path, max_shard_bytes=max_shard_bytes,
                   generation_config={"temperature": 0.7, "top_p": 0.95, "max_tokens": 128})
        earlier = weight_paths(out)
        weights = weight_paths(Path(tmp))  # shards before their index
        for path in [Path(tmp) / "config.json", Path(tmp) / "generation_config.json", *weights]:
            path.replace(out / path.name)
        remove_stale_weights(out, earlier, {p.name for p in weights})
    return out


def ensure_default_model() -> Path:
    from .checkpoint import default_model_dir

    d = default_model_dir()
    if not (d / "model.safetensors").is_file():
        init_model(d, "tiny", seed=0)
    return d
