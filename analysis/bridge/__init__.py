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


def extract(
    model,
    inputs,
    *,
    representation: str = "residual",
    reduce=None,
    sink_k: int = 0,
    attention: bool = True,
    tokenizer=None,
    labels=None,
):
    """Token trajectory of ``model`` on ``inputs`` as an xarray Dataset (layout: ``analysis.bridge.core``).

    model: a ``particles.nn`` model (ViT / CausalLM) or a Hugging Face ``PreTrainedModel``.
    inputs: images (B, 8, 8) / token ids (B, T) as tensor or array, a dict of tensors from a
        tokenizer (``input_ids``, ``attention_mask``), or text (HF, with ``tokenizer``).
    representation: "residual" (the residual stream; HF: ``output_hidden_states``) or "normalised"
        (the LayerNorm output each attention reads; layer L the final-norm output).
    reduce: None (store every attention map), True (all of ``REDUCTIONS``) or a subset of them:
        per-(sample, layer, head) metrics computed inside the hooks; no T×T map is kept.
    sink_k: the key k of the sink score α_k stored by ``reduce``.
    attention: False skips attention altogether (hidden states only).
    """
    kw = dict(representation=representation, reduce=reduce, sink_k=sink_k, attention=attention, labels=labels)
    if is_ours(model):  # checked first: is_hf imports transformers (seconds)
        return extract_ours(model, inputs, **kw)
    if is_hf(model):
        return extract_hf(model, inputs, tokenizer=tokenizer, **kw)
    raise TypeError(
        f"model: expected a particles.nn model or a transformers PreTrainedModel, got {type(model).__name__}"
    )


def make_compare(task: str, quick: bool = False, out="figures", progress: bool = True, **kwargs):
    """Figure ``out/compare_<task>.png`` (+ .pdf, .nc); see :func:`analysis.bridge.figure.make_compare`."""
    from .figure import make_compare as _make

    return _make(task, quick=quick, out=out, progress=progress, **kwargs)


from .hf import extract_hf  # noqa: E402
from .ours import extract_ours  # noqa: E402

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
]
