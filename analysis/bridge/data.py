"""Default input batches for the shipped tasks (held-out splits, fixed order) and Dataset I/O."""

from __future__ import annotations

from pathlib import Path

import torch
import xarray as xr

from particles.conventions import decode, encode


def task_inputs(task: str, n: int = 16, seed: int = 0):
    """(inputs, labels or None): the first ``n`` held-out examples of ``task``.

    digits-vit: test images (n, 8, 8), labels = digits; digits-ar: test pixel tokens (n, 64);
    text-lm: n consecutive non-overlapping windows of 128 test characters; recall: n sequences from
    the task's generator seeded with ``seed`` (no labels).
    """
    from particles.nn import TASKS, data

    if task not in TASKS:
        raise ValueError(f"task must be one of {tuple(TASKS)}, got {task!r}")
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if task == "digits-vit":
        _, Xte, _, yte = data.digits_split()
        return Xte[:n], yte[:n].numpy()
    if task == "digits-ar":
        return data.digits_tokens()[1][:n], None
    if task == "text-lm":
        T = TASKS[task].model_defaults["seq_len"]
        ids = data.text_split()[1]
        n = min(n, len(ids) // T)
        return torch.stack([ids[i * T : (i + 1) * T] for i in range(n)]), None
    t = TASKS[task]()
    x = t._batch(n, torch.Generator().manual_seed(seed))[0]
    return x, None


def save(ds: xr.Dataset, path) -> Path:
    """Write ``ds`` as netCDF (.nc) or zarr (.zarr), CF-encoded by ``particles.conventions.encode``, at a
    path that does not exist yet (the CLI writes to a temporary path, see ``particles.store``)."""
    path = Path(path)
    if path.suffix not in (".nc", ".zarr"):
        raise ValueError(f"output must end in .nc or .zarr, got {str(path)!r}")
    if path.exists():
        raise FileExistsError(f"{str(path)!r} exists; it is never replaced here (choose a new path)")
    ds = encode(ds)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".nc":
        ds.to_netcdf(path)
    else:
        ds.to_zarr(path, mode="w-")
    return path


def load(path) -> xr.Dataset:
    """A trajectory or extraction written by ``ksync simulate`` / ``ksync extract`` (netCDF or zarr)."""
    from particles.store import store_kind

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"trajectory file {path} not found")
    if store_kind(path) == "sweep":
        raise ValueError(f"{str(path)!r} is a sweep store (many runs): open it with analysis.open_sweep; "
                         "compare takes one trajectory or extraction (.nc or .zarr)")
    try:
        if path.is_dir():
            return decode(xr.open_zarr(path).load())
        with xr.open_dataset(path) as ds:
            return decode(ds.load())
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{str(path)!r} is not a netCDF file or zarr store of a trajectory or an extraction "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err
