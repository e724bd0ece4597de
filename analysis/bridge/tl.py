"""Extraction from TransformerLens ``HookedTransformer`` models (optional; ``pip install
"transformer-lens<4"``: version 4 removed HookedTransformer).

TransformerLens names its hook points as the bridge does (``particles.nn.hooks``), so a
HookedTransformer is read through its own HookPoints, removed after every pass. Layer mapping (the
one of GPT-2/Llama-style Hugging Face models): x[layer = l] = ``blocks.{l}.hook_resid_pre`` for
l = 0..L−1 (layer 0 = token + position embeddings), x[layer = L] = ``ln_final.hook_normalized`` (after
the final norm; a model without one: ``blocks.{L−1}.hook_resid_post``). ``representation=
"normalised"``: ``blocks.{l}.ln1.hook_normalized`` and the final-norm output. Attention:
``blocks.{l}.attn.hook_pattern``.
"""

from __future__ import annotations

import numpy as np
import torch

from .core import batches_of, build_dataset, check_reduce, check_representation, run_hooks


def is_tl(model) -> bool:
    """A TransformerLens HookedTransformer (checked by class, without importing transformer_lens)."""
    return any(
        c.__name__ == "HookedTransformer" and c.__module__.startswith("transformer_lens")
        for c in type(model).__mro__
    )


def _tokens(model, inputs):
    if isinstance(inputs, str) or (
        isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], str)
    ):
        if getattr(model, "tokenizer", None) is None:
            raise ValueError("inputs: text needs a HookedTransformer with a tokenizer; pass token ids")
        return {"input": model.to_tokens(inputs)}
    if hasattr(inputs, "keys"):
        enc = {k: v for k, v in dict(inputs).items() if isinstance(v, torch.Tensor)}
        if "input_ids" not in enc:
            raise ValueError(f"inputs: expected 'input_ids' among the tensors, got {sorted(enc)}")
        out = {"input": enc["input_ids"].long()}
        if "attention_mask" in enc:
            out["attention_mask"] = enc["attention_mask"]
        return out
    ids = torch.as_tensor(np.asarray(inputs) if not isinstance(inputs, torch.Tensor) else inputs).long()
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise ValueError(f"inputs: token ids must have shape (T,) or (batch, T), got {tuple(ids.shape)}")
    return {"input": ids}


def extract_tl(
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
    enc = _tokens(model, inputs)
    cfg = model.cfg
    L = int(cfg.n_layers)
    sites = hook_sites(model)
    last = (
        "ln_final.hook_normalized"
        if "ln_final.hook_normalized" in sites
        else f"blocks.{L - 1}.hook_resid_post"
    )
    if representation == "residual":
        hidden_names = [f"blocks.{l}.hook_resid_pre" for l in range(L)] + [last]
    else:
        if "blocks.0.ln1.hook_normalized" not in sites:
            raise ValueError("representation='normalised' needs a HookedTransformer with layer norms")
        hidden_names = [f"blocks.{l}.ln1.hook_normalized" for l in range(L)] + [last]
    ids = enc["input"]
    mask = enc.get("attention_mask", torch.ones_like(ids)).bool()
    hidden, attn_vars = run_hooks(
        sites,
        lambda b: (
            model(b["input"], attention_mask=b.get("attention_mask"))
            if "attention_mask" in b
            else model(b["input"])
        ),
        batches_of(enc, mask, batch_size),
        n_layers=L,
        hidden_names=hidden_names,
        attention=attention,
        reduce=names,
        sink_k=sink_k,
        progress=progress,
    )
    coords = {"token_id": (("sample", "token"), ids.cpu().numpy().astype(np.int64))}
    if labels is not None:
        coords["label"] = ("sample", np.asarray(labels))
    attrs = dict(
        source="transformer_lens",
        model_class=type(model).__name__,
        model_name=str(getattr(cfg, "model_name", "")),
        n_layers=L,
        n_heads=int(cfg.n_heads),
        d_model=int(cfg.d_model),
        d_head=int(cfg.d_head),
        representation=representation,
        attention_kind="softmax",
        causal=getattr(cfg, "attention_dir", "causal") == "causal",
        normalization_type=str(getattr(cfg, "normalization_type", None)),
        last_layer_note=f"layer L = {last}",
        sink_k=sink_k if (names and attention) else None,
    )
    return build_dataset(hidden, attn_vars, coords, attrs, token_mask=mask.cpu().numpy())
