"""Argument types shared by the subcommands: checked numbers, .npy inputs, output names."""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np

NPY_MAGIC = b"\x93NUMPY"


def _number(text, cast, what, low=None, strict=False):
    """``cast(text)``, finite, and > low (strict) or >= low; ArgumentTypeError saying ``what`` else."""
    try:
        value = cast(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    bad = isinstance(value, float) and not math.isfinite(value)
    if bad or (low is not None and (value <= low if strict else value < low)):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def finite_float(text) -> float:
    """A finite float (no nan, inf)."""
    return _number(text, float, "a finite number")


def positive_float(text) -> float:
    return _number(text, float, "a finite number > 0", 0, strict=True)


def nonnegative_float(text) -> float:
    return _number(text, float, "a finite number >= 0", 0)


def positive_int(text) -> int:
    return _number(text, int, "an integer >= 1", 1)


def nonnegative_int(text) -> int:
    return _number(text, int, "an integer >= 0", 0)


def load_npy(path, option: str) -> np.ndarray:
    """The numeric array stored in the .npy file ``path`` (ValueError naming ``option`` otherwise).

    Never unpickles: object arrays are refused.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            magic = fh.read(len(NPY_MAGIC))
    except FileNotFoundError:
        raise FileNotFoundError(f"{option} {path}: file not found") from None
    except OSError as err:
        raise OSError(f"{option} {path}: cannot read ({err.strerror})") from None
    if magic != NPY_MAGIC:
        raise ValueError(f"{option} {path}: not a .npy array file (save one with numpy.save)")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as err:
        if "pickle" in str(err):
            raise ValueError(f"{option} {path}: holds Python objects, not numbers; only numeric "
                             ".npy arrays are read") from None
        raise ValueError(f"{option} {path}: damaged .npy file ({err})") from None
    except (OSError, EOFError) as err:
        raise ValueError(f"{option} {path}: damaged .npy file ({err})") from None
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{option} {path}: expected a numeric array, got dtype {arr.dtype}")
    return arr


def matrix(text) -> np.ndarray:
    """A d×d matrix given as JSON nested lists or a .npy file."""
    try:
        if text.endswith(".npy"):
            return load_npy(text, "matrix")
        value = np.asarray(json.loads(text), dtype=float)
    except (OSError, json.JSONDecodeError, ValueError, TypeError) as err:
        raise argparse.ArgumentTypeError(
            f"expected JSON nested lists of numbers or a readable .npy file: {err}") from None
    if value.ndim != 2 or value.shape[0] != value.shape[1]:
        raise argparse.ArgumentTypeError(f"expected a square (d, d) matrix, got shape {value.shape}")
    if not np.all(np.isfinite(value)):
        raise argparse.ArgumentTypeError("expected finite numbers (no NaN or inf)")
    return value


def output_name(text) -> str:
    """A bare file name (no folder part): it is placed under an output folder."""
    if not text or os.sep in text or (os.altsep and os.altsep in text) or text in (".", "..") \
            or text.startswith("."):
        raise argparse.ArgumentTypeError(f"expected a plain name without folders or a leading dot, "
                                         f"got {text!r}")
    return text


def add_force(p) -> None:
    p.add_argument("--force", action="store_true",
                   help="replace the output if it exists and was written by ksync (never anything else)")
