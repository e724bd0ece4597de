"""Multi-head attention modules: softmax, Krause (RBF + locality + top-k) and the gated hybrid.

For head h with projections q_i = W_q x_i, k_j = W_k x_j, v_j = W_v x_j (each d_head wide):

* softmax:  s_ij = ⟨q_i, k_j⟩ / √d_head
* Krause:   s_ij = −‖q_i − k_j‖² / (2σ_h²),   σ_h = exp(log σ_h) learnable (per head or per layer)

Support N(i) (both kinds accept every restriction, which is how the ablations are built):
locality — ``grid=(h, w)``: 4-neighbour patch grid plus the CLS row/column (token 0), or
``causal=True`` with ``window=w``: 0 ≤ i − j < w (keys i − w < j ≤ i) — then ``top_k``: the k
largest s_ij inside the locality support. Weights a_ij = exp(s_ij) / Σ_{l∈N(i)} exp(s_il) on N(i),
exactly 0 elsewhere; output o_i = W_o [Σ_j a_ij v_j]_heads.

``forward(x, return_attention=True)`` also returns a (B, H, T, T). The weights pass through the hook
point ``attn.hook_pattern`` (``particles.nn.hooks``: TransformerLens names; read them with
``hooks.capture``); the module keeps no state between calls.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .hooks import HookPoint


def grid_mask(rows: int, cols: int, cls_token: bool = True) -> torch.Tensor:
    """Boolean (T, T) mask: a patch sees itself and its 4 neighbours; CLS (token 0) sees all, all see it."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    r, c = r.reshape(-1), c.reshape(-1)
    patches = (r[:, None] - r[None, :]).abs() + (c[:, None] - c[None, :]).abs() <= 1
    if not cls_token:
        return patches
    n = rows * cols + 1
    mask = torch.ones(n, n, dtype=torch.bool)
    mask[1:, 1:] = patches
    return mask


def causal_mask(T: int, window: int | None = None, offset: int = 0) -> torch.Tensor:
    """Boolean (T, T + offset) mask of keys j with 0 ≤ i − j < window (i counted from `offset`)."""
    i = torch.arange(T)[:, None] + offset
    j = torch.arange(T + offset)[None, :]
    keep = j <= i
    if window is not None:
        keep &= i - j < window
    return keep


class _Attention(nn.Module):
    """Shared plumbing: projections, support mask, top-k, softmax, the ``hook_pattern`` hook point."""

    kind = "base"

    def __init__(
        self,
        d_model: int,
        n_heads: int = 1,
        *,
        causal: bool = False,
        window: int | None = None,
        grid: tuple[int, int] | None = None,
        cls_token: bool = True,
        top_k: int | None = None,
        bias: bool = True,
    ):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if grid is not None and causal:
            raise ValueError("grid locality and causal masking are exclusive")
        self.d_model, self.n_heads, self.d_head = d_model, n_heads, d_model // n_heads
        self.causal, self.window, self.top_k = bool(causal), window, top_k
        self.grid, self.cls_token = (tuple(grid) if grid is not None else None), cls_token
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=bias)
        self.hook_pattern = HookPoint()

    # -- pieces ------------------------------------------------------------------------------
    def support(self, T: int, device=None, offset: int = 0) -> torch.Tensor | None:
        """Locality mask (T, T + offset) or None when every key is visible."""
        if self.grid is not None:
            mask = grid_mask(*self.grid, self.cls_token)
            if mask.shape[0] != T:
                raise ValueError(
                    f"grid {self.grid} (cls={self.cls_token}) needs {mask.shape[0]} tokens, got {T}"
                )
        elif self.causal:
            mask = causal_mask(T, self.window, offset)
        elif self.window is not None:
            i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
            mask = (i - j).abs() < self.window
        else:
            return None
        return mask.to(device)

    def scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def weights(self, s: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Softmax of s over N(i) = top-k of the locality support; exactly 0 outside."""
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        if self.top_k is not None and self.top_k < s.shape[-1]:
            idx = s.topk(self.top_k, dim=-1).indices
            keep = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)
            s = s.masked_fill(~keep, float("-inf"))
        return F.softmax(s, dim=-1)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.n_heads, self.d_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        B, T, D = x.shape
        q, k, v = (self._heads(p(x)) for p in (self.q_proj, self.k_proj, self.v_proj))
        a = self.hook_pattern(self.weights(self.scores(q, k), self.support(T, x.device)))
        out = self.o_proj((a @ v).transpose(1, 2).reshape(B, T, D))
        return (out, a) if return_attention else out

    # -- incremental decoding ----------------------------------------------------------------
    def step(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        """One causal decoding step for x (B, 1, D). `cache` holds past keys/values; with a window
        only the last `window` of them are kept, so the cache has a fixed size (Krause sampling)."""
        if not self.causal:
            raise ValueError("step() needs a causal attention")
        q, k, v = (self._heads(p(x)) for p in (self.q_proj, self.k_proj, self.v_proj))
        if "k" in cache:
            k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
        if self.window is not None:
            k, v = k[:, :, -self.window :], v[:, :, -self.window :]
        cache["k"], cache["v"] = k, v
        a = self.weights(self.scores(q, k), None)
        return self.o_proj((a @ v).transpose(1, 2).reshape(x.shape[0], 1, self.d_model))

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, causal={self.causal}, window={self.window}, "
            f"grid={self.grid}, top_k={self.top_k}"
        )


class SoftmaxAttention(_Attention):
    """Standard scaled dot-product attention, s_ij = ⟨q_i, k_j⟩/√d_head (β = 1/√d_head)."""

    kind = "softmax"

    @property
    def beta(self) -> float:
        return 1.0 / math.sqrt(self.d_head)

    def scores(self, q, k):
        return (q @ k.transpose(-2, -1)) * self.beta


class KrauseAttention(_Attention):
    """Krause attention, s_ij = −‖q_i − k_j‖²/(2σ²) with learnable log σ (shape (H,1,1) or (1,1,1))."""

    kind = "krause"

    def __init__(
        self, d_model: int, n_heads: int = 1, *, sigma: float = 2.5, sigma_per_head: bool = True, **kwargs
    ):
        super().__init__(d_model, n_heads, **kwargs)
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.sigma_per_head = bool(sigma_per_head)
        self.log_sigma = nn.Parameter(torch.full((n_heads if sigma_per_head else 1, 1, 1), math.log(sigma)))

    @property
    def sigma(self) -> torch.Tensor:
        """σ per head, shape (H,) (a shared σ is repeated)."""
        return self.log_sigma.detach().exp().reshape(-1).expand(self.n_heads)

    def scores(self, q, k):
        sq = (q * q).sum(-1, keepdim=True) + (k * k).sum(-1).unsqueeze(-2) - 2 * (q @ k.transpose(-2, -1))
        return -sq.clamp_min(0) / (2 * torch.exp(2 * self.log_sigma))


class HybridAttention(nn.Module):
    """Gated softmax + Krause (the paper's LLM variant): o_i = g_i0 o_i^softmax + g_i1 o_i^Krause,
    g_i = softmax(W_g [o_i^softmax; o_i^Krause] + b), b initialised to (log 4, 0) (80 % softmax).

    Each branch is a full attention module with its own projections: ``attn.softmax``, ``attn.krause``.
    Hook points: ``hook_pattern`` sees the gate-weighted mixture Σ_b g_ib a^b_ij (row-stochastic, a
    summary: the branches have different value/output maps), ``hook_gate`` the gate (B, T, 2), and
    ``softmax.hook_pattern`` / ``krause.hook_pattern`` each branch's weights.
    """

    kind = "hybrid"

    def __init__(
        self,
        d_model: int,
        n_heads: int = 1,
        *,
        softmax: dict | None = None,
        krause: dict | None = None,
        gate_init: float = 0.8,
        bias: bool = True,
    ):
        super().__init__()
        self.d_model, self.n_heads, self.d_head = d_model, n_heads, d_model // n_heads
        self.softmax = SoftmaxAttention(d_model, n_heads, bias=bias, **(softmax or {}))
        self.krause = KrauseAttention(d_model, n_heads, bias=bias, **(krause or {}))
        self.gate = nn.Linear(2 * d_model, 2)
        with torch.no_grad():
            nn.init.normal_(self.gate.weight, std=0.01)
            self.gate.bias.copy_(torch.tensor([math.log(gate_init / (1 - gate_init)), 0.0]))
        self.hook_pattern = HookPoint()
        self.hook_gate = HookPoint()

    @property
    def causal(self):
        return self.softmax.causal

    def _mix(self, o_s, o_k):
        g = F.softmax(self.gate(torch.cat([o_s, o_k], -1)), dim=-1)
        return g[..., :1] * o_s + g[..., 1:] * o_k, g

    def forward(self, x, return_attention: bool = False):
        o_s, a_s = self.softmax(x, return_attention=True)
        o_k, a_k = self.krause(x, return_attention=True)
        out, g = self._mix(o_s, o_k)
        g = self.hook_gate(g)
        a = self.hook_pattern(g[:, None, :, :1] * a_s + g[:, None, :, 1:] * a_k)
        return (out, a) if return_attention else out

    def step(self, x, cache: dict):
        o_s = self.softmax.step(x, cache.setdefault("softmax", {}))
        o_k = self.krause.step(x, cache.setdefault("krause", {}))
        return self._mix(o_s, o_k)[0]


ATTENTIONS = {"softmax": SoftmaxAttention, "krause": KrauseAttention, "hybrid": HybridAttention}


def make_attention(spec: dict, d_model: int, n_heads: int) -> nn.Module:
    """Build an attention module from a JSON-able spec {"kind": ..., **kwargs}."""
    spec = dict(spec)
    kind = spec.pop("kind")
    if kind not in ATTENTIONS:
        raise ValueError(f"attention kind must be one of {tuple(ATTENTIONS)}, got {kind!r}")
    return ATTENTIONS[kind](d_model, n_heads, **spec)
