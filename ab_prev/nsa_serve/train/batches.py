"""What one optimizer step trains on: a curriculum phase picks the sequence length; each sequence is a
window of the tokenized corpus or, with the phase's task probability, a synthetic retrieval task.

Every step's samples come from a generator seeded by (seed, step), so a resumed run sees exactly the
data an uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .tasks import Sample, TaskBuilder


@dataclass(frozen=True)
class Phase:
    seq_len: int
    frac: float  # share of the optimizer steps
    task_prob: float  # chance that a sequence is a retrieval task instead of corpus text


# Of the task sequences: passkey, kv lookup, continuation chat (the rest: dialog).
TASK_MIX = (0.5, 0.2, 0.3)
DEFAULT_CURRICULUM = "2048:0.5:0.3,4096:0.3:0.5,16384:0.2:0.75"


def parse_curriculum(spec: str) -> list[Phase]:
    """'LEN:FRAC:TASKP,...' (FRACs are normalised to sum to 1). Lengths must not decrease."""
    phases = []
    for item in spec.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3:
            raise ValueError(f"curriculum item {item!r} must be LEN:FRAC:TASK_PROB")
        try:
            L, f, tp = int(parts[0]), float(parts[1]), float(parts[2])
        except ValueError as exc:
            raise ValueError(f"curriculum item {item!r}: {exc}") from exc
        if L < 64 or f <= 0 or not 0 <= tp <= 1:
            raise ValueError(f"curriculum item {item!r}: need LEN ≥ 64, FRAC > 0, 0 ≤ TASK_PROB ≤ 1")
        phases.append(Phase(L, f, tp))
    if any(b.seq_len < a.seq_len for a, b in zip(phases, phases[1:])):
        raise ValueError(f"curriculum lengths must not decrease: {spec}")
    total = sum(p.frac for p in phases)
    return [Phase(p.seq_len, p.frac / total, p.task_prob) for p in phases]


def phase_at(phases: list[Phase], step: int, total_steps: int) -> Phase:
    x = step / max(1, total_steps)
    acc = 0.0
    for p in phases:
        acc += p.frac
        if x < acc - 1e-12:
            return p
    return phases[-1]


def seqs_per_step(phase: Phase, tokens_per_step: int) -> int:
    return max(1, tokens_per_step // phase.seq_len)


def parse_task_mix(spec: str) -> tuple[float, ...]:
    """'PASSKEY,KV,CHAT[,DIALOG]' shares of the task sequences → (passkey, kv, chat) fractions; the
    rest is dialog. Three numbers = no dialog, exactly as before the dialog task existed."""
    try:
        parts = [float(x) for x in spec.split(",")]
    except ValueError as exc:
        raise ValueError(f"task mix {spec!r} must be numbers PASSKEY,KV,CHAT[,DIALOG]") from exc
    if len(parts) not in (3, 4) or min(parts) < 0 or sum(parts) <= 0:
        raise ValueError(f"task mix {spec!r} must be three or four non-negative numbers PASSKEY,KV,CHAT[,DIALOG]")
    total = sum(parts)
    return tuple(x / total for x in parts[:3])


class StepSampler:
    def __init__(self, tokens: np.ndarray, tasks: TaskBuilder | None, seed: int,
                 task_mix: tuple[float, ...] = TASK_MIX):
        self.tokens = tokens
        self.tasks = tasks
        self.seed = seed
        self.mix = task_mix

    def text_window(self, rng: np.random.Generator, length: int) -> Sample:
        n = self.tokens.shape[0]
        if n < length + 1:
            reps = -(-(length + 1) // n)
            ids = np.tile(np.asarray(self.tokens, dtype=np.int64), reps)[: length + 1]
        else:
            start = int(rng.integers(0, n - length))
            ids = np.asarray(self.tokens[start:start + length + 1], dtype=np.int64)
        return Sample(ids, np.zeros(length, dtype=bool), "text")

    def step(self, step: int, phase: Phase, n_seqs: int) -> list[Sample]:
        rng = np.random.default_rng([self.seed, step])
        out = []
        for _ in range(n_seqs):
            if self.tasks is not None and rng.random() < phase.task_prob:
                u = rng.random()
                p, kv, chat = self.mix
                make = (self.tasks.passkey if u < p else self.tasks.kv_lookup if u < p + kv else
                        self.tasks.continuation if u < p + kv + chat or chat >= 1 - p - kv - 1e-12 else
                        self.tasks.dialog)
                out.append(make(rng, phase.seq_len))
            else:
                out.append(self.text_window(rng, phase.seq_len))
        return out
