"""TransformerLens pieces of the bridge: text tokenisation with an exact padding mask, the layer
mapping, and extraction from an ``ActivationCache`` (the live ``HookedTransformer`` path is
``analysis.bridge.tl``).

Layer mapping (the same as Hugging Face GPT-2, docs/bridge.md), L = ``cfg.n_layers``:

* ``representation="residual"``: x[layer = l] = ``blocks.{l}.hook_resid_pre`` for l = 0..L−1 (layer 0
  = token + position embeddings, layer l = ``blocks.{l−1}.hook_resid_post``); x[layer = L] = the
  output of ``ln_final`` (= ``unembed.hook_in``, what the unembedding reads; without a final norm:
  ``blocks.{L−1}.hook_resid_post``).
* ``representation="normalised"``: x[layer = l] = the output of ``blocks.{l}.ln1`` (what block l's
  attention reads), x[layer = L] as above.
* ``attention[layer = l]`` = ``blocks.{l}.attn.hook_pattern``.

TransformerLens's ``*.hook_normalized`` is taken *before* the norm's gain and bias (x − mean)/scale,
so it is not what the next layer reads unless the weights were folded (``fold_ln``): the mapping uses
the norm modules' outputs instead. A HookedTransformer with the HF model's weights loaded unprocessed
(``from_pretrained_no_processing``) then gives the HF Dataset to float rounding; the processed
``from_pretrained`` folds the gains into the next weights and centres the residual stream, so its
states differ from the HF ones (its attention patterns do not).
"""

from __future__ import annotations

import numpy as np
import torch

from .core import AttentionSink, build_dataset, check_reduce, check_representation


def is_tl_cache(obj) -> bool:
    """A TransformerLens ``ActivationCache`` (checked by class, without importing transformer_lens)."""
    return any(
        c.__name__ == "ActivationCache" and c.__module__.startswith("transformer_lens")
        for c in type(obj).__mro__
    )


def text_tokens(model, texts, padding_side: str = "right") -> dict:
    """``{"input": ids (B, T), "attention_mask": (B, T)}`` for one text or a list: each text tokenised
    alone by ``model.to_tokens`` (BOS as the model's default), padded on ``padding_side`` with the pad
    id (TransformerLens sets it to the end-of-text id when the tokenizer has none; 0 without either).
    The mask is exact: a real token equal to the pad id (GPT-2's BOS and end of text) is never taken
    for padding."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if getattr(model, "tokenizer", None) is None:
        raise ValueError("inputs: text needs a HookedTransformer with a tokenizer; pass token ids")
    rows = [model.to_tokens(t)[0].cpu() for t in texts]
    tok = model.tokenizer
    fill = next((i for i in (tok.pad_token_id, tok.eos_token_id) if i is not None), 0)
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), int(fill), dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(T - len(r), T) if padding_side == "left" else slice(0, len(r))
        ids[i, span], mask[i, span] = r, 1
    return {"input": ids, "attention_mask": mask}


def norm_sites(model) -> dict:
    """Hook sites on the norm modules' outputs (what the next layer reads): ``ln_final`` and
    ``blocks.{l}.ln1`` (absent for a model without norms)."""
    from particles.nn.hooks import HookSite

    sites = {}
    if isinstance(getattr(model, "ln_final", None), torch.nn.Module):
        sites["ln_final"] = HookSite(model.ln_final)
    for l, block in enumerate(model.blocks):
        ln1 = getattr(block, "ln1", None)
        if isinstance(ln1, torch.nn.Module) and not isinstance(ln1, torch.nn.Identity):
            sites[f"blocks.{l}.ln1"] = HookSite(ln1)
    return sites


def layer_names(n_layers: int, representation: str, sites) -> tuple[list[str], str]:
    """(the L + 1 site names of x, the name of layer L) for ``representation``; ``sites`` holds
    :func:`norm_sites` and the HookPoints."""
    L = n_layers
    last = "ln_final" if "ln_final" in sites else f"blocks.{L - 1}.hook_resid_post"
    if representation == "residual":
        return [f"blocks.{l}.hook_resid_pre" for l in range(L)] + [last], last
    if "blocks.0.ln1" not in sites:
        raise ValueError("representation='normalised' needs a HookedTransformer with layer norms")
    return [f"blocks.{l}.ln1" for l in range(L)] + [last], last


def tl_attrs(model, representation: str, last: str, sink_k) -> dict:
    """Dataset attributes of a HookedTransformer extraction (``sink_k`` None: no reductions)."""
    cfg = model.cfg
    return dict(
        source="transformer_lens",
        model_class=type(model).__name__,
        model_name=str(getattr(cfg, "model_name", "")),
        n_layers=int(cfg.n_layers),
        n_heads=int(cfg.n_heads),
        d_model=int(cfg.d_model),
        d_head=int(cfg.d_head),
        representation=representation,
        attention_kind="softmax",
        causal=getattr(cfg, "attention_dir", "causal") == "causal",
        normalization_type=str(getattr(cfg, "normalization_type", None)),
        last_layer_note="layer L = the output of ln_final (what the unembedding reads, unembed.hook_in)"
        if last == "ln_final"
        else f"layer L = {last} (no final norm)",
        sink_k=sink_k,
    )


def _cache_inputs(model, inputs, batch: int, T: int):
    """(token ids (B, T) or None, token_mask (B, T)) for a cache made from ``inputs`` (text: padded on
    the tokenizer's side, as ``run_with_cache`` pads it)."""
    if inputs is None:
        return None, torch.ones(batch, T, dtype=torch.bool)
    from .tl import _tokens

    if isinstance(inputs, str) or (
        isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], str)
    ):
        enc = text_tokens(model, inputs, getattr(model.tokenizer, "padding_side", "right"))
    else:
        enc = _tokens(model, inputs)
    ids = enc["input"].cpu()
    if tuple(ids.shape) != (batch, T):
        raise ValueError(f"inputs: token ids of shape {tuple(ids.shape)} for a cache of {batch} × {T} tokens")
    return ids, enc.get("attention_mask", torch.ones_like(ids)).bool().cpu()


def extract_cache(
    cache,
    inputs=None,
    *,
    representation: str = "residual",
    reduce=None,
    sink_k: int = 0,
    attention: bool = True,
    labels=None,
    **_ignored,
):
    """The Dataset of :func:`analysis.bridge.extract` from a ``run_with_cache`` ActivationCache (layer
    mapping: module docstring). inputs: what the cache was made from (token ids, a dict with
    ``attention_mask``, or text as ``run_with_cache`` received it), for ``token_id`` and ``token_mask``
    (None: no ids, every token real). Layer L is ``unembed.hook_in`` when the cache has it, else the
    model's ``ln_final`` applied to ``blocks.{L−1}.hook_resid_post``; ``"normalised"`` applies
    ``blocks.{l}.ln1`` to ``blocks.{l}.hook_resid_pre``."""
    representation = check_representation(representation)
    names = check_reduce(reduce)
    if not cache.has_batch_dim:
        raise ValueError("model: the ActivationCache has no batch dimension (remove_batch_dim=True)")
    model = cache.model
    L = int(model.cfg.n_layers)
    needed = [f"blocks.{l}.hook_resid_pre" for l in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
    if attention:
        needed += [f"blocks.{l}.attn.hook_pattern" for l in range(L)]
    missing = [n for n in needed if n not in cache]
    if missing:
        raise ValueError(
            f"model: the ActivationCache lacks {missing[:4]} (run_with_cache without names_filter)"
        )
    has_norm = isinstance(getattr(model, "ln_final", None), torch.nn.Module)
    last = "ln_final" if has_norm else f"blocks.{L - 1}.hook_resid_post"
    with torch.no_grad():
        if "unembed.hook_in" in cache:  # = the output of ln_final
            final = cache["unembed.hook_in"]
        else:
            resid = cache[f"blocks.{L - 1}.hook_resid_post"]
            final = model.ln_final(resid) if has_norm else resid
        if representation == "residual":
            states = [cache[f"blocks.{l}.hook_resid_pre"] for l in range(L)]
        else:
            if not isinstance(getattr(model.blocks[0], "ln1", None), torch.nn.Module):
                raise ValueError("representation='normalised' needs a HookedTransformer with layer norms")
            states = [model.blocks[l].ln1(cache[f"blocks.{l}.hook_resid_pre"]) for l in range(L)]
    x = torch.stack([s.detach().float().cpu() for s in states + [final]], 1).numpy()
    ids, mask = _cache_inputs(model, inputs, x.shape[0], x.shape[2])
    attn_vars = {}
    if attention:
        sink = AttentionSink(L, names, sink_k)
        for l in range(L):
            sink.add(l, cache[f"blocks.{l}.attn.hook_pattern"], mask)
        attn_vars = sink.variables()
    coords = {} if ids is None else {"token_id": (("sample", "token"), ids.numpy().astype(np.int64))}
    if labels is not None:
        coords["label"] = ("sample", np.asarray(labels))
    attrs = tl_attrs(model, representation, last, sink_k if (names and attention) else None)
    attrs["from_activation_cache"] = 1
    return build_dataset(x, attn_vars, coords, attrs, token_mask=mask.numpy())
