"""The training loop on CPU with a tiny config: same math as the model's forward, gradients through all
three branches, loss goes down, checkpoints load into identical logits, resume continues exactly."""

from __future__ import annotations

import shutil

import numpy as np

import pytest
import torch

from nsa_serve.model.checkpoint import load_model
from nsa_serve.model.nsa_model import NSAModel
from nsa_serve.train.forward import train_forward
from nsa_serve.train.presets import count_parameters, model_config
from nsa_serve.train.state import ResumeError
from nsa_serve.train.tokens import write_tokens
from nsa_serve.train.trainer import Trainer, TrainArgs

from train_helpers import VOCAB, prepared_data, tiny_overrides


def _tiny_model(shared_kv: bool, seed=0) -> NSAModel:
    return NSAModel(model_config("tiny", **tiny_overrides(shared_kv=shared_kv))).init_weights(seed)


@pytest.mark.parametrize("shared_kv", [True, False])
def test_chunked_forward_is_the_model_forward(shared_kv):
    model = _tiny_model(shared_kv).double()
    tokens = torch.randint(0, VOCAB, (150,), generator=torch.Generator().manual_seed(1))
    ref = model(tokens)
    got = train_forward(model, tokens, q_chunk=40)
    assert torch.allclose(got, ref, rtol=0, atol=1e-12)
    g_ref = torch.autograd.grad(ref.logsumexp(-1).sum(), list(model.parameters()))
    g_got = torch.autograd.grad(got.logsumexp(-1).sum(), list(model.parameters()))
    for a, b in zip(g_ref, g_got):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("q_chunk", [None, 48])
def test_every_branch_parameter_gets_gradient(q_chunk):
    """Independent K/V: compression (φ_K, φ_V, k/v_proj_cmp), selection (k/v_proj_slc), window
    (k/v_proj_win) and the gates must all learn. Sequence long enough for every branch (l=8, l'=16, w=32)."""
    model = _tiny_model(shared_kv=False)
    tokens = torch.randint(0, VOCAB, (128,), generator=torch.Generator().manual_seed(2))
    logits = train_forward(model, tokens[:-1], q_chunk=q_chunk)
    torch.nn.functional.cross_entropy(logits, tokens[1:]).backward()
    names = [n for n, _ in model.named_parameters()]
    for want in ("phi_k.pos", "phi_k.proj", "phi_k.out", "phi_v.proj", "phi_v.out", "gate.net.weight", "gate.net.bias",
                 "k_proj_cmp", "v_proj_cmp", "k_proj_slc", "v_proj_slc", "k_proj_win", "v_proj_win", "q_proj"):
        assert sum(want in n for n in names) == 2, want  # one per layer
    for n, p in model.named_parameters():
        assert p.grad is not None and float(p.grad.abs().max()) > 0, f"no gradient reaches {n}"


def test_default_preset_is_paper_sparsity_and_fits_25mb():
    cfg = model_config("default")
    assert (cfg.cmp_block, cfg.cmp_stride, cfg.select_block, cfg.num_select, cfg.window) == (32, 16, 64, 16, 512)
    assert cfg.num_kv_heads < cfg.num_heads  # GQA
    n = count_parameters(cfg)
    assert n * 2 <= 16 * 2**20  # bf16 model.safetensors under the device tool's 16 MiB per file
    assert n * 4 <= 2 * 15 * 2**20  # fp32 master weights in two compact resume shards


def _repetitive_data(tmp_path):
    """A corpus the tiny model can learn in a few dozen steps: one 50-token pattern, repeated."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(prepared_data() / "tokenizer.model", data / "tokenizer.model")
    pattern = list(range(10, 60))
    write_tokens(data / "train.bin", [pattern * 80], {"split": "train"})
    write_tokens(data / "heldout.bin", [pattern * 8], {"split": "heldout"})
    return data


def _args(tmp_path, data, **kw) -> TrainArgs:
    base = dict(data=str(data / "train.bin"), out=str(tmp_path / "out"), config="tiny",
                overrides=tiny_overrides(), seq_len=64, batch=2, steps=12, lr=3e-3, warmup=3, task_prob=0.0,
                checkpoint_every=1000, log_every=1000, eval_tokens=256, q_chunk=32, device="cpu",
                save_dtype="float32", rewarm=4)
    base.update(kw)
    return TrainArgs(**base)


def test_training_reduces_loss_and_checkpoint_loads_identically(tmp_path):
    data = _repetitive_data(tmp_path)
    tr = Trainer(_args(tmp_path, data, steps=40, batch=4), log=lambda m: None)
    first = tr.train_step()["lm"]
    assert tr.run() == "done"
    last = [h for h in tr.history if "lm" in h][-1]["lm"]
    assert last < 0.5 * first, (first, last)
    ppl = [h for h in tr.history if "heldout_ppl" in h][-1]["heldout_ppl"]
    assert ppl < 0.5 * VOCAB
    # The exported model directory loads (safetensors) into exactly the trained logits.
    out = tmp_path / "out"
    assert {p.name for p in (out / "model").iterdir()} >= {"config.json", "model.safetensors", "tokenizer.model",
                                                            "generation_config.json"}
    loaded = load_model(out / "model")
    tokens = torch.randint(0, VOCAB, (100,))
    tr.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(tokens), tr.model(tokens))
    assert loaded.cfg.extra["trained_steps"] == 40 and loaded.cfg.extra["final"] is True


def test_bf16_export_loads_as_the_rounded_weights(tmp_path):
    data = _repetitive_data(tmp_path)
    tr = Trainer(_args(tmp_path, data, steps=2, save_dtype="bfloat16"), log=lambda m: None)
    tr.run()
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "out" / "model" / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
    loaded = load_model(tmp_path / "out" / "model", dtype=torch.float32)
    rounded = _tiny_model(True)
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in tr.model.state_dict().items()})
    tokens = torch.randint(0, VOCAB, (80,))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), rounded.eval()(tokens))


def test_exact_resume_matches_an_uninterrupted_run(tmp_path):
    data = _repetitive_data(tmp_path)
    straight = Trainer(_args(tmp_path / "a", data), log=lambda m: None)
    straight.run()
    # Same run, interrupted after 5 steps (as a time budget would) and started again.
    first = Trainer(_args(tmp_path / "b", data), log=lambda m: None)
    for _ in range(5):
        first.train_step()
    first.save()
    logs = []
    second = Trainer(_args(tmp_path / "b", data), log=logs.append)
    assert second.step == 5 and any("resumed" in m and "exact" in m for m in logs)
    second.run()
    for (n, a), (_, b) in zip(straight.model.named_parameters(), second.model.named_parameters()):
        assert torch.equal(a, b), n


def test_compact_resume_restores_weights_and_rewarms(tmp_path):
    data = _repetitive_data(tmp_path)
    first = Trainer(_args(tmp_path / "a", data), log=lambda m: None)
    for _ in range(4):
        first.train_step()
    first.save()
    # A fresh machine: no exact state, only the compact OUT/resume that came back from the device.
    resume = tmp_path / "carried"
    shutil.copytree(tmp_path / "a" / "out" / "resume", resume)
    second = Trainer(_args(tmp_path / "b", data, resume=str(resume)), log=lambda m: None)
    assert second.step == 4 and second.resumed_at == 4
    for (n, a), (_, b) in zip(first.model.named_parameters(), second.model.named_parameters()):
        assert torch.equal(a, b), n
    from nsa_serve.train.trainer import lr_at

    assert lr_at(4, second.a, 12, 4) < lr_at(4, second.a, 12, None)  # re-warm-up after fresh moments
    assert second.run() == "done" and second.step == 12


def test_time_budget_pauses_then_resumes(tmp_path):
    data = _repetitive_data(tmp_path)
    tr = Trainer(_args(tmp_path, data, steps=10_000, time_budget_min=0.002), log=lambda m: None)
    assert tr.run() == "paused"
    paused_at = tr.step
    assert 1 <= paused_at < 10_000
    again = Trainer(_args(tmp_path, data, steps=10_000, time_budget_min=0.002), log=lambda m: None)
    assert again.step == paused_at


def test_resume_refuses_another_config(tmp_path):
    data = _repetitive_data(tmp_path)
    tr = Trainer(_args(tmp_path, data, steps=1), log=lambda m: None)
    tr.run()
    with pytest.raises(ResumeError, match="different model config"):
        Trainer(_args(tmp_path, data, steps=1, overrides=tiny_overrides(num_layers=1)), log=lambda m: None)


def test_auto_steps_time_each_phase_then_fix_the_total(tmp_path):
    data = _repetitive_data(tmp_path)
    logs = []
    tr = Trainer(_args(tmp_path, data, steps=0, seq_len=None, curriculum="64:1:0.0,128:1:0.0",
                       total_budget_min=0.02), log=logs.append)
    assert tr.run() == "done"
    assert sum(m.startswith("calibrate: seq_len") for m in logs) == 2
    assert tr.total_steps >= 1 and tr.step == tr.total_steps
    assert any(m.startswith("auto steps:") and f"--steps {tr.total_steps}" in m for m in logs)
    assert load_model(tmp_path / "out" / "model").cfg.extra["total_steps"] == tr.total_steps


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_training_resumes_exactly(tmp_path):
    """The device path: bf16 autocast with fp32 attention, fused AdamW, exact resume of its state."""
    data = _repetitive_data(tmp_path)
    kw = dict(device="cuda", steps=8, seq_len=128, batch=2)
    straight = Trainer(_args(tmp_path / "a", data, **kw), log=lambda m: None)
    first_loss = straight.train_step()["lm"]
    straight.run()
    assert [h for h in straight.history if "lm" in h][-1]["lm"] < first_loss
    part = Trainer(_args(tmp_path / "b", data, **kw), log=lambda m: None)
    for _ in range(3):
        part.train_step()
    part.save()
    rest = Trainer(_args(tmp_path / "b", data, **kw), log=lambda m: None)
    assert rest.step == 3
    rest.run()
    for (n, a), (_, b) in zip(straight.model.named_parameters(), rest.model.named_parameters()):
        # CUDA reductions (embedding backward) are not bit-deterministic; lost AdamW moments would
        # differ by ~lr = 3e-3.
        assert torch.allclose(a, b, rtol=0, atol=2e-4), n


def test_init_starts_a_new_run_from_earlier_weights(tmp_path):
    data = _repetitive_data(tmp_path)
    base = Trainer(_args(tmp_path / "a", data, steps=3), log=lambda m: None)
    base.run()
    logs = []
    ft = Trainer(_args(tmp_path / "b", data, steps=4, init=str(tmp_path / "a" / "out" / "resume")), log=logs.append)
    assert ft.step == 0 and ft.total_steps == 4 and any("initialised from" in m for m in logs)
    for (n, a), (_, b) in zip(base.model.named_parameters(), ft.model.named_parameters()):
        assert torch.equal(a, b), n
    ft.run()
    assert ft.meta()["init_from"]["step"] == 3
    with pytest.raises(ResumeError, match="different model config"):
        Trainer(_args(tmp_path / "c", data, overrides=tiny_overrides(shared_kv=False),
                      init=str(tmp_path / "a" / "out" / "resume")), log=lambda m: None)


@pytest.mark.parametrize("attention", ["sdpa", "reference"])
def test_ragged_step_scores_each_sequence_over_its_own_length(tmp_path, attention):
    """A task a few tokens short of the phase length is padded in the batch; its loss and gradients
    must equal those of the sequence on its own."""
    from nsa_serve.train.tasks import Sample

    data = _repetitive_data(tmp_path)
    tr = Trainer(_args(tmp_path, data, attention=attention, overrides=tiny_overrides()), log=lambda m: None)
    tr.model.double()
    rng = np.random.default_rng(0)
    samples = [Sample(rng.integers(0, VOCAB, n), rng.random(n - 1) < 0.1, "passkey") for n in (129, 120)]
    tr.opt.zero_grad(set_to_none=True)
    stats = tr._forward_backward(samples, 0.5)
    got = {n: p.grad.clone() for n, p in tr.model.named_parameters()}
    want_lm, want = 0.0, {n: torch.zeros_like(p) for n, p in tr.model.named_parameters()}
    for s in samples:
        tr.opt.zero_grad(set_to_none=True)
        st = tr._forward_backward([s], 0.5)
        want_lm += st["lm"] / 2
        for n, p in tr.model.named_parameters():
            want[n] += p.grad
    assert stats["tokens"] == 128 + 119
    assert stats["lm"] == pytest.approx(want_lm, rel=1e-6)
    for n in got:
        assert torch.allclose(got[n], want[n], rtol=1e-5, atol=1e-5 * float(want[n].abs().max())), n


def test_selection_aux_targets_the_needle_block_and_trains(tmp_path):
    data = prepared_data()
    logs = []
    tr = Trainer(_args(tmp_path, data, seq_len=256, batch=4, steps=3, task_prob=1.0, task_mix="1,0,0",
                       select_aux_weight=0.5), log=logs.append)
    p = tr.cfg.sparsity
    samples = tr.sampler.step(0, tr.phases[0], 4)
    seq, pos, block, n = tr._aux_target(samples)
    for i, s in enumerate(samples):
        rows = (seq == i).nonzero().flatten()
        nb = s.needle // p.select_block
        needle_text = tr.tok.decode(s.ids[s.needle:s.needle + 24].tolist())
        assert needle_text.startswith("The pass key is"), needle_text
        want = [t for t in np.nonzero(s.answer)[0] if t // p.select_block - nb >= p.num_local and nb >= p.num_init]
        assert pos[rows].tolist() == want and set(block[rows].tolist()) <= {nb}
    assert n == sum(bool((seq == i).any()) for i in range(4))
    rec = tr.train_step()
    assert "ans_sel_aux" in rec and rec["ans_sel_aux"] > 0
    for name, prm in tr.model.named_parameters():
        if "phi_k" in name or "q_proj" in name:
            assert prm.grad is not None and float(prm.grad.abs().max()) > 0, name


def test_init_from_a_model_directory(tmp_path):
    data = _repetitive_data(tmp_path)
    base = Trainer(_args(tmp_path / "a", data, steps=2), log=lambda m: None)
    base.run()
    ft = Trainer(_args(tmp_path / "b", data, steps=2, init=str(tmp_path / "a" / "out" / "model")), log=lambda m: None)
    for (n, a), (_, b) in zip(base.model.named_parameters(), ft.model.named_parameters()):
        assert torch.equal(a, b), n  # the tests export float32, so the copy is exact
    with pytest.raises(ResumeError, match="neither a state dir"):
        Trainer(_args(tmp_path / "c", data, init=str(tmp_path)), log=lambda m: None)
    # The same weights as shards (a large model's layout) start a fine-tune alike.
    from nsa_serve.model.checkpoint import INDEX, load_model, save_model
    save_model(load_model(tmp_path / "a" / "out" / "model"), tmp_path / "sharded", max_shard_bytes=100_000)
    assert (tmp_path / "sharded" / INDEX).is_file()
    ft = Trainer(_args(tmp_path / "d", data, steps=2, init=str(tmp_path / "sharded")), log=lambda m: None)
    for (n, a), (_, b) in zip(base.model.named_parameters(), ft.model.named_parameters()):
        assert torch.equal(a, b), n


def test_stop_at_step_checkpoints_there(tmp_path):
    data = _repetitive_data(tmp_path)
    tr = Trainer(_args(tmp_path, data, steps=6, stop_at_step=4), log=lambda m: None)
    assert tr.run() == "paused" and tr.step == 4
    assert load_model(tmp_path / "out" / "model").cfg.extra["trained_steps"] == 4


def test_bad_attention_settings_fail_clearly(tmp_path):
    data = _repetitive_data(tmp_path)
    with pytest.raises(ValueError, match="attention must be"):
        Trainer(_args(tmp_path, data, attention="flash"), log=lambda m: None)
    with pytest.raises(ValueError, match="needs --attention sdpa"):
        Trainer(_args(tmp_path, data, attention="reference", select_aux_weight=0.5), log=lambda m: None)
