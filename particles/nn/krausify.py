"""``krausify(model)``: every Llama-style attention of a Hugging Face model becomes the gated hybrid of
the original softmax attention and a Krause branch (``particles.nn.llm_attention``), as in the Krause
Llama models of Liu et al.'s official code:

  o_i = g_i0 o^softmax_i + g_i1 o^Krause_i,   g_i = softmax(W_g [o^softmax_i; o^Krause_i] + b),
  Krause scores s_ij = −‖q_i − k_j‖²/(2σ_h²) on rotary-embedded q, k (σ per head, init ``sigma``),
  causal sliding window i − window < j ≤ i, then the ``top_k`` largest, then softmax.

At initialisation the Krause branch's projections are copies of the original ones and the gate bias
gives the softmax branch the share ``gate`` (W_g ~ N(0, 0.01²)): the model's output moves only by the
Krause branch's share 1 − gate.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # annotations only: torch is imported on first use
    import torch

M = TypeVar("M", bound="torch.nn.Module")


def _check(window, top_k, sigma, gate):
    for name, value in (("window", window), ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an integer, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    for name, value in (("sigma", sigma), ("gate", gate)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be finite and > 0, got {sigma}")
    if not 0 < gate < 1:
        raise ValueError(f"gate (the softmax branch's initial share) must be in (0, 1), got {gate}")


def krausify(model: M, window: int = 32, top_k: int = 16, sigma: float = 5.5, gate: float = 0.8) -> M:
    """Replace, in place, every ``LlamaAttention`` of ``model`` by ``KrauseLlamaAttention``; returns model.

    window: causal sliding window of the Krause branch (keys i − window < j ≤ i); top_k: keys kept
    per query after the window; sigma: initial σ of every head; gate: initial softmax share.
    Raises TypeError naming the class for a model without Llama-style attention, ValueError for a
    model that is already krausified or a bad parameter. Sets ``model.config.use_cache = False`` (the
    Krause branch has no key/value cache) and records the parameters in ``model.config.krausify``.
    """
    _check(window, top_k, sigma, gate)
    from torch import nn

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch module, got {type(model).__name__}")
    from .llm_attention import KrauseLlamaAttention, LlamaAttention

    if any(isinstance(m, KrauseLlamaAttention) for m in model.modules()):
        raise ValueError(f"model: this {type(model).__name__} is already krausified")
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, LlamaAttention)]
    if not targets:
        found = sorted(
            {type(m).__name__ for n, m in model.named_modules() if n.endswith(("attn", "attention"))}
        )
        raise TypeError(
            f"krausify supports Llama-style attention (transformers LlamaAttention); "
            f"{type(model).__name__} has {', '.join(found) or 'no attention modules'}"
        )
    hooked = any(getattr(m, "_output_capturing_hooks_installed", False) for m in model.modules())
    for name, attn in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = KrauseLlamaAttention(attn, window=window, top_k=top_k, sigma=float(sigma), gate=float(gate))
        new.train(attn.training)
        setattr(parent, child, new)
        if hooked:  # transformers installs its output-capturing hooks once: give the new module its own
            from transformers.utils.output_capturing import install_output_capuring_hook

            install_output_capuring_hook(new, "attentions", 1)
    cfg = getattr(model, "config", None)
    if cfg is not None:
        cfg.use_cache = False
        cfg.krausify = dict(window=int(window), top_k=int(top_k), sigma=float(sigma), gate=float(gate))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.use_cache = False
    return model
