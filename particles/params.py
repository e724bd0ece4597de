"""The one description of `simulate`'s parameters: name, kind, default, help text, validator.

:data:`PARAMS` is the table; :func:`check` validates one value (returning it normalised) and
raises ValueError/TypeError naming the parameter. `simulate` and `make_interaction` validate
through it, and the command line, the sweep spec and the notebook panel read their flags, defaults
and help text from it, so a parameter is described once.

``Param.group`` says where a parameter belongs: "interaction" (the kernel family: beta, sigma,
radius, window, causal, top_k, Q, K, V, geometry), "run" (integration: steps, dt, …) or "output"
(store, overwrite, return_weights, progress). ``Param.models`` lists the presets it applies to
(None: all).
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

DTYPES = ("float32", "float64")
BACKENDS = ("numba", "torch")
DEVICES = (None, "cpu", "cuda")


# -- validators (each returns the normalised value or raises naming the parameter) ---------------
def check_int(name, value, minimum=None, *, allow_float=False):
    """An integer (numpy integers too; integer-valued floats only if allow_float) ≥ minimum."""
    if allow_float and isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_real(name, value, *, positive=False, nonnegative=False):
    """A finite real number (bool and complex refused), optionally > 0 or ≥ 0."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_bool(name, value):
    """True or False (numpy bools too); strings such as "no" are refused, not read as true."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_choice(name, value, choices):
    try:
        ok = value in choices
    except TypeError:  # unhashable (a list, a dict)
        ok = False
    if not ok:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_dtype(name, value):
    """"float32" / "float64" (or the numpy dtypes) → the numpy dtype."""
    try:
        dtype = np.dtype(value)
    except TypeError:
        raise ValueError(f"{name} must be one of {DTYPES}, got {value!r}") from None
    if str(dtype) not in DTYPES:
        raise ValueError(f"{name} must be one of {DTYPES}, got {value!r}")
    return dtype


def check_seed(name, value):
    """A non-negative integer (the root of numpy's SeedSequence)."""
    return check_int(name, value, 0)


def numeric_array(name, value, dtype=np.float64) -> np.ndarray:
    """value as a real array of `dtype`: strings, objects and complex numbers are refused (TypeError),
    never cast with a warning."""
    try:
        raw = np.asarray(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a real numeric array: {err}") from None
    if raw.dtype.kind == "c":
        raise TypeError(f"{name} must be real, got complex values (dtype {raw.dtype}); pass x.real "
                        "if the imaginary part is meant to be dropped")
    if raw.dtype.kind not in "biuf" or raw.dtype.kind == "b":
        raise TypeError(f"{name} must be a real numeric array, got dtype {raw.dtype}")
    return raw.astype(dtype, copy=False)


def check_matrix(name, value):
    """A square (d, d) real matrix without NaN/inf, as a read-only float64 array (None: identity)."""
    if value is None:
        return None
    m = np.array(numeric_array(name, value), dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"{name} must be a square (d, d) matrix, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError(f"{name} contains NaN or inf")
    m.setflags(write=False)
    return m


def check_path(name, value):
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {value!r}")
    return value


def _optional(check):
    return lambda name, value: None if value is None else check(name, value)


def _at_least(minimum, allow_float=False):
    return lambda name, value: check_int(name, value, minimum, allow_float=allow_float)


def _real(**kw):
    return lambda name, value: check_real(name, value, **kw)


def _sigma(name, value):
    value = check_real(name, value, positive=True)
    if 2.0 * value * value == 0.0 or not np.isfinite(1.0 / (2.0 * value * value)):
        raise ValueError(f"{name} is too small: 1/(2 {name}²) overflows ({name}={value})")
    return value


def _integrator(name, value):
    from .integrate import INTEGRATORS

    if callable(value):
        return value
    if not isinstance(value, str) or value not in INTEGRATORS:
        raise ValueError(f"{name} must be one of {tuple(INTEGRATORS)} or a callable step(f, x, dt) -> x, "
                         f"got {value!r}")
    return value


def _geometry(name, value):
    from .geometry import get_geometry

    if value is None:
        return None
    try:
        return get_geometry(value)
    except ValueError:
        raise ValueError(f"{name} must be one of ('sphere', 'euclidean') (or a Geometry), "
                         f"got {value!r}") from None


# -- the table ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One parameter of :func:`particles.simulate`."""

    name: str
    kind: str  # int | float | bool | str | choice | matrix | array | path | seed | callable-or-choice
    default: Any
    help: str
    check: Callable[[str, Any], Any]
    group: str = "run"
    choices: tuple | None = None
    models: tuple | None = None  # presets the parameter applies to (None: every one)

    def validate(self, value):
        return self.check(self.name, value)


def _p(name, kind, default, help, check, **kw):
    return name, Param(name, kind, default, help, check, **kw)


PARAMS: dict[str, Param] = dict([
    # run
    _p("n", "int", None, "number of particles (when x0 is drawn)", _optional(_at_least(1))),
    _p("d", "int", None, "dimension of each particle (when x0 is drawn)",
       _optional(_at_least(1))),
    _p("samples", "int", None, "ensemble size: independent systems integrated together (x0 drawn)",
       _optional(_at_least(1))),
    _p("steps", "int", None, "number of time steps (required)", _at_least(0)),
    _p("dt", "float", None, "time step (required, > 0)", _real(positive=True)),
    _p("save_every", "int", 1, "keep every save_every-th step (and the last)", _at_least(1)),
    _p("seed", "seed", 0, "seed of the initial state and of the noise (integer >= 0)", check_seed),
    _p("integrator", "choice", "euler", "time stepper: euler or rk4 (or a callable step(f, x, dt) -> x)",
       _integrator, choices=("euler", "rk4")),
    _p("dtype", "choice", "float64", "floating-point type of the state", check_dtype, choices=DTYPES),
    _p("noise", "float", 0.0, "Euler–Maruyama noise level: x += √dt·noise·ξ (tangent on the sphere)",
       _real(nonnegative=True)),
    _p("backend", "choice", "numba", "compiled kernels: numba (CPU) or torch",
       lambda k, v: check_choice(k, v, BACKENDS), choices=BACKENDS),
    _p("device", "choice", None, "torch device: cpu or cuda (backend='torch' only)",
       lambda k, v: check_choice(k, v, DEVICES), choices=DEVICES),
    # interaction
    _p("beta", "float", 1.0, "inverse temperature β of the softmax score β⟨Qx_i, Kx_j⟩", check_real,
       group="interaction", models=("sa", "usa")),
    _p("sigma", "float", 1.0, "width σ of the rbf score −‖Qx_i − Kx_j‖²/(2σ²)", _sigma,
       group="interaction", models=("krause",)),
    _p("radius", "float", None, "bounded confidence: keep pairs with ‖x_i − x_j‖ ≤ radius (hk: required)",
       _optional(_real(nonnegative=True)), group="interaction"),
    _p("window", "int", None, "sequence window: keep keys with |i − j| < window (causal: 0 ≤ i − j < window)",
       _optional(_at_least(1, True)), group="interaction"),
    _p("causal", "bool", False, "keep keys j ≤ i only", check_bool, group="interaction"),
    _p("top_k", "int", None, "keep the top_k largest scores of each row (after the other restrictions)",
       _optional(_at_least(1, True)), group="interaction"),
    _p("Q", "matrix", None, "query matrix (d, d); None: identity", check_matrix, group="interaction"),
    _p("K", "matrix", None, "key matrix (d, d); None: identity", check_matrix, group="interaction"),
    _p("V", "matrix", None, "value matrix (d, d); None: identity", check_matrix, group="interaction"),
    _p("geometry", "choice", None, "sphere or euclidean (None: the preset's)", _geometry,
       group="interaction", choices=("sphere", "euclidean")),
    # output
    _p("progress", "bool", False, "show a tqdm progress bar", check_bool, group="output"),
    _p("return_weights", "bool", False, "also return the interaction matrices a_ij at saved steps",
       check_bool, group="output"),
    _p("store", "path", None, "zarr store: stream saved steps to disk, return a lazy Dataset", check_path,
       group="output"),
    _p("overwrite", "bool", False, "replace an existing store written by us", check_bool, group="output"),
])

INTERACTION = tuple(name for name, p in PARAMS.items() if p.group == "interaction")


def check(name: str, value):
    """Validate one parameter by name (see PARAMS); returns the normalised value."""
    if name not in PARAMS:
        raise TypeError(f"unknown parameter {name!r}; known: {sorted(PARAMS)}")
    return PARAMS[name].validate(value)


def applies_to(model: str) -> tuple[str, ...]:
    """The interaction parameters that mean something for preset `model`."""
    return tuple(name for name in INTERACTION if PARAMS[name].models is None or model in PARAMS[name].models)
