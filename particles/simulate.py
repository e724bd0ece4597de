"""`simulate`: validation → stepping loop → xarray Dataset (design.md §2)."""

from __future__ import annotations

import numbers

import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from . import __version__
from .integrate import INTEGRATORS, make_stepper, normalise_rows
from .interaction import Interaction, _check_real, make_interaction
from .kernels import velocity_field

DTYPES = ("float32", "float64")


def _check_count(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def initial_state(geometry: str, n: int, d: int, samples: int | None, rng, dtype) -> np.ndarray:
    """x0 drawn uniformly on S^{d-1} (sphere) or on [0, 1]^d (euclidean); shape (samples, n, d)."""
    shape = (samples or 1, n, d)
    if geometry == "sphere":
        return normalise_rows(rng.standard_normal(shape)).astype(dtype)
    return rng.random(shape).astype(dtype)


def _prepare_x0(x0, n, d, samples, geometry, rng, dtype):
    """Return (x0 as (S, n, d), ensemble?)."""
    if x0 is None:
        if n is None or d is None:
            raise ValueError("n and d are required when x0 is None")
        n = _check_count("n", n, 1)
        d = _check_count("d", d, 1)
        if samples is not None:
            _check_count("samples", samples, 1)
        return initial_state(geometry, n, d, samples, rng, dtype), samples is not None
    x0 = np.asarray(x0)
    if x0.ndim not in (2, 3):
        raise ValueError(f"x0 must have shape (n, d) or (sample, n, d), got ndim={x0.ndim}")
    if not np.issubdtype(x0.dtype, np.number):
        raise TypeError(f"x0 must be numeric, got dtype {x0.dtype}")
    if not np.all(np.isfinite(x0)):
        raise ValueError("x0 contains NaN or inf")
    for name, given, actual in (("n", n, x0.shape[-2]), ("d", d, x0.shape[-1])):
        if given is not None and given != actual:
            raise ValueError(f"{name}={given} does not match x0 of shape {x0.shape}")
    ensemble = x0.ndim == 3
    x0 = np.array(x0.reshape((-1,) + x0.shape[-2:]), dtype=dtype)
    if geometry == "sphere":
        norms = np.linalg.norm(x0, axis=-1)
        if np.any(norms == 0):
            raise ValueError("x0 has a zero row, which cannot be put on the sphere")
        off = np.abs(norms - 1) > 8 * np.finfo(dtype).eps  # rows already unit stay bit-identical
        x0[off] /= norms[off][:, None]
    return x0, ensemble


def saved_steps(steps: int, save_every: int) -> np.ndarray:
    """0, save_every, 2·save_every, …, and the final step."""
    out = np.arange(0, steps + 1, save_every)
    return out if out[-1] == steps else np.append(out, steps)


def simulate(model: str, x0=None, *, n=None, d=None, steps, dt, save_every=1, seed=0,
             integrator="euler", dtype="float64", progress=False, samples=None, noise=0.0,
             return_weights=False, store=None, **params) -> xr.Dataset:
    """Integrate ẋ_i = P_{x_i}(Σ_j a_ij V x_j) (sphere) or Σ_j a_ij V x_j − x_i (euclidean).

    model: "sa", "usa", "krause" or "hk"; params: beta, sigma, radius, window, causal, top_k, Q, K,
    V, geometry. x0: (n, d) or (sample, n, d); None draws n points (or `samples` ensembles) with
    `seed`. On the sphere x0 is normalised to unit rows. noise > 0 adds √dt·noise·ξ (Euler–Maruyama;
    sample s uses its own stream spawned from `seed`). return_weights=True also stores the
    interaction matrices a_ij at the saved steps as variable "attention" (time, query, key).
    store: path of a zarr store; saved steps are then streamed to disk as they are computed and the
    Dataset is opened lazily from the store (particles/store.py).
    Returns a Dataset with "x" (time, particle, component) [+ leading "sample"].
    """
    unknown = set(params) - {"beta", "sigma", "radius", "window", "causal", "top_k", "Q", "K", "V",
                             "geometry"}
    if unknown:
        raise TypeError(f"unknown parameter(s) for simulate: {sorted(unknown)}")
    it = make_interaction(model, **params)
    if integrator not in INTEGRATORS:
        raise ValueError(f"integrator must be one of {INTEGRATORS}, got {integrator!r}")
    if str(np.dtype(dtype)) not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    dtype = np.dtype(dtype)
    steps = _check_count("steps", steps, 0)
    save_every = _check_count("save_every", save_every, 1)
    dt = _check_real("dt", dt, positive=True)
    noise = _check_real("noise", noise, nonnegative=True)
    if noise > 0 and integrator != "euler":
        raise ValueError("integrator must be 'euler' when noise > 0 (Euler–Maruyama)")

    init_seq, noise_seq = np.random.SeedSequence(seed).spawn(2)
    x0, ensemble = _prepare_x0(x0, n, d, samples, it.geometry, np.random.default_rng(init_seq), dtype)
    S, n, d = x0.shape
    it.check_dimension(d)

    field = velocity_field(it, n, d, dtype)
    keep = saved_steps(steps, save_every)
    if store is None:
        traj = np.empty((S, len(keep), n, d), dtype=dtype)
    else:  # stream saved steps to a zarr store (particles/store.py); the result is opened lazily
        from .store import TrajectoryStore
        traj = sink = TrajectoryStore(store, (S, len(keep), n, d), dtype, ensemble)
    weights = np.empty((S, len(keep), n, n), dtype=dtype) if return_weights else None
    noise_rngs = [np.random.default_rng(s) for s in noise_seq.spawn(S)]
    with tqdm(total=S * steps, disable=not progress, desc=f"simulate {model}", unit="step") as bar:
        for s in range(S):
            step = make_stepper(field, it.geometry, integrator, dt, noise, noise_rngs[s])
            x, order = x0[s], None
            if field.path == "hk1d" and noise == 0:
                # 1-D HK is permutation-equivariant and keeps the order of opinions: integrate the
                # sorted opinions (the sweep then needs no gather/scatter) and unsort saved steps
                order = np.argsort(x[:, 0], kind="stable")
                x = x[order]
            done = 0
            for slot, target in enumerate(keep):
                for _ in range(target - done):
                    x = step(x)
                bar.update(target - done)
                done = target
                _check_finite(x, it, target)
                saved = x if order is None else _unsort(x, order)
                traj[s, slot] = saved
                if return_weights:
                    weights[s, slot] = field.weights(saved)
    traj = traj if store is None else sink.lazy()
    ds = _to_dataset(traj if ensemble else traj[0], weights if (ensemble or weights is None)
                     else weights[0], keep, it, ensemble, dict(
                         dt=dt, steps=steps, save_every=save_every, seed=seed,
                         integrator=integrator, dtype=str(dtype), noise=noise, n=n, d=d))
    return ds if store is None else sink.finish(ds)


def _unsort(x, order):
    """The rows of x (given in the order `order` of the particles) back in particle order."""
    out = np.empty_like(x)
    out[order] = x
    return out


def _check_finite(x, it: Interaction, step: int):
    if not np.all(np.isfinite(x)):
        if not it.normalise:
            raise OverflowError(f"usa weights exp(beta⟨Qx_i, Kx_j⟩) overflowed at step {step} "
                                f"(beta={it.beta}); lower beta or use the normalised model 'sa'")
        raise FloatingPointError(f"non-finite state at step {step}; reduce dt")


def _to_dataset(traj, weights, keep, it: Interaction, ensemble, run_attrs) -> xr.Dataset:
    lead = ("sample",) if ensemble else ()
    ds = xr.Dataset({"x": (lead + ("time", "particle", "component"), traj)},
                    coords={"time": keep * run_attrs["dt"], "step": ("time", keep)})
    if weights is not None:
        ds["attention"] = (lead + ("time", "query", "key"), weights)
    for name in ("Q", "K", "V"):
        m = getattr(it, name)
        if m is not None:
            ds[name] = (("component_out", "component"), np.asarray(m))
    ds.attrs.update(it.attrs())
    ds.attrs.update({k: v for k, v in run_attrs.items() if v is not None})
    ds.attrs["krause_sync_version"] = __version__
    return ds
