"""krause-sync: interacting-particle models of attention (SA, USA, Krause, Hegselmann–Krause).

    from particles import simulate
    ds = simulate("krause", n=256, d=3, steps=500, dt=0.05, sigma=0.5)
"""

__version__ = "0.1.0"

from .vectors import prefer_512_bit_vectors  # noqa: E402

prefer_512_bit_vectors()  # before numba compiles anything (see particles/vectors.py)

from .interaction import MODELS, Interaction, make_interaction  # noqa: E402
from .simulate import simulate  # noqa: E402

__all__ = ["simulate", "make_interaction", "Interaction", "MODELS", "__version__"]
