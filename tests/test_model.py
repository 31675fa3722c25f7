"""The reference model: incremental decoding equals the whole-sequence forward; config and
checkpoint errors name what is wrong; save → load gives identical logits."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nsa_serve.model import ConfigError, NSAConfig, NSAModel, preset
from nsa_serve.model.checkpoint import CheckpointError, load_model, save_model


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("shared", [True, False], ids=["shared-kv", "independent-kv"])
def test_incremental_decoding_matches_whole_sequence(shared):
    # tiny preset: l=8, d=4, l'=16, n=4, w=32 — 300 steps cross ~74 compression entries,
    # ~19 selection blocks (so top-n drops blocks) and leave the window many times over.
    cfg = preset("tiny", shared_kv=shared, phi="mlp")
    model = NSAModel(cfg).init_weights(seed=3).eval()
    tokens = torch.randint(0, cfg.vocab_size, (310,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(tokens)
    cache = model.new_cache()
    steps = [model.step(tokens[:10], cache)]  # a 10-token prompt, then 300 single-token steps
    for t in range(10, 310):
        steps.append(model.step(tokens[t:t + 1], cache))
    err = rel(torch.cat(steps), full)
    assert err <= 1e-5, f"incremental vs whole-sequence logits differ by {err:.2e}"


def test_chunked_steps_match_whole_sequence():
    cfg = preset("tiny", phi="linear", gate="mlp")
    model = NSAModel(cfg).init_weights(seed=5).eval()
    tokens = torch.randint(0, cfg.vocab_size, (157,), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(tokens)
    cache, outs, start = model.new_cache(), [], 0
    for size in (13, 1, 7, 29, 3, 64, 40):  # chunk edges not aligned to d, l or l'
        outs.append(model.step(tokens[start:start + size], cache))
        start += size
    assert rel(torch.cat(outs), full) <= 1e-5


def test_bf16_runs_close_to_fp32():
    cfg = preset("tiny", phi="mean")
    model = NSAModel(cfg).init_weights(seed=1).eval()
    tokens = torch.randint(0, cfg.vocab_size, (120,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(tokens)
        low = model.to(torch.bfloat16)(tokens).float()
    assert rel(low, ref) < 5e-2  # bf16 weights and activations through 2 layers


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    cfg = preset("tiny", shared_kv=False)
    model = NSAModel(cfg).init_weights(seed=7).eval()
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    tokens = torch.randint(0, cfg.vocab_size, (50,))
    with torch.no_grad():
        assert torch.equal(model(tokens), loaded(tokens))
    assert loaded.cfg == cfg


def _saved(tmp_path):
    model = NSAModel(preset("tiny")).init_weights(seed=0)
    save_model(model, tmp_path)
    return tmp_path / "model.safetensors"


def test_missing_tensor_is_named(tmp_path):
    path = _saved(tmp_path)
    state = load_file(str(path))
    del state["layers.1.attn.phi_k.proj.weight"]
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): layers\.1\.attn\.phi_k\.proj\.weight"):
        load_model(tmp_path)


def test_misshaped_tensor_is_named(tmp_path):
    path = _saved(tmp_path)
    state = load_file(str(path))
    state["layers.0.attn.q_proj.weight"] = torch.zeros(3, 3)
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"'layers\.0\.attn\.q_proj\.weight' has shape \(3, 3\)"):
        load_model(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
    path = _saved(tmp_path)
    state = load_file(str(path))
    state["layers.0.attn.k_proj_win.weight"] = torch.zeros(4, 4)
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="unexpected tensor.*k_proj_win"):
        load_model(tmp_path)


def test_missing_weights_file(tmp_path):
    NSAConfig().save(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(tmp_path)


@pytest.mark.parametrize("field,value,message", [
    ("num_heads", 5, "'num_heads' .* multiple of 'num_kv_heads'"),
    ("phi", "attention", "'phi' must be one of"),
    ("cmp_stride", 3, "'cmp_stride' .* must divide 'cmp_block'"),
    ("select_block", 20, "'select_block' .* multiple of 'cmp_stride'"),
    ("num_select", 2, "'num_select' .* at least"),
    ("hidden_size", 0, "'hidden_size' must be a positive integer"),
    ("head_dim_k", "64", "'head_dim_k' must be a positive integer"),
    ("head_dim_k", 33, "'head_dim_k' must be even"),
    ("gate", "softmax", "'gate' must be one of"),
])
def test_invalid_config_names_the_field(tmp_path, field, value, message):
    data = NSAConfig().to_dict()
    data[field] = value
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message):
        load_model(tmp_path)


def test_unknown_config_field_is_named(tmp_path):
    data = NSAConfig().to_dict() | {"num_experts": 8}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="unknown config field.*num_experts"):
        load_model(tmp_path)


def test_paper_shape_dk_differs_from_dv():
    cfg = preset("tiny", num_heads=8, num_kv_heads=2, head_dim_k=48, head_dim_v=32)
    model = NSAModel(cfg).init_weights(seed=0).eval()
    tokens = torch.randint(0, cfg.vocab_size, (40,))
    with torch.no_grad():
        out = model(tokens)
    assert out.shape == (40, cfg.vocab_size) and torch.isfinite(out).all()


def _rope_twin(x, positions, theta):
    """Rotate-half RoPE written out: angle p·θ^(−2i/D), pairs (x_i, x_{i+D/2}) rotated."""
    D = x.shape[-1]
    xf = x.double()
    i = torch.arange(D // 2, dtype=torch.float64)
    ang = positions.double()[:, None] * theta ** (-2 * i / D)  # [T, D/2]
    c, s = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = xf[..., : D // 2], xf[..., D // 2:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_rope_tables_shared_by_layers_equal_the_formula(dtype, tol):
    # The engine builds the RoPE tables once per step and every layer applies them to q and k;
    # the result must be the rotation itself, for any head count and positions far apart.
    from nsa_serve.model.nsa_model import Rope, apply_rope

    gen = torch.Generator().manual_seed(0)
    positions = torch.tensor([0, 1, 5, 63, 64, 4095, 65535, 131071])
    rope = Rope(positions, 24, 10000.0, dtype)
    for heads in (1, 4):
        x = torch.randn(len(positions), heads, 24, generator=gen).to(dtype)
        want = _rope_twin(x, positions, 10000.0)
        got = rope(x)
        assert got.dtype == dtype
        assert ((got.double() - want).norm() / want.norm()).item() < tol
        assert torch.equal(got, apply_rope(x, positions, 10000.0))
    with pytest.raises(ValueError, match="head dim"):
        rope(torch.zeros(len(positions), 1, 16, dtype=dtype))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rms_norm_equals_the_formula(dtype, tol):
    # RMSNorm runs torch's F.rms_norm (one fused kernel on CUDA); its twin is the formula written
    # out, computed here in float64. Rows of very different scales, eps mattering for the small one.
    from nsa_serve.model.nsa_model import RMSNorm, rms_norm_reference

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 96, generator=gen) * torch.tensor([1e-4, 1.0, 30.0]).view(1, 3, 1)
    norm = RMSNorm(96, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96, generator=gen))
    norm = norm.to(dtype)
    got = norm(x.to(dtype))
    want = rms_norm_reference(x.double(), norm.weight.double(), 1e-5)
    assert got.dtype == dtype
    assert ((got.double() - want).norm() / want.norm()).item() < tol
    assert torch.allclose(rms_norm_reference(x.to(dtype), norm.weight, 1e-5).double(), got.double(),
                          rtol=tol, atol=0)


@pytest.mark.parametrize("shared,gate", [(True, "linear"), (False, "linear"), (True, "mlp")],
                         ids=["shared-kv", "independent-kv", "mlp-gate"])
def test_fused_projections_equal_the_separate_layers(shared, gate, tmp_path):
    # The engine's one-GEMM projections (q, every K/V, linear gate) and gate/up MLP equal the
    # reference layers; the layers' weights become views of the fused buffer, so the reference
    # path still reads the same values, and a checkpoint loaded afterwards lands in both.
    from nsa_serve.model.nsa_model import BRANCHES

    cfg = preset("tiny", num_heads=8, num_kv_heads=2, head_dim_k=48, head_dim_v=32, shared_kv=shared, gate=gate)
    model = NSAModel(cfg).init_weights(seed=1).double().eval()
    for p in model.parameters():  # non-zero biases and position embeddings
        with torch.no_grad():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype) * 0.1)
    x = torch.randn(9, cfg.hidden_size, dtype=torch.float64)
    pos = torch.tensor([0, 3, 4, 17, 100, 101, 500, 1000, 2047])
    attn, mlp = model.layers[0].attn, model.layers[0].mlp
    with torch.no_grad():
        q0, kv0 = attn.project(x, pos)
        g0, m0 = attn.gate(x), mlp(x)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        assert model.fuse_for_inference() is model.fuse_for_inference()  # idempotent
        q1, kv1, g1 = attn.project_and_gate(x, pos)
        m1 = mlp.forward_fused(x)
        for a, b in [(q0, q1), (g0, g1), (m0, m1)] + [(kv0[br][i], kv1[br][i]) for br in BRANCHES for i in (0, 1)]:
            assert a.shape == b.shape
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
        assert (kv1["cmp"][0] is kv1["win"][0]) == shared
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # same weights
        model.load_state_dict({k: v * 2 for k, v in state.items()})  # loading writes the fused buffer
        q2, _, _ = attn.project_and_gate(x, pos)
        assert torch.allclose(q2, attn.project(x, pos)[0], rtol=1e-12, atol=1e-12)
        # `write`: the selection branch's K/V handed to write_pair at the slots (on a CPU the
        # RoPE kernel does not apply, so write_pair is called), outputs unchanged.
        calls = []
        slots = torch.arange(9)
        kc, vc = torch.zeros(3, 2, 4, 48, dtype=torch.float64), torch.zeros(3, 2, 4, 32, dtype=torch.float64)
        q3, kv3, g3 = attn.project_and_gate(x, pos, write=(kc, vc, slots, lambda *a: calls.append(a)))
        q4, kv4, g4 = attn.project_and_gate(x, pos)
        assert torch.equal(q3, q4) and torch.equal(g3, g4)
        assert len(calls) == 1 and calls[0][0] is kc and calls[0][1] is vc and calls[0][4] is slots
        assert torch.equal(calls[0][2], kv4["slc"][0]) and torch.equal(calls[0][3], kv4["slc"][1])
        assert not torch.allclose(q2, q1)
        # A fused model saves (its weights share one buffer) and loads back to the same logits.
        tokens = torch.randint(0, cfg.vocab_size, (12,))
        save_model(model, tmp_path / "m")
        again = load_model(tmp_path / "m", dtype=torch.float64)
        assert torch.equal(again(tokens), model(tokens))


@pytest.mark.parametrize("phi,dk,dv", [("mlp", 48, 32), ("linear", 48, 32), ("mlp", 32, 48)])
def test_phi_pair_equals_phi_k_and_phi_v(phi, dk, dv):
    # The decode graphs' φ: K and V blocks zero-padded to max(dk, dv) and stacked, the keys'
    # position embedding folded into a bias, one batched GEMM chain; equal to the two Compressors.
    from nsa_kernels.paged import gather_block_pair_reference

    cfg = preset("tiny", num_heads=8, num_kv_heads=2, head_dim_k=dk, head_dim_v=dv, phi=phi)
    model = NSAModel(cfg).init_weights(seed=2).double().eval()
    attn = model.layers[0].attn
    with torch.no_grad():
        attn.phi_k.pos.add_(torch.randn(attn.phi_k.pos.shape, dtype=torch.float64))  # non-zero
    gen = torch.Generator().manual_seed(3)
    P, lb = cfg.select_block, cfg.cmp_block
    k = torch.randn(6, 2, P, dk, generator=gen, dtype=torch.float64)
    v = torch.randn(6, 2, P, dv, generator=gen, dtype=torch.float64)
    slots = torch.randperm(6 * P, generator=gen)[:3 * lb].view(3, lb)
    with torch.no_grad():
        want_k = attn.phi_k(k[slots // P, :, slots % P].permute(0, 2, 1, 3)).reshape(6, dk)
        want_v = attn.phi_v(v[slots // P, :, slots % P].permute(0, 2, 1, 3)).reshape(6, dv)
        assert not attn.has_phi_pair
        model.fuse_for_inference()
        got_k, got_v = attn.phi_pair(gather_block_pair_reference(k, v, slots))
    assert torch.allclose(got_k, want_k, rtol=1e-12, atol=1e-12)
    assert torch.allclose(got_v, want_v, rtol=1e-12, atol=1e-12)
    # The stack is a copy: weights loaded afterwards retire it until the model is fused again.
    x = gather_block_pair_reference(k, v, slots)
    state = model.state_dict()
    model.load_state_dict({n: t * 2 if ".phi_" in n else t for n, t in state.items()})
    assert not attn.has_phi_pair
    with pytest.raises(RuntimeError, match="fuse_phi"):
        attn.phi_pair(x)
    model.fuse_for_inference()
    with torch.no_grad():
        got_k, got_v = attn.phi_pair(x)
        want_k = attn.phi_k(k[slots // P, :, slots % P].permute(0, 2, 1, 3)).reshape(6, dk)
    assert attn.has_phi_pair
    assert torch.allclose(got_k, want_k, rtol=1e-12, atol=1e-12)


def test_phi_pair_is_not_built_for_mean_pooling():
    model = NSAModel(preset("tiny", phi="mean")).eval()
    model.fuse_for_inference()
    assert not model.layers[0].attn.has_phi_pair
