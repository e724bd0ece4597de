"""particles.vectors: numba's vector width on Intel AVX-512 cores."""

import subprocess
import sys

import pytest

from particles import vectors

SCRIPT = """
import numba, particles
from particles.vectors import PREFER_256, vector_bits
before = vector_bits()
numba.njit(lambda: 1)()  # the code generator now exists: vector_bits reads its features
assert vector_bits() == before, (before, vector_bits())
print(PREFER_256 in (numba.config.CPU_FEATURES or ""), before)
"""


def _run(env):
    """Import particles in a fresh process whose environment has `env` and none of the three
    variables otherwise."""
    import os

    names = ("KSYNC_VECTOR_BITS", "NUMBA_CPU_FEATURES", "NUMBA_CPU_NAME")
    clean = {k: v for k, v in os.environ.items() if k not in names}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True,
                         env={**clean, **env}).stdout.split()
    return out[0] == "True", int(out[1])


def _host_has_avx512():
    from llvmlite import binding

    return "+avx512f" in binding.get_host_cpu_features().flatten().split(",")


def test_importing_particles_asks_for_512_bit_vectors_on_avx512_hosts_only():
    applied, bits = _run({})
    assert applied == _host_has_avx512()
    assert bits == 512 if _host_has_avx512() else bits in (128, 256)


@pytest.mark.parametrize("env", [{"KSYNC_VECTOR_BITS": "256"}, {"NUMBA_CPU_NAME": "generic"}])
def test_the_users_choice_wins(env):
    applied, _ = _run(env)
    assert not applied


def test_nothing_changes_once_numba_has_compiled(monkeypatch):
    import numba
    from numba import njit

    njit(lambda: 1)()  # the code generator now exists in this process
    monkeypatch.setattr(numba.config, "CPU_FEATURES", numba.config.CPU_FEATURES)
    monkeypatch.delenv("KSYNC_VECTOR_BITS", raising=False)
    monkeypatch.delenv("NUMBA_CPU_NAME", raising=False)
    monkeypatch.delenv("NUMBA_CPU_FEATURES", raising=False)
    before = numba.config.CPU_FEATURES
    assert vectors.prefer_512_bit_vectors() is False
    assert numba.config.CPU_FEATURES == before
