"""Named hook points in the TransformerLens vocabulary, shared by our models, Hugging Face models
(``analysis.bridge.hf.hook_sites``) and TransformerLens' own ``HookedTransformer``.

Names (block l = 0..L-1; every value is a tensor with the batch first):

  blocks.{l}.hook_resid_pre          residual stream entering block l               (B, T, D)
  blocks.{l}.hook_resid_post         residual stream leaving block l                (B, T, D)
  blocks.{l}.ln1.hook_normalized     the normalised tokens block l's attention reads (B, T, D)
  blocks.{l}.attn.hook_pattern       attention weights a_ij of block l              (B, H, T, T)
                                     (hybrids: the gate-weighted mixture Σ_b g_ib a^b_ij)
  blocks.{l}.attn.hook_gate          hybrids: the gate g_i = (g_i,softmax, g_i,krause)  (B, T, 2)
  blocks.{l}.attn.softmax.hook_pattern, blocks.{l}.attn.krause.hook_pattern   hybrids: each branch
  ln_final.hook_normalized           the final-norm output                          (B, T, D)

A :class:`HookPoint` is an identity module placed where a value is computed; forward hooks registered
on it see that value. :func:`hook_sites` maps each name to a :class:`HookSite` (a module and which of
its values to read: output, an output's element, or its input), so names that have no HookPoint of
their own (a LayerNorm's output, a Hugging Face layer's input) are read the same way.
:func:`capture` registers hooks for the requested names and removes them when the ``with`` block ends,
also on error: no model is left with a hook or a stored tensor after a run.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn


class HookPoint(nn.Module):
    """Identity module ``x ↦ x``: a named place where hooks read a value (TransformerLens style)."""

    def forward(self, x):
        return x


def is_hook_point(module) -> bool:
    """Ours or TransformerLens' HookPoint (matched by class name: TransformerLens is optional)."""
    return type(module).__name__ == "HookPoint"


@dataclass(frozen=True)
class HookSite:
    """Where a named value is read: ``module``'s output (element ``index`` of a tuple output, the first
    element when ``index`` is None) or, with ``where="input"``, its first argument (or ``hidden_states``)."""

    module: nn.Module
    where: str = "output"
    index: int | None = None

    def register(self, fn: Callable):
        """Register ``fn(value)``; returns the torch handle (``handle.remove()``)."""
        if self.where == "input":

            def pre(_, args, kwargs):
                fn(args[0] if args else kwargs.get("hidden_states"))

            return self.module.register_forward_pre_hook(pre, with_kwargs=True)
        index = self.index

        def post(_, __, out):
            if isinstance(out, (tuple, list)):
                out = out[0 if index is None else index] if len(out) > (index or 0) else None
            fn(out)

        return self.module.register_forward_hook(post)


def hook_sites(model) -> dict[str, HookSite]:
    """Every named hook point of a ``particles.nn`` model or a module holding HookPoints (TransformerLens).

    Our models: the HookPoints in blocks and attention modules, plus ``blocks.{l}.ln1.hook_normalized``
    (the output of ``block.norm1``) and ``ln_final.hook_normalized`` (the output of ``model.norm``).
    """
    sites = {name: HookSite(m) for name, m in model.named_modules() if is_hook_point(m)}
    if hasattr(model, "blocks") and isinstance(getattr(model, "norm", None), nn.Module):  # particles.nn
        for layer, block in enumerate(model.blocks):
            if hasattr(block, "norm1"):
                sites.setdefault(f"blocks.{layer}.ln1.hook_normalized", HookSite(block.norm1))
        sites.setdefault("ln_final.hook_normalized", HookSite(model.norm))
    return sites


def n_blocks(sites: dict) -> int:
    """Number of blocks named in a site table (1 + the largest l in ``blocks.{l}.…``)."""
    layers = [int(m.group(1)) for name in sites if (m := re.match(r"blocks\.(\d+)\.", name))]
    return max(layers) + 1 if layers else 0


@contextmanager
def capture(sites: dict[str, HookSite], names: Iterable[str], fn: Callable | None = None):
    """Hooks on ``names`` for one ``with`` block; removed on exit (also on error).

    fn(name, value) is called on every value; without it the values (detached) are collected in the
    dict this context yields (the last value per name).
    """
    names = list(names)
    missing = [n for n in names if n not in sites]
    if missing:
        raise ValueError(f"names: unknown hook points {missing[:5]} (known e.g. {sorted(sites)[:4]})")
    store: dict = {}

    def keep(name, value):
        store[name] = value.detach() if hasattr(value, "detach") else value

    call = fn or keep
    handles = []
    try:
        for name in names:
            handles.append(sites[name].register(lambda value, name=name: call(name, value)))
        yield store
    finally:
        for h in handles:
            h.remove()
