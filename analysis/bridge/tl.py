"""Extraction from TransformerLens ``HookedTransformer`` models (optional; ``pip install
"transformer-lens<4"``: version 4 removed HookedTransformer).

TransformerLens names its hook points as the bridge does (``particles.nn.hooks``), so a
HookedTransformer is read through its own HookPoints, removed after every pass. Layer mapping (the
one of GPT-2/Llama-style Hugging Face models; details and the ActivationCache path in
``analysis.bridge.tlens``): x[layer = l] = ``blocks.{l}.hook_resid_pre`` for l = 0..L−1 (layer 0 =
token + position embeddings), x[layer = L] = the output of ``ln_final`` (after the final norm, gain
and bias included: ``unembed.hook_in``; a model without one: ``blocks.{L−1}.hook_resid_post``).
``representation="normalised"``: the output of ``blocks.{l}.ln1`` and the final-norm output (not
``*.hook_normalized``, which TransformerLens takes before the gain and bias). Attention:
``blocks.{l}.attn.hook_pattern``. Text is tokenised text by text and padded on the right with an exact
mask (``tlens.text_tokens``).
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
        from .tlens import text_tokens

        return text_tokens(model, inputs)
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
    from .tlens import layer_names, norm_sites, tl_attrs

    sites = {**hook_sites(model), **norm_sites(model)}
    hidden_names, last = layer_names(L, representation, sites)
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
    attrs = tl_attrs(model, representation, last, sink_k if (names and attention) else None)
    return build_dataset(hidden, attn_vars, coords, attrs, token_mask=mask.cpu().numpy())
