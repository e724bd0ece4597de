"""Extraction from our own torch models (``particles.nn``: ViT and CausalLM, softmax/Krause/hybrid).

Hooks on the models' named hook points (``particles.nn.hooks``, TransformerLens names) record the
residual stream and the attention during ordinary forward passes, so the stored states are exactly
what the model computes; the hooks are removed after every pass:

* layer 0: ``blocks.0.hook_resid_pre`` (= ``model.embed(inputs)``);
* ``representation="residual"``: layer ℓ = ``blocks.{ℓ-1}.hook_resid_post`` (before the final norm);
* ``representation="normalised"``: layer ℓ < L = ``blocks.{ℓ}.ln1.hook_normalized`` (what the
  attention reads), layer L = ``ln_final.hook_normalized`` (what the head reads; ``model.hidden``).

Attention: ``blocks.{ℓ}.attn.hook_pattern``. For a hybrid attention, ``attention`` is the gated
mixture Σ_b g_ib a^b_ij and each branch (``attn.softmax.hook_pattern``, ``attn.krause.hook_pattern``)
is kept along a "branch" axis in ``branch_attention`` (or the ``branch_*`` reductions), with the gate
(``attn.hook_gate``) in ``gate`` (sample, layer, token, branch). Our models never pad: ``token_mask``
is all True.
"""

from __future__ import annotations

import numpy as np
import torch

from .core import BRANCHES, batches_of, build_dataset, check_reduce, check_representation, run_hooks


def is_ours(model) -> bool:
    return (
        hasattr(model, "blocks") and hasattr(model, "embed") and all(hasattr(b, "attn") for b in model.blocks)
    )


def _as_tensor(inputs):
    if isinstance(inputs, dict):
        for key in ("inputs", "input_ids", "x"):
            if key in inputs:
                return _as_tensor(inputs[key])
        raise ValueError(f"inputs: a dict needs an 'inputs' or 'input_ids' entry, got keys {sorted(inputs)}")
    t = torch.as_tensor(np.asarray(inputs)) if not isinstance(inputs, torch.Tensor) else inputs
    if t.ndim < 1:
        raise ValueError(f"inputs: expected a batch, got shape {tuple(t.shape)}")
    return t


def _hybrid(attn) -> bool:
    return getattr(attn, "kind", None) == "hybrid"


def hidden_names(L: int, representation: str) -> list[str]:
    """The L + 1 hook points of x[layer] (see the module docstring)."""
    if representation == "residual":
        return ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.hook_resid_post" for l in range(L)]
    return [f"blocks.{l}.ln1.hook_normalized" for l in range(L)] + ["ln_final.hook_normalized"]


def extract_ours(
    model,
    inputs,
    *,
    representation: str = "residual",
    reduce=None,
    sink_k: int = 0,
    attention: bool = True,
    labels=None,
    batch_size: int | None = None,
    progress: bool = False,
):
    from particles.nn.hooks import hook_sites

    representation = check_representation(representation)
    names = check_reduce(reduce)
    x = _as_tensor(inputs)
    if x.ndim == 1:  # a single token sequence
        x = x[None]
    blocks = list(model.blocks)
    L = len(blocks)
    hybrid = any(_hybrid(b.attn) for b in blocks)
    sites = hook_sites(model)
    # the mask only sizes the batches here (our inputs have no padding); T is known after the pass
    batches = batches_of({"x": x}, torch.ones(len(x), 1, dtype=torch.bool), batch_size)
    hidden, attn_vars = run_hooks(
        sites,
        lambda b: model(b["x"]),
        [(b, None) for b, _ in batches],
        n_layers=L,
        hidden_names=hidden_names(L, representation),
        attention=attention,
        reduce=names,
        sink_k=sink_k,
        progress=progress,
    )
    coords = _coords(model, x, hidden.shape[2], labels)
    if hybrid and attention:
        coords["branch"] = list(BRANCHES)
    attrs = _attrs(model, representation, hybrid)
    if names and attention:
        attrs["sink_k"] = sink_k
    ds = build_dataset(hidden, attn_vars, coords, attrs)
    sig = _sigma(blocks)
    if sig is not None:
        ds["sigma"] = (("layer", "head"), np.concatenate([sig, np.full_like(sig[:1], np.nan)]))
    return ds


def _coords(model, x, T, labels) -> dict:
    coords = {}
    if hasattr(model, "grid") and hasattr(model, "patch") and not hasattr(model, "tok"):  # ViT
        g = model.grid
        coords["token_label"] = (
            "token",
            ["CLS"] + [f"patch_{r}_{c}" for r in range(g[0]) for c in range(g[1])],
        )
    elif hasattr(model, "tokens"):
        ids = model.tokens(x).cpu().numpy()
        coords["token_id"] = (("sample", "token"), ids.astype(np.int64))
        task = (getattr(model, "card", None) or {}).get("task")
        if task == "text-lm":
            from particles.nn.data import CHARS

            coords["token_str"] = (
                ("sample", "token"),
                np.array(
                    [[CHARS[i] if 0 < i < len(CHARS) else "\ufffd" for i in row] for row in ids], dtype=object
                ),
            )
        elif getattr(model, "bos", None) is not None:
            coords["token_label"] = ("token", ["BOS"] + [f"t{i}" for i in range(T - 1)])
    if labels is not None:
        coords["label"] = ("sample", np.asarray(labels))
    return coords


def _branch_attr(attn, name):
    if _hybrid(attn):
        return {b: _jsonable(getattr(getattr(attn, b), name)) for b in BRANCHES}
    return _jsonable(getattr(attn, name, None))


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


def _attrs(model, representation, hybrid) -> dict:
    blocks = list(model.blocks)
    a0 = blocks[0].attn
    card = getattr(model, "card", None) or {}
    kinds = sorted({b.attn.kind for b in blocks})
    attrs = dict(
        source="krause-sync",
        model_class=type(model).__name__,
        attention_kind=",".join(kinds),
        n_layers=len(blocks),
        n_heads=a0.n_heads,
        d_model=a0.d_model,
        d_head=a0.d_head,
        representation=representation,
        causal=bool(getattr(a0, "causal", False)),
        top_k=[_branch_attr(b.attn, "top_k") for b in blocks],
        window=_branch_attr(a0, "window"),
        grid=_branch_attr(a0, "grid"),
        task=card.get("task"),
        checkpoint=card.get("file"),
        config=getattr(model, "config", None),
    )
    if hybrid:
        attrs["attention_label"] = (
            "attention = gated mixture sum_b g_ib a^b_ij of the two branches; "
            "branch_* = each branch (softmax, krause)"
        )
    return attrs


def _sigma(blocks):
    """σ per (layer, head) of the Krause attention (or the hybrid's Krause branch); None if none."""
    rows = []
    for b in blocks:
        attn = b.attn.krause if _hybrid(b.attn) else b.attn
        if getattr(attn, "kind", None) != "krause":
            return None
        rows.append(attn.sigma.detach().cpu().double().numpy())
    return np.stack(rows)
