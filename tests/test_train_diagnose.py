"""The retrieval diagnostic (`python -m nsa_serve.train.diagnose`): its selection flags are the
reference attention's own selection, and the teacher-forced key check reads the right positions."""

from __future__ import annotations

import torch

from nsa_kernels.reference import nsa_attention, num_compressed
from nsa_serve.model.nsa_model import NSAModel
from nsa_serve.tokenizer import Tokenizer, render_chat
from nsa_serve.train.diagnose import diagnose_case
from nsa_serve.train.evaluate import build_passkey_cases
from nsa_serve.train.presets import model_config
from nsa_serve.train.tasks import passkey_answer
from nsa_serve.train.tokens import read_tokens

from train_helpers import prepared_data, tiny_overrides


def test_diagnose_reports_the_reference_selection():
    data = prepared_data()
    tok = Tokenizer(data / "tokenizer.model")
    model = NSAModel(model_config("tiny", **tiny_overrides())).init_weights(3).eval()
    case = build_passkey_cases(tok, read_tokens(data / "heldout.bin"), [300], 1, seed=1)[0]
    r = diagnose_case(model, tok, case.messages, case.key, q_chunk=64)
    c, p = model.cfg, model.cfg.sparsity
    assert len(r["layers"]) == c.num_layers and all(len(g) == c.num_kv_heads for g in r["layers"])
    assert r["block"] == r["needle"] // p.select_block and 0 <= r["block"] < r["blocks"]
    # Layer 0's flags = the reference attention's selection at the query before the key's first token
    # (the prompt, then the answer's tokens up to the key).
    prompt = tok.encode(render_chat(case.messages))
    attn = model.layers[0].attn
    nl = len(tok.encode("\n", add_bos=False))
    answer = tok.encode("\n" + passkey_answer(case.key), add_bos=False)[nl:]
    key_toks = tok.encode("\n" + case.key, add_bos=False)[nl:]
    first = next(i for i in range(len(answer)) if answer[i:i + len(key_toks)] == key_toks)
    ids_full = torch.tensor(prompt + answer[:first])
    with torch.no_grad():
        Tf = ids_full.shape[0]
        pos_f = torch.arange(Tf)
        x = model.layers[0].attn_norm(model.embed(ids_full))
        q, kv = attn.project(x, pos_f)
        kc, vc = attn.compress(*kv["cmp"], 0, num_compressed(Tf, c.cmp_block, c.cmp_stride))
        _, chosen = nsa_attention(q, pos_f, kc, vc, *kv["slc"], *kv["win"], attn.gate(x), p,
                                  return_selection=True)
    assert r["query"] == Tf - 1
    want = [bool(chosen[g, Tf - 1, r["block"]]) for g in range(c.num_kv_heads)]
    assert [g["selected"] for g in r["layers"][0]] == want
    assert len(r["key_tokens_right"]) == len(key_toks)
