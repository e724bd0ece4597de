"""Extraction from our own torch models (``particles.nn``: ViT and CausalLM, softmax/Krause/hybrid).

Forward hooks on the model's own modules record the residual stream during one ordinary forward
pass, so the stored states are exactly what the model computes:

* layer 0: the input of ``blocks[0]`` (= ``model.embed(inputs)``);
* ``representation="residual"``: layer ℓ = output of ``blocks[ℓ-1]`` (before the final norm);
* ``representation="normalised"``: layer ℓ < L = output of ``blocks[ℓ].norm1`` (what the attention
  reads), layer L = output of ``model.norm`` (what the head reads; ``model.hidden(inputs)``).

Attention comes from ``attn.last_attention`` (``store_attention`` is switched on for the pass and
restored afterwards). For a hybrid attention, ``attention`` is the gated mixture
Σ_b g_ib a^b_ij and each branch is kept along a "branch" axis in ``branch_attention`` (or the
``branch_*`` reductions), with the gate in ``gate`` (sample, layer, token, branch).
"""

from __future__ import annotations

import numpy as np
import torch

from .core import AttentionSink, build_dataset, check_reduce, check_representation

BRANCHES = ("softmax", "krause")


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


def extract_ours(
    model,
    inputs,
    *,
    representation: str = "residual",
    reduce=None,
    sink_k: int = 0,
    attention: bool = True,
    labels=None,
):
    representation = check_representation(representation)
    names = check_reduce(reduce)
    x = _as_tensor(inputs)
    if x.ndim == 1:  # a single token sequence
        x = x[None]
    blocks = list(model.blocks)
    L = len(blocks)
    hybrid = any(_hybrid(b.attn) for b in blocks)
    mix = AttentionSink(L, names, sink_k)
    branch = {b: AttentionSink(L, names, sink_k) for b in BRANCHES} if hybrid else {}
    gates: list = [None] * L
    hidden: list = [None] * (L + 1)
    handles, saved = [], []

    def grab_input(_, args):
        hidden[0] = args[0].detach()

    def keep(slot):
        def hook(_, __, out):
            hidden[slot] = out.detach()

        return hook

    def grab_attention(layer):
        def hook(module, _, __):
            mix.add(layer, module.last_attention)
            module.last_attention = None
            if _hybrid(module):
                for b in BRANCHES:
                    branch[b].add(layer, module.last_branch_attention[b])
                gates[layer] = module.last_gate.cpu()
                module.last_branch_attention = module.last_gate = None

        return hook

    try:
        if representation == "residual":
            handles.append(blocks[0].register_forward_pre_hook(grab_input))
        for i, block in enumerate(blocks):
            if representation == "residual":
                handles.append(block.register_forward_hook(keep(i + 1)))
            elif i > 0:
                handles.append(block.norm1.register_forward_hook(keep(i)))
            if attention:
                saved.append((block.attn, block.attn.store_attention))
                block.attn.store_attention = True
                handles.append(block.attn.register_forward_hook(grab_attention(i)))
        if representation == "normalised":
            handles.append(blocks[0].norm1.register_forward_hook(keep(0)))
            handles.append(model.norm.register_forward_hook(keep(L)))
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        for module, flag in saved:
            module.store_attention = flag

    attn_vars = {}
    if attention:
        attn_vars.update(mix.variables())
        if hybrid:
            for name, (dims, _) in branch["softmax"].variables().items():
                arr = np.stack([branch[b].variables()[name][1] for b in BRANCHES], 1)
                attn_vars[f"branch_{name}"] = (dims[:1] + ("branch",) + dims[1:], arr)
            g = torch.stack(gates, 1).numpy()  # (B, L, T, 2)
            g = np.concatenate([g, np.full_like(g[:, :1], np.nan)], 1)
            attn_vars["gate"] = (("sample", "layer", "token", "branch"), g)
    coords = _coords(model, x, len(hidden[0][0]), labels)
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
