"""The bridge between trained transformers and particle dynamics (issue 7, docs/bridge.md).

    from analysis.bridge import extract, compare, simulate_like, fit_preset
    ds = extract(model, inputs)                 # "x" (sample, layer, token, component), "attention"
    own = simulate_like(model, ds, mode="own")  # the model's own attention, no MLP, on the sphere
    fit = fit_preset(ds, "sa")                  # SA(β) with β fitted to the per-layer curves
    table = compare({"krause": ds_k, "softmax": ds_s, "own": own})
    print(format_table(table))

``extract`` works for ``particles.nn`` models (ViT, CausalLM; softmax, Krause, hybrid) and for
Hugging Face ``transformers`` models (load them offline with :func:`load_hf`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .compare import (
    as_interaction,
    compare,
    fit_preset,
    format_table,
    layer_metrics,
    restrictions,
    simulate_like,
)
from .core import REDUCTIONS, attention_layers
from .hf import is_hf, load_hf, load_smollm2
from .ours import is_ours

if TYPE_CHECKING:  # annotations only
    import numpy as np
    import torch
    import xarray as xr


def extract(
    model: torch.nn.Module,
    inputs: torch.Tensor | np.ndarray | Mapping[str, torch.Tensor] | str | Sequence[str] | None,
    *,
    representation: str = "residual",
    reduce: bool | str | tuple[str, ...] | list[str] | None = None,
    sink_k: int = 0,
    attention: bool = True,
    tokenizer: Any = None,
    labels: Sequence[Any] | np.ndarray | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> xr.Dataset:
    """Token trajectory of ``model`` on ``inputs`` as an xarray Dataset (layout: ``analysis.bridge.core``).

    model: a ``particles.nn`` model (ViT / CausalLM), a Hugging Face ``PreTrainedModel`` (krausified
        Llama models included), a TransformerLens ``HookedTransformer`` or its ``ActivationCache``
        (from ``run_with_cache(inputs)``; pass the same ``inputs``, or None). Layer mapping: layer 0 =
        the embeddings; layer l = the input of block l; layer L = after the final norm for
        GPT-2/Llama-style HF models and TransformerLens (the last block's output for ours and BERT).
    inputs: images (B, 8, 8) / token ids (B, T) as tensor or array, a dict of tensors from a
        tokenizer (``input_ids``, ``attention_mask``), or text (HF, with ``tokenizer``).
    representation: "residual" (the residual stream; HF: ``output_hidden_states``) or "normalised"
        (the LayerNorm output each attention reads; layer L the final-norm output).
    reduce: None (store every attention map), True (all of ``REDUCTIONS``) or a subset of them:
        per-(sample, layer, head) metrics computed inside the hooks; no T×T map is kept.
    sink_k: the key k of the sink score α_k stored by ``reduce``.
    attention: False skips attention altogether (hidden states only).
    batch_size: samples per forward pass (None: all at once); progress: a tqdm bar over the batches.

    Capture goes through the named hook points (``particles.nn.hooks``, TransformerLens names), removed
    after every pass. ``x`` carries the boolean coordinate ``token_mask`` (False = padding).
    """
    kw = dict(
        representation=representation,
        reduce=reduce,
        sink_k=sink_k,
        attention=attention,
        labels=labels,
        batch_size=batch_size,
        progress=progress,
    )
    if is_tl_cache(model):
        return extract_cache(model, inputs, **kw)
    if is_tl(model):  # before is_ours: a HookedTransformer also has blocks and embed
        return extract_tl(model, inputs, **kw)
    if is_ours(model):  # checked before is_hf: is_hf imports transformers (seconds)
        return extract_ours(model, inputs, **kw)
    if is_hf(model):
        return extract_hf(model, inputs, tokenizer=tokenizer, **kw)
    raise TypeError(
        "model: expected a particles.nn model, a transformers PreTrainedModel or a TransformerLens "
        f"HookedTransformer or ActivationCache, got {type(model).__name__}"
    )


def make_compare(
    task: str,
    quick: bool = False,
    out: str | os.PathLike[str] = "figures",
    progress: bool = True,
    **kwargs: Any,
) -> xr.Dataset:
    """Figure ``out/compare_<task>.png`` (+ .pdf, .nc); see :func:`analysis.bridge.figure.make_compare`."""
    from .figure import make_compare as _make

    return _make(task, quick=quick, out=out, progress=progress, **kwargs)


from .hf import extract_hf  # noqa: E402
from .ours import extract_ours  # noqa: E402
from .tl import extract_tl, is_tl  # noqa: E402
from .tlens import extract_cache, is_tl_cache  # noqa: E402

__all__ = [
    "extract",
    "compare",
    "simulate_like",
    "fit_preset",
    "layer_metrics",
    "format_table",
    "make_compare",
    "load_hf",
    "load_smollm2",
    "attention_layers",
    "restrictions",
    "as_interaction",
    "REDUCTIONS",
    "extract_hf",
    "extract_ours",
    "extract_tl",
    "extract_cache",
]
