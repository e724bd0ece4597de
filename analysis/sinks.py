"""Attention-sink metrics on attention/interaction matrices, and massive activations.

Attention inputs have the item axes ("query", "key") — found by name, in any position — and any
leading axes, e.g. ("sample", "layer", "head", "query", "key") from a trained model or
("time", "query", "key") for simulated interaction weights; a Dataset contributes its variable
"attention" and its ``token_mask``. Plain numpy leading axes are named right-aligned from
("sample", "layer", "head").

Notation, for one matrix A after dropping padding rows and keys (``token_mask``):

* visible keys of query i: V_i = {j : A_ij > 0} (the support: a causal mask, a window, a locality
  mask or top-k give exact zeros; so can underflow);
* the rows used, R_k: the selected queries (``queries=``; all by default) with i ≥ k;
* α_k = mean_{i ∈ R_k} A_ik, the sink score of key k (Gu et al. 2024, "When attention sink emerges
  in language models: an empirical view", arXiv 2410.10781);
* b_k = mean_{i ∈ R_k} 1[k ∈ V_i] / |V_i|, what α_k would be if every query spread its weight
  uniformly over its visible keys (a row without visible keys adds 0 to both α_k and b_k).

``queries=`` restricts every sink metric to the rows that matter, e.g. ``queries=0`` for a
classifier that reads only its CLS row, or a boolean array / DataArray with a "query" axis. Its
indices refer to the stored query positions; key k counts real tokens (= key k without padding).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from analysis._layout import ATTENTION, POINTS, check_index, check_positive, per_item


def _k(shape, arguments):
    arguments["k"] = check_index("k", arguments["k"], min(shape))


@per_item(ATTENTION, item_dims=(("part", 2),), check=_k, stacked=True)
def _alpha_baseline(attention, k=0, *, queries=None, baseline=True):
    """(α_k, b_k) of a stack of matrices (N, n, m) (see the module docstring); NaN when R_k is empty.
    b_k is NaN unless ``baseline`` (it costs a pass over the support)."""
    N, n, m = attention.shape
    if k >= min(n, m):  # fewer real tokens than k + 1
        return np.full((N, 2), np.nan)
    rows = queries & (np.arange(n) >= k)
    used = rows.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        alpha = np.where(rows, attention[:, :, k], 0.0).sum(axis=1) / used
        if not baseline:
            return np.stack([alpha, np.full(N, np.nan)], axis=1)
        count = (attention > 0).sum(axis=2)
        share = np.where(rows & (count > 0), (attention[:, :, k] > 0) / np.maximum(count, 1), 0.0)
        return np.stack([alpha, share.sum(axis=1) / used], axis=1)


def _scalar(da):
    return da.item() if isinstance(da, xr.DataArray) and da.ndim == 0 else da


def _named(da, name):
    return _scalar(da.rename(name) if isinstance(da, xr.DataArray) else da)


def sink_scores(
    attention: np.ndarray | xr.DataArray | xr.Dataset, k: int = 0, *, queries=None, token_mask=None,
) -> float | xr.DataArray:
    """Gu et al. (2024) sink score α_k = (1/|R_k|) Σ_{i ∈ R_k} A_ik: mean weight on key k over the
    queries that can see it causally (i ≥ k); one value per matrix (per layer, head, …)."""
    parts = _alpha_baseline(attention, k, queries=queries, baseline=False, token_mask=token_mask)
    return _named(parts.isel(part=0, drop=True), "sink_scores")


def first_token_mass(
    attention: np.ndarray | xr.DataArray | xr.Dataset, *, queries=None, token_mask=None,
) -> float | xr.DataArray:
    """Mean weight on the first (real) key, (1/|R_0|) Σ_{i ∈ R_0} A_i0 = α_0 (see ``sink_scores``): the
    attention sink of Xiao, Tian, Chen, Han, Lewis 2023 ("Efficient streaming language models with
    attention sinks", arXiv 2309.17453)."""
    return _named(sink_scores(attention, 0, queries=queries, token_mask=token_mask), "first_token_mass")


def _mean_over(da, over):
    over = (over,) if isinstance(over, str) else tuple(over)
    return da.mean([d for d in over if d in da.dims])


def sink_excess(
    attention: np.ndarray | xr.DataArray | xr.Dataset, k: int = 0, *, over: tuple[str, ...] = ("head",),
    queries=None, token_mask=None,
) -> float | xr.DataArray:
    """α_k − b_k: the sink score above the uniform-over-visible-keys baseline, averaged over the
    axes ``over`` that are present (default "head"; others, e.g. layer and sample, are kept).

    0 for attention that is uniform over each row's support; 1 − b_k at most (all weight on key k).
    Unlike α_k it compares across supports of different sizes: uniform attention over 6 keys has
    α_0 = 1/6, over 17 keys 1/17, and an excess of 0 in both. Visible keys are read from the support
    A_ij > 0 and the token mask (see the module docstring), so a row that is exactly one-hot on key k
    has excess 0: its support is key k alone (the support cannot tell such a row from a mask; softmax
    rows are never exactly one-hot unless exp underflows).
    """
    parts = _alpha_baseline(attention, k, queries=queries, token_mask=token_mask)
    excess = parts.isel(part=0, drop=True) - parts.isel(part=1, drop=True)
    return _named(_mean_over(excess, over), "sink_excess")


def sink_rate(
    attention: np.ndarray | xr.DataArray | xr.Dataset, eps: float = 0.3, k: int = 0, *,
    relative: bool = False, queries=None, token_mask=None,
) -> float | xr.DataArray:
    """Gu et al. (2024) Sink_k^ε = fraction of (layer, head) pairs whose key k is a sink.

    ``relative=False`` (Gu et al.): a sink is α_k > ε.
    ``relative=True``: a sink is α_k > b_k + ε (1 − b_k), i.e. (α_k − b_k)/(1 − b_k) > ε: key k
    holds more than the fraction ε of the mass that uniform attention over the visible keys leaves
    to be gained (1 − b_k). This normalised excess is 0 for uniform attention and 1 for a full sink
    whatever the support size, so one ε means the same for a 6-key and a 17-key support (a fixed
    α_k > 0.3 is 1.8 × uniform on 6 keys but 5.1 × on 17); for many keys (b_k → 0) it is Gu et al.'s
    α_k > ε. An additive α_k > b_k + ε would be unattainable on small supports (b_k ≥ 1 − ε), a
    multiplicative α_k > (1 + ε) b_k trivially small on large ones. A single visible key is never a
    sink.

    The fraction is taken over the "layer" and "head" axes that are present; every other leading
    axis is kept: one value per sample for model attention (sample, layer, head, …), one per time
    step for simulated weights (time, query, key) (then 0 or 1, the rate of a single head).
    A single matrix gives 0.0 or 1.0. Matrices without α_k (missing, or R_k empty) are left out of
    the fraction (NaN if none is left).
    """
    eps = check_positive("eps", eps)
    if not isinstance(relative, (bool, np.bool_)):
        raise TypeError(f"relative must be True or False, got {relative!r}")
    parts = _alpha_baseline(attention, k, queries=queries, token_mask=token_mask)
    alpha, base = parts.isel(part=0, drop=True), parts.isel(part=1, drop=True)
    sink = (alpha > (base + eps * (1 - base) if relative else eps)).astype(float).where(alpha.notnull())
    rate = sink.mean([d for d in ("layer", "head") if d in sink.dims])
    return _named(rate, "sink_rate")


@per_item(ATTENTION)
def attention_entropy(
    attention: np.ndarray | xr.DataArray | xr.Dataset, *, queries=None,
) -> float | xr.DataArray:
    """Mean over the selected queries i of the normalised row entropy H_i / log |V_i|.

    Each row is first divided by its sum (so unnormalised USA weights work too; weights are ≥ 0);
    H_i = −Σ_{j ∈ V_i} p_ij log p_ij over the visible keys V_i = {j : p_ij > 0}. Rows with
    |V_i| < 2 have no entropy to normalise and are left out of the mean; NaN if no row has two
    visible keys. 1 for attention uniform over each row's support, 0 for one-hot rows (the
    normalised form of the attention entropy of Zhai et al. 2023, "Stabilizing transformer training
    by preventing attention entropy collapse", arXiv 2303.06296).
    """
    a = attention if queries.all() else attention[queries]
    total = a.sum(axis=1, keepdims=True)
    p = a / np.where(total > 0, total, 1.0)
    visible = (p > 0).sum(axis=1)
    h = -np.sum(p * np.log(np.where(p > 0, p, 1.0)), axis=1)
    keep = visible >= 2
    return np.mean(h[keep] / np.log(visible[keep])) if keep.any() else np.nan


def _massive_args(shape, arguments):
    for name in ("threshold", "ratio"):
        arguments[name] = check_positive(name, arguments[name])


@per_item(POINTS, dtype=int, check=_massive_args)
def massive_activations(
    h: np.ndarray | xr.DataArray | xr.Dataset, threshold: float = 100.0, ratio: float = 1000.0,
) -> int | xr.DataArray:
    """Number of entries of one layer's hidden states h (token, component) with |h| > threshold and
    |h| > ratio · median(|h|) over that layer's real tokens (Sun, Chen, Kolter, Liu 2024, "Massive
    activations in large language models": 100 and 1000); per layer/sample. Raw values (no sphere)."""
    a = np.abs(h)
    return int(np.sum((a > threshold) & (a > ratio * np.median(a)))) if a.size else 0
