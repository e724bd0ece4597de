"""Counter-based standard normals: ξ(key, step, e) is a pure function of its three integers.

Each sample of an ensemble has its own 64-bit key (a word of the run's noise SeedSequence, see
particles.simulate); the normal for element e = p·d + c (particle p, component c) at step t is

    h = mix(key ⊕ mix(t + 1)),   u1 = (mix(h + (2e + 1)·γ) >> 11 + 1)·2⁻⁵³ ∈ (0, 1],
    u2 = (mix(h + (2e + 2)·γ) >> 11)·2⁻⁵³,   ξ = √(−2 ln u1) · cos(2π u2)        (Box–Muller)

with γ = 0x9E3779B97F4A7C15 and mix the SplitMix64 finaliser. No generator state is carried, so
the numbers do not depend on which thread draws them, in what order, or on the order in which the
particles are held (the 1-D HK sweep keeps them sorted): the compiled trajectories and the Python
stepper draw the same ξ for a seed.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_TWO_PI = 2.0 * np.pi


@njit(cache=True, inline="always")
def _mix(z):
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@njit(cache=True, inline="always")
def step_key(key, step):
    """The per-step hash h of a sample's key."""
    return _mix(np.uint64(key) ^ _mix(np.uint64(step) + np.uint64(1)))


@njit(cache=True, inline="always")
def normal(h, e):
    """ξ for element e given the step hash h (float64)."""
    i = np.uint64(e)
    u1 = (np.float64(_mix(h + (np.uint64(2) * i + np.uint64(1)) * _GAMMA) >> _S11) + 1.0) * 2.0**-53
    u2 = np.float64(_mix(h + (np.uint64(2) * i + np.uint64(2)) * _GAMMA) >> _S11) * 2.0**-53
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(_TWO_PI * u2)


@njit(cache=True)
def normals_into(key, step, order, out):
    """out[p, c] = ξ(key, step, order[p]·d + c) for an (n, d) out; order maps rows to particles
    (an empty order: row p is particle p)."""
    n, d = out.shape
    h = step_key(key, step)
    for p in range(n):
        particle = order[p] if order.shape[0] > 0 else p
        for c in range(d):
            out[p, c] = normal(h, particle * d + c)
    return out


def normals(key, step, shape, dtype=np.float64, order=None) -> np.ndarray:
    """The (n, d) standard normals of sample `key` at `step` (rows in particle order, or `order`)."""
    out = np.empty(shape, dtype=dtype)
    perm = np.empty(0, np.int64) if order is None else np.asarray(order, np.int64)
    return normals_into(np.uint64(key), np.int64(step), perm, out)
