"""Small pre-LN transformers: a ViT for 8×8 digits and a causal LM (pixels, characters, recall).

Block:  h ← h + attn(norm1(h));  h ← h + mlp(norm2(h)).   Layer-0 tokens: ``model.embed(inputs)``.
Hook points (``particles.nn.hooks``): ``blocks.{l}.hook_resid_pre`` / ``hook_resid_post`` (the block's
input and output), ``blocks.{l}.attn.hook_pattern`` (+ ``hook_gate`` and the branches' for hybrids).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import make_attention
from .hooks import HookPoint


def layer_specs(spec: dict, n_layers: int) -> list[dict]:
    """Per-layer attention specs: a list-valued ``top_k`` (or ``krause.top_k``) gives one value per layer."""
    out = []
    for layer in range(n_layers):
        s = dict(spec)
        if isinstance(s.get("top_k"), list):
            s["top_k"] = s["top_k"][layer]
        for branch in ("softmax", "krause"):
            if isinstance(s.get(branch), dict) and isinstance(s[branch].get("top_k"), list):
                s[branch] = dict(s[branch], top_k=s[branch]["top_k"][layer])
        out.append(s)
    return out


class Block(nn.Module):
    """Pre-LN transformer block: h + attn(LN(h)), then h + MLP(LN(h))."""

    def __init__(self, d_model: int, n_heads: int, attention: dict, mlp_ratio: int = 2, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = make_attention(attention, d_model, n_heads)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(), nn.Linear(mlp_ratio * d_model, d_model)
        )
        self.drop = nn.Dropout(dropout)
        self.hook_resid_pre = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, h):
        h = self.hook_resid_pre(h)
        h = h + self.drop(self.attn(self.norm1(h)))
        return self.hook_resid_post(h + self.drop(self.mlp(self.norm2(h))))

    def step(self, h, cache):
        h = h + self.attn.step(self.norm1(h), cache)
        return h + self.mlp(self.norm2(h))


class _Transformer(nn.Module):
    def __init__(self, d_model, n_heads, n_layers, attention, mlp_ratio, dropout):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, s, mlp_ratio, dropout) for s in layer_specs(attention, n_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def hidden(self, inputs):
        h = self.embed(inputs)
        for block in self.blocks:
            h = block(h)
        return self.norm(h)


class ViT(_Transformer):
    """ViT classifier for scikit-learn digits: (B, 8, 8) floats 0–16 → logits (B, n_classes).

    Tokens: CLS + (8/patch)² patches (linear patch embedding of x/16) + learned positions.
    """

    def __init__(
        self,
        *,
        image_size=8,
        patch=2,
        n_classes=10,
        d_model=64,
        n_heads=4,
        n_layers=4,
        attention: dict,
        mlp_ratio=2,
        dropout=0.0,
    ):
        super().__init__(d_model, n_heads, n_layers, attention, mlp_ratio, dropout)
        self.image_size, self.patch = image_size, patch
        self.grid = (image_size // patch, image_size // patch)
        self.patch_embed = nn.Linear(patch * patch, d_model)
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos = nn.Parameter(0.02 * torch.randn(1, self.grid[0] * self.grid[1] + 1, d_model))
        self.head = nn.Linear(d_model, n_classes)

    def patches(self, x):
        """(B, 8, 8) or (B, 64) → (B, n_patches, patch²), row-major over the patch grid, scaled to [0, 1]."""
        x = x.reshape(x.shape[0], self.image_size, self.image_size).float() / 16.0
        p, g = self.patch, self.grid
        return x.reshape(-1, g[0], p, g[1], p).permute(0, 1, 3, 2, 4).reshape(x.shape[0], g[0] * g[1], p * p)

    def embed(self, x):
        """Layer-0 tokens (B, 1 + n_patches, D): CLS first."""
        t = self.patch_embed(self.patches(x))
        return torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos

    def forward(self, x):
        return self.head(self.hidden(x)[:, 0])


class CausalLM(_Transformer):
    """Causal transformer over tokens 0..vocab_size−1: (B, T) → next-token logits (B, T, vocab_size).

    With ``bos`` set (pixel model) the inputs are the targets themselves: the model reads
    [bos, x_0, …, x_{T−2}] and logits[:, t] predict x_t, so every one of the T tokens is scored.
    Without it (char LM, recall) logits[:, t] predict inputs[:, t + 1].
    """

    def __init__(
        self,
        *,
        vocab_size,
        seq_len,
        d_model=64,
        n_heads=4,
        n_layers=4,
        attention: dict,
        mlp_ratio=2,
        dropout=0.0,
        bos: int | None = None,
    ):
        super().__init__(d_model, n_heads, n_layers, attention, mlp_ratio, dropout)
        self.vocab_size, self.seq_len, self.bos = vocab_size, seq_len, bos
        self.tok = nn.Embedding(vocab_size + (bos is not None), d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def tokens(self, x):
        x = x.reshape(x.shape[0], -1).long()
        if self.bos is None:
            return x
        return torch.cat([torch.full_like(x[:, :1], self.bos), x[:, :-1]], 1)

    def embed(self, x):
        """Layer-0 tokens (B, T, D) = token + position embeddings (BOS first for the pixel model)."""
        t = self.tokens(x)
        return self.tok(t) + self.pos(torch.arange(t.shape[1], device=t.device))

    def forward(self, x):
        return self.head(self.hidden(x))

    @torch.no_grad()
    def generate(
        self,
        n: int,
        length: int | None = None,
        *,
        prompt=None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Sample (n, length) tokens (prompt included). With ``use_cache`` every attention keeps a
        key/value cache: of fixed size ``window`` for windowed (Krause) attention, growing for full
        softmax attention; without it the whole prefix is recomputed at every step."""
        length = length or self.seq_len
        seq = torch.empty(n, 0, dtype=torch.long) if prompt is None else prompt.reshape(n, -1).long()
        if self.bos is not None:
            seq = torch.cat([torch.full((n, 1), self.bos, dtype=torch.long), seq], 1)
        elif seq.shape[1] == 0:
            raise ValueError("a model without BOS needs a prompt")
        skip = int(self.bos is not None)
        caches, fed = [{} for _ in self.blocks], 0
        while seq.shape[1] - skip < length:
            if use_cache:
                for p in range(fed, seq.shape[1]):
                    h = self.tok(seq[:, p : p + 1]) + self.pos.weight[p]
                    for block, cache in zip(self.blocks, caches):
                        h = block.step(h, cache)
                fed = seq.shape[1]
            else:
                h = self.tok(seq) + self.pos(torch.arange(seq.shape[1]))
                for block in self.blocks:
                    h = block(h)
            logits = self.head(self.norm(h[:, -1]))
            nxt = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1, generator=generator)
            seq = torch.cat([seq, nxt], 1)
        return seq[:, skip : skip + length]
