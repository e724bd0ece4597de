"""Per-layer measurements of one trained model on held-out inputs (the bridge, batched).

For S held-out inputs, layers ℓ = 0..L (layer 0 = embeddings, layer ℓ = residual stream after block
ℓ) and attention of block ℓ + 1 read at layer ℓ (the bridge's convention):

* token metrics on the unit sphere u_i = x_i/‖x_i‖ (so the growth of token norms changes nothing):
  ``clusters`` (ε-graph components ‖u_i − u_j‖ ≤ ε, for each ε of ``EPS``), ``clusters_no_first``
  (the same without token 0, the CLS/BOS token), ``effective_rank`` (Roy–Vetterli), ``mean_cosine``,
  and the mean token norm ``norm`` (of the raw x);
* attention, per (layer, head, query), averaged over the inputs: ``a0`` = a_i0 (the first-token
  weight), ``a0_uniform`` = 1[0 ∈ N(i)]/|N(i)| (what uniform weights over the visible keys N(i)
  would give it; N(i) = the locality support, then top-k), ``entropy`` = H(a_i·)/log|N(i)| (rows with
  |N(i)| ≥ 2); ``key_mass`` (layer, head, key) = mean_i a_ik for every key (is there a sink on
  some other token?); ``reaches_output`` (layer, query) marks the rows whose output reaches the model's
  prediction (the ViT's last block: only the CLS row; a causal LM: every row).

From these, :func:`summarise` gives per-layer α₀ = mean_i a_i0 and its excess over uniform, over all
rows or only the rows that reach the output, the attention entropy and the fraction of heads whose
excess is above a threshold.
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr

EPS = (0.25, 0.5, 0.75, 1.0)


def _support_sizes(attn, T: int) -> tuple[np.ndarray, np.ndarray]:
    """(|N(i)|, 1[0 in the locality support of i]) from the module's locality mask and top-k."""
    mask = attn.support(T)
    loc = np.full(T, T) if mask is None else mask.sum(-1).cpu().numpy()
    first = np.ones(T, bool) if mask is None else mask[:, 0].cpu().numpy()
    k = getattr(attn, "top_k", None)
    return (np.minimum(loc, k) if k is not None else loc), first


def _attention_sums(blocks, a: np.ndarray, entropy: bool = True) -> dict:
    """Sums over the inputs of a_i0, 1[0 ∈ N(i)]/|N(i)| and H_i/log|N(i)|, each (L, H, T), from the
    attention a (B, L, H, T, T) of ``blocks``. 0 ∈ N(i): in the locality support and, with top-k,
    among the kept keys (a_i0 > 0)."""
    a = a.astype(np.float64)
    T = a.shape[-1]
    m, loc0 = (np.stack(v) for v in zip(*(_support_sizes(b.attn, T) for b in blocks)))  # (L, T)
    topk = np.array([getattr(b.attn, "top_k", None) is not None for b in blocks])
    vis0 = loc0[None, :, None, :] & np.where(topk[None, :, None, None], a[..., 0] > 0, True)
    out = {"a0": a[..., 0].sum(0), "a0_uniform": (vis0 / m[None, :, None, :]).sum(0)}
    if entropy:
        out["key_mass"] = a.mean(-2).sum(0)  # (L, H, key): mean_i a_ik, every key, not only the first
        h = -(a * np.log(np.where(a > 0, a, 1.0))).sum(-1)
        ent = np.where(m[None, :, None, :] >= 2, h / np.log(np.maximum(m, 2))[None, :, None, :], np.nan)
        out["entropy"] = np.nansum(ent, 0)
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def reaching_rows(model, n_layers: int, T: int) -> np.ndarray:
    """(L, T) bool: rows of block ℓ + 1's attention whose output reaches the prediction."""
    keep = np.ones((n_layers, T), bool)
    if hasattr(model, "patch_embed"):  # ViT: the head reads CLS after the last block only
        keep[-1] = False
        keep[-1, 0] = True
    return keep


def measure(model, inputs, *, batch: int = 64, eps=EPS) -> xr.Dataset:
    """Per-layer token and per-(layer, head, query) attention measurements, mean over ``inputs``."""
    import analysis
    from analysis.bridge import extract

    blocks = list(model.blocks)
    L = len(blocks)
    sums: dict[str, np.ndarray] = {}
    S = 0
    for start in range(0, len(inputs), batch):
        chunk = inputs[start : start + batch]
        ds = extract(model, chunk)
        x = ds["x"].values.astype(np.float64)  # (B, L+1, T, D)
        B, _, T, _ = x.shape
        u = xr.DataArray(_unit(x), dims=("sample", "layer", "token", "component"))
        part = {
            "clusters": np.stack([analysis.count_clusters(u, e).values.sum(0) for e in eps]),
            "clusters_no_first": np.stack(
                [analysis.count_clusters(u.isel(token=slice(1, None)), e).values.sum(0) for e in eps]
            ),
            "effective_rank": analysis.effective_rank(u).values.sum(0),
            "mean_cosine": analysis.mean_cosine(u).values.sum(0),
            "norm": np.linalg.norm(x, axis=-1).mean(-1).sum(0),
        }
        part.update(_attention_sums(blocks, ds["attention"].values[:, :L]))
        for k, v in part.items():
            sums[k] = sums.get(k, 0) + v
        S += B
    T = int(sums["a0"].shape[-1])
    H = int(sums["a0"].shape[1])
    m = np.stack([_support_sizes(b.attn, T)[0] for b in blocks])
    out = xr.Dataset(
        {
            "clusters": (("eps", "layer"), sums["clusters"] / S),
            "clusters_no_first": (("eps", "layer"), sums["clusters_no_first"] / S),
            "effective_rank": ("layer", sums["effective_rank"] / S),
            "mean_cosine": ("layer", sums["mean_cosine"] / S),
            "norm": ("layer", sums["norm"] / S),
            "a0": (("attn_layer", "head", "query"), sums["a0"] / S),
            "a0_uniform": (("attn_layer", "head", "query"), sums["a0_uniform"] / S),
            "entropy": (
                ("attn_layer", "head", "query"),
                np.where(m[:, None, :] >= 2, sums["entropy"] / S, np.nan),
            ),
            "key_mass": (("attn_layer", "head", "key"), sums["key_mass"] / S),
            "reaches_output": (("attn_layer", "query"), reaching_rows(model, L, T)),
            "support_size": (("attn_layer", "query"), m),
        },
        coords={
            "eps": list(eps),
            "layer": np.arange(L + 1),
            "attn_layer": np.arange(L),
            "head": np.arange(H),
            "query": np.arange(T),
            "key": np.arange(T),
        },
    )
    out.attrs.update(n_inputs=S, n_tokens=T, n_layers=L)
    return out


def summarise(m: xr.Dataset, *, threshold: float = 0.1) -> xr.Dataset:
    """Per-layer summaries of :func:`measure`'s output.

    ``alpha0`` = mean_i a_i0 over all rows, ``alpha0_excess`` = mean_i (a_i0 − 1[0∈N(i)]/|N(i)|),
    ``alpha0_excess_out`` the same over the rows that reach the output, ``entropy`` (mean over rows
    and heads), ``entropy_out``, ``sink_heads`` = fraction of heads whose α₀ excess (all rows) > threshold.
    Attention variables are on ``attn_layer`` (block ℓ + 1 reading layer ℓ).
    """
    exc = m["a0"] - m["a0_uniform"]
    reach = m["reaches_output"]
    out = xr.Dataset(
        {
            "alpha0": m["a0"].mean(("head", "query")),
            "alpha0_uniform": m["a0_uniform"].mean(("head", "query")),
            "alpha0_excess": exc.mean(("head", "query")),
            "alpha0_excess_out": exc.where(reach).mean(("head", "query")),
            "entropy": m["entropy"].mean(("head", "query")),
            "entropy_out": m["entropy"].where(reach).mean(("head", "query")),
            "sink_heads": (exc.mean("query") > threshold).mean("head").astype(float),
            "clusters": m["clusters"],
            "clusters_no_first": m["clusters_no_first"],
            "effective_rank": m["effective_rank"],
            "mean_cosine": m["mean_cosine"],
            "norm": m["norm"],
        }
    )
    out.attrs.update(m.attrs, sink_threshold=threshold)
    return out


@torch.no_grad()
def first_token_probe(windows: torch.Tensor):
    """A training probe: per-layer α₀ = mean_{i,h} a_i0 and its excess over uniform, on fixed windows."""

    def probe(model) -> dict:
        return first_token_numbers(measure_attention_only(model, windows))

    return probe


def first_token_numbers(m: xr.Dataset) -> dict:
    """:func:`first_token_probe`'s per-layer lists from :func:`measure_attention_only`'s output."""
    return {
        "alpha0": m["a0"].mean(("head", "query")).values.tolist(),
        "alpha0_excess": (m["a0"] - m["a0_uniform"]).mean(("head", "query")).values.tolist(),
        "alpha0_max_head": m["a0"].mean("query").max("head").values.tolist(),
    }


def backcopy_probe(windows: torch.Tensor, active: torch.Tensor):
    """A training probe for Bigram-Backcopy: :func:`first_token_probe`'s numbers plus, per layer and
    mean over heads, ``alpha0_dormant`` = mean a_i0 over the dormant rows that can see the first
    token (i ≥ 1, not ``active``, 0 in the locality support of i), ``alpha0_dormant_uniform`` = the
    same for uniform weights over each row's visible keys, ``alpha0_active`` = mean a_i0 over the
    active rows, ``self_dormant`` = mean a_ii over all dormant rows (i ≥ 1) and ``previous_active``
    = mean a_i,i−1 over the active rows (the copy)."""
    active = active.numpy()
    dormant = ~active
    dormant[:, 0] = False

    def probe(model) -> dict:
        blocks = list(model.blocks)
        heads = _attention(model, windows)  # (B, L, H, T, T): one forward for every number
        a = heads.mean(2)  # (B, L, T, T), mean over heads
        T = a.shape[-1]
        sizes, first = (np.stack(v) for v in zip(*(_support_sizes(b.attn, T) for b in blocks)))
        out = {}
        for layer in range(len(blocks)):
            sees = dormant & first[layer][None, :]
            rows = np.arange(T)
            out.setdefault("alpha0_dormant", []).append(a[:, layer, :, 0][sees].mean())
            out.setdefault("alpha0_dormant_uniform", []).append(
                np.broadcast_to(1.0 / sizes[layer], sees.shape)[sees].mean()
            )
            out.setdefault("alpha0_active", []).append(a[:, layer, :, 0][active].mean())
            out.setdefault("self_dormant", []).append(a[:, layer, rows, rows][dormant].mean())
            prev = a[:, layer, rows[1:], rows[:-1]]
            out.setdefault("previous_active", []).append(prev[active[:, 1:]].mean())
        first = first_token_numbers(_attention_dataset(blocks, heads))
        return {**first, **{k: [float(x) for x in v] for k, v in out.items()}}

    return probe


def _attention(model, inputs) -> np.ndarray:
    """The attention weights (B, L, H, T, T) of every block of ``model`` on ``inputs`` (float64)."""
    from particles.nn.hooks import capture, hook_sites

    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(len(model.blocks))]
    with capture(hook_sites(model), names) as got:
        model(inputs)
    return torch.stack([got[n] for n in names], 1).double().numpy()


def measure_attention_only(model, inputs) -> xr.Dataset:
    """a0 and a0_uniform (layer, head, query) of ``inputs`` without the token metrics (fast)."""
    return _attention_dataset(list(model.blocks), _attention(model, inputs))


def _attention_dataset(blocks, a: np.ndarray) -> xr.Dataset:
    """a0 and a0_uniform (layer, head, query), mean over inputs, of the attention a (B, L, H, T, T)."""
    sums = _attention_sums(blocks, a, entropy=False)
    dims = ("attn_layer", "head", "query")
    return xr.Dataset({k: (dims, v / a.shape[0]) for k, v in sums.items()})


@torch.no_grad()
def uniform_rows_effect(model, inputs, block: int, rows) -> float:
    """max |Δ output| when the attention rows ``rows`` of ``blocks[block]`` are replaced by uniform
    weights over their support (every head): 0 means those rows do not reach the prediction."""
    attn = model.blocks[block].attn
    base = model(inputs)
    original = attn.weights

    def uniform(s, mask):
        a = original(s, mask)
        flat = (a > 0).to(a.dtype)
        u = flat / flat.sum(-1, keepdim=True)
        a = a.clone()
        a[..., rows, :] = u[..., rows, :]
        return a

    attn.weights = uniform
    try:
        changed = model(inputs)
    finally:
        del attn.weights  # back to the class method
    return float((changed - base).abs().max())
