"""Next-token sampling for a batch of sequences, each with its own SamplingParams.

Order (as in vLLM): structured-output grammar mask → allowed_token_ids → logit_bias → penalties →
min_tokens masking (not for grammar rows: the grammar decides when the output may end) →
bad_words (last, so that its rule, yield if nothing else would be left, sees every other ban) →
greedy (temperature 0) or temperature → top-k → top-p → min-p → draw. Logprobs report the model's
raw distribution (log-softmax of the unmodified logits), the convention OpenAI-compatible servers
follow.

The draw uses the exponential race: token = argmax(p / E) with E ~ Exp(1) i.i.d. per vocabulary
entry, which samples exactly from p. A seeded request draws its E from its own generator, one
vector per step, so its tokens depend only on its seed and its own logits — never on batch mates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .bad_words import banned_next
from .protocol import TokenLogprob
from .sequence import Sequence
from .structured import allowed_masks


@dataclass
class SampleResult:
    token_id: int
    logprob: TokenLogprob | None = None  # token text left empty; the engine fills it in
    dead_end: bool = False  # the grammar and allowed_token_ids left no token (token_id is meaningless)


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: list[int], seed: int = 0):
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.seed = seed
        self._shared_gen: dict[str, torch.Generator] = {}

    def _shared(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._shared_gen:
            self._shared_gen[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._shared_gen[key]

    @staticmethod
    def _own_generator(seq: Sequence, device: torch.device) -> torch.Generator:
        if seq.generator is None or seq.generator.device != device:
            # Completion i of a seeded request gets seed + i: n > 1 completions must differ.
            seq.generator = torch.Generator(device=device).manual_seed(seq.params.seed + seq.index)
        return seq.generator

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampleResult]:
        return self.launch(logits, seqs).results()

    def launch(self, logits: torch.Tensor, seqs: list[Sequence]) -> "PendingSample":
        """Enqueue the sampling of every row on the logits' device; read the results with
        `PendingSample.results()`. Nothing here waits for the device (host values go up through
        pinned buffers), so an engine can queue its next step before reading this one's tokens.
        If this or `results()` raises, the seeded rows' generators are put back as they were, so
        that a retry of the step draws what this attempt drew."""
        undo: dict = {}
        try:
            return self._launch(logits, seqs, undo)
        except BaseException:
            restore_generators(undo)
            raise

    @torch.no_grad()
    def _launch(self, logits: torch.Tensor, seqs: list[Sequence], undo: dict) -> "PendingSample":
        B, V = logits.shape
        device = logits.device
        if B == 0:
            return PendingSample(torch.empty(0, dtype=torch.long, device=device), None, [], [], 0)
        ps = [s.params for s in seqs]
        hidden = hidden_drafts(seqs)
        needs_min = [s.num_output_tokens - h < p.min_tokens and s.matcher is None for s, p, h in zip(seqs, ps, hidden)]
        plain_greedy = all(p.temperature == 0 and p.logprobs is None and not has_penalty(p)
                           and not _has_bias(p) for p in ps) and all(s.matcher is None and not s.bad_words
                                                                      for s in seqs)
        if plain_greedy and not any(needs_min):
            return PendingSample(logits.argmax(dim=-1), None, ps, [], 0)

        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(p.logprobs is not None for p in ps) else None
        logits = logits.clone()
        dead = []
        rows = [b for b, seq in enumerate(seqs) if seq.matcher is not None]
        if rows:  # grammar masks, all rows at once (in parallel on llguidance's pool)
            allowed = allowed_masks([seqs[b].matcher for b in rows], V)
            for k, b in enumerate(rows):
                ids = ps[b].allowed_token_ids
                if ids is not None and not allowed[k, list(ids)].any():
                    dead.append(b)  # checked on the host mask: nothing to sample in this row
            idx = upload(rows, torch.long, device)
            logits[idx] = logits[idx].masked_fill(~upload(allowed, torch.bool, device), -float("inf"))
        for b, (seq, p) in enumerate(zip(seqs, ps)):
            if _has_bias(p):
                logits[b] = apply_bias(logits[b], p)
            if has_penalty(p):
                logits[b] = apply_penalties(logits[b], seq, p, hidden[b])
            if needs_min[b]:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_token_ids)
                banned = [t for t in banned if 0 <= t < V]
                # Decided on the host: when allowed_token_ids holds only stop tokens, min_tokens
                # yields (banning them all would leave nothing to sample).
                if p.allowed_token_ids is not None and not set(p.allowed_token_ids) - set(banned):
                    banned = []
                if banned:
                    logits[b, upload(banned, torch.long, device)] = -float("inf")
            if seq.bad_words:
                output = seq.output_token_ids
                logits[b] = ban_bad_words(logits[b], banned_next(seq.bad_words, output[:len(output) - hidden[b]]))

        greedy_host = [p.temperature == 0 for p in ps]  # decided on the host: no GPU sync
        tokens = logits.argmax(dim=-1)
        if not all(greedy_host):
            greedy = upload(greedy_host, torch.bool, device)
            temp = upload([p.temperature if p.temperature > 0 else 1.0 for p in ps], torch.float32,
                           device).unsqueeze(1)
            probs = filter_probs(torch.softmax(logits / temp, dim=-1),
                                 top_k=[p.top_k for p in ps], top_p=[p.top_p for p in ps],
                                 min_p=[p.min_p for p in ps])
            race = torch.empty_like(probs).exponential_(generator=self._shared(device))
            for b, (seq, p) in enumerate(zip(seqs, ps)):
                if p.seed is not None and p.temperature > 0:
                    undo.update(generator_states([seq]))
                    race[b] = torch.empty(V, device=device).exponential_(generator=self._own_generator(seq, device))
            sampled = (probs / race).argmax(dim=-1)
            tokens = torch.where(greedy, tokens, sampled)

        lp = None
        kmax = 0
        if raw_logprobs is not None:
            kmax = max(p.logprobs or 0 for p in ps)
            chosen = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
            top_v, top_i = raw_logprobs.topk(kmax, dim=-1) if kmax else (None, None)
            lp = (chosen, top_v, top_i)
        return PendingSample(tokens, lp, ps, dead, kmax, undo)


def generator_states(seqs: list[Sequence]) -> dict:
    """Each sequence's seeded generator state (None: not made yet), for `restore_generators`."""
    return {s: None if s.generator is None else s.generator.get_state() for s in seqs}


def restore_generators(states: dict) -> None:
    """Undo the draws made since `generator_states`: a step that failed, or whose tokens are
    dropped, must leave a seeded request to draw the same numbers when it runs again."""
    for seq, state in states.items():
        if state is None:
            seq.generator = None  # made again from the seed when next needed
        else:
            seq.generator.set_state(state)


class PendingSample:
    """A batch's sampled tokens (and logprobs) on their way to the host.

    `tokens` stays on the device (the next step's inputs can be gathered from it). On CUDA the
    host copies are queued right behind the sampling, with an event after them, so `results()`
    waits for this step's work only, not for whatever was queued on the stream since."""

    def __init__(self, tokens: torch.Tensor, lp, params, dead: list[int], kmax: int, undo: dict | None = None):
        self.tokens = tokens
        self._undo = undo or {}  # the seeded generators' states before this sampling's draws
        self._params, self._dead, self._kmax = params, dead, kmax
        parts = [tokens] + ([t for t in lp if t is not None] if lp is not None else [])
        self._has_lp = lp is not None
        self._event = None
        if tokens.is_cuda:
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in parts]
            for h, t in zip(host, parts):
                h.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            parts = host
        self._host = parts

    def results(self) -> list[SampleResult]:
        try:
            return self._results()
        except BaseException:
            restore_generators(self._undo)
            raise

    def _results(self) -> list[SampleResult]:
        if self._event is not None:
            self._event.synchronize()
        token_list = self._host[0].tolist()
        results = [SampleResult(t) for t in token_list]
        for b in self._dead:
            results[b].dead_end = True
        if self._has_lp:
            chosen = self._host[1].tolist()
            top_v = self._host[2].tolist() if self._kmax else None
            top_i = self._host[3].tolist() if self._kmax else None
            for b, p in enumerate(self._params):
                if p.logprobs is None:
                    continue
                top = [(top_i[b][j], "", top_v[b][j]) for j in range(p.logprobs)] if p.logprobs else []
                results[b].logprob = TokenLogprob(token_list[b], "", chosen[b], top)
        return results


def upload(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values (a list or a CPU tensor) on `device` without waiting for the device's queue: on
    CUDA through a pinned buffer (a pageable upload would synchronise the stream first)."""
    t = values if torch.is_tensor(values) else torch.tensor(values, dtype=dtype)
    t = t.to(dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _has_bias(p) -> bool:
    return bool(p.logit_bias) or p.allowed_token_ids is not None


def apply_bias(logits: torch.Tensor, p) -> torch.Tensor:
    """allowed_token_ids (every other token to -inf), then logit_bias added to its tokens' logits."""
    if p.allowed_token_ids is not None:
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep[upload(list(p.allowed_token_ids), torch.long, logits.device)] = True
        logits = logits.masked_fill(~keep, -float("inf"))
    if p.logit_bias:
        ids = upload(list(p.logit_bias), torch.long, logits.device)
        logits = logits.index_add(0, ids, upload(list(p.logit_bias.values()), logits.dtype, logits.device))
    return logits


def ban_bad_words(logits: torch.Tensor, banned: list[int]) -> torch.Tensor:
    """One row's logits with the bad words' next tokens at -inf, unless that would leave nothing
    to sample (allowed_token_ids, a grammar or min_tokens already banned the rest): then the row is
    left as it was, as min_tokens yields. Decided on the device: no sync."""
    if not banned:
        return logits
    masked = logits.index_fill(0, upload(banned, torch.long, logits.device), -float("inf"))
    return torch.where(torch.isfinite(masked).any(), masked, logits)


def has_penalty(p) -> bool:
    return p.presence_penalty != 0 or p.frequency_penalty != 0 or p.repetition_penalty != 1.0


def hidden_drafts(seqs: list[Sequence]) -> list[int]:
    """Per row, how many of its sequence's last tokens come after the row's position. A sequence
    verifying k drafts (speculative.py) is listed k + 1 times in position order; its row j samples
    what follows its tokens up to draft j, so the k − j drafts after it are not its history."""
    seen: dict = {}
    out = []
    for s in seqs:
        if s.num_draft:
            j = seen.get(s, 0)
            seen[s] = j + 1
            out.append(s.num_draft - j)
        else:
            out.append(0)
    return out


def apply_penalties(logits: torch.Tensor, seq: Sequence, p, hidden: int = 0) -> torch.Tensor:
    """Presence / frequency penalties over generated tokens; repetition penalty over prompt and
    generated tokens (divide positive logits, multiply negative ones), as vLLM defines them. The
    last `hidden` tokens are drafts after this row's position (hidden_drafts), not its history."""
    V = logits.shape[-1]
    end = len(seq.token_ids) - hidden
    out_ids = torch.tensor(seq.token_ids[seq.num_prompt_tokens:end], dtype=torch.long, device=logits.device)
    counts = torch.bincount(out_ids, minlength=V)[:V].to(logits.dtype)
    logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(logits.dtype)
    if p.repetition_penalty != 1.0:
        seen = torch.zeros(V, dtype=torch.bool, device=logits.device)
        seen[torch.tensor(seq.token_ids[:end], dtype=torch.long, device=logits.device)] = True
        rp = p.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
    return logits


def filter_probs(probs: torch.Tensor, top_k: list[int], top_p: list[float], min_p: list[float]) -> torch.Tensor:
    """Zero out what top-k / top-p / min-p exclude, row by row. The most likely token always stays."""
    B, V = probs.shape
    device = probs.device
    k_host = [min(k, V) if k and k > 0 else V for k in top_k]
    ks = upload(k_host, torch.long, device)
    tp = upload(top_p, probs.dtype, device)
    mp = upload(min_p, probs.dtype, device)
    if any(k < V for k in k_host) or any(p < 1 for p in top_p):  # host-side test: no GPU sync
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        rank = torch.arange(V, device=device).unsqueeze(0)
        sorted_p = sorted_p.masked_fill(rank >= ks.unsqueeze(1), 0.0)
        # top-p on the distribution top-k left (renormalised): drop a token once the mass
        # before it already reaches p.
        kept = sorted_p / sorted_p.sum(dim=-1, keepdim=True)
        drop = (kept.cumsum(dim=-1) - kept) >= tp.unsqueeze(1)
        drop[:, 0] = False
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(1, idx, sorted_p)
    if any(m > 0 for m in min_p):
        top = probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(probs < mp.unsqueeze(1) * top, 0.0)
    return probs
