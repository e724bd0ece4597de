"""Torch attention modules, small models, training and checkpoints (Krause vs softmax).

Attention (``particles.nn.attention``), for head h, q = W_q x, k = W_k x, v = W_v x:
  SoftmaxAttention   s_ij = ⟨q_i, k_j⟩/√d_head
  KrauseAttention    s_ij = −‖q_i − k_j‖²/(2σ_h²), learnable log σ (per head or one per layer)
  HybridAttention    o = g_0 o^softmax + g_1 o^Krause, g = softmax(W_g[o^softmax; o^Krause] + b)
then the support (``grid=(h, w)``: 4-neighbour patch grid + CLS row/column; ``causal=True`` with
``window=w``: 0 ≤ i − j < w), then ``top_k``, then softmax over the kept scores (0 elsewhere).
``attn(x, return_attention=True)`` → (out, a (B, H, T, T)); the weights, the residual stream and a
hybrid's gate are read through named hook points (``particles.nn.hooks``: ``hook_sites(model)``,
``capture(sites, names)``; TransformerLens names such as ``blocks.0.attn.hook_pattern``).

Models: ``ViT`` (digits (B, 8, 8) floats 0–16 → logits (B, 10); tokens = CLS + 4×4 patches of 2×2)
and ``CausalLM`` (pixel model with BOS, 64 tokens, 17 levels; char LM; recall).

Hooks for the bridge (every model):
  model.embed(inputs)         layer-0 tokens (B, T, D) (CLS/BOS first where the model has one)
  model.blocks                nn.ModuleList of pre-LN ``Block``: h ← h + attn(norm1(h)); h ← h + mlp(norm2(h))
  block.norm1, block.attn     the LayerNorm before attention and the attention module
  attn.q_proj/k_proj/v_proj/o_proj   nn.Linear(D, D); heads split as (B, T, H, d_head)
  attn.n_heads, attn.d_head, attn.kind ("softmax" | "krause" | "hybrid")
  attn.sigma (Krause: tensor (H,)), attn.log_sigma, attn.beta (softmax: 1/√d_head),
  attn.window, attn.causal, attn.grid, attn.top_k, attn.support(T) (bool (T, T) or None)
  hybrid: attn.softmax / attn.krause are the two branch modules (each with the attributes above),
          hook points attn.hook_gate (B, T, 2), attn.softmax.hook_pattern, attn.krause.hook_pattern
  model.norm, model.head      final LayerNorm and output layer; model.config, model.card (checkpoints)

Checkpoints: ``load_checkpoint(path)`` (verifies sha256, weights only), ``save_checkpoint``.
Training: ``train(task, attention, epochs=, seed=)`` with tasks in ``TASKS``.
"""

from .attention import (
    HybridAttention,
    KrauseAttention,
    SoftmaxAttention,
    causal_mask,
    grid_mask,
    make_attention,
)
from .checkpoint import CheckpointError, load_checkpoint, read_card, save_checkpoint
from .krausify import krausify
from .models import Block, CausalLM, ViT
from .train import ABLATIONS, TASKS, build_model, train

__all__ = [
    "KrauseAttention",
    "SoftmaxAttention",
    "HybridAttention",
    "make_attention",
    "grid_mask",
    "causal_mask",
    "Block",
    "ViT",
    "CausalLM",
    "build_model",
    "train",
    "TASKS",
    "ABLATIONS",
    "load_checkpoint",
    "save_checkpoint",
    "read_card",
    "CheckpointError",
    "krausify",
]
