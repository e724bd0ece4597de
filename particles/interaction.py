"""The one interaction-kernel family behind every model (docs/maths.md).

An :class:`Interaction` fixes

* the score kind          s_ij = β⟨Q x_i, K x_j⟩ ("softmax"),  −‖Q x_i − K x_j‖²/(2σ²) ("rbf"),  0 ("flat");
* the support N(i)         radius ‖x_i − x_j‖ ≤ r, window |i − j| < w, causal j ≤ i, then top-k;
* the normalisation       a_ij = exp(s_ij)/Σ_{l∈N(i)} exp(s_il)   or   exp(s_ij)/n ("usa");
* the geometry            "sphere": ẋ_i = P_{x_i} v_i,   "euclidean": ẋ_i = v_i − x_i,   v_i = Σ_j a_ij V x_j.

The four presets "sa", "usa", "krause" and "hk" are values of this one dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .params import check, check_bool
from .params import check_real as check_real

if TYPE_CHECKING:  # annotations only
    from .geometry import Geometry

MODELS = ("sa", "usa", "krause", "hk")
SCORES = ("softmax", "rbf", "flat")
GEOMETRIES = ("sphere", "euclidean")  # names; the objects are particles.geometry.GEOMETRIES

#: Relative tolerance of the bounded-confidence test ‖x_i − x_j‖ ≤ r·(1 + RADIUS_RTOL[dtype]).
#: A pair at distance exactly r (e.g. neighbours on an equally spaced opinion lattice) must count as
#: inside even when round-off puts it at r·(1 + a few ulps). The same tolerance is used by every kernel
#: path (numpy reference, numba rows, neighbour lists, the sorted 1-D HK sweep).
RADIUS_RTOL = {np.dtype(np.float64): 1e-9, np.dtype(np.float32): 1e-5}

PRESETS = {
    "sa": dict(score="softmax", normalise=True, geometry="sphere"),
    "usa": dict(score="softmax", normalise=False, geometry="sphere"),
    "krause": dict(score="rbf", normalise=True, geometry="sphere"),
    "hk": dict(score="flat", normalise=True, geometry="euclidean"),
}


def radius_bound_sq(radius: float, dtype) -> float:
    """Squared radius with the documented tolerance: pairs with ‖x_i − x_j‖² ≤ this are neighbours."""
    return (radius * (1.0 + RADIUS_RTOL[np.dtype(dtype)])) ** 2


def usa_overflow_message(beta: float, dtype, step: int | None = None, dt: float | None = None) -> str:
    """The one message for unnormalised (usa) weights exp(beta⟨Qx_i, Kx_j⟩)/n that overflow `dtype`.

    step None: one velocity evaluation (a kernel, which does not know the step); step 0: beta itself
    is too large for the dtype; a later step: the step dt let the state get there."""
    dtype = np.dtype(dtype)
    head = f"usa weights exp(beta⟨Qx_i, Kx_j⟩)/n overflow {dtype}"
    if step is None:
        return f"{head} (beta={beta}); lower beta or use model 'sa'"
    if step == 0:
        return (f"{head} at step 0 (beta={beta}): beta is too large for {dtype}; lower beta or use the "
                "normalised model 'sa'")
    return (f"{head} by step {step} (beta={beta}, dt={dt}): the state was finite at step 0, so the "
            "step is too large for the size of the velocity (≈ e^beta); reduce dt or beta")


@dataclass(frozen=True)
class Interaction:
    """A member of the kernel family. Matrices None mean the identity."""

    model: str
    score: str
    normalise: bool
    geometry: str
    beta: float = 1.0
    sigma: float = 1.0
    radius: float | None = None
    window: int | None = None
    causal: bool = False
    top_k: int | None = None
    Q: np.ndarray | None = field(default=None, repr=False, compare=False)
    K: np.ndarray | None = field(default=None, repr=False, compare=False)
    V: np.ndarray | None = field(default=None, repr=False, compare=False)

    # -- derived quantities -------------------------------------------------------------------
    def matrices(self, d: int, dtype=np.float64):
        """(Q, K, V) as (d, d) arrays of `dtype` (identity where None)."""
        eye = np.eye(d, dtype=dtype)
        return tuple(eye if m is None else np.asarray(m, dtype=dtype) for m in (self.Q, self.K, self.V))

    @property
    def space(self):
        """The particles.geometry object of `geometry` (tangent, retract, sample)."""
        from .geometry import get_geometry

        return get_geometry(self.geometry)

    @property
    def identity_qkv(self) -> bool:
        return self.Q is None and self.K is None and self.V is None

    @property
    def restricted(self) -> bool:
        """True when some restriction (radius, window, causal, top-k) shrinks the support."""
        return self.radius is not None or self.window is not None or self.causal or self.top_k is not None

    def check_dimension(self, d: int) -> None:
        for name in ("Q", "K", "V"):
            m = getattr(self, name)
            if m is not None and m.shape != (d, d):
                raise ValueError(f"{name} must have shape (d, d) = ({d}, {d}), got {m.shape}")

    def attrs(self) -> dict:
        """netCDF-safe attributes (str/int/float only; a restriction that is off is absent)."""
        out = dict(model=self.model, score=self.score, normalise=int(self.normalise),
                   geometry=self.geometry, beta=float(self.beta), sigma=float(self.sigma),
                   causal=int(self.causal))
        for name in ("radius", "window", "top_k"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


# validators shared with simulate: one place for each rule (particles/params.py)
_check_real = check_real


def make_interaction(model: str, *, beta: float = 1.0, sigma: float = 1.0, radius: float | None = None,
                     window: int | None = None, causal: bool = False, top_k: int | None = None,
                     Q: np.ndarray | None = None, K: np.ndarray | None = None, V: np.ndarray | None = None,
                     geometry: str | Geometry | None = None) -> Interaction:
    """Validate parameters and build the preset `model`, optionally overriding its geometry
    (a name or a particles.geometry object)."""
    if not isinstance(model, str) or model not in PRESETS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    preset = dict(PRESETS[model])
    if geometry is not None:
        preset["geometry"] = check("geometry", geometry).name
    if model == "hk" and radius is None:
        raise ValueError("radius is required for model 'hk' (the confidence bound R)")
    return Interaction(
        model=model, **preset,
        beta=check("beta", beta), sigma=check("sigma", sigma), radius=check("radius", radius),
        window=check("window", window), causal=check_bool("causal", causal), top_k=check("top_k", top_k),
        Q=check("Q", Q), K=check("K", K), V=check("V", V),
    )
