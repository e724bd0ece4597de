"""Attention-sink metrics on attention/interaction matrices, and massive activations.

Attention inputs have trailing axes ("query", "key") and any leading axes, e.g.
("sample", "layer", "head", "query", "key") from a trained model or ("time", "query", "key") for
simulated interaction weights; a Dataset contributes its variable "attention". Plain numpy
leading axes are named right-aligned from ("sample", "layer", "head").
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from analysis._layout import ATTENTION, POINTS, check_positive, per_item


@per_item(ATTENTION)
def first_token_mass(attention):
    """Mean over queries i of A_i0, the weight on the first key (rows taken as given)."""
    return attention[:, 0].mean()


@per_item(ATTENTION)
def sink_scores(attention, k=0):
    """Gu et al. (2024) sink score α_k = (1/(n − k)) Σ_{i ≥ k} A_ik: mean weight on key k over the
    queries that can see it causally."""
    if isinstance(k, bool) or not float(k).is_integer() or not 0 <= k < min(attention.shape):
        raise ValueError(f"k must be an integer in [0, {min(attention.shape)}), got {k!r}")
    return attention[int(k):, int(k)].mean()


def sink_rate(attention, eps=0.3, k=0):
    """Gu et al. (2024) Sink_k^ε = fraction of (layer, head) pairs with α_k > ε.

    The fraction is taken over the "layer" and "head" axes that are present; every other leading
    axis is kept: one value per sample for model attention (sample, layer, head, …), one per time
    step for simulated weights (time, query, key) (then 0 or 1, the rate of a single head).
    A single matrix gives 0.0 or 1.0.
    """
    eps = check_positive("eps", eps)
    alpha = sink_scores(attention, k)
    if not isinstance(alpha, xr.DataArray):
        return float(alpha > eps)
    rate = (alpha > eps).astype(float).mean([d for d in ("layer", "head") if d in alpha.dims])
    return rate.item() if rate.ndim == 0 else rate.rename("sink_rate")


@per_item(ATTENTION)
def attention_entropy(attention):
    """Mean over queries of the normalised row entropy H_i / log m_i.

    Each row is first divided by its sum (so unnormalised USA weights work too);
    H_i = −Σ_j p_ij log p_ij over the m_i visible keys, visible meaning p_ij > 0 (a causal mask,
    a window or top-k give exact zeros; so can underflow). Rows with m_i < 2 have no entropy to
    normalise and are left out of the mean; NaN if no row has two visible keys.
    """
    a = np.clip(attention, 0.0, None)
    p = a / np.where(a.sum(axis=1, keepdims=True) > 0, a.sum(axis=1, keepdims=True), 1.0)
    visible = (p > 0).sum(axis=1)
    h = -np.sum(p * np.log(np.where(p > 0, p, 1.0)), axis=1)
    keep = visible >= 2
    return np.mean(h[keep] / np.log(visible[keep])) if keep.any() else np.nan


@per_item(POINTS)
def massive_activations(h, threshold=100.0, ratio=1000.0):
    """Number of entries of one layer's hidden states h (token, component) with |h| > threshold and
    |h| > ratio · median(|h|) over that layer (Sun et al. 2024: 100 and 1000); per layer/sample."""
    a = np.abs(h)
    return int(np.sum((a > threshold) & (a > ratio * np.median(a))))
