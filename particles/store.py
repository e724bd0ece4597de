"""Output stores: the data-safety rules, the one-writer lock, and the streamed trajectory store.

Data safety — every writer of the package (``simulate(store=...)``, sweep stores, the ``-o`` of
``ksync simulate``, ``extract`` and ``compare``) follows these rules (docs/data-safety.md):

1. **Never delete what the library did not create.** Each output we write is marked as ours: the
   root attribute ``krause_sync_store = "<kind>"`` of a zarr store, or the global attribute of the
   same name of a netCDF file (kinds: ``"trajectory"``, ``"sweep"``, ``"extraction"``,
   ``"comparison"``). An existing path without the marker is refused with ``FileExistsError``
   naming it, and nothing in it is changed.
2. **Replacing one of ours needs** ``overwrite=True`` (command line: ``--force``), and only by an
   output of the same kind: a sweep store is never replaced by a trajectory, nor the reverse.
3. **One writer per store.** :class:`StoreLock` holds the lock file ``.<name>.lock`` beside the
   output (an ``fcntl.flock``-ed file that names the holder's pid and host). The kernel drops the
   flock when its process dies, SIGKILL included, so a lock file left behind is stale and the next
   writer takes it over; a live holder makes a second writer fail with :class:`StoreLocked`,
   which names its pid.
4. **Written under a temporary name, moved into place when complete.** Output goes to the sibling
   ``.<name>.partial-<id><suffix>`` and is moved onto ``<name>`` at the end (``os.replace`` for a
   file; for a directory the old one is renamed aside, the new one renamed in, then the old one
   removed). A writer killed at any moment leaves the previous output (or no output) in place; its
   partial sibling is removed by the next writer of that path, under the lock.

Stores must live on a local or POSIX file system with working ``flock`` (not an object store).

Streaming: ``simulate(..., store="run.zarr")`` writes each saved configuration as soon as it is
computed (one chunk per saved step, split along particles into ≈ 8 MB pieces), so a run with 10⁶
particles × d = 3 needs memory for a few configurations only. At the end the coordinates,
matrices and attributes are added and the Dataset is reopened lazily (dask) from the store::

    ds = simulate("hk", n=10**6, d=3, steps=200, dt=0.5, radius=0.05, save_every=10, store="hk.zarr")
    ds.x.isel(time=-1).values      # reads one saved step from disk

The interaction matrices requested with ``return_weights=True`` are n×n per saved step and stay in
memory; they are meant for small n.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
import uuid
import warnings
import weakref
from contextlib import contextmanager
from pathlib import Path

import numpy as np

CHUNK_BYTES = 8 * 2**20
#: root attribute (zarr) / global attribute (netCDF) that marks an output as written by us
MARKER = "krause_sync_store"
KINDS = ("trajectory", "sweep", "extraction", "comparison")
_LEGACY = {"ksync_sweep": "sweep"}  # sweep stores of format 1 carry only their own attribute


class StoreLocked(RuntimeError):
    """Another live process is writing this store."""


# -- is it ours? -----------------------------------------------------------------------------------
def _zarr_root_attrs(path: Path) -> dict | None:
    for meta, key in (("zarr.json", "attributes"), (".zattrs", None)):
        f = path / meta
        if f.is_file():
            try:
                doc = json.loads(f.read_text())
            except (OSError, ValueError):
                return None
            attrs = doc.get(key, {}) if key else doc
            return attrs if isinstance(attrs, dict) else None
    return None


def _netcdf_attrs(path: Path) -> dict | None:
    try:
        with open(path, "rb") as fh:
            magic = fh.read(8)
    except OSError:
        return None
    if not (magic[:3] == b"CDF" or magic == b"\x89HDF\r\n\x1a\n"):
        return None
    import xarray as xr

    try:
        with xr.open_dataset(path, decode_cf=False, decode_times=False) as ds:
            return dict(ds.attrs)
    except Exception:  # any unreadable file is simply not one of ours
        return None


def store_kind(path) -> str | None:
    """The kind of krause-sync output at ``path`` ("trajectory", "sweep", …), or None if ``path``
    is absent or was not written by this library."""
    path = Path(path)
    if path.is_symlink():
        return None
    if path.is_dir():
        attrs = _zarr_root_attrs(path)
    elif path.is_file():
        attrs = _netcdf_attrs(path)
    else:
        return None
    if not attrs:
        return None
    kind = attrs.get(MARKER)
    if kind is None:
        kind = next((k for attr, k in _LEGACY.items() if attr in attrs), None)
    return kind if isinstance(kind, str) else None


def check_output(path, *, kind: str, overwrite: bool = False) -> bool:
    """Whether ``path`` exists; FileExistsError unless it is absent, or one of our ``kind`` outputs
    and ``overwrite`` is true (rules 1 and 2 of the module docstring)."""
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return False
    found = store_kind(path)
    if found is None:
        what = "directory" if path.is_dir() else "file"
        raise FileExistsError(f"{str(path)!r} exists and is not a krause-sync output ({what} not written "
                              "by this library): refusing to replace it, nothing was changed; "
                              "choose another output path")
    if found != kind:
        raise FileExistsError(f"{str(path)!r} is a krause-sync {found} store, not a {kind} output: "
                              "refusing to replace it; choose another output path")
    if not overwrite:
        raise FileExistsError(f"{str(path)!r} already exists (a krause-sync {kind} output); pass "
                              "overwrite=True (command line: --force) to replace it")
    return True


def mark(ds, kind: str):
    """A shallow copy of the Dataset ``ds`` carrying the marker of a ``kind`` output."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    out = ds.copy(deep=False)
    out.attrs = {**ds.attrs, MARKER: kind}
    return out


# -- one writer: the lock ---------------------------------------------------------------------------
def lock_path(path) -> Path:
    path = Path(path)
    return path.parent / f".{path.name}.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreLock:
    """Exclusive writer lock of the store at ``path`` (rule 3): ``with StoreLock(path): ...``.

    The lock file ``.<name>.lock`` beside the store holds JSON ``{"pid", "host", "since"}``. After
    acquiring, :attr:`stale` is the record of a previous holder that died without releasing
    (None if there was none).
    """

    def __init__(self, path):
        self.path = Path(path)
        self.file = lock_path(self.path)
        self.stale: dict | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> StoreLock:
        if self._fd is not None:
            return self
        self.file.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_record(fd)
                os.close(fd)
                raise StoreLocked(self._busy_message(holder)) from None
            except OSError as err:
                os.close(fd)
                raise OSError(f"cannot lock {str(self.file)!r} ({err.strerror}); stores need a file "
                              "system with working flock") from None
            try:  # the previous holder may have unlinked the file between our open and flock
                same = os.fstat(fd).st_ino == os.stat(self.file).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_record(fd)
        if previous and previous.get("pid") != os.getpid():
            self.stale = previous
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        return self

    def _busy_message(self, holder: dict | None) -> str:
        if not holder:
            return f"{str(self.path)!r} is being written by another process (lock {str(self.file)!r})"
        pid, host = holder.get("pid"), holder.get("host")
        mine = host == socket.gethostname() and pid == os.getpid()
        who = f"pid {pid}" + (" (this process)" if mine else "") + (f" on {host}" if host else "")
        alive = "" if host != socket.gethostname() or not isinstance(pid, int) or _alive(pid) else \
            " (not running any more; retry)"
        return (f"{str(self.path)!r} is being written by {who} since {holder.get('since', '?')}{alive}: "
                "one writer per store; wait for it to finish or stop it")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.file)
        except FileNotFoundError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_record(fd: int) -> dict | None:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


# -- temporary name, then into place ----------------------------------------------------------------
def partial_path(path) -> Path:
    """A fresh temporary sibling of ``path`` (same suffix, so writers pick the same format)."""
    path = Path(path)
    return path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:12]}{path.suffix}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def clean_leftovers(path) -> None:
    """Remove the partial siblings of ``path`` left by killed writers, and finish an interrupted
    replacement (the old output renamed aside, the new one not yet in: the old one goes back).
    Call only while holding ``StoreLock(path)``: then no live writer owns them."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    olds = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not (path.exists() or path.is_symlink()):
        os.rename(olds.pop(), path)
    for leftover in [*path.parent.glob(f".{path.name}.partial-*"), *olds]:
        _remove(leftover)


def move_into_place(tmp, path) -> None:
    """Move the finished output ``tmp`` onto ``path`` (rule 4)."""
    tmp, path = Path(tmp), Path(path)
    if (path.exists() or path.is_symlink()) and (path.is_dir() or tmp.is_dir()):
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(path, old)
        os.rename(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)


@contextmanager
def prepare_output(path, *, overwrite: bool = False, kind: str):
    """``with prepare_output(path, kind=...) as tmp: write(tmp)`` — the safe way to write an output.

    Takes the store lock, refuses ``path`` by rules 1–2, yields a temporary sibling path with the
    same suffix, and moves it onto ``path`` when the block succeeds (what was written must carry the
    marker: see :func:`mark`). If the block fails the temporary output is removed and ``path`` is
    untouched. Missing parent folders are created.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = Path(path)
    check_output(path, kind=kind, overwrite=overwrite)  # refuse early, before creating any folder
    path.parent.mkdir(parents=True, exist_ok=True)
    with StoreLock(path):
        clean_leftovers(path)
        check_output(path, kind=kind, overwrite=overwrite)
        tmp = partial_path(path)
        try:
            yield tmp
            if not (tmp.exists() and store_kind(tmp) == kind):
                raise RuntimeError(f"internal error: the output for {str(path)!r} was not written with "
                                   f"the {kind!r} marker")
            check_output(path, kind=kind, overwrite=overwrite)
            move_into_place(tmp, path)
        finally:
            _remove(tmp)


def write_dataset(ds, path, *, kind: str, overwrite: bool = False) -> Path:
    """Write the Dataset ``ds`` to ``path`` (.nc: netCDF, .zarr: zarr) following the rules above."""
    path = Path(path)
    if path.suffix not in (".nc", ".zarr"):
        raise ValueError(f"output must end in .nc or .zarr, got {str(path)!r}")
    with prepare_output(path, overwrite=overwrite, kind=kind) as tmp:
        from particles.conventions import encode

        out = mark(encode(ds), kind)
        if path.suffix == ".zarr":
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata")
                out.to_zarr(tmp, mode="w-")
        else:
            out.to_netcdf(tmp)
    return path


# -- the streamed trajectory store ----------------------------------------------------------------
def _abandon(tmp: Path, lock: StoreLock) -> None:
    _remove(tmp)
    lock.release()


class TrajectoryStore:
    """Write-through stand-in for the (sample, time, particle, component) trajectory array.

    ``store[s, slot] = x`` writes saved step `slot` of sample `s`; without an ensemble the stored
    variable has no sample axis. :meth:`lazy` gives the stored data as a dask array of the full
    (sample, time, particle, component) shape; :meth:`finish` completes the store from the final
    Dataset, moves it into place and reopens it. The store is written under a temporary name while
    the lock is held (module docstring); use it as a context manager (or call :meth:`abort`) so that
    a failed run removes its partial store and releases the lock at once.
    """

    def __init__(self, path, shape, dtype, ensemble: bool, overwrite: bool = False):
        import dask.array as da
        import xarray as xr
        import zarr

        self.path = Path(os.fspath(path))
        if self.path.suffix != ".zarr":
            raise ValueError(f"store must be a path ending in .zarr, got {str(self.path)!r}")
        self.ensemble = ensemble
        check_output(self.path, kind="trajectory", overwrite=overwrite)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = StoreLock(self.path).acquire()
        self.tmp = partial_path(self.path)
        self._cleanup = weakref.finalize(self, _abandon, self.tmp, self._lock)
        try:
            clean_leftovers(self.path)
            check_output(self.path, kind="trajectory", overwrite=overwrite)
            S, T, n, d = shape
            dtype = np.dtype(dtype)
            chunk_n = int(max(1, min(n, CHUNK_BYTES // (d * dtype.itemsize))))
            lead = (S,) if ensemble else ()
            dims = (("sample",) if ensemble else ()) + ("time", "particle", "component")
            chunks = (1,) * len(lead) + (1, chunk_n, d)
            template = da.zeros(lead + (T, n, d), chunks=chunks, dtype=dtype)
            xr.Dataset({"x": (dims, template)}, attrs={MARKER: "trajectory"}).to_zarr(
                self.tmp, mode="w-", compute=False, consolidated=False)
            self.array = zarr.open_group(str(self.tmp), mode="r+")["x"]
        except BaseException:
            self.abort()
            raise
        self.overwrite = overwrite

    def __setitem__(self, key, x):
        s, slot = key
        if self.ensemble:
            self.array[s, slot] = x
        else:
            self.array[slot] = x

    def lazy(self):
        """The stored trajectory as a dask array of shape (sample, time, particle, component)."""
        import dask.array as da

        arr = da.from_zarr(self.array)
        return arr if self.ensemble else arr[None]

    def finish(self, ds):
        """Add everything but "x" (coordinates, matrices, weights, attributes), move the store into
        place, release the lock and reopen it lazily."""
        import xarray as xr

        try:
            rest = ds.drop_vars("x")
            rest.attrs = {**ds.attrs, MARKER: "trajectory"}
            rest.to_zarr(self.tmp, mode="a", consolidated=False)
            check_output(self.path, kind="trajectory", overwrite=self.overwrite)
            move_into_place(self.tmp, self.path)
        finally:
            self.abort()
        return xr.open_zarr(self.path, consolidated=False)

    def abort(self) -> None:
        """Discard the partial store (if not moved into place) and release the lock."""
        self._cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.abort()
