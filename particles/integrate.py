"""Time steppers on the sphere or in euclidean space (design.md §1).

ẋ = f(x) with f_i = P_{x_i} v_i = v_i − ⟨x_i, v_i⟩ x_i (sphere) or f_i = v_i − x_i (euclidean).
Euler: x ← x + dt f(x);  RK4: the classical four stages;  Euler–Maruyama: x ← x + dt f(x) + √dt·η·ξ
with ξ standard normal (projected to the tangent space on the sphere). On the sphere every step
ends with x_i ← x_i/‖x_i‖.
"""

from __future__ import annotations

import numpy as np

INTEGRATORS = ("euler", "rk4")


def tangent(x: np.ndarray, v: np.ndarray, geometry: str) -> np.ndarray:
    """f(x): P_x v on the sphere, v − x in euclidean space."""
    if geometry == "sphere":
        return v - np.einsum("nd,nd->n", x, v)[:, None] * x
    return v - x


def normalise_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def euler(f, x, dt):
    return x + dt * f(x)


def rk4(f, x, dt):
    k1 = f(x)
    k2 = f(x + (0.5 * dt) * k1)
    k3 = f(x + (0.5 * dt) * k2)
    k4 = f(x + dt * k3)
    return x + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


def make_stepper(velocity, geometry: str, integrator: str, dt: float, noise: float, rng):
    """One step x ↦ x(t + dt) for the given velocity field."""
    dt = float(dt)

    def f(x):
        return tangent(x, velocity(x), geometry)

    def step(x):
        y = (rk4 if integrator == "rk4" else euler)(f, x, dt)
        if noise > 0:
            xi = rng.standard_normal(x.shape).astype(x.dtype, copy=False)
            if geometry == "sphere":
                xi = tangent(x, xi, "sphere")
            y = y + (np.sqrt(dt) * noise) * xi
        if geometry == "sphere":
            y = normalise_rows(y)
        return y.astype(x.dtype, copy=False)

    return step
