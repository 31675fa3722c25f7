"""Sharded checkpoints (Hugging Face's layout: model-0000i-of-0000N.safetensors + an index) load
like a single model.safetensors, and a broken one is refused with a message naming what is wrong."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from nsa_serve.cli import parse_size
from nsa_serve.model.checkpoint import INDEX, SINGLE, CheckpointError, load_model, save_model
from nsa_serve.model.config import preset
from nsa_serve.model.nsa_model import NSAModel


def _model(seed=3):
    return NSAModel(preset("tiny")).init_weights(seed=seed).eval()


def _same_logits(a, b, vocab):
    tokens = torch.randint(0, vocab, (40,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a(tokens), b(tokens))


def _hand_sharded(tmp_path, model, parts=3):
    """Shards and an index written here with safetensors alone (not through save_model), tensors
    dealt round-robin so a shard holds tensors of several layers, as real checkpoints do."""
    model.cfg.save(tmp_path / "config.json")
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    names = list(state)
    weight_map = {}
    for i in range(parts):
        file = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        part = {k: state[k] for k in names[i::parts]}
        save_file(part, str(tmp_path / file))
        weight_map.update(dict.fromkeys(part, file))
    (tmp_path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_hand_written_shards_load_to_the_same_model(tmp_path):
    model = _model()
    _hand_sharded(tmp_path, model)
    assert not (tmp_path / SINGLE).exists()
    loaded = load_model(tmp_path)
    assert _same_logits(model, loaded, model.cfg.vocab_size)


def test_save_model_shards_above_the_limit_and_round_trips(tmp_path):
    model = _model()
    save_model(model, tmp_path, max_shard_bytes=200_000)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    index = json.loads((tmp_path / INDEX).read_text())
    assert len(shards) > 2 and not (tmp_path / SINGLE).exists()
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for p in shards:  # at most the limit, unless one tensor alone exceeds it
        state = load_file(str(p))
        size = sum(t.numel() * t.element_size() for t in state.values())
        assert size <= 200_000 or len(state) == 1
    assert _same_logits(model, load_model(tmp_path), model.cfg.vocab_size)
    # Saving again in fewer shards leaves no shard of the earlier set behind.
    save_model(model, tmp_path, max_shard_bytes=600_000)
    index = json.loads((tmp_path / INDEX).read_text())
    assert {p.name for p in tmp_path.glob("model-*-of-*.safetensors")} == set(index["weight_map"].values())
    assert len(set(index["weight_map"].values())) < len(shards)
    assert _same_logits(model, load_model(tmp_path), model.cfg.vocab_size)
    # Saving again as one file removes the shards and the index (the loader would read either).
    other = _model(seed=4)
    save_model(other, tmp_path)
    assert not list(tmp_path.glob("model-*-of-*.safetensors")) and not (tmp_path / INDEX).exists()
    assert _same_logits(other, load_model(tmp_path), model.cfg.vocab_size)


def test_float64_shards_keep_their_bits(tmp_path):
    model = _model().double()
    save_model(model, tmp_path, max_shard_bytes=400_000)
    loaded = load_model(tmp_path, dtype=torch.float64)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_index_naming_a_missing_shard(tmp_path):
    _hand_sharded(tmp_path, _model())
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="names shard 'model-00002-of-00003.safetensors'"):
        load_model(tmp_path)


def test_index_putting_a_tensor_in_the_wrong_shard(tmp_path):
    weight_map = _hand_sharded(tmp_path, _model())
    name = next(n for n, f in weight_map.items() if f.startswith("model-00001"))
    weight_map[name] = "model-00002-of-00003.safetensors"
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=f"puts tensor '{name}' in model-00002-of-00003"):
        load_model(tmp_path)


def test_index_without_a_weight_map(tmp_path):
    _hand_sharded(tmp_path, _model())
    (tmp_path / INDEX).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="weight_map"):
        load_model(tmp_path)


def test_index_naming_a_path_outside_the_directory(tmp_path):
    (tmp_path / "m").mkdir()
    weight_map = _hand_sharded(tmp_path / "m", _model())
    name = next(iter(weight_map))
    save_file({name: torch.zeros(1)}, str(tmp_path / "outside.safetensors"))
    weight_map[name] = "../outside.safetensors"
    (tmp_path / "m" / INDEX).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="names shard '../outside.safetensors'"):
        load_model(tmp_path / "m")


def test_sharded_missing_and_misshaped_tensors_are_named(tmp_path):
    weight_map = _hand_sharded(tmp_path, _model())
    gone = "layers.1.attn.phi_k.proj.weight"
    del weight_map[gone]
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=rf"missing tensor\(s\): {gone.replace('.', '[.]')}"):
        load_model(tmp_path)
    _replace_in_shard(tmp_path, _hand_sharded(tmp_path, _model()), "layers.0.attn.q_proj.weight",
                      lambda t: torch.zeros(3, 3))
    with pytest.raises(CheckpointError, match=r"'layers\.0\.attn\.q_proj\.weight' has shape \(3, 3\)"):
        load_model(tmp_path)


def _replace_in_shard(d, weight_map, name, change):
    """Rewrite the shard holding tensor `name` with change(tensor) in its place."""
    file = d / weight_map[name]
    state = load_file(str(file))
    state[name] = change(state[name])
    save_file(state, str(file))


def test_integer_tensor_is_refused(tmp_path):
    name = "layers.0.attn.q_proj.weight"
    _replace_in_shard(tmp_path, _hand_sharded(tmp_path, _model()), name, lambda t: t.to(torch.int32))
    with pytest.raises(CheckpointError, match=f"'{name}' must be floating point, got I32"):
        load_model(tmp_path)


def test_truncated_shard_is_named(tmp_path):
    weight_map = _hand_sharded(tmp_path, _model())
    file = tmp_path / sorted(set(weight_map.values()))[0]
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"cannot read .*{file.name}"):
        load_model(tmp_path)


@pytest.mark.parametrize("text,value", [("5GB", 5 * 10**9), ("500MiB", 500 * 2**20), ("1.5kb", 1500),
                                        ("123", 123)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["GB", "5XB", "-1", "0", "five"])
def test_parse_size_refuses(text):
    import argparse
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "nsa_serve.cli", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_init_model_cli_shards_and_generate_reads_them(tmp_path):
    # The same seed written as shards and as one file: `nsa-serve generate` says the same from both.
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    _cli("init-model", "--out", str(sharded), "--seed", "5", "--max-shard-size", "300KB")
    _cli("init-model", "--out", str(single), "--seed", "5")
    assert (sharded / INDEX).is_file() and not (sharded / SINGLE).exists()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2
    prompt = ("--prompt", "The function returns", "--max-tokens", "12", "--ignore-eos")
    text = _cli("generate", "--model", str(sharded), *prompt)
    assert text.strip() and text == _cli("generate", "--model", str(single), *prompt)
    # Written again without a limit: one file, the shards gone.
    _cli("init-model", "--out", str(sharded), "--seed", "5")
    assert (sharded / SINGLE).is_file() and not (sharded / INDEX).exists()
    assert not list(sharded.glob("model-*-of-*.safetensors"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_shards_read_straight_to_the_device_equal_the_host_load(tmp_path):
    model = _model()
    save_model(model, tmp_path, max_shard_bytes=200_000)
    on_gpu = load_model(tmp_path, device="cuda", dtype=torch.bfloat16)
    on_cpu = load_model(tmp_path, dtype=torch.bfloat16)
    for k, v in on_cpu.state_dict().items():
        w = on_gpu.state_dict()[k]
        assert w.is_cuda and torch.equal(w.cpu(), v), k
