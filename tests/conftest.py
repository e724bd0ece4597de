"""Shared test data: the kernel-family cases and random inputs (imported as ``from conftest import ...``)."""

import numpy as np

#: support restrictions exercised against the numpy reference (n = 37: not a multiple of anything)
RESTRICTIONS = [
    {},
    {"radius": 0.9},
    {"window": 5},
    {"causal": True},
    {"window": 4, "causal": True},
    {"top_k": 6},
    {"window": 7, "causal": True, "top_k": 3},
    {"radius": 1.2, "window": 9, "top_k": 4},
    {"radius": 0.7, "top_k": 5},
    {"radius": 1.1, "causal": True},
]
PRESETS = [("sa", {"beta": 2.0}), ("usa", {"beta": 1.5}), ("krause", {"sigma": 0.6}), ("hk", {"radius": 0.8})]


def sphere_points(n, d, seed=0):
    """n points uniform on S^{d-1}."""
    x = np.random.default_rng(seed).standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def random_qkv(d, seed=1):
    """Q, K, V = I + 0.4·N(0, 1) (d × d)."""
    rng = np.random.default_rng(seed)
    return {name: np.eye(d) + 0.4 * rng.standard_normal((d, d)) for name in "QKV"}
