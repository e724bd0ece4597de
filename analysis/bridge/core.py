"""Shared pieces of the extractors: in-hook attention reductions and the Dataset layout (docs/contract.md).

Layout of an extracted Dataset (``S`` samples, ``L`` attention layers, ``T`` tokens, ``D`` width):

* ``x`` (sample, layer, token, component), layer = 0..L: layer 0 the embeddings, layer ℓ the tokens
  after block ℓ (``representation="residual"``) or the tokens block ℓ + 1's attention reads
  (``"normalised"``: its LayerNorm output; layer L the final-norm output).
* ``attention`` (sample, layer, head, query, key): the weights computed *from* ``x[layer]``, i.e. the
  attention of block ℓ + 1 at layer ℓ — the convention of ``particles.simulate(return_weights=True)``,
  whose weights at a saved step are those of the state at that step. No block reads the final tokens,
  so ``attention[layer=L]`` is NaN; :func:`attention_layers` drops it.
* with ``reduce=``: instead of ``attention``, the per-head reductions ``first_token_mass``,
  ``sink_score`` (Gu et al. α_k) and ``attention_entropy`` (sample, layer, head), computed inside the
  forward hooks so that no T×T map outlives its layer.
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from particles.conventions import encode_attrs

#: Reductions ``reduce=`` can compute inside the hooks, each (B, H, T, T) → (B, H).
REDUCTIONS = ("first_token_mass", "sink_score", "attention_entropy")


def check_reduce(reduce) -> tuple[str, ...]:
    """``reduce`` as a tuple of names: None/False → (), True/"all" → every reduction."""
    if reduce is None or reduce is False:
        return ()
    if reduce is True or reduce == "all":
        return REDUCTIONS
    names = (reduce,) if isinstance(reduce, str) else tuple(reduce)
    bad = [n for n in names if n not in REDUCTIONS]
    if bad:
        raise ValueError(f"reduce must be True or a subset of {REDUCTIONS}, got {bad}")
    return names


def check_representation(representation: str) -> str:
    if representation not in ("residual", "normalised"):
        raise ValueError(f"representation must be 'residual' or 'normalised', got {representation!r}")
    return representation


def reduce_attention(a: torch.Tensor, names, sink_k: int = 0) -> dict[str, np.ndarray]:
    """Per-(sample, head) reductions of attention a (B, H, T, T), identical to ``analysis.sinks``:
    first_token_mass = mean_i a_i0; sink_score = mean_{i ≥ k} a_ik; attention_entropy = mean over rows
    with ≥ 2 visible keys (p > 0) of H_i / log m_i, rows divided by their sum first."""
    a = a.detach().double()
    out = {}
    if "first_token_mass" in names:
        out["first_token_mass"] = a[..., :, 0].mean(-1)
    if "sink_score" in names:
        if not 0 <= sink_k < a.shape[-1]:
            raise ValueError(f"sink_k must be in [0, {a.shape[-1]}), got {sink_k}")
        out["sink_score"] = a[..., sink_k:, sink_k].mean(-1)
    if "attention_entropy" in names:
        a = a.clamp_min(0)
        total = a.sum(-1, keepdim=True)
        p = a / torch.where(total > 0, total, torch.ones_like(total))
        visible = (p > 0).sum(-1)
        h = -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum(-1)
        keep = visible >= 2
        ratio = torch.where(keep, h / torch.log(visible.clamp_min(2).double()), torch.zeros_like(h))
        n = keep.sum(-1)
        out["attention_entropy"] = torch.where(
            n > 0, ratio.sum(-1) / n.clamp_min(1), torch.full_like(h[..., 0], np.nan)
        )
    return {k: v.cpu().numpy() for k, v in out.items()}


class AttentionSink:
    """Collects per-layer attention (B, H, T, T): stored whole, or reduced on arrival."""

    def __init__(self, n_layers: int, reduce=(), sink_k: int = 0):
        self.n_layers, self.reduce, self.sink_k = n_layers, tuple(reduce), sink_k
        self.maps: list = [None] * n_layers
        self.reduced: list = [None] * n_layers

    def add(self, layer: int, a: torch.Tensor):
        if self.reduce:
            self.reduced[layer] = reduce_attention(a, self.reduce, self.sink_k)
        else:
            self.maps[layer] = a.detach().cpu()

    def variables(self, prefix: str = "") -> dict:
        """Data variables padded with NaN at layer L (no block reads the final tokens)."""
        if self.reduce:
            if any(r is None for r in self.reduced):
                raise RuntimeError("attention was not captured for every layer")
            out = {}
            for name in self.reduce:
                arr = np.stack([r[name] for r in self.reduced], 1)  # (B, L, H)
                arr = np.concatenate([arr, np.full_like(arr[:, :1], np.nan)], 1)
                out[prefix + name] = (("sample", "layer", "head"), arr)
            return out
        if any(m is None for m in self.maps):
            raise RuntimeError("attention was not captured for every layer")
        arr = torch.stack(self.maps, 1).numpy()  # (B, L, H, T, T)
        arr = np.concatenate([arr, np.full_like(arr[:, :1], np.nan)], 1)
        return {prefix + "attention": (("sample", "layer", "head", "query", "key"), arr)}


def attention_layers(ds_or_da):
    """The layers that have attention: an extracted Dataset's first ``n_attention_layers``; for a
    DataArray, every layer up to the trailing all-NaN ones (the padded layer L)."""
    n = ds_or_da.sizes["layer"]
    if "n_attention_layers" in ds_or_da.attrs:
        n = int(ds_or_da.attrs["n_attention_layers"])
    elif isinstance(ds_or_da, xr.DataArray):
        while n > 0 and bool(ds_or_da.isel(layer=n - 1).isnull().all()):
            n -= 1
    return ds_or_da.isel(layer=slice(0, n))


def build_dataset(hidden: list[torch.Tensor], attn_vars: dict, coords: dict, attrs: dict) -> xr.Dataset:
    """Assemble the extracted Dataset; ``hidden`` is the list of L + 1 tensors (B, T, D)."""
    x = torch.stack([h.detach().cpu() for h in hidden], 1).numpy()
    S, n_layers, T, D = x.shape
    ds = xr.Dataset(
        {"x": (("sample", "layer", "token", "component"), x), **attn_vars},
        coords={"sample": np.arange(S), "layer": np.arange(n_layers), "token": np.arange(T), **coords},
    )
    ds.attrs.update(encode_attrs({k: v for k, v in attrs.items() if v is not None}))
    ds.attrs["n_attention_layers"] = n_layers - 1
    ds.attrs["attention_convention"] = (
        "attention[layer=l] is computed from x[layer=l] (block l+1); the last layer has none (NaN)"
    )
    from particles import __version__

    ds.attrs["krause_sync_version"] = __version__
    return ds
