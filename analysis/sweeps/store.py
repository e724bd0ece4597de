"""The on-disk store of a parameter sweep: a zarr directory written point by point, atomically.

Layout (zarr format of the installed zarr; one group per finished point)::

    results.zarr/
      zarr.json          root group; attrs["ksync_sweep"] = {"format": 1, "spec": {...}}
      points/            one subgroup per finished point, named by its index key, e.g. "2_0_3"
        2_0_3/           arrays: one per metric (0-d, or 1-d over "time"); attrs: index, params, …
      result/            the assembled Dataset (xarray layout), written when every point is done
      final_clusters/ …  the same Dataset at the root too (its arrays; its attrs join the root's),
                         so that a plain ``xr.open_zarr("results.zarr")`` shows it
      .tmp/              staging area; anything here is an unfinished write and is discarded

The root group carries consolidated metadata of the result's arrays only (what xarray reads,
without its "no consolidated metadata" warning); ``points/`` and ``result/`` are opened by path
(``zarr.open_group("results.zarr", use_consolidated=False)`` lists them all). Before the sweep is
complete the root's consolidated metadata lists no arrays: ``xr.open_zarr`` shows an empty Dataset,
:func:`open_sweep` the finished points.

Atomicity: a point is first written completely under ``.tmp/`` and then moved into ``points/``
with one ``os.rename`` of its directory, which is atomic on a POSIX file system. A process killed
at any moment (SIGKILL included) therefore leaves each point either absent or complete, never
half-written; the same holds for the creation of the store itself and for ``result/``. The root
copy of the result is moved in array by array between two replacements of the root metadata (one
file each: first listing no arrays, then the new ones), so ``xr.open_zarr`` sees either no result
or the whole of it; a run killed meanwhile leaves no result at the root until the next run on the
store, which writes it again. The store must live on a local or POSIX-shared file system (not an
object store such as S3). Writes are not fsync'ed: the guarantee is against killed processes, not
against power loss.

Data safety (the rules of ``particles.store``, docs/data-safety.md): the root group is marked
``krause_sync_store = "sweep"``; a path holding anything else (a directory we did not write, a
trajectory store) is refused, never emptied. One sweep process per store: :meth:`SweepStore.writer`
holds ``particles.store.StoreLock`` for the whole run, so a second sweep on the same store fails at
once with a message naming the first one's pid, and the staging area is only ever cleaned by the
lock holder. A lock left by a killed sweep is stale and taken over by the next run. A point
counts as finished only when all its metric arrays and its attributes are written (the attributes
last); a damaged point directory is discarded by the next writer and recomputed.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import zarr

from particles.store import MARKER, StoreLock, check_output, clean_leftovers, partial_path, store_kind

FORMAT = 1
ATTR = "ksync_sweep"
#: entries of the store's root that are not result arrays (a result variable may not take these names)
RESERVED = frozenset({"points", "result", ".tmp", "zarr.json", ".zgroup", ".zattrs", ".zmetadata"})


class SpecMismatch(ValueError):
    """The store at a path was written for a different sweep specification."""


def _tmp_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _write_array(group, name: str, data: np.ndarray) -> None:
    if hasattr(group, "create_array"):  # zarr >= 3
        group.create_array(name, data=data)
    else:  # pragma: no cover - zarr 2
        group.array(name, data, chunks=data.shape or None)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory ``src`` onto ``dst``, discarding an older ``dst`` if any."""
    if dst.exists():
        old = src.parent / _tmp_name(f"old-{dst.name}")
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(src, dst)


def json_roundtrip(obj):
    """``obj`` as plain JSON types (numpy scalars/arrays and tuples become numbers and lists)."""
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cannot store {type(obj).__name__} {obj!r} in a sweep specification")


def spec_difference(stored: dict, requested: dict) -> list[str]:
    """Human-readable differences between two specifications (top-level and one level down)."""
    out = []
    for key in sorted(set(stored) | set(requested)):
        a, b = stored.get(key, "<absent>"), requested.get(key, "<absent>")
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                sa, sb = a.get(sub, "<absent>"), b.get(sub, "<absent>")
                if sa != sb:
                    out.append(f"{key}.{sub}: stored {sa!r}, requested {sb!r}")
        else:
            out.append(f"{key}: stored {a!r}, requested {b!r}")
    return out


class SweepStore:
    """A sweep store at ``path`` (see the module docstring for the layout)."""

    def __init__(self, path):
        self.path = Path(path)
        self.points = self.path / "points"
        self.tmp = self.path / ".tmp"

    # -- creation / opening ---------------------------------------------------------------------
    @classmethod
    def open(cls, path) -> SweepStore:
        """Open an existing store; ValueError if ``path`` is not a sweep store."""
        store = cls(path)
        store.spec  # noqa: B018  (validates)
        return store

    @classmethod
    def create_or_check(cls, path, spec: dict) -> SweepStore:
        """Create the store for ``spec``, or open it and check that it was made for the same spec.

        A store made for a different spec raises :class:`SpecMismatch` listing the differences.
        """
        store = cls(path)
        spec = json_roundtrip(spec)
        if not store.path.exists():
            store.path.parent.mkdir(parents=True, exist_ok=True)
            staging = partial_path(store.path)
            root = zarr.open_group(str(staging), mode="w-")
            root.attrs.update({MARKER: "sweep", ATTR: {"format": FORMAT, "spec": spec}})
            _consolidate(staging)  # listing no arrays: xr.open_zarr shows an empty Dataset, no warning
            zarr.open_group(str(staging / "points"), mode="w-")
            (staging / ".tmp").mkdir()
            try:
                os.rename(staging, store.path)
            except OSError:  # created meanwhile by another process: check it below
                shutil.rmtree(staging, ignore_errors=True)
        stored = store.spec
        if stored != spec:
            diff = "; ".join(spec_difference(stored, spec))
            raise SpecMismatch(
                f"store {str(store.path)!r} holds a sweep with a different specification ({diff}); "
                "rerun with the original spec to resume it, or write to a new store path")
        store.tmp.mkdir(exist_ok=True)
        store.points.mkdir(exist_ok=True)
        return store

    @classmethod
    @contextmanager
    def writer(cls, path, spec: dict):
        """``with SweepStore.writer(path, spec) as store:`` — the one writer of the store at ``path``.

        Holds the store lock (StoreLocked if another live process holds it), refuses a path that is
        not a sweep store (FileExistsError, nothing changed), creates the store or checks its spec
        (:meth:`create_or_check`), then discards unfinished and damaged writes of killed runs.
        """
        path = Path(path)
        _refuse_foreign(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with StoreLock(path):
            clean_leftovers(path)
            _refuse_foreign(path)
            store = cls.create_or_check(path, spec)
            store.clean_tmp()
            store.discard_damaged()
            yield store

    @property
    def spec(self) -> dict:
        if not self.path.exists():
            raise FileNotFoundError(f"no sweep store at {str(self.path)!r}")
        try:
            attrs = dict(zarr.open_group(str(self.path), mode="r").attrs)
        except Exception as err:  # zarr raises various errors for non-zarr directories
            raise ValueError(f"{str(self.path)!r} exists and is not a zarr store ({err})") from err
        if ATTR not in attrs or attrs.get(MARKER, "sweep") != "sweep":
            raise ValueError(f"{str(self.path)!r} exists and is not a ksync sweep store; "
                             "choose another path")
        meta = attrs[ATTR]
        if meta.get("format") != FORMAT:
            raise ValueError(f"sweep store {str(self.path)!r} has format {meta.get('format')}, "
                             f"this version reads format {FORMAT}")
        return meta["spec"]

    # -- points -----------------------------------------------------------------------------------
    def clean_tmp(self) -> None:
        """Discard unfinished writes left by a killed process."""
        if self.tmp.exists():
            for entry in self.tmp.iterdir():
                shutil.rmtree(entry, ignore_errors=True)

    def _entries(self):
        if not self.points.exists():
            return []
        return [p for p in self.points.iterdir() if not p.name.startswith(".") and p.is_dir()]

    def _complete(self, point: Path, metrics) -> bool:
        """All metric arrays present and the attributes (written last) there."""
        try:
            group = zarr.open_group(str(point), mode="r")
            return "index" in group.attrs and all(name in group for name in metrics)
        except Exception:  # unreadable metadata: a damaged point
            return False

    def done(self) -> set[str]:
        """Keys of the finished points."""
        metrics = list(self.spec.get("metrics", {}))
        return {p.name for p in self._entries() if self._complete(p, metrics)}

    def discard_damaged(self) -> list[str]:
        """Move incomplete point directories (a store written by an unlocked older version) out of
        ``points/`` into the staging area and remove them; returns their keys. Lock holder only."""
        metrics = list(self.spec.get("metrics", {}))
        damaged = [p for p in self._entries() if not self._complete(p, metrics)]
        for p in damaged:
            aside = self.tmp / _tmp_name(f"damaged-{p.name}")
            os.rename(p, aside)
            shutil.rmtree(aside, ignore_errors=True)
        return [p.name for p in damaged]

    def write_point(self, key: str, values: dict, attrs: dict) -> bool:
        """Write one point atomically; False (and nothing written) if it is already there."""
        final = self.points / key
        if final.exists():
            return False
        staging = self.tmp / _tmp_name(key)
        group = zarr.open_group(str(staging), mode="w")
        for name, value in values.items():
            _write_array(group, name, np.asarray(value))
        group.attrs.update(json_roundtrip(attrs))
        try:
            os.rename(staging, final)
        except OSError:  # written meanwhile (a duplicate result): keep the first one
            shutil.rmtree(staging, ignore_errors=True)
            return False
        return True

    def read_point(self, key: str) -> dict:
        group = zarr.open_group(str(self.points / key), mode="r")
        return {name: np.asarray(arr[...]) for name, arr in group.arrays()}

    def point_attrs(self, key: str) -> dict:
        return dict(zarr.open_group(str(self.points / key), mode="r").attrs)

    # -- assembled result -------------------------------------------------------------------------
    def write_result(self, ds) -> None:
        """Write the assembled Dataset as group ``result`` (replacing an older one atomically) and at
        the root of the store (:meth:`_write_root`), so that ``xr.open_zarr(path)`` shows it."""
        staging = self.tmp / _tmp_name("result")
        ds.to_zarr(str(staging), mode="w", consolidated=False)
        _replace_dir(staging, self.path / "result")
        clash = sorted(name for name in map(str, ds.variables) if name in RESERVED or name.startswith("."))
        if clash:
            warnings.warn(f"sweep store {str(self.path)!r}: the variables {clash} take names of the store's "
                          "layout; the result is only in its group 'result'", stacklevel=2)
            return
        self._write_root(ds)

    def _write_root(self, ds) -> None:
        """The result's arrays at the root of the store, so that a plain ``xr.open_zarr`` reads them.

        xarray reads the root through its consolidated metadata, one file replaced in one move: first
        a version that lists no arrays (readers see an empty Dataset while arrays move in and stale
        ones go), then one that lists the new arrays, with the store's own attrs and the result's."""
        own = dict(zarr.open_group(str(self.path), mode="r", **_NO_CONSOLIDATED).attrs)
        own = {key: own[key] for key in (MARKER, ATTR) if key in own}
        empty = self.tmp / _tmp_name("root-empty")
        zarr.open_group(str(empty), mode="w").attrs.update(own)
        _consolidate(empty)
        self._move_root_metadata(empty)
        staging = self.tmp / _tmp_name("root")
        ds.to_zarr(str(staging), mode="w", consolidated=False)
        zarr.open_group(str(staging), mode="r+").attrs.update(own)
        _consolidate(staging)  # while the arrays are still in staging
        names = {str(name) for name in ds.variables}
        for name in sorted(names):
            _replace_dir(staging / name, self.path / name)
        for entry in self.path.iterdir():  # arrays of an older result that this one does not have
            if entry.name not in names and entry.name not in RESERVED and _is_array(entry):
                shutil.rmtree(entry, ignore_errors=True)
        self._move_root_metadata(staging)

    def _move_root_metadata(self, staging: Path) -> None:
        """Move the metadata files of the group ``staging`` (zarr.json; zarr 2: .z*) onto the root's,
        each with one atomic ``os.replace``; then discard ``staging``."""
        for meta in sorted(p for p in staging.iterdir() if p.is_file()):
            os.replace(meta, self.path / meta.name)
        shutil.rmtree(staging, ignore_errors=True)


#: zarr >= 3 reads a group through its consolidated metadata by default; the root's lists the result only
_NO_CONSOLIDATED = {"use_consolidated": False} if int(zarr.__version__.split(".")[0]) >= 3 else {}


def _consolidate(path: Path) -> None:
    """Consolidated metadata for the group at ``path`` (what ``xr.open_zarr`` reads first)."""
    with warnings.catch_warnings():  # zarr 3 warns that consolidated metadata is outside the v3 spec;
        warnings.filterwarnings("ignore", message="Consolidated metadata")  # xarray reads it all the same
        zarr.consolidate_metadata(str(path))


def _is_array(path: Path) -> bool:
    """Whether the directory ``path`` is a zarr array (format 3: zarr.json node_type, format 2: .zarray)."""
    if not path.is_dir() or path.is_symlink():
        return False
    if (path / ".zarray").is_file():
        return True
    try:
        return json.loads((path / "zarr.json").read_text()).get("node_type") == "array"
    except (OSError, ValueError, AttributeError):
        return False


def _refuse_foreign(path: Path) -> None:
    """FileExistsError for an existing path that is not a sweep store (rules of particles.store)."""
    if (path.exists() or path.is_symlink()) and store_kind(path) != "sweep":
        check_output(path, kind="sweep")
