"""Gated softmax + Krause attention for Llama-style Hugging Face models (built by ``krausify``).

For layer input h (B, T, D), with rotary embeddings R_t applied to queries and keys (GQA: each of the
H query heads reads the key/value head of its group):

  softmax branch  a^s_ij = softmax_j(⟨R_i q_i, R_j k_j⟩/√d_head) on j ≤ i    the original attention,
                  o^s = W_o [Σ_j a^s_ij v_j]_heads                          with the original weights
  Krause branch   s_ij = −‖R_i q'_i − R_j k'_j‖² / (2σ_h²), σ_h per query head (log σ parameter),
                  N(i) = the top_k largest s_ij among keys i − window < j ≤ i (and not padding),
                  a^K_ij = exp(s_ij) / Σ_{l∈N(i)} exp(s_il) on N(i), 0 elsewhere,
                  o^K = W'_o [Σ_j a^K_ij v'_j]_heads;  q', k', v', W'_o start as copies of the originals
  gate            g_i = softmax(W_g [o^s_i; o^K_i] + b),  W_g ~ N(0, 0.01²), b = (log(p/(1−p)), 0)
  output          o_i = g_i0 o^s_i + g_i1 o^K_i

At initialisation g_i ≈ (p, 1 − p) (p = 0.8: 80 % softmax). The module returns (o, Σ_b g_ib a^b_ij)
(the gate-weighted mixture is what ``outputs.attentions`` holds); hook points ``hook_pattern``
(mixture), ``hook_gate`` (B, T, 2), ``softmax.hook_pattern`` and ``krause.hook_pattern`` (each branch).

Differences from the official Krause-Llama code, on purpose: the copies keep the original's bias
setting (the official module adds randomly initialised q/k/v biases to both branches when the base
model has none, so its softmax branch is not the original attention at initialisation); top-k keeps
exactly k keys (the official threshold keeps ties); the Krause branch has no key/value cache, so
cached decoding is refused (``generate(use_cache=False)`` works).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb, repeat_kv

from .hooks import HookPoint


def krause_scores(q: torch.Tensor, k: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """s_ij = −‖q_i − k_j‖² / (2σ_h²) for q (B, H, T, d), k (B, H, S, d), log σ (H, 1, 1); in float32
    at least (half-precision models as in the official code; float64 stays float64)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k = q.to(dtype), k.to(dtype)
    sq = (q * q).sum(-1, keepdim=True) + (k * k).sum(-1).unsqueeze(-2) - 2 * (q @ k.transpose(-2, -1))
    return -sq.clamp_min(0) / (2 * torch.exp(2 * log_sigma.to(dtype)))


def mask_support(attention_mask, T: int) -> torch.Tensor | None:
    """Keys visible under a Hugging Face attention mask (4-D additive float or boolean), or None."""
    if attention_mask is None or attention_mask.ndim != 4:
        return None
    m = attention_mask[..., :T, :T]
    return m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2


def krause_weights(s: torch.Tensor, keep: torch.Tensor, top_k: int) -> torch.Tensor:
    """Softmax over the top_k largest scores among the kept keys; exactly 0 elsewhere."""
    s = s.masked_fill(~keep, torch.finfo(s.dtype).min)
    if top_k >= s.shape[-1]:
        return F.softmax(s, dim=-1).masked_fill(~keep, 0.0)
    top, idx = s.topk(top_k, dim=-1)  # a row with fewer than top_k kept keys picks masked ones: 0 below
    return torch.zeros_like(s).scatter(-1, idx, F.softmax(top, dim=-1)).masked_fill(~keep, 0.0)


def window_blocks(x: torch.Tensor, w: int) -> torch.Tensor:
    """Rows of x (..., T, d) in blocks of w, each with the w rows before it: (..., ⌈T/w⌉, 2w, d)
    (zeros before row 0 and after row T − 1). Block b holds keys (b − 1)w … (b + 1)w − 1, which are all
    that a causal window of w sees from the queries bw … (b + 1)w − 1."""
    T = x.shape[-2]
    nb = -(-T // w)
    x = F.pad(x, (0, 0, w, nb * w - T))  # (..., (nb + 1) w, d)
    before, own = x[..., :-w, :].unflatten(-2, (nb, w)), x[..., w:, :].unflatten(-2, (nb, w))
    return torch.cat([before, own], -2)


def block_support(T: int, w: int, keep: torch.Tensor | None, device=None) -> torch.Tensor:
    """The causal window of w in block form (⌈T/w⌉, w, 2w): query r of block b sees block column c iff
    r < c ≤ r + w and the key (b − 1)w + c exists; ``keep`` (…, T, T) (padding) is cut into the same
    blocks."""
    nb = -(-T // w)
    r = torch.arange(w, device=device)[:, None]
    c = torch.arange(2 * w, device=device)[None, :]
    key = torch.arange(nb, device=device)[:, None, None] * w - w + c  # absolute key index
    support = (c > r) & (c <= r + w) & (key >= 0) & (key < T)
    if keep is None:
        return support
    padded = F.pad(keep, (w, (nb + 1) * w - T - w, 0, nb * w - T))  # (…, nb w, (nb + 1) w)
    blocks = torch.stack([padded[..., b * w : (b + 1) * w, b * w : (b + 2) * w] for b in range(nb)], -3)
    return support & blocks


def blocks_to_dense(a: torch.Tensor, T: int) -> torch.Tensor:
    """Weights in block form (..., nb, w, 2w) → the (..., T, T) matrix they stand for."""
    *lead, nb, w, _ = a.shape
    dense = a.new_zeros(*lead, nb * w, (nb + 1) * w)
    for b in range(nb):
        dense[..., b * w : (b + 1) * w, b * w : (b + 2) * w] = a[..., b, :, :]
    return dense[..., :T, w : w + T]


class KrauseBranch(nn.Module):
    """The Krause branch: its own q/k/v/o projections (copies), per-head log σ, window, top-k."""

    kind = "krause"

    def __init__(self, attn: LlamaAttention, *, window: int, top_k: int, sigma: float):
        super().__init__()
        cfg = attn.config
        self.n_heads, self.d_head = cfg.num_attention_heads, attn.head_dim
        self.window, self.top_k, self.causal = int(window), int(top_k), True
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, copy.deepcopy(getattr(attn, name)))
        p = attn.q_proj.weight
        self.log_sigma = nn.Parameter(
            torch.full((self.n_heads, 1, 1), math.log(sigma), dtype=p.dtype, device=p.device)
        )
        self.hook_pattern = HookPoint()

    @property
    def sigma(self) -> torch.Tensor:
        """σ per query head, shape (H,)."""
        return self.log_sigma.detach().exp().reshape(-1)

    def extra_repr(self) -> str:
        return f"window={self.window}, top_k={self.top_k}, n_heads={self.n_heads}"


class BranchHooks(nn.Module):
    """The softmax branch's hook point (its projections are the original module's own)."""

    kind = "softmax"

    def __init__(self):
        super().__init__()
        self.hook_pattern = HookPoint()


class KrauseLlamaAttention(LlamaAttention):
    """Gated hybrid of the original Llama attention and a Krause branch (see the module docstring)."""

    kind = "hybrid"

    def __init__(self, attn: LlamaAttention, *, window: int, top_k: int, sigma: float, gate: float):
        nn.Module.__init__(self)
        # the original module's attributes and projections (softmax branch), shared, not copied;
        # private ones too (e.g. the `_kernel_funcs` that newer transformers' forward wrapper reads),
        # but not nn.Module's own bookkeeping, which __init__ just created
        module_state = set(vars(self))
        for key, value in vars(attn).items():
            if key not in module_state:
                setattr(self, key, value)
        for name, module in attn.named_children():
            setattr(self, name, module)
        self.n_heads = attn.config.num_attention_heads
        self.softmax = BranchHooks()
        self.krause = KrauseBranch(attn, window=window, top_k=top_k, sigma=sigma)
        D = attn.config.hidden_size
        p = attn.o_proj.weight
        self.gate = nn.Linear(2 * D, 2, bias=True, dtype=p.dtype, device=p.device)
        with torch.no_grad():
            nn.init.normal_(self.gate.weight, std=0.01)
            self.gate.bias.copy_(torch.tensor([math.log(gate / (1 - gate)), 0.0]))
        self.hook_pattern = HookPoint()
        self.hook_gate = HookPoint()

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        kwargs.pop("past_key_values", None)
        if cache is not None and cache.get_seq_length(self.layer_idx) > 0:
            raise NotImplementedError(
                "the Krause branch keeps no key/value cache: decode with use_cache=False"
            )
        o_s, a_s = super().forward(hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
        # the (B, H, T, T) weights only when somebody reads them
        dense = a_s is not None or any(
            m._forward_hooks or m._forward_pre_hooks for m in (self.hook_pattern, self.krause.hook_pattern)
        )
        o_k, a_k = self.krause_branch(hidden_states, position_embeddings, attention_mask, dense)
        g = self.hook_gate(F.softmax(self.gate(torch.cat([o_s, o_k], -1)), dim=-1))
        out = g[..., :1] * o_s + g[..., 1:] * o_k
        a = None
        if a_s is not None:
            a_s = self.softmax.hook_pattern(a_s)
            a = self.hook_pattern(g[:, None, :, :1] * a_s + g[:, None, :, 1:] * a_k.to(a_s.dtype))
        return out, a

    def krause_branch(self, h, position_embeddings, attention_mask=None, dense: bool = True):
        """(o^K (B, T, D), a^K (B, H, T, T), or None when ``dense`` is False). The scores are computed
        in blocks of w = min(window, T) queries against the 2w keys their windows can reach (T·2w
        scores, not T²)."""
        kb = self.krause
        B, T, _ = h.shape
        shape = (B, T, -1, self.head_dim)
        q = kb.q_proj(h).view(shape).transpose(1, 2)
        k = kb.k_proj(h).view(shape).transpose(1, 2)
        v = kb.v_proj(h).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups)
        w = min(kb.window, T)
        keep = block_support(T, w, mask_support(attention_mask, T), h.device)
        q_blocks = F.pad(q, (0, 0, 0, -T % w)).unflatten(-2, (-1, w))  # (B, H, nb, w, d)
        s = krause_scores(q_blocks, window_blocks(k, w), kb.log_sigma[..., None])
        a = krause_weights(s, keep, kb.top_k)  # (B, H, nb, w, 2w)
        o = (a.to(v.dtype) @ window_blocks(v, w)).flatten(2, 3)[:, :, :T]
        o = kb.o_proj(o.transpose(1, 2).reshape(B, T, -1))
        return o, (kb.hook_pattern(blocks_to_dense(a, T)) if dense else None)

    def extra_repr(self) -> str:
        return f"hybrid softmax + krause (window={self.krause.window}, top_k={self.krause.top_k})"
