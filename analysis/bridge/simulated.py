"""Simulated counterparts of a trained model: particle dynamics started from its layer-0 tokens.

* :func:`simulate_like` — ``mode="own"``: the model's own attention sub-layers
  ``block.attn(block.norm1(x))`` (learned q/k/v/o maps, σ, window/grid, top-k; no MLP) as the velocity
  field, one unit of time per layer; ``mode="sa"``/``"krause"``: the presets of
  ``particles.simulate`` (Q = K = V = I) with β or σ.
* :func:`matched_dt` — the time step of the sphere idealisation matched to the model: the dt whose
  first simulated layer turns the tokens by the same mean angle as the model's first block.
* :func:`restrictions` — the support restrictions of a model that the simulator can express;
  :func:`as_interaction` — a single-head attention module as a ``particles`` Interaction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr

from particles.geometry import SPHERE
from particles.integrate import euler

from .core import build_dataset

GEOMETRIES = ("sphere", "residual")
MODES = ("own", "sa", "krause")


def restrictions(ds_or_model) -> dict:
    """Support restrictions the particle simulator can express (causal, window, top_k), read from a
    model or an extracted Dataset's attrs; for a hybrid the Krause branch's, top_k of the first layer.
    A patch-grid locality (ViT) has no counterpart in ``particles.simulate`` and is left out."""
    if isinstance(ds_or_model, xr.Dataset):
        a = ds_or_model.attrs
        causal, window, top_k = bool(a.get("causal", 0)), _parse(a.get("window")), _parse(a.get("top_k"))
    else:
        attn = ds_or_model.blocks[0].attn
        attn = attn.krause if getattr(attn, "kind", "") == "hybrid" else attn
        causal, window = bool(attn.causal), attn.window
        top_k = [(b.attn.krause if b.attn.kind == "hybrid" else b.attn).top_k for b in ds_or_model.blocks]
    if isinstance(window, dict):
        window = window.get("krause")
    if isinstance(top_k, (list, tuple)):
        top_k = top_k[0] if top_k else None
    if isinstance(top_k, dict):
        top_k = top_k.get("krause")
    return {"causal": causal, "window": window, "top_k": top_k}


def _parse(v):
    if isinstance(v, str):
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return None
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def layer0_tokens(x0) -> np.ndarray:
    """The layer-0 tokens as (sample, token, component): from a Dataset/DataArray (layer 0), a tensor
    or an array of shape (T, D) or (S, T, D)."""
    if isinstance(x0, xr.Dataset):
        x0 = x0["x"]
    if isinstance(x0, xr.DataArray):
        if "layer" in x0.dims:
            x0 = x0.isel(layer=0)
        x0 = x0.values
    x0 = x0.detach().cpu().numpy() if isinstance(x0, torch.Tensor) else np.asarray(x0)
    if x0.ndim == 2:
        x0 = x0[None]
    if x0.ndim != 3:
        raise ValueError(
            f"x0: expected (token, component) or (sample, token, component), got shape {x0.shape}"
        )
    return x0


def simulate_like(
    model: torch.nn.Module | None,
    x0: xr.Dataset | xr.DataArray | torch.Tensor | np.ndarray,
    *,
    mode: str = "own",
    geometry: str = "sphere",
    dt: float = 1.0,
    steps_per_layer: int = 1,
    n_layers: int | None = None,
    layers: Sequence[int] | None = None,
    beta: float | None = None,
    sigma: float | None = None,
    attention: bool = True,
    **restrict: Any,
) -> xr.Dataset:
    """Particle dynamics from the layer-0 tokens ``x0`` (an extracted Dataset, or (sample, T, D)).

    mode "own": velocity v = ``block.attn(block.norm1(x))`` of block ℓ during layer ℓ (the model's
      learned attention; MLP and final norm left out). geometry "sphere": x ← normalise(x + h P_x v),
      x0 projected to the unit sphere (Geshkovski et al.); "residual": x ← x + h v, so one step with
      dt = 1 is exactly the block's attention sub-layer h + attn(norm1(h)). h = dt/steps_per_layer.
      ``layers`` picks the blocks (default all).
    mode "sa"/"krause": ``particles.simulate`` preset on the sphere with Q = K = V = I and β/σ, for
      ``n_layers`` (default: the model's) units of time; ``restrict`` (causal, window, top_k) default
      to :func:`restrictions` of the model.
    Returns the extracted layout: "x" (sample, layer, token, component), "attention" (sample, layer,
    head, query, key) computed from x[layer] at each layer (NaN at the last one).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {GEOMETRIES}, got {geometry!r}")
    if not (isinstance(steps_per_layer, int) and steps_per_layer >= 1):
        raise ValueError(f"steps_per_layer must be an integer >= 1, got {steps_per_layer!r}")
    if not (np.isfinite(dt) and dt > 0):
        raise ValueError(f"dt must be a finite number > 0, got {dt!r}")
    x0 = layer0_tokens(x0)
    if mode == "own":
        return _simulate_own(model, x0, geometry, dt, steps_per_layer, layers, attention)
    if geometry != "sphere":
        raise ValueError("the presets 'sa' and 'krause' run on the sphere (geometry='sphere')")
    if n_layers is None:
        if model is None:
            raise ValueError("n_layers is required without a model")
        n_layers = len(model.blocks)
    if model is not None and not restrict:
        restrict = restrictions(model)
    return _simulate_preset(mode, x0, n_layers, dt, steps_per_layer, beta, sigma, attention, restrict)


def _simulate_own(model, x0, geometry, dt, spl, layers, attention):
    if not hasattr(model, "blocks"):
        raise ValueError("mode='own' needs a particles.nn model (blocks with norm1 and attn)")
    blocks = list(model.blocks) if layers is None else [model.blocks[i] for i in layers]
    param = next(model.parameters())
    x = torch.as_tensor(x0, dtype=param.dtype, device=param.device)
    if geometry == "sphere":
        x = SPHERE.retract(x)
    h = dt / spl
    states, maps = [x], []
    with torch.no_grad():
        for block in blocks:
            for s in range(spl):
                v, a = block.attn(block.norm1(x), return_attention=True)
                if s == 0:
                    maps.append(a)
                if geometry == "residual":  # the block's own update h ← h + attn(norm1(h)) (h = 1)
                    x = x + h * v if h != 1 else x + v
                else:  # Euler on the sphere: x ← R(x + h P_x v)
                    x = euler(lambda y, v=v: SPHERE.tangent(y, v), x, h, SPHERE)
            states.append(x)
    attn_vars = {}
    if attention:
        a = torch.stack(maps, 1).cpu().numpy()
        a = np.concatenate([a, np.full_like(a[:, :1], np.nan)], 1)
        attn_vars["attention"] = (("sample", "layer", "head", "query", "key"), a)
    return build_dataset(
        states,
        attn_vars,
        {},
        dict(
            source="simulate_like",
            mode="own",
            geometry=geometry,
            dt=float(dt),
            steps_per_layer=spl,
            attention_kind=",".join(sorted({b.attn.kind for b in blocks})),
            note="velocity = the model's own attention sub-layer attn(norm1(x)); no MLP, no final norm",
        ),
    )


def _simulate_preset(mode, x0, n_layers, dt, spl, beta, sigma, attention, restrict):
    from particles import simulate

    params = {k: v for k, v in restrict.items() if v is not None and v is not False}
    if mode == "sa":
        params["beta"] = 1.0 if beta is None else float(beta)
    else:
        params["sigma"] = 1.0 if sigma is None else float(sigma)
    sim = simulate(
        mode,
        x0.astype(np.float64),
        steps=n_layers * spl,
        dt=dt / spl,
        save_every=spl,
        return_weights=attention,
        **params,
    )
    x = sim["x"].values  # (S, L+1, T, D)
    attn_vars = {}
    if attention:
        a = sim["attention"].values[:, :, None]  # (S, L+1, 1, T, T)
        a[:, -1] = np.nan
        attn_vars["attention"] = (("sample", "layer", "head", "query", "key"), a)
    states = [torch.from_numpy(x[:, i]) for i in range(x.shape[1])]
    return build_dataset(
        states,
        attn_vars,
        {},
        dict(
            source="simulate_like",
            mode=mode,
            geometry="sphere",
            dt=float(dt),
            steps_per_layer=spl,
            attention_kind={"sa": "softmax", "krause": "krause"}[mode],
            **{k: v for k, v in params.items()},
        ),
    )


def as_interaction(attn):
    """The ``particles`` Interaction equal to a single-head, bias-free attention module on its input:
    softmax → "sa" with β = 1/√d, Q = W_q, K = W_k; Krause → "krause" with σ, Q, K; V = W_o W_v (so
    v_i = Σ_j a_ij V x_j is the module's output), with its causal/window/top-k restrictions.

    The model's LayerNorm is not part of it (apply it to x first). A patch grid, biases or several
    heads have no counterpart in the kernel family: ValueError.
    """
    from particles import make_interaction

    kind = getattr(attn, "kind", None)
    if kind not in ("softmax", "krause"):
        raise ValueError(f"attn: needs a softmax or Krause attention module, got {kind!r}")
    if attn.n_heads != 1 or attn.grid is not None:
        raise ValueError("attn: only a single head without grid locality maps onto the kernel family")
    if any(p.bias is not None for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)):
        raise ValueError("attn: projections with biases do not map onto the kernel family (Q x, K x, V x)")
    w = {n: getattr(attn, f"{n}_proj").weight.detach().double().cpu().numpy() for n in "qkvo"}
    params = dict(
        Q=w["q"], K=w["k"], V=w["o"] @ w["v"], causal=attn.causal, window=attn.window, top_k=attn.top_k
    )
    if kind == "softmax":
        return make_interaction("sa", beta=float(attn.beta), **params)
    return make_interaction("krause", sigma=float(attn.sigma[0]), **params)


def mean_angle(a, b) -> float:
    """Mean over tokens (and samples) of the angle arccos⟨a_i/‖a_i‖, b_i/‖b_i‖⟩ between two states."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return float(np.mean(np.arccos(np.clip(cos, -1.0, 1.0))))


def matched_dt(model, ds, *, steps_per_layer: int = 4, lo: float = 1e-4, hi: float = 10.0, tol: float = 1e-3):
    """The dt of the own-attention sphere dynamics whose first layer (``steps_per_layer`` Euler steps of
    dt/steps_per_layer with the first block's attention) turns the tokens by the model's first-block
    mean angle θ₁ = mean_i ∠(x_i⁽⁰⁾, x_i⁽¹⁾) of the extracted ``ds``; found by bisection on log dt
    (the simulated angle grows with dt). Returns (dt, θ₁)."""
    x = ds["x"].values
    target = mean_angle(x[:, 0], x[:, 1])

    def angle(dt):
        sim = simulate_like(
            model, ds, mode="own", dt=dt, steps_per_layer=steps_per_layer, layers=[0], attention=False
        )
        return mean_angle(sim["x"].values[:, 0], sim["x"].values[:, 1])

    if angle(hi) < target:
        raise ValueError(f"the model's first-block angle {target:.3g} is not reached with dt <= {hi}")
    while np.log(hi / lo) > tol:
        mid = float(np.sqrt(lo * hi))
        lo, hi = (mid, hi) if angle(mid) < target else (lo, mid)
    return float(np.sqrt(lo * hi)), target
