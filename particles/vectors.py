"""512-bit vectors for the numba kernels on Intel AVX-512 cores.

LLVM tunes Intel's AVX-512 cores (Skylake-X through Sapphire Rapids) to prefer 256-bit vectors
("prefer-256-bit"), so numba's loops there use ymm registers only, while on AMD Zen 4 they use zmm.
Measured on an Intel Xeon (AVX-512/AMX; benchmarks/vector_width.py, its table in
benchmarks/README.md): with 512-bit vectors the dense step at n = 4096 (one thread, SA and Krause,
fp32 and fp64, d = 3 and 4) is 1.18–1.45× faster, an ensemble of 2048 systems of 32 tokens 1.24×
in fp64 (1.01× in fp32), one n = 64 system 1.32×.

:func:`prefer_512_bit_vectors` appends ``-prefer-256-bit`` to the host's CPU features for numba's
code generation, before numba compiles anything. It does nothing when the CPU lacks avx512f, when
the user set ``NUMBA_CPU_NAME`` or ``NUMBA_CPU_FEATURES`` (their choice wins), when
``KSYNC_VECTOR_BITS=256`` asks for the LLVM default, or when numba has already compiled code in this
process (its code generator is then fixed). The setting is process-wide: numba code of other
libraries compiled afterwards uses it too.
"""

from __future__ import annotations

import os

PREFER_256 = "-prefer-256-bit"


def vector_bits() -> int:
    """The widest vectors numba's loops use in this process (512 or 256, or 128 without AVX): from
    its code generator's features once it exists, else from what it will be created with."""
    import numba
    from llvmlite import binding
    from numba.core.registry import cpu_target

    features = None
    if _codegen_exists():  # (a private attribute: fall back without it)
        features = getattr(cpu_target.target_context.codegen(), "_tm_features", None)
    features = features or numba.config.CPU_FEATURES or binding.get_host_cpu_features().flatten()
    flags = features.split(",")
    if "+avx512f" in flags:
        return 512 if PREFER_256 in flags or not _prefers_256(numba.config.CPU_NAME) else 256
    return 256 if "+avx" in flags else 128


def _codegen_exists() -> bool:
    """True once numba has created its CPU code generator in this process (its features are fixed)."""
    from numba.core.registry import cpu_target

    return "_toplevel_target_context" in vars(cpu_target)


def _prefers_256(cpu_name) -> bool:
    """LLVM's tuning for Intel AVX-512 cores; AMD's Zen 4 and later use full-width vectors."""
    from llvmlite import binding

    return not (cpu_name or binding.get_host_cpu_name()).startswith("znver")


def prefer_512_bit_vectors() -> bool:
    """Ask numba for 512-bit vectors (module docstring); True if the setting was applied."""
    if os.environ.get("KSYNC_VECTOR_BITS", "") == "256":
        return False
    if os.environ.get("NUMBA_CPU_NAME") or os.environ.get("NUMBA_CPU_FEATURES"):
        return False
    import numba
    from llvmlite import binding

    if _codegen_exists():
        return False
    features = binding.get_host_cpu_features().flatten()
    if "+avx512f" not in features.split(","):
        return False
    numba.config.CPU_FEATURES = f"{features},{PREFER_256}"
    return True
