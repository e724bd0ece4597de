"""Where the particles live: the unit sphere or euclidean space (one object per geometry).

A geometry turns the interaction velocity v_i = Σ_j a_ij V x_j into the vector field and keeps
the state on its manifold:

* ``SPHERE``     tangent(x, v) = P_x v = v − ⟨x, v⟩ x   retract(x) = x/‖x‖ (rows)   sample: uniform on S^{d−1}
* ``EUCLIDEAN``  tangent(x, v) = v − x                  retract(x) = x             sample: uniform on [0, 1]^d

``project(x, v)`` is the tangent-space projection that noise gets (P_x v on the sphere, v in
euclidean space — there the vector field v − x is the consensus form, not a projection).

(and ``place(x)``, which puts a given initial state on the manifold: unit rows on the sphere).

Every method works row-wise on the last axis of numpy arrays and of torch tensors (any leading
axes). ``code`` is the number the compiled trajectory kernels use for the geometry.
"""

from __future__ import annotations

import numpy as np


def _is_numpy(x) -> bool:
    return isinstance(x, (np.ndarray, np.generic))


def _row_dot(x, v):
    """⟨x_i, v_i⟩ over the last axis, keeping it (numpy or torch)."""
    return (x * v).sum(-1)[..., None]


class Geometry:
    """Base class: subclasses define tangent, retract and sample; `name` is what attrs record."""

    name: str = ""
    code: int = -1

    def tangent(self, x, v):
        raise NotImplementedError

    def project(self, x, v):
        """The component of v in the tangent space at x (where noise lives)."""
        raise NotImplementedError

    def retract(self, x):
        raise NotImplementedError

    def sample(self, rng, shape, dtype=np.float64):
        raise NotImplementedError

    def place(self, x: np.ndarray) -> np.ndarray:
        """A given initial state (numpy, modified in place) put on the manifold."""
        return x

    def __repr__(self) -> str:
        return f"{type(self).__name__.upper()}"

    def __reduce__(self):  # singletons survive pickling (dask workers, multiprocessing)
        return (get_geometry, (self.name,))


class Sphere(Geometry):
    """The unit sphere S^{d−1} of each row (Geshkovski et al.'s SA/USA models)."""

    name, code = "sphere", 0

    def tangent(self, x, v):
        """P_x v = v − ⟨x, v⟩ x."""
        return v - _row_dot(x, v) * x

    def project(self, x, v):
        """P_x v (on the sphere the vector field is the projected velocity)."""
        return self.tangent(x, v)

    def retract(self, x):
        """x_i/‖x_i‖ for every row."""
        if _is_numpy(x):
            return x / np.linalg.norm(x, axis=-1, keepdims=True)
        import torch

        return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)

    def place(self, x: np.ndarray) -> np.ndarray:
        """Rows normalised to ‖x_i‖ = 1; rows already unit to 8 ulps stay bit-identical; a zero row
        is an error (it has no direction)."""
        norms = np.linalg.norm(x, axis=-1)
        if np.any(norms == 0):
            raise ValueError("x0 has a zero row, which cannot be put on the sphere")
        off = np.abs(norms - 1) > 8 * np.finfo(x.dtype).eps
        if off.any():
            x[off] /= norms[off][:, None]
        return x

    def sample(self, rng, shape, dtype=np.float64):
        """Uniform on S^{d−1}: normalised standard normal rows. rng: numpy Generator (→ ndarray of
        `dtype`) or torch.Generator (→ tensor; dtype a torch dtype)."""
        if isinstance(rng, np.random.Generator):
            return self.retract(rng.standard_normal(shape)).astype(dtype)
        import torch

        return self.retract(torch.randn(tuple(shape), generator=rng, dtype=torch.float64)).to(dtype)


class Euclidean(Geometry):
    """R^d in consensus form: ẋ_i = v_i − x_i (with V = I, Σ_j a_ij (x_j − x_i))."""

    name, code = "euclidean", 1

    def tangent(self, x, v):
        """v − x."""
        return v - x

    def project(self, x, v):
        """v: every direction is tangent."""
        return v

    def retract(self, x):
        """The identity."""
        return x

    def sample(self, rng, shape, dtype=np.float64):
        """Uniform on [0, 1]^d (numpy Generator → ndarray, torch.Generator → tensor)."""
        if isinstance(rng, np.random.Generator):
            return rng.random(shape).astype(dtype)
        import torch

        return torch.rand(tuple(shape), generator=rng, dtype=torch.float64).to(dtype)


SPHERE = Sphere()
EUCLIDEAN = Euclidean()
GEOMETRIES = {g.name: g for g in (SPHERE, EUCLIDEAN)}


def get_geometry(geometry) -> Geometry:
    """The geometry object for a name ("sphere", "euclidean") or a Geometry (returned as is)."""
    if isinstance(geometry, Geometry):
        return geometry
    if isinstance(geometry, str) and geometry in GEOMETRIES:
        return GEOMETRIES[geometry]
    raise ValueError(f"geometry must be one of {tuple(GEOMETRIES)} (or a Geometry), got {geometry!r}")
