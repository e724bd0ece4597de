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
  ``sink_score`` (Gu et al. α_k), ``sink_excess`` (α_k minus the uniform-over-visible-keys baseline)
  and ``attention_entropy`` (sample, layer, head), computed as each layer's weights arrive at its
  hook point, so that no T×T map outlives its layer (memory: the hidden states, O(S·L·T·D)).
* hybrids (gated softmax + Krause): ``attention`` = Σ_b g_ib a^b_ij, ``branch_attention`` (or
  ``branch_*`` reductions) with a ``branch`` axis (softmax, krause), ``gate`` (sample, layer, token,
  branch).
* ``token_mask`` (sample, token): a boolean coordinate (True = real token, False = padding), so
  ``ds.x`` carries it; the reductions leave padding out (rows and keys) as the metrics do.
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from particles.conventions import encode_attrs

#: Reductions ``reduce=`` can compute inside the hooks, each (B, H, T, T) → (B, H).
REDUCTIONS = ("first_token_mass", "sink_score", "sink_excess", "attention_entropy")


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


def reduce_attention(a: torch.Tensor, names, sink_k: int = 0, token_mask=None) -> dict[str, np.ndarray]:
    """Per-(sample, head) reductions of attention a (B, H, T, T), as ``analysis.sinks`` defines them on
    the real tokens (``token_mask`` (B, T), True = real; padding rows are left out, key k is the k-th
    real token). With R_k the real queries at real position ≥ k and V_i = {j real : a_ij > 0}:
    first_token_mass = α_0; sink_score = α_k = mean_{i∈R_k} a_ik; sink_excess = α_k − b_k with
    b_k = mean_{i∈R_k} 1[k ∈ V_i]/|V_i| (uniform over the visible keys); attention_entropy = mean over
    real rows with |V_i| ≥ 2 of H_i / log |V_i|, rows divided by their sum first, computed in one pass
    as H_i = log t_i − (Σ_j a_ij log a_ij)/t_i with t_i = Σ_j a_ij. Elementwise work and row sums in
    the weights' dtype (float32 at least; torch sums pairwise), means over rows in float64."""
    a = a.detach()
    if a.dtype not in (torch.float32, torch.float64):
        a = a.float()
    B, H, T, _ = a.shape
    mask = torch.ones(B, T, dtype=torch.bool) if token_mask is None else torch.as_tensor(token_mask).bool()
    mask = mask.to(a.device)
    if not bool(mask.all()):
        a = a * mask[:, None, None, :]  # padding is never a key
    position = mask.cumsum(-1) - 1  # real index of every token
    n_real = mask.sum(-1)
    visible = (a > 0).sum(-1, dtype=torch.int32)  # (B, H, T)
    out = {}

    def alpha_baseline(k, baseline):
        if (n_real <= k).any():
            raise ValueError(f"sink_k must be smaller than every sample's number of tokens, got {k}")
        key = (mask & (position == k)).double().argmax(-1)  # (B,) index of the k-th real token
        col = a.gather(-1, key[:, None, None, None].expand(B, H, T, 1))[..., 0].double()  # (B, H, T)
        rows = (mask & (position >= k))[:, None, :].double()
        used = rows.sum(-1)
        alpha = (col * rows).sum(-1) / used
        if not baseline:
            return alpha, None
        share = torch.where(visible > 0, (col > 0).double() / visible.clamp_min(1), torch.zeros_like(col))
        return alpha, (share * rows).sum(-1) / used

    if "first_token_mass" in names:
        out["first_token_mass"] = alpha_baseline(0, False)[0]
    if "sink_score" in names or "sink_excess" in names:
        alpha, base = alpha_baseline(sink_k, "sink_excess" in names)
        if "sink_score" in names:
            out["sink_score"] = alpha
        if "sink_excess" in names:
            out["sink_excess"] = alpha - base
    if "attention_entropy" in names:
        pos = a.clamp_min(0) if bool(a.amin() < 0) else a
        total = pos.sum(-1).double()
        alog = torch.special.xlogy(pos, pos).sum(-1).double()  # Σ_j a_ij log a_ij, 0 log 0 = 0
        h = torch.where(total > 0, torch.log(total.clamp_min(1e-300)) - alog / total, 0.0)
        keep = (visible >= 2) & mask[:, None, :]
        ratio = torch.where(keep, h / torch.log(visible.clamp_min(2).double()), torch.zeros_like(h))
        n = keep.sum(-1)
        out["attention_entropy"] = torch.where(
            n > 0, ratio.sum(-1) / n.clamp_min(1), torch.full_like(h[..., 0], np.nan)
        )
    return {k: v.cpu().numpy() for k, v in out.items()}


class AttentionSink:
    """Collects per-layer attention (B, H, T, T) batch after batch: stored whole, or reduced on arrival
    (then no T×T map outlives its layer)."""

    def __init__(self, n_layers: int, reduce=(), sink_k: int = 0):
        self.n_layers, self.reduce, self.sink_k = n_layers, tuple(reduce), sink_k
        self.parts: list[list] = [[] for _ in range(n_layers)]

    def add(self, layer: int, a: torch.Tensor, token_mask=None):
        if self.reduce:
            self.parts[layer].append(reduce_attention(a, self.reduce, self.sink_k, token_mask))
        else:
            self.parts[layer].append(a.detach().float().cpu().numpy())

    def variables(self, prefix: str = "") -> dict:
        """Data variables padded with NaN at layer L (no block reads the final tokens)."""
        counts = {len(p) for p in self.parts}
        if len(counts) != 1 or 0 in counts:
            raise RuntimeError("attention was not captured for every layer")
        if self.reduce:
            out = {}
            for name in self.reduce:
                arr = np.stack([np.concatenate([r[name] for r in p]) for p in self.parts], 1)  # (B, L, H)
                arr = np.concatenate([arr, np.full_like(arr[:, :1], np.nan)], 1)
                out[prefix + name] = (("sample", "layer", "head"), arr)
            return out
        arr = np.stack([np.concatenate(p) for p in self.parts], 1)  # (B, L, H, T, T)
        arr = np.concatenate([arr, np.full_like(arr[:, :1], np.nan)], 1)
        return {prefix + "attention": (("sample", "layer", "head", "query", "key"), arr)}


BRANCHES = ("softmax", "krause")


def is_hybrid(sites: dict) -> bool:
    """A hybrid (gated softmax + Krause) model: its attention has a ``hook_gate`` hook point."""
    return "blocks.0.attn.hook_gate" in sites


def run_hooks(
    sites: dict,
    forward,
    batches,
    *,
    n_layers: int,
    hidden_names=None,
    attention: bool = True,
    reduce=(),
    sink_k: int = 0,
    progress: bool = False,
    desc: str = "extract",
):
    """One pass per batch with hooks on the named hook points; hooks removed after every batch.

    batches: list of (batch, token_mask (B, T) bool or None); forward(batch) runs the model and may
    return its L + 1 hidden states: they are used where ``hidden_names`` is None (all of them) or has a
    None entry. Returns (x (S, L + 1, T, D) float32
    array, attention variables: ``attention`` or the reductions; for hybrids also ``branch_*`` with a
    ``branch`` axis and ``gate`` (sample, layer, token, branch)).
    """
    from tqdm.auto import tqdm

    from particles.nn.hooks import capture

    L = n_layers
    hybrid = attention and is_hybrid(sites)
    mix = AttentionSink(L, reduce, sink_k)
    branch = {b: AttentionSink(L, reduce, sink_k) for b in BRANCHES} if hybrid else {}
    gates: list[list] = [[] for _ in range(L)]
    sizes = [len(mask) if mask is not None else len(next(iter(b.values()))) for b, mask in batches]
    x, start = None, 0  # filled batch by batch: no second copy of the hidden states
    names = [n for n in hidden_names or [] if n is not None]
    if attention:
        names += [f"blocks.{l}.attn.hook_pattern" for l in range(L)]
    if hybrid:
        names += [f"blocks.{l}.attn.hook_gate" for l in range(L)]
        names += [f"blocks.{l}.attn.{b}.hook_pattern" for l in range(L) for b in BRANCHES]
    slot = {n: i for i, n in enumerate(hidden_names or []) if n is not None}
    for batch, mask in tqdm(batches, desc=desc, unit="batch", disable=not progress or len(batches) < 2):
        hidden: list = [None] * len(hidden_names or [])

        def on(name, value, mask=mask, hidden=hidden):
            if name in slot:
                hidden[slot[name]] = value.detach().float().cpu()
                return
            layer = int(name.split(".")[1])
            if value is None:
                raise ValueError(
                    f"layer {layer} returned no attention weights: the model cannot produce attention "
                    "weights as loaded (it needs attn_implementation='eager')"
                )
            if name.endswith("attn.hook_pattern"):
                mix.add(layer, value, mask)
            elif name.endswith("hook_gate"):
                gates[layer].append(value.detach().float().cpu().numpy())
            else:
                branch[name.split(".")[3]].add(layer, value, mask)

        with torch.no_grad(), capture(sites, names, on):
            returned = forward(batch)
        if hidden_names is None:
            hidden = [h.detach().float().cpu() for h in returned]
        else:  # None entries: the forward's own hidden state at that index
            hidden = [
                returned[i].detach().float().cpu() if n is None else hidden[i]
                for i, n in enumerate(hidden_names)
            ]
        if any(h is None for h in hidden):
            raise RuntimeError("a hidden state was not captured: the forward pass skipped a hook point")
        B = len(hidden[0])
        if x is None:
            x = np.empty((sum(sizes), len(hidden)) + tuple(hidden[0].shape[1:]), dtype=np.float32)
        for i, h in enumerate(hidden):  # straight into x: no stacked copy of the batch
            x[start : start + B, i] = h.numpy()
        start += B
    attn_vars = {}
    if attention:
        attn_vars.update(mix.variables())
        if hybrid:
            per = {b: branch[b].variables() for b in BRANCHES}
            for name, (dims, _) in per["softmax"].items():
                arr = np.stack([per[b][name][1] for b in BRANCHES], 1)
                attn_vars[f"branch_{name}"] = (dims[:1] + ("branch",) + dims[1:], arr)
            g = np.stack([np.concatenate(p) for p in gates], 1)  # (B, L, T, 2)
            g = np.concatenate([g, np.full_like(g[:, :1], np.nan)], 1)
            attn_vars["gate"] = (("sample", "layer", "token", "branch"), g)
    return x, attn_vars


def batches_of(tensors: dict, token_mask: torch.Tensor, batch_size: int | None):
    """[(dict of tensor slices, token_mask slice)] in order; batch_size None: one batch."""
    n = len(token_mask)
    size = n if not batch_size else int(batch_size)
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [
        ({k: v[s : s + size] for k, v in tensors.items()}, token_mask[s : s + size])
        for s in range(0, n, size)
    ]


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


def build_dataset(hidden, attn_vars: dict, coords: dict, attrs: dict, token_mask=None) -> xr.Dataset:
    """Assemble the extracted Dataset; ``hidden`` is the list of L + 1 tensors (B, T, D) or an array
    (B, L + 1, T, D); ``token_mask`` (B, T) (True = real token) becomes the boolean coordinate
    ``token_mask`` on ("sample", "token"), so ``ds.x`` carries it."""
    if isinstance(hidden, np.ndarray):
        x = hidden
    else:
        x = torch.stack([h.detach().cpu() for h in hidden], 1).numpy()
    S, n_layers, T, D = x.shape
    ds = xr.Dataset(
        {"x": (("sample", "layer", "token", "component"), x), **attn_vars},
        coords={"sample": np.arange(S), "layer": np.arange(n_layers), "token": np.arange(T), **coords},
    )
    mask = np.ones((S, T), bool) if token_mask is None else np.asarray(token_mask, dtype=bool)
    ds = ds.assign_coords(token_mask=(("sample", "token"), mask))
    ds["token_mask"].attrs.update(long_name="real token (False = padding)")
    ds.attrs.update(encode_attrs({k: v for k, v in attrs.items() if v is not None}))
    ds.attrs["n_attention_layers"] = n_layers - 1
    ds.attrs["attention_convention"] = (
        "attention[layer=l] is computed from x[layer=l] (block l+1); the last layer has none (NaN)"
    )
    from particles import __version__

    ds.attrs["krause_sync_version"] = __version__
    return ds
