"""The NSA reference model: a decoder-only transformer whose attention is Native Sparse Attention.

One plain PyTorch file, readable against the paper (arXiv 2502.11089 §3) and DESIGN.md §1:
RMSNorm → NSA attention (compressed / selected / window branches, sigmoid gates) → residual →
RMSNorm → SwiGLU MLP → residual. GQA: `num_kv_heads` groups share K/V and one block selection.

Two entry points share all the math in `NSAAttention`:
  * `forward(tokens)`: the whole sequence at once (training / prefill reference);
  * `step(tokens, cache)`: append tokens to a simple contiguous `ContiguousCache` and return their
    logits (the obviously-correct twin of the paged serving engine).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nsa_kernels.reference import compress_blocks, dense_attention, nsa_attention, num_compressed

from .config import NSAConfig


class RMSNorm(nn.Module):
    """x · rsqrt(mean(x²) + eps) · weight, computed in float32 (float64 for float64) and returned in
    x's dtype — `rms_norm_reference` written out. torch's `F.rms_norm` is that computation; on CUDA
    it is one fused kernel where the formula is about 9 (33 norms in a paper-1b decode step)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + δ, norm(h + δ)): a residual add and the RMSNorm that follows it. On CUDA (rows [T, N],
    no autograd) one Triton launch where the PyTorch form below is two (kernels/add_rms_norm.py,
    tested against it); the serving engine's layer loop uses it twice a layer."""
    if (h.is_cuda and h.dim() == 2 and delta.shape == h.shape and h.stride(-1) == 1 and delta.stride(-1) == 1
            and not (torch.is_grad_enabled() and (h.requires_grad or delta.requires_grad))):
        from nsa_kernels.add_rms_norm import add_rms_norm as fused

        return fused(h, delta, norm.weight, norm.eps)
    h = h + delta
    return h, norm(h)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """silu(g)·u for gu = [g | u] along the last dim (SwiGLU). On CUDA (rows [T, 2I], no autograd)
    one Triton launch where the PyTorch form below is two (kernels/silu_mul.py, tested against it)."""
    n = gu.shape[-1] // 2
    if gu.is_cuda and gu.dim() == 2 and gu.stride(-1) == 1 and not (torch.is_grad_enabled() and gu.requires_grad):
        from nsa_kernels.silu_mul import silu_mul as fused

        return fused(gu)
    return F.silu(gu[..., :n]) * gu[..., n:]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`RMSNorm`'s obviously-correct twin (the tests compare them)."""
    xf = x.double() if x.dtype == torch.float64 else x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.to(xf.dtype)).to(x.dtype)


class Rope:
    """Rotate-half RoPE tables for one set of positions: cos and signed sin [T, 1, D] in the
    compute dtype (float64 for float64 inputs, else float32), angles in float64.

    Built once per forward and shared by every layer and by q and k: built inside `apply_rope`
    instead, a 16-layer decode step spent ~26 launches a layer on them, float64 cos/sin among
    them (0.27 ms of a 9.4 ms paper-1b step at batch 4 on the H200, scripts/profile_engine_decode.py).
    rotate_half(x)·sin = cat(x2, x1)·sin_signed with sin_signed = cat(−sin, sin): the same bits."""

    def __init__(self, positions: torch.Tensor, dim: int, theta: float, dtype: torch.dtype,
                 device: torch.device | None = None):
        device = positions.device if device is None else device
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim))
        ang = positions.to(device=device, dtype=torch.float64).unsqueeze(1) * inv_freq  # [T, D/2]
        self.dtype = torch.float64 if dtype == torch.float64 else torch.float32
        cos, sin = ang.cos(), ang.sin()
        self.cos = torch.cat([cos, cos], -1).unsqueeze(1).to(self.dtype)
        self.sin = torch.cat([-sin, sin], -1).unsqueeze(1).to(self.dtype)
        self.dim = dim

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H, D] → x rotated by its positions' angles, in x's dtype."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"RoPE table is for head dim {self.dim}, got {x.shape[-1]}")
        if self._kernel_applies(x):
            from nsa_kernels.rope import rope_rotate  # one launch instead of six (kernels/rope.py)

            return rope_rotate(x, self.cos, self.sin)
        return self.rotate_reference(x)

    def rotate_and_sigmoid(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(x), sigmoid(g)) for g [T, NG]: one launch where the kernel applies (the gates'
        logits ride along with the rotation, kernels/rope.py says why), else the two ops."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"RoPE table is for head dim {self.dim}, got {x.shape[-1]}")
        if self._kernel_applies(x) and self._kernel_applies(g) and g.dim() == 2:
            from nsa_kernels.rope import rope_rotate_and_sigmoid

            return rope_rotate_and_sigmoid(x, self.cos, self.sin, g)
        return self(x), torch.sigmoid(g)

    def rotate_sigmoid_write(self, x: torch.Tensor, g: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             v: torch.Tensor, slots: torch.Tensor, write_pair) -> tuple[torch.Tensor, torch.Tensor]:
        """`rotate_and_sigmoid(x, g)`, and the keys (x's last Hkv heads, rotated) and values v
        stored into the caches at slots: in the same launch where the kernel applies
        (kernels/rope.py says why), else by `write_pair(k_cache, v_cache, keys, v, slots)` after."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"RoPE table is for head dim {self.dim}, got {x.shape[-1]}")
        if (self._kernel_applies(x) and self._kernel_applies(g) and g.dim() == 2 and k_cache.is_cuda
                and v.stride(-1) == 1):
            from nsa_kernels.rope import rope_rotate_sigmoid_write

            return rope_rotate_sigmoid_write(x, self.cos, self.sin, g, k_cache, v_cache, v, slots)
        rot, sig = self.rotate_and_sigmoid(x, g)
        write_pair(k_cache, v_cache, rot[:, x.shape[1] - v.shape[1]:], v, slots)
        return rot, sig

    def _kernel_applies(self, x: torch.Tensor) -> bool:
        # The kernel has no backward: training (autograd on x) keeps the PyTorch ops.
        return (x.is_cuda and self.dtype == torch.float32 and x.stride(-1) == 1
                and not (torch.is_grad_enabled() and x.requires_grad))

    def rotate_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The rotation in PyTorch ops: CPU, float64, and the twin of the CUDA kernel."""
        xf = x.to(self.dtype)
        D = self.dim
        swapped = torch.cat([xf[..., D // 2:], xf[..., : D // 2]], -1)
        return (xf * self.cos + swapped * self.sin).to(x.dtype)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE over the whole head dim. x: [T, H, D], positions: [T]."""
    return Rope(positions, x.shape[-1], theta, x.dtype, x.device)(x)


class Compressor(nn.Module):
    """φ: maps one compression block of l tokens [.., l, D] to a single summary [.., D].

    mlp    — the paper's learnable MLP with an intra-block position embedding: (x + pe) flattened,
             Linear(l·D → D), SiLU, Linear(D → D).
    linear — (x + pe) flattened, Linear(l·D → D).
    mean   — mean pooling, no parameters (the fla library's choice).
    The position embedding is used for keys only (`use_pos=True`); values are pooled as they are.
    """

    def __init__(self, variant: str, block: int, dim: int, use_pos: bool):
        super().__init__()
        self.variant = variant
        if variant == "mean":
            return
        self.pos = nn.Parameter(torch.zeros(block, dim)) if use_pos else None
        self.proj = nn.Linear(block * dim, dim, bias=False)
        if variant == "mlp":
            self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        if self.variant == "mean":
            return blocks.mean(dim=-2)
        x = blocks + self.pos if self.pos is not None else blocks
        h = self.proj(x.flatten(-2))
        if self.variant == "mlp":
            h = self.out(F.silu(h))
        return h


class Gate(nn.Module):
    """Per-query-head sigmoid gates (compressed, selected, window) from the layer input."""

    def __init__(self, form: str, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        if form == "mlp":
            self.net = nn.Sequential(nn.Linear(hidden, hidden, bias=False), nn.SiLU(),
                                     nn.Linear(hidden, 3 * heads, bias=True))
        else:
            self.net = nn.Linear(hidden, 3 * heads, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x)).view(*x.shape[:-1], self.heads, 3)


BRANCHES = ("cmp", "slc", "win")


class NSAAttention(nn.Module):
    def __init__(self, cfg: NSAConfig):
        super().__init__()
        self.cfg = cfg
        H, Hkv, Dk, Dv = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim_k, cfg.head_dim_v
        self.q_proj = nn.Linear(cfg.hidden_size, H * Dk, bias=False)
        # Shared: one K/V for every branch. Independent: each branch its own (paper §3.3.3 note).
        names = ("",) if cfg.shared_kv else tuple(f"_{b}" for b in BRANCHES)
        for suffix in names:
            setattr(self, f"k_proj{suffix}", nn.Linear(cfg.hidden_size, Hkv * Dk, bias=False))
            setattr(self, f"v_proj{suffix}", nn.Linear(cfg.hidden_size, Hkv * Dv, bias=False))
        self.o_proj = nn.Linear(H * Dv, cfg.hidden_size, bias=False)
        self.phi_k = Compressor(cfg.phi, cfg.cmp_block, Dk, use_pos=True)
        self.phi_v = Compressor(cfg.phi, cfg.cmp_block, Dv, use_pos=False)
        self.gate = Gate(cfg.gate, cfg.hidden_size, H)

    # -- pieces the serving engine reuses -------------------------------------------------------
    def rope(self, positions: torch.Tensor, x: torch.Tensor) -> Rope:
        """The RoPE tables `project` uses for x's dtype and device (build once, pass to every layer)."""
        return Rope(positions, self.cfg.head_dim_k, self.cfg.rope_theta, x.dtype, x.device)

    def project(self, x: torch.Tensor, positions: torch.Tensor, rope: Rope | None = None):
        """x [T, hidden] → q [T, H, Dk] (RoPE'd), {branch: (k [T, Hkv, Dk] RoPE'd, v [T, Hkv, Dv])}.

        With shared K/V every branch maps to the same pair of tensors. `rope`: tables for these
        positions (`self.rope`), built here when not given.
        """
        c = self.cfg
        T = x.shape[0]
        rope = rope if rope is not None else self.rope(positions, x)
        q = rope(self.q_proj(x).view(T, c.num_heads, c.head_dim_k))
        if c.shared_kv:
            k = rope(self.k_proj(x).view(T, c.num_kv_heads, c.head_dim_k))
            v = self.v_proj(x).view(T, c.num_kv_heads, c.head_dim_v)
            return q, {b: (k, v) for b in BRANCHES}
        kv = {}
        for b in BRANCHES:
            k = getattr(self, f"k_proj_{b}")(x).view(T, c.num_kv_heads, c.head_dim_k)
            v = getattr(self, f"v_proj_{b}")(x).view(T, c.num_kv_heads, c.head_dim_v)
            kv[b] = (rope(k), v)
        return q, kv

    def fuse_projections(self) -> None:
        """For inference: one GEMM makes q, every K/V projection and (linear gates) the gate logits.

        The weights are concatenated once, q first, then the keys, then the values, then the gate,
        and the original Linear layers' weights become views into that buffer: the same values,
        no second copy, and `project` / `gate` (the reference path) still read them. A decode
        step of paper-1b made 3–9 small GEMMs a layer here (plus cuBLAS's split-K reductions);
        `project_and_gate` makes one. Idempotent."""
        if getattr(self, "_fused", None) is not None:
            return
        c = self.cfg
        names = ("",) if c.shared_kv else tuple(f"_{b}" for b in BRANCHES)
        mods = ([self.q_proj] + [getattr(self, f"k_proj{s}") for s in names]
                + [getattr(self, f"v_proj{s}") for s in names])
        gate = self.gate.net if isinstance(self.gate.net, nn.Linear) else None
        if gate is not None:
            mods.append(gate)
        with torch.no_grad():
            weight = torch.cat([m.weight for m in mods])
            bias = None
            if gate is not None:  # the gate's bias; the projections have none (zeros add nothing)
                bias = torch.cat([weight.new_zeros(weight.shape[0] - gate.weight.shape[0]), gate.bias])
                gate.bias.data = bias[-gate.weight.shape[0]:]
            start = 0
            for m in mods:
                n = m.weight.shape[0]
                m.weight.data = weight[start:start + n]
                start += n
        self._fused = (weight, bias, len(names), gate is not None)

    def project_and_gate(self, x: torch.Tensor, positions: torch.Tensor, rope: Rope | None = None,
                         write=None):
        """`project(x, positions, rope)` and `gate(x)` together: (q, kv, gates). After
        `fuse_projections` they come from one GEMM and q and the keys are rotated in one RoPE call
        (same values up to the GEMM's float rounding: tests compare the two); else the two calls.

        `write` = (k_cache, v_cache, slots, write_pair): also store the selection branch's keys
        and values (with shared K/V, every branch's) at slots, as `write_pair(k_cache, v_cache, k,
        v, slots)` would. With shared K/V and the fused gates the RoPE launch does it (one launch
        a layer fewer in the engine's decode step); otherwise `write_pair` is called."""
        fused = getattr(self, "_fused", None)
        rope = rope if rope is not None else self.rope(positions, x)
        if fused is None:
            q, kv = self.project(x, positions, rope)
            if write is not None:
                k_cache, v_cache, slots, write_pair = write
                write_pair(k_cache, v_cache, *kv["slc"], slots)
            return q, kv, self.gate(x)
        weight, bias, nkv, has_gate = fused
        c = self.cfg
        T, H, Hkv, Dk, Dv = x.shape[0], c.num_heads, c.num_kv_heads, c.head_dim_k, c.head_dim_v
        y = F.linear(x, weight, bias)
        n_qk = (H + nkv * Hkv) * Dk
        v0 = n_qk
        vs = [y[:, v0 + i * Hkv * Dv:v0 + (i + 1) * Hkv * Dv].view(T, Hkv, Dv) for i in range(nkv)]
        qk_in, g = y[:, :n_qk].view(T, H + nkv * Hkv, Dk), y[:, v0 + nkv * Hkv * Dv:]
        in_rope = write is not None and has_gate and nkv == 1
        if in_rope:  # the sigmoid and the K/V write in the RoPE launch
            k_cache, v_cache, slots, write_pair = write
            qk, gates = rope.rotate_sigmoid_write(qk_in, g, k_cache, v_cache, vs[0], slots, write_pair)
        elif has_gate:  # the gates' sigmoid in the RoPE launch (kernels/rope.py says why)
            qk, gates = rope.rotate_and_sigmoid(qk_in, g)
        else:
            qk, gates = rope(qk_in), self.gate(x)
        gates = gates.view(T, H, 3)
        q = qk[:, :H]
        ks = [qk[:, H + i * Hkv:H + (i + 1) * Hkv] for i in range(nkv)]
        if nkv == 1:
            kv = {b: (ks[0], vs[0]) for b in BRANCHES}
        else:
            kv = {b: (ks[i], vs[i]) for i, b in enumerate(BRANCHES)}
        if write is not None and not in_rope:
            k_cache, v_cache, slots, write_pair = write
            write_pair(k_cache, v_cache, *kv["slc"], slots)
        return q, kv, gates

    def fuse_phi(self) -> None:
        """For inference: φ_K and φ_V (mlp / linear) as one batched GEMM chain, `phi_pair`.

        Each token's D-wide row is zero-padded to Dm = max(Dk, Dv), so both φs take [l·Dm] inputs
        and give [Dm] outputs and stack into [2, l·Dm, Dm] (and [2, Dm, Dm]) weights; the zero rows
        and columns add nothing, and padded outputs stay zero through SiLU. The keys' intra-block
        position embedding is folded into a bias: W·flatten(x + pe) = W·flatten(x) + W·flatten(pe).
        A decode step then makes 4 launches for φ per layer (`gather_block_pair`, a batched GEMM
        with the bias, SiLU, a batched GEMM) instead of 9. The stacked weights are copies (the
        padding), ~4.7 MB a layer at the paper shape; the reference `phi_k` / `phi_v` are unchanged.
        φ = mean has no weights to stack: `phi_pair` stays unavailable. Idempotent; because the
        stack is a copy, weights changed in place afterwards (a checkpoint loaded into the fused
        model) make `has_phi_pair` False until it is called again."""
        if self.has_phi_pair or self.phi_k.variant == "mean":
            return
        c = self.cfg
        lb, dm = c.cmp_block, max(c.head_dim_k, c.head_dim_v)
        w1 = self.phi_k.proj.weight
        with torch.no_grad():
            W1 = w1.new_zeros(2, dm, lb, dm)  # [which, out, token, in]
            acc = torch.promote_types(w1.dtype, torch.float32)  # the folded bias: at least fp32 sums
            bias = torch.zeros(2, 1, dm, dtype=acc, device=w1.device)
            W2 = w1.new_zeros(2, dm, dm) if self.phi_k.variant == "mlp" else None
            for i, phi in enumerate((self.phi_k, self.phi_v)):
                d = phi.proj.weight.shape[0]
                W1[i, :d, :, :d] = phi.proj.weight.view(d, lb, d)
                if phi.pos is not None:
                    bias[i, 0, :d] = phi.proj.weight.to(acc) @ phi.pos.to(acc).flatten()
                if W2 is not None:
                    W2[i, :d, :d] = phi.out.weight
            W1t = W1.view(2, dm, lb * dm).transpose(1, 2).contiguous()  # [2, l·Dm, Dm]: x @ W
            W2t = W2.transpose(1, 2).contiguous() if W2 is not None else None
        self._phi_fused = (W1t, bias.to(w1.dtype), W2t, self._phi_versions())

    def _phi_versions(self) -> tuple[int, ...]:
        """In-place writes to φ's parameters (load_state_dict, optimiser steps) bump these."""
        return tuple(t._version for t in (*self.phi_k.parameters(), *self.phi_v.parameters()))

    def phi_pair(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """φ_K and φ_V of M blocks each, after `fuse_phi`: x [2, M, l·Dm] (the layout of
        `nsa_kernels.cache_write.gather_block_pair`) → ([M, Dk], [M, Dv])."""
        if not self.has_phi_pair:
            raise RuntimeError("phi_pair needs fuse_phi() after φ's weights last changed")
        W1t, bias, W2t, _ = self._phi_fused
        h = torch.baddbmm(bias, x, W1t)
        if W2t is not None:
            h = torch.bmm(F.silu(h), W2t)
        return h[0, :, :self.cfg.head_dim_k], h[1, :, :self.cfg.head_dim_v]

    def phi_pair_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`fuse_phi`'s stacked weights (W1 [2, l·Dm, Dm], bias [2, 1, Dm], W2 [2, Dm, Dm] or None
        for φ = linear): what `phi_pair` multiplies by, for kernels that run the same products
        (nsa_kernels.phi_decode)."""
        if not self.has_phi_pair:
            raise RuntimeError("phi_pair_weights needs fuse_phi() after φ's weights last changed")
        return self._phi_fused[:3]

    @property
    def has_phi_pair(self) -> bool:
        """`phi_pair` is built and φ's weights have not changed since."""
        fused = getattr(self, "_phi_fused", None)
        return fused is not None and fused[3] == self._phi_versions()

    def compress(self, k_raw: torch.Tensor, v_raw: torch.Tensor, first: int, count: int):
        """Summaries for compressed entries first … first+count−1 from the compression branch's raw
        K/V (post-RoPE keys, positions 0 … covering those blocks). Returns ([count, Hkv, Dk], [.., Dv])."""
        c = self.cfg
        start, end = first * c.cmp_stride, (first + count - 1) * c.cmp_stride + c.cmp_block
        kb = compress_blocks(k_raw[start:end], c.cmp_block, c.cmp_stride)  # [count, Hkv, l, Dk]
        vb = compress_blocks(v_raw[start:end], c.cmp_block, c.cmp_stride)
        return self.phi_k(kb), self.phi_v(vb)

    def attend(self, q, positions, kc, vc, kv_slc, kv_win, gates, dense: bool = False):
        if dense:  # like-for-like baseline: plain causal attention over the selection K/V
            return dense_attention(q, positions, kv_slc[0], kv_slc[1])
        return nsa_attention(q, positions, kc, vc, kv_slc[0], kv_slc[1], kv_win[0], kv_win[1],
                             gates, self.cfg.sparsity)

    def output(self, o: torch.Tensor) -> torch.Tensor:
        return self.o_proj(o.reshape(o.shape[0], -1))

    # -- whole sequence ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        q, kv = self.project(x, positions)
        n = num_compressed(x.shape[0], c.cmp_block, c.cmp_stride)
        kc, vc = self.compress(*kv["cmp"], 0, n) if n else self._empty_summaries(x)
        o = self.attend(q, positions, kc, vc, kv["slc"], kv["win"], self.gate(x))
        return self.output(o)

    def _empty_summaries(self, x):
        c = self.cfg
        return (x.new_zeros(0, c.num_kv_heads, c.head_dim_k), x.new_zeros(0, c.num_kv_heads, c.head_dim_v))


class MLP(nn.Module):
    def __init__(self, cfg: NSAConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def fuse(self) -> None:
        """For inference: gate_proj and up_proj as one GEMM (`forward_fused`); their weights become
        views into the concatenated buffer, so `forward` is unchanged. Idempotent."""
        if getattr(self, "_gate_up", None) is not None:
            return
        with torch.no_grad():
            weight = torch.cat([self.gate_proj.weight, self.up_proj.weight])
            n = self.gate_proj.weight.shape[0]
            self.gate_proj.weight.data, self.up_proj.weight.data = weight[:n], weight[n:]
        self._gate_up = weight

    def forward_fused(self, x):
        """`forward` with one GEMM for gate and up after `fuse` (same values up to float rounding)."""
        if getattr(self, "_gate_up", None) is None:
            return self.forward(x)
        return self.down_proj(silu_mul(F.linear(x, self._gate_up)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: NSAConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = NSAAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)


class ContiguousCache:
    """A single sequence's K/V and summaries in plain growing tensors (the reference cache).

    Per layer: raw K/V for each distinct branch tensor (one set when K/V are shared, three when
    independent) and the compressed summaries made so far.
    """

    def __init__(self, cfg: NSAConfig):
        self.cfg = cfg
        self.length = 0
        self.layers: list[dict] = [dict() for _ in range(cfg.num_layers)]

    def append(self, layer: int, kv: dict, kc: torch.Tensor | None, vc: torch.Tensor | None):
        store = self.layers[layer]
        for b, (k, v) in kv.items():
            if b in store:
                store[b] = (torch.cat([store[b][0], k]), torch.cat([store[b][1], v]))
            else:
                store[b] = (k, v)
        if kc is not None:
            if "summaries" in store:
                store["summaries"] = (torch.cat([store["summaries"][0], kc]), torch.cat([store["summaries"][1], vc]))
            else:
                store["summaries"] = (kc, vc)


class NSAModel(nn.Module):
    def __init__(self, cfg: NSAConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def init_weights(self, seed: int = 0) -> "NSAModel":
        """Small-normal initialisation, reproducible from `seed` (for random models and training)."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif ".pos" in name or name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else 1
                std = 0.02 if name.startswith("embed") else 1.0 / math.sqrt(fan_in)
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(h))

    def head(self, hn: torch.Tensor) -> torch.Tensor:
        """Logits of the final-normed hidden states (`logits` without the norm)."""
        return hn @ self.embed.weight.t() if self.lm_head is None else self.lm_head(hn)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Whole-sequence forward: tokens [S] → logits [S, vocab]."""
        positions = torch.arange(tokens.shape[0], device=tokens.device)
        h = self.embed(tokens)
        for layer in self.layers:
            h = h + layer.attn(layer.attn_norm(h), positions)
            h = h + layer.mlp(layer.mlp_norm(h))
        return self.logits(h)

    def fuse_for_inference(self) -> "NSAModel":
        """Concatenate each layer's input projections (NSAAttention.fuse_projections, MLP.fuse)
        for the serving engine's `project_and_gate` / `forward_fused`, and stack φ_K and φ_V for
        `phi_pair` (NSAAttention.fuse_phi); the reference paths are unchanged. Idempotent."""
        for layer in self.layers:
            layer.attn.fuse_projections()
            layer.attn.fuse_phi()
            layer.mlp.fuse()
        return self

    def new_cache(self) -> ContiguousCache:
        return ContiguousCache(self.cfg)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache: ContiguousCache) -> torch.Tensor:
        """Append `tokens` [T] to the sequence held by `cache`; return their logits [T, vocab]."""
        c = self.cfg
        start, T = cache.length, tokens.shape[0]
        if start + T > c.max_position_embeddings:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_position_embeddings "
                             f"({c.max_position_embeddings})")
        positions = torch.arange(start, start + T, device=tokens.device)
        n_old, n_new = (num_compressed(n, c.cmp_block, c.cmp_stride) for n in (start, start + T))
        h = self.embed(tokens)
        for li, layer in enumerate(self.layers):
            attn = layer.attn
            x = layer.attn_norm(h)
            q, kv = attn.project(x, positions)
            cache.append(li, {b: kv[b] for b in _distinct(kv)}, None, None)
            store = cache.layers[li]
            full = {b: store[b] if b in store else store["cmp"] for b in BRANCHES}
            if n_new > n_old:
                cache.append(li, {}, *attn.compress(*full["cmp"], n_old, n_new - n_old))
            kc, vc = store.get("summaries") or attn._empty_summaries(x)
            o = attn.attend(q, positions, kc, vc, full["slc"], full["win"], attn.gate(x))
            h = h + attn.output(o)
            h = h + layer.mlp(layer.mlp_norm(h))
        cache.length = start + T
        return self.logits(h)


def _distinct(kv: dict) -> list[str]:
    """Branch names whose K/V tensors are distinct (just 'cmp' when all branches share one)."""
    seen, names = [], []
    for b, pair in kv.items():
        if not any(pair[0] is s for s in seen):
            seen.append(pair[0])
            names.append(b)
    return names
