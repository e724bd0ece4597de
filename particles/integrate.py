"""Time steppers ẋ = f(x) on a geometry (particles.geometry), by name or as a callable.

f(x) = geometry.tangent(x, v(x)): P_x v on the sphere, v − x in euclidean space. A registered
integrator is ``step(f, x, dt, geometry) -> x`` and returns a state on the manifold:

* "euler"  x ← R(x + dt f(x))
* "rk4"    the classical four stages with every stage point retracted before f is evaluated,
           k1 = f(x), k2 = f(R(x + dt/2 k1)), k3 = f(R(x + dt/2 k2)), k4 = f(R(x + dt k3)),
           x ← R(x + dt/6 (k1 + 2k2 + 2k3 + k4)).

R is the retraction (row normalisation on the sphere, the identity in euclidean space). Retracted
stage points make rk4 the classical method applied to g(x) = f(R(x)), which equals f on the
manifold, so it keeps its order 4 while the interaction only ever sees points on the manifold
(Krause(σ) = SA(β = 1/σ²) on the sphere, radius 2 keeps antipodal pairs, top-k ranks unit vectors).

A user callable ``step(f, x, dt) -> x`` is accepted too; its result is retracted. With noise > 0
the step is Euler–Maruyama, x ← R(x + dt f(x) + √dt·noise·T_x ξ), ξ standard normal and T_x the
tangent-space projection (geometry.project: P_x on the sphere; kernels/noise.py draws ξ).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .geometry import EUCLIDEAN, Geometry, get_geometry
from .kernels.noise import normals


def euler(f, x, dt, geometry: Geometry = EUCLIDEAN):
    """x ← R(x + dt f(x))."""
    return geometry.retract(x + dt * f(x))


def rk4(f, x, dt, geometry: Geometry = EUCLIDEAN):
    """Classical RK4 with stage points retracted to the manifold (see the module docstring)."""
    r = geometry.retract
    k1 = f(x)
    k2 = f(r(x + (0.5 * dt) * k1))
    k3 = f(r(x + (0.5 * dt) * k2))
    k4 = f(r(x + dt * k3))
    return r(x + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4))


#: name → step(f, x, dt, geometry); the compiled trajectories implement the same arithmetic.
INTEGRATORS: dict[str, Callable] = {"euler": euler, "rk4": rk4}


def register_integrator(name: str, step: Callable) -> None:
    """Add step(f, x, dt, geometry) -> x (a state on the manifold) under `name`."""
    if not isinstance(name, str) or not callable(step):
        raise TypeError("register_integrator(name: str, step: callable)")
    INTEGRATORS[name] = step


def get_integrator(integrator) -> tuple[str, Callable]:
    """(name, step(f, x, dt, geometry)) for a registered name or a callable step(f, x, dt) -> x."""
    if isinstance(integrator, str):
        if integrator not in INTEGRATORS:
            raise ValueError(f"integrator must be one of {tuple(INTEGRATORS)} or a callable, "
                             f"got {integrator!r}")
        return integrator, INTEGRATORS[integrator]
    if not callable(integrator):
        raise TypeError(f"integrator must be a name or a callable step(f, x, dt) -> x, got {integrator!r}")

    def step(f, x, dt, geometry):
        y = integrator(f, x, dt)
        if np.shape(y) != np.shape(x):
            raise ValueError(f"integrator {integrator!r} returned shape {np.shape(y)}, "
                             f"expected {np.shape(x)}")
        return geometry.retract(np.asarray(y, dtype=x.dtype))

    return getattr(integrator, "__name__", repr(integrator)), step


def make_stepper(velocity, geometry, integrator, dt: float, noise: float = 0.0, key=None):
    """One step (x, step index, row order) ↦ x(t + dt) for the velocity field v(x).

    key: the sample's noise key (kernels/noise.py), needed when noise > 0; order maps the rows of x
    to particles (None: row p is particle p), so the noise of a particle does not depend on how the
    state is held.
    """
    geometry = get_geometry(geometry)
    _, step = get_integrator(integrator)
    dt = float(dt)

    def f(x):
        return geometry.tangent(x, velocity(x))

    def advance(x, index, order=None):
        if noise == 0:
            return step(f, x, dt, geometry).astype(x.dtype, copy=False)
        xi = geometry.project(x, normals(key, index, x.shape, x.dtype, order))
        y = x + dt * f(x) + (np.sqrt(dt) * noise) * xi
        return geometry.retract(y).astype(x.dtype, copy=False)

    return advance
