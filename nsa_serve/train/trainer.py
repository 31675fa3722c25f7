"""The training loop: AdamW, warm-up + cosine learning rate, bf16 autocast on CUDA, a curriculum of
sequence lengths, a wall-clock budget per call, checkpoints that resume.

A step = `seqs_per_step(phase)` sequences (about `tokens_per_step` tokens), then one optimizer update.
With `attention="sdpa"` (the default) the sequences go through `train_forward_batch` in micro-batches of
at most `micro_batch_tokens` tokens (fused attention, tested equal to the model's forward); with
`attention="reference"` each sequence is its own forward through the reference attention. Gradients
accumulate over micro-batches.
Loss per sequence: mean next-token cross-entropy over all targets, plus `answer_weight` × the mean over
a task's answer tokens (a 5-digit key is 5 of 16k targets; without the extra term it would be noise).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nsa_serve.model.nsa_model import NSAModel
from nsa_serve.tokenizer import Tokenizer

from . import state as ckpt
from .batches import (DEFAULT_CURRICULUM, Phase, StepSampler, parse_curriculum, parse_task_mix, phase_at,
                      seqs_per_step)
from .evaluate import heldout_nll, perplexity
from .forward import train_forward, train_forward_batch
from .presets import model_config
from .tasks import GREETING_SHARE, Sample, TaskBuilder
from .tokens import read_meta, read_tokens

CALIBRATION_STEP = 10**9  # data seeds for the timing steps, far from any real step's
# Sampling defaults the server applies when a request leaves them out. A 7.6M-parameter model trained on
# documentation falls into runs of spaces and repeated identifiers; a repetition penalty of 1.2 at
# temperature 0.7 gave the most readable replies in a side-by-side check (docs/training.md).
GENERATION_CONFIG = {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.2, "max_tokens": 128}


@dataclass
class TrainArgs:
    data: str
    out: str
    config: str = "default"
    overrides: dict = field(default_factory=dict)
    tokenizer: str | None = None  # default: tokenizer.model beside the token file
    heldout: str | None = None  # default: heldout.bin beside the token file, when present
    state_dir: str | None = None  # exact resume state; default OUT/state
    resume: str | None = None  # an exact or compact state dir to continue from
    init: str | None = None  # start a new run (fresh optimizer and schedule) from a state or model dir
    stop_at_step: int = 0  # pause (checkpoint) on reaching this step (0: run to the end); reproduces a cut run
    steps: int = 0  # 0: choose from total_budget_min after timing each phase
    total_budget_min: float = 27.0
    time_budget_min: float = 0.0  # this call's wall-clock budget (0: none)
    seq_len: int | None = None  # one fixed length instead of the curriculum
    curriculum: str = DEFAULT_CURRICULUM
    batch: int = 16  # sequences per step in the first phase; later phases keep the tokens per step
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    rewarm: int = 50  # re-warm-up steps after a compact resume (fresh AdamW moments)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    answer_weight: float = 1.0
    select_aux_weight: float = 0.0  # retrieval supervision of the selection (forward.selection_aux_loss)
    task_prob: float | None = None  # override every phase's task probability
    task_mix: str = "0.5,0.2,0.3"  # passkey, kv lookup, continuation chat shares of the tasks
    greeting_share: float = GREETING_SHARE  # of dialog samples that open with a greeting turn
    seed: int = 0
    checkpoint_every: int = 200
    log_every: int = 10
    eval_tokens: int = 65536
    q_chunk: int = 2048  # reference attention only; the sdpa path sizes its chunks itself
    attention: str = "sdpa"  # "sdpa": batched fused attention; "reference": the reference, per sequence
    micro_batch_tokens: int = 32768  # sdpa path: tokens per forward/backward
    device: str | None = None
    compile: bool = False  # torch.compile the attention chunks (forward.compile_attention)
    save_dtype: str = "bfloat16"


def lr_at(step: int, a: TrainArgs, total: int, resumed_at: int | None) -> float:
    if step < a.warmup:
        f = (step + 1) / a.warmup
    else:
        x = (step - a.warmup) / max(1, total - a.warmup)
        f = a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, x)))
    if resumed_at is not None and a.rewarm > 0:
        f *= min(1.0, (step - resumed_at + 1) / a.rewarm)
    return a.lr * f


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor, answer: torch.Tensor,
                  answer_weight: float) -> tuple[torch.Tensor, float, float | None]:
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    lm = ce.mean()
    if answer_weight and bool(answer.any()):
        ans = ce[answer].mean()
        return lm + answer_weight * ans, float(lm.detach()), float(ans.detach())
    return lm, float(lm.detach()), None


def make_optimizer(model: NSAModel, a: TrainArgs, device: torch.device) -> torch.optim.Optimizer:
    # Decay matrices only: norms, biases, the intra-block position embeddings and the (tied)
    # embedding are left alone, as is common practice.
    decay, plain = [], []
    for n, p in model.named_parameters():
        (decay if p.dim() >= 2 and not n.startswith("embed") and ".pos" not in n else plain).append(p)
    groups = [{"params": decay, "weight_decay": a.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.95), eps=1e-8, **kw)


class Trainer:
    def __init__(self, a: TrainArgs, log=print):
        self.a = a
        self.log = log
        if a.attention not in ("sdpa", "reference"):
            raise ValueError(f"attention must be 'sdpa' or 'reference', got {a.attention!r}")
        if a.select_aux_weight and a.attention == "reference":
            raise ValueError("--select-aux-weight needs --attention sdpa (the reference path has no hook for it)")
        self.device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.autocast = self.device.type == "cuda"
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if a.compile:
            from .forward import compile_attention

            compile_attention()
        data = Path(a.data)
        self.tokens = read_tokens(data)
        self.data_meta = read_meta(data)
        self.tok_path = Path(a.tokenizer or data.parent / "tokenizer.model")
        self.tok = Tokenizer(self.tok_path)
        held = Path(a.heldout) if a.heldout else data.parent / "heldout.bin"
        self.heldout = read_tokens(held) if held.is_file() and held.resolve() != data.resolve() else None
        cfg = model_config(a.config, **a.overrides)
        if self.tok.vocab_size > cfg.vocab_size:
            raise ValueError(f"tokenizer has {self.tok.vocab_size} pieces but the model's vocab_size is "
                             f"{cfg.vocab_size}")
        cfg.bos_token_id, cfg.eos_token_id = self.tok.bos_id, self.tok.eos_id
        self.cfg = cfg
        if a.seq_len:
            tp = a.task_prob if a.task_prob is not None else 0.3
            self.phases = [Phase(a.seq_len, 1.0, tp)]
        else:
            self.phases = parse_curriculum(a.curriculum)
            if a.task_prob is not None:
                self.phases = [Phase(p.seq_len, p.frac, a.task_prob) for p in self.phases]
        self.tokens_per_step = a.batch * self.phases[0].seq_len
        if cfg.max_position_embeddings < self.phases[-1].seq_len:
            raise ValueError(f"curriculum length {self.phases[-1].seq_len} exceeds max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        tasks = (TaskBuilder(self.tok, self.tokens, a.greeting_share) if any(p.task_prob > 0 for p in self.phases)
                 else None)
        self.sampler = StepSampler(self.tokens, tasks, a.seed, parse_task_mix(a.task_mix))
        torch.manual_seed(a.seed)
        self.model = NSAModel(cfg).init_weights(a.seed).to(self.device)
        self.opt = make_optimizer(self.model, a, self.device)
        self.out = Path(a.out)
        self.state_dir = Path(a.state_dir) if a.state_dir else self.out / "state"
        self.step = 0
        self.total_steps = a.steps
        self.resumed_at: int | None = None
        self.history: list[dict] = []
        self.init_from: dict | None = None
        if a.init:
            self._init_weights(Path(a.init))
        self._resume()

    def _init_weights(self, d: Path) -> None:
        """Fine-tuning: weights from an earlier run's state dir (fp32 master weights) or a model
        directory (e.g. the shipped default model, bf16), everything else new."""
        from nsa_serve.model.checkpoint import INDEX, SINGLE, load_model

        st = ckpt.read_state(d)
        if st is None and ((d / SINGLE).is_file() or (d / INDEX).is_file()):
            src = load_model(d, dtype=torch.float32)
            st = {"config": src.cfg.to_dict(), "step": src.cfg.extra.get("trained_steps", 0),
                  "total_steps": src.cfg.extra.get("total_steps", 0)}
        elif st is None:
            raise ckpt.ResumeError(f"--init {d}: neither a state dir (state.json) nor a model directory")
        else:
            src = None
        if {k: v for k, v in st["config"].items() if k != "extra"} != \
                {k: v for k, v in self.cfg.to_dict().items() if k != "extra"}:
            raise ckpt.ResumeError(f"--init {d} holds a different model config")
        if src is not None:
            with torch.no_grad():
                self.model.load_state_dict(src.to(self.device).state_dict())
        else:
            ckpt.load_weights_into(self.model, d, st)
        self.init_from = {"dir": str(d), "step": st["step"], "total_steps": st["total_steps"],
                          "args": st.get("args"), "history": st.get("history", [])[-200:]}
        self.log(f"initialised from {d} (a run's step {st['step']}/{st['total_steps']}); new optimizer and schedule")

    # -- resume -----------------------------------------------------------------------------------
    def _resume(self) -> None:
        """Continue from the most advanced of: the exact state dir, the --resume dir."""
        candidates = []
        for d in (self.state_dir, Path(self.a.resume) if self.a.resume else None):
            st = ckpt.read_state(d) if d is not None else None
            if st is not None:
                candidates.append((st["step"], st["kind"] == "exact", d, st))
        if not candidates:
            return
        step, _, d, st = max(candidates, key=lambda c: (c[0], c[1]))
        same = {k: v for k, v in st["config"].items() if k != "extra"} == \
            {k: v for k, v in self.cfg.to_dict().items() if k != "extra"}
        if not same:
            raise ckpt.ResumeError(f"resume state in {d} was trained with a different model config; "
                                   f"use a fresh --out/--state-dir or the same --config/--set")
        if st.get("data_sha256") and st["data_sha256"] != self.data_meta.get("sha256"):
            self.log(f"warning: resuming from {d}, which was trained on different data "
                     f"(sha256 {st['data_sha256'][:12]} vs {str(self.data_meta.get('sha256'))[:12]})")
        ckpt.load_weights_into(self.model, d, st)
        if st["kind"] == "exact":
            ckpt.load_optimizer_into(self.opt, self.model, d, st)
            self.resumed_at = st.get("resumed_at")
        else:
            self.resumed_at = step  # fresh moments: re-warm the learning rate
        if self.a.steps and self.a.steps != st["total_steps"]:
            self.log(f"warning: --steps {self.a.steps} ignored; the run being resumed has {st['total_steps']}")
        self.step, self.total_steps = step, st["total_steps"]
        self.history = st.get("history", [])
        self.log(f"resumed from {d} ({st['kind']}) at step {step}/{self.total_steps}")

    # -- one step ---------------------------------------------------------------------------------
    def _forward_backward(self, samples: list[Sample], scale: float) -> dict:
        lm_sum, ntok = 0.0, 0
        answers: dict[str, list[float]] = {}  # answer loss per task kind (passkey / kv / chat)
        if self.a.attention == "reference":
            groups = [[s] for s in samples]
        else:
            per = max(1, self.a.micro_batch_tokens // max(len(s.ids) - 1 for s in samples))
            groups = [samples[i:i + per] for i in range(0, len(samples), per)]
        for group in groups:
            # A task can come out a few tokens short of the phase's length: right-pad (causal, so the
            # padding changes no earlier position) and score each sequence over its own length.
            # The width is rounded up to a multiple of 64 tokens so every step of a phase has the same
            # shapes (the fused attention plans each new shape once).
            lens = [len(s.ids) for s in group]
            width = -(-(max(lens) - 1) // 64) * 64 + 1
            ids = torch.as_tensor(np.stack([np.pad(s.ids, (0, width - n)) for s, n in zip(group, lens)]),
                                  device=self.device)
            answer = torch.as_tensor(np.stack([np.pad(s.answer, (0, width - n)) for s, n in zip(group, lens)]),
                                     device=self.device)
            target = self._aux_target(group) if self.a.select_aux_weight else None
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                if self.a.attention == "reference":
                    logits = train_forward(self.model, ids[0, :-1], self.a.q_chunk, attn_fp32=self.autocast)[None]
                elif target is not None:
                    logits, aux = train_forward_batch(self.model, ids[:, :-1], aux_target=target)
                else:
                    logits = train_forward_batch(self.model, ids[:, :-1])
            loss = 0.0
            if target is not None:
                loss = self.a.select_aux_weight * aux * target[3]
                answers.setdefault("sel_aux", []).append(float(aux.detach()))
            for i, (s, n) in enumerate(zip(group, lens)):
                seq_loss, lm, ans = sequence_loss(logits[i, :n - 1], ids[i, 1:n], answer[i, :n - 1],
                                                  self.a.answer_weight)
                loss = loss + seq_loss
                lm_sum += lm
                ntok += n - 1
                if ans is not None:
                    answers.setdefault(s.kind, []).append(ans)
            (loss * scale).backward()
        return {"lm": lm_sum / len(samples), "tokens": ntok,
                **{f"ans_{k}": sum(v) / len(v) for k, v in sorted(answers.items())}}

    def _aux_target(self, group: list[Sample]):
        """(seq, pos, block, sequences) for `selection_aux_loss`: every answer position of a task whose
        fact lies in a selection block the query does not get for free (not one of the local blocks).
        None when the group has no such position."""
        p = self.cfg.sparsity
        seq, pos, block, seqs = [], [], [], 0
        for i, s in enumerate(group):
            if s.needle < 0:
                continue
            nb = s.needle // p.select_block
            if nb < p.num_init:  # an initial block is always selected
                continue
            at = [int(t) for t in np.nonzero(s.answer)[0] if t // p.select_block - nb >= p.num_local]
            seq += [i] * len(at)
            pos += at
            block += [nb] * len(at)
            seqs += bool(at)
        if not seq:
            return None
        dev = self.device
        return (torch.tensor(seq, device=dev), torch.tensor(pos, device=dev), torch.tensor(block, device=dev), seqs)

    def train_step(self) -> dict:
        phase = phase_at(self.phases, self.step, self.total_steps)
        samples = self.sampler.step(self.step, phase, seqs_per_step(phase, self.tokens_per_step))
        lr = lr_at(self.step, self.a, self.total_steps, self.resumed_at)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        stats = self._forward_backward(samples, 1.0 / len(samples))
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.a.grad_clip)
        self.opt.step()
        self.step += 1
        return {**stats, "lr": lr, "grad_norm": float(gnorm), "seq_len": phase.seq_len,
                "seqs": len(samples)}

    def calibrate(self) -> float:
        """Seconds per optimizer step averaged over the curriculum: time one step of each phase
        (after one warm-up step of the same shapes), gradients thrown away. Used to pick --steps 0 (auto)."""
        per = []
        for i, phase in enumerate(self.phases):
            n = seqs_per_step(phase, self.tokens_per_step)
            samples = self.sampler.step(CALIBRATION_STEP + i, phase, n)
            self._forward_backward(samples, 0.0)  # warm-up at the step's own shapes
            self._sync()
            t0 = time.perf_counter()
            self._forward_backward(samples, 0.0)
            self._sync()
            dt = time.perf_counter() - t0
            per.append(dt)
            self.log(f"calibrate: seq_len {phase.seq_len} × {n} seqs: {dt:.2f} s/step")
        self.opt.zero_grad(set_to_none=True)
        return sum(p.frac * t for p, t in zip(self.phases, per))

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    # -- checkpoints --------------------------------------------------------------------------------
    def meta(self) -> dict:
        return {"step": self.step, "total_steps": self.total_steps, "config": self.cfg.to_dict(),
                "args": asdict(self.a), "data_sha256": self.data_meta.get("sha256"),
                "resumed_at": self.resumed_at, "history": self.history[-2000:], "init_from": self.init_from}

    def save(self, final: bool = False) -> None:
        t0 = time.perf_counter()
        meta = self.meta()
        ckpt.save_exact(self.state_dir, self.model, self.opt, meta)
        ckpt.save_compact(self.out / "resume", self.model, meta)
        self.model.cfg.extra = {"trained_steps": self.step, "total_steps": self.total_steps,
                                "seed": self.a.seed, "data_sha256": self.data_meta.get("sha256"),
                                "final": final, "command": "nsa-serve train (docs/training.md)"}
        ckpt.export_model(self.model, self.out / "model", self.tok_path, getattr(torch, self.a.save_dtype),
                          GENERATION_CONFIG)
        self.model.cfg.extra = {}
        self.log(f"checkpoint at step {self.step}: {self.out} ({time.perf_counter() - t0:.1f} s)")

    def evaluate(self) -> dict:
        if self.heldout is None:
            return {}
        self.model.eval()
        nll, n = heldout_nll(self.model, self.heldout, 1024, self.a.eval_tokens, self.device, "auto",
                             self.autocast)
        self.model.train()
        return {"heldout_ppl": perplexity(nll, n), "heldout_tokens": n}

    # -- the loop -----------------------------------------------------------------------------------
    def run(self) -> str:
        """Train until the total steps or this call's time budget. Returns 'done' or 'paused'."""
        a, t_start = self.a, time.perf_counter()
        budget = a.time_budget_min * 60 if a.time_budget_min else math.inf
        if not self.total_steps:
            per_step = self.calibrate()
            self.total_steps = max(1, int(a.total_budget_min * 60 / per_step))
            self.log(f"auto steps: {per_step:.2f} s/step averaged over the curriculum → "
                     f"--steps {self.total_steps} for {a.total_budget_min} min")
        self.log(f"model: {sum(p.numel() for p in self.model.parameters()):,} parameters; "
                 f"train tokens {self.tokens.shape[0]:,}; steps {self.step}/{self.total_steps}; "
                 f"{self.tokens_per_step} tokens/step; device {self.device}")
        self.out.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.state_dir / "train_log.jsonl"  # OUT holds only what must come back (8 files)
        self.model.train()
        window = []
        save_cost = 10.0
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            rec = self.train_step()
            self._sync()
            dt = time.perf_counter() - t0
            window.append((dt, rec["tokens"]))
            rec.update(step=self.step, s_per_step=round(dt, 4), elapsed_s=round(time.perf_counter() - t_start, 1))
            if self.step % a.log_every == 0 or self.step == self.total_steps:
                tps = sum(n for _, n in window) / sum(t for t, _ in window)
                window = []
                msg = (f"step {self.step}/{self.total_steps} len {rec['seq_len']} loss {rec['lm']:.3f}"
                       + "".join(f" {k} {v:.3f}" for k, v in rec.items() if k.startswith("ans_"))
                       + f" lr {rec['lr']:.2e} gn {rec['grad_norm']:.2f} {tps:,.0f} tok/s"
                       f" {rec['elapsed_s']:.0f}s")
                self.log(msg)
                self.history.append({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()})
                with log_path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
            if self.step % a.checkpoint_every == 0 and self.step < self.total_steps:
                rec_eval = self.evaluate()
                if rec_eval:
                    self.log(f"step {self.step}: held-out ppl {rec_eval['heldout_ppl']:.2f}")
                    self.history.append({"step": self.step, **rec_eval})
                s0 = time.perf_counter()
                self.save()
                save_cost = time.perf_counter() - s0 + 5.0
            elapsed = time.perf_counter() - t_start
            if a.stop_at_step and self.step >= a.stop_at_step and self.step < self.total_steps:
                self.save()
                self.log(f"PAUSED at step {self.step}/{self.total_steps} (--stop-at-step)")
                return "paused"
            if elapsed + 2 * dt + save_cost > budget and self.step < self.total_steps:
                self.save()
                self.log(f"PAUSED at step {self.step}/{self.total_steps} (time budget {a.time_budget_min} min); "
                         "run the same command again to resume")
                return "paused"
        rec_eval = self.evaluate()
        if rec_eval:
            self.log(f"final held-out ppl {rec_eval['heldout_ppl']:.2f}")
            self.history.append({"step": self.step, **rec_eval})
        self.save(final=True)
        self.log(f"DONE: {self.step} steps; model directory {self.out / 'model'}")
        return "done"
