"""Numba kernels behind :func:`particles.simulate`, and the choice of the fastest path.

:func:`velocity_field` returns a callable x ↦ v with v_i = Σ_j a_ij V x_j for one configuration
(n, d). Every path computes the same maths as :mod:`particles.reference` (checked in tests); the
row maths lives once, in :mod:`.rows`. Paths (``VelocityField.path``):

* ``"hk1d"``       flat score, d = 1, radius, no window/causal/top-k (1-D Hegselmann–Krause):
                   sorted two-pointer sweep over prefix sums, O(n) per step (:mod:`.hk1d`).
* ``"neighbours"`` radius, no window, d ≤ 3, n ≥ 2048, and a sampled neighbour fraction ≤ 10 %:
                   cKDTree neighbour lists (CSR) + the row kernel over the lists, decided per call
                   (:mod:`.neighbours`); otherwise the call falls back to "range".
* ``"symmetric"``  d ≤ 4, no restriction, Q = K, softmax or rbf score, n ≥ SYMMETRIC_MIN_N: the
                   scores are symmetric, so each exp(s_ij − shift) is computed once for the pair
                   i < j and used by both rows, with one shift bounding every score
                   (:func:`.dense.velocity_symmetric`); a row whose sum underflows that shared
                   bound is redone by the fused kernel with its exact max.
* ``"fused"``      d ≤ 4 and no top-k (dense, causal or windowed, radius masked): one fused
                   vectorised pass per row (scores, exp, Σ w·v) with a bound of the row max as the
                   shift (:func:`.dense.velocity_fused`) — the dense softmax/RBF fast path.
* ``"headdim"``    d ≥ 5, dense softmax/rbf (no restriction), n ≥ headdim.MIN_N: blocks of BLAS
                   products around a vectorised exp (Q = K: the upper triangle only) (:mod:`.headdim`).
* ``"blas"``       softmax score, d > 4, no restriction: row blocks of BLAS matmuls around the
                   shared row weights (:mod:`.blas`).
* ``"range"``      everything else (top-k, or d > 4 with another score or a restriction): each
                   row scans one contiguous key range — all keys (dense), 0..i (causal) or the
                   window (O(n·w)); radius masks, top-k selects inside the range (:func:`.dense.rows_range`).

Windowed rows cost O(w) whatever n, so "fused" and "range" are linear in n with a window; no path
allocates an n×n array (only ``weights`` returns one, on request).

:data:`PATHS` is the table of paths, in the order of preference: each :class:`Path` says when it
applies (may be forced), when it is chosen automatically, and how it computes v. The kernels read
the interaction from one :class:`.rows.RowSpec` built per VelocityField.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numba
import numpy as np

from ..interaction import Interaction, radius_bound_sq, usa_overflow_message
from . import blas, dense, headdim, hk1d, neighbours, rows, simd, tiles, trajectory

#: Below this many scored pairs a call runs on one thread: waking the second numba thread costs more
#: than it saves, and on a busy machine the wait for it can take a whole scheduler tick (4 ms).
SERIAL_WORK = 1 << 21
HK1D_WORK_PER_OPINION = 16  # the sweep's cost per opinion, in the same units
RANGE_TOP_K_COST = 4  # a scored pair of the range kernel with top-k, in the same units
SYMMETRIC_MIN_N = 512
LANES_MIN_SAMPLES = 16  # ensembles this large integrate tiles of samples vectorised over the samples
LANES_PER_TILE = 64  # samples per LANES tile: the lane loops vectorise in blocks of 64 (fp32: 16 × 4)
assert LANES_PER_TILE % simd.lanes(np.dtype(np.float32)) == 0  # the tiles run whole vectors of samples
# One system below SERIAL_WORK pairs runs on several threads in lockstep (trajectory.integrate_rows)
# when each thread gets at least LOCKSTEP_MIN_ROWS rows, each evaluation at least LOCKSTEP_MIN_PAIRS
# scored pairs and the call at least LOCKSTEP_MIN_WORK, about 1 ms (the helper threads take about
# 50 µs to join, longer on a busy machine; each evaluation adds two barriers of about 40 ns).
# benchmarks/lockstep.md (2 vCPUs of an AMD EPYC, against one thread): SA d = 3 1.02x at n = 32
# and 64 (1.02-1.3x over repeated runs at 64), 1.2-1.6x at n = 128-1000; Krause top-k 1.6-1.7x.
LOCKSTEP_MIN_ROWS = 24
LOCKSTEP_MIN_PAIRS = 4096
# The symmetric tiles need nine times as many (n ≥ 192): their own one-thread Euler loop
# (trajectory._integrate_tiles_euler) runs n = 64 in 2.7 µs a step, and lockstep gave 0.61x at
# n = 64, 0.91x at 128, 0.98x at 160, 1.09x at 192, 1.29x at 256 (benchmarks/lockstep.md).
LOCKSTEP_MIN_PAIRS_TILES = 192 * 192
LOCKSTEP_MIN_WORK = 1 << 20


@contextmanager
def threads_for(work: int):
    """Run the enclosed kernels on one numba thread when `work` (pairs) is small."""
    if work >= SERIAL_WORK:
        yield
        return
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def lockstep(field: VelocityField, plan, samples: int, evaluations: int):
    """(plan, threads) for trajectory.run: one sample with LOCKSTEP_MIN_PAIRS (the symmetric tiles:
    LOCKSTEP_MIN_PAIRS_TILES) to SERIAL_WORK pairs per evaluation, at least LOCKSTEP_MIN_WORK in all
    its `evaluations` and LOCKSTEP_MIN_ROWS rows per thread, runs its FUSED, RANGE or SYMMETRIC_TILES
    rows on up to numba.get_num_threads() threads in lockstep (SYMMETRIC_TILES: at most tiles.SLOTS;
    the FUSED rows in place of a forced serial SYMMETRIC kernel); anything else keeps `plan` on its
    own (threads = 1)."""
    kinds = ((0,) * trajectory.FUSED, (0,) * trajectory.SYMMETRIC, (0,) * trajectory.RANGE,
             (0,) * trajectory.SYMMETRIC_TILES)
    if samples != 1 or plan is None or plan.kind not in kinds:
        return plan, 1
    n, work = field.n, field.work(field.n)
    threads = min(numba.get_num_threads(), n // LOCKSTEP_MIN_ROWS)
    min_pairs = LOCKSTEP_MIN_PAIRS
    if plan.kind == (0,) * trajectory.SYMMETRIC_TILES:
        threads = min(threads, tiles.SLOTS)  # a thread per share of the tiles at most
        min_pairs = LOCKSTEP_MIN_PAIRS_TILES
    if not min_pairs <= work < SERIAL_WORK or work * evaluations < LOCKSTEP_MIN_WORK or threads < 2:
        return plan, 1
    return (_plan_fused(field, False) if plan.kind == (0,) * trajectory.SYMMETRIC else plan), threads


def _plain(it: Interaction) -> bool:
    return it.window is None and not it.causal and it.top_k is None


def symmetric_scores(it: Interaction, d: int) -> bool:
    """s_ij = s_ji for every pair: Q = K, a softmax or rbf score and no restriction."""
    if it.restricted or it.score == "flat" or d > rows.FUSED_MAX_DIM:
        return False
    Q, K, _ = it.matrices(d)
    return (it.Q is None and it.K is None) or np.array_equal(Q, K)


def _is_hk1d(it, n, d):
    return it.score == "flat" and d == 1 and it.radius is not None and _plain(it) and it.normalise


def _fused_applies(it, n, d):
    return it.top_k is None and d <= rows.FUSED_MAX_DIM


def _blas_applies(it, n, d):
    return it.score == "softmax" and not it.restricted and d > rows.FUSED_MAX_DIM


# -- drivers: out ← v for the projected state; each returns the path it took ----------------------
def _run_hk1d(f, x, proj, out):
    with threads_for(HK1D_WORK_PER_OPINION * x.shape[0]):
        v = f.sweep(x.astype(f.dtype, copy=False), f.spec.r2)
    out[:] = v if f.interaction.V is None else v * f.V[0, 0]
    return "hk1d"


def _run_neighbours(f, x, proj, out):
    nbrs = neighbours.neighbour_lists(x, f.spec.r2, 1.0 if f.forced else neighbours.MAX_FRACTION)
    if nbrs is None:  # too dense to pay off: the dense kernel for this shape
        return f.fallback.run(f, x, proj, out)
    with threads_for(int(nbrs[0][-1])):
        neighbours.velocity_lists(f.spec, *nbrs, *proj, out)
    return "neighbours"


def _run_symmetric(f, x, proj, out):
    """out ← v via velocity_symmetric; rows whose Σ w fell below `tiny` under the shared shift
    are redone one by one by the fused kernel with their exact row max."""
    xT, qT, _, vT = proj
    it, spec, n = f.interaction, f.spec, xT.shape[1]
    sq = np.einsum("dn,dn->n", qT, qT)
    shift = abs(it.beta) * sq.max() if it.score == "softmax" else 0.0
    sums = np.empty((len(f.dims) + 1, n), dtype=f.dtype)
    with threads_for(n * n // 2):
        blocks = -(-n // dense.SYMMETRIC_BLOCK)
        tasks = max(1, min((blocks + 1) // 2, 2 * numba.get_num_threads()))
        partial = np.empty((tasks, len(f.dims) + 1, n), dtype=f.dtype)
        dense.velocity_symmetric(f.dims, f.score_s, spec, qT, vT, shift, partial, sums)
    factor = 1.0 / sums[0] if it.normalise else np.full(n, 1.0 / n, dtype=f.dtype)
    out[:] = (sums[1:] * factor).T
    loose = np.flatnonzero(sums[0] < spec.tiny) if it.normalise else ()
    if len(loose):
        redo = np.empty((len(loose), xT.shape[0]), dtype=f.dtype)
        qnorm, kmax = np.sqrt(sq), f.dtype.type(np.sqrt(sq.max()))
        dense.velocity_fused(f.dims, f.score_s, f.radius_s, spec, loose, xT, qT, qT, vT, qnorm, kmax, redo)
        out[loose] = redo
    return "symmetric"


def _run_fused(f, x, proj, out):
    xT, qT, kT, vT = proj
    it, n = f.interaction, xT.shape[1]
    qnorm = np.sqrt(np.einsum("dn,dn->n", qT, qT))
    kmax = f.dtype.type(np.sqrt(np.einsum("dn,dn->n", kT, kT).max()))
    with threads_for(n * rows.buffer_len(n, it.window or 0, bool(it.causal))):
        dense.velocity_fused(f.dims, f.score_s, f.radius_s, f.spec, np.arange(n), xT, qT, kT, vT, qnorm, kmax,
                             out)
    return "fused"


def _run_headdim(f, x, proj, out):
    with threads_for(headdim.work(x.shape[0], x.shape[1])):
        headdim.run_field(f, x, out)  # row-major q, k, v from x and f.Q, f.K, f.V
    return "headdim"


def _run_blas(f, x, proj, out):
    _, qT, kT, vT = proj
    n = qT.shape[1]
    with threads_for(n * n):
        blas.velocity_blas(qT.T, kT.T, vT.T, f.spec.beta, f.spec.normalise, out)
    return "blas"


def _run_range(f, x, proj, out):
    it, n = f.interaction, x.shape[0]
    pairs = n * rows.buffer_len(n, it.window or 0, bool(it.causal))
    with threads_for(pairs * (RANGE_TOP_K_COST if it.top_k else 1)):
        dense.rows_range(f.small_dims, f.spec, *proj, False, out)
    return "range"


# -- plans of the compiled trajectories (kernels/trajectory.py); None: the Python stepping loop ----
def _plan_hk1d(f, parallel):
    """dims = (0,): the state is one component, so the step is the vectorised d ≤ 4 Euler loop
    (trajectory._euler_plain; the general loop took 9 ms of a 27 ms step at 10⁶ opinions)."""
    return trajectory.make_plan(trajectory.HK1D, dims=(0,),
                                vscale=1.0 if f.interaction.V is None else f.V[0, 0])


def _plan_symmetric(f, parallel):
    return trajectory.make_plan(trajectory.SYMMETRIC, f.dims, f.score_s, f.radius_s)


def _plan_fused(f, parallel):
    return trajectory.make_plan(trajectory.FUSED, f.dims, f.score_s, f.radius_s)


def _plan_range(f, parallel):
    return trajectory.make_plan(trajectory.RANGE, f.small_dims)


def _plan_blas(f, parallel):  # one thread per sample: the range rows (BLAS threads would compete)
    return None if parallel else _plan_range(f, parallel)


@dataclass(frozen=True)
class Path:
    """One way of computing v: `applies(it, n, d)` says it may be used (forced), `auto(it, n, d)`
    that it is the automatic choice when no earlier path is, `run(field, x, proj, out)` computes
    out ← v (proj: the component-major projections) and returns the path it actually took, and
    `plan(field, parallel)` is its compiled-trajectory plan (None: the Python stepping loop — the
    neighbour lists are built by scipy's kd-tree, headdim calls BLAS per block, each call ≥ 0.1 ms);
    `projects`: run reads proj (False: it works from x itself, and no projection is computed)."""

    name: str
    applies: Callable
    auto: Callable
    run: Callable
    plan: Callable = lambda f, parallel: None
    projects: bool = True


#: The paths in the order of preference (see the module docstring).
PATH_TABLE = (
    Path("hk1d", _is_hk1d, _is_hk1d, _run_hk1d, _plan_hk1d, projects=False),
    Path("neighbours", lambda it, n, d: it.radius is not None,
         lambda it, n, d: it.radius is not None and it.window is None and d <= neighbours.MAX_DIM
         and n >= neighbours.MIN_N, _run_neighbours),
    Path("symmetric", lambda it, n, d: symmetric_scores(it, d),
         lambda it, n, d: n >= SYMMETRIC_MIN_N and symmetric_scores(it, d), _run_symmetric, _plan_symmetric),
    Path("fused", _fused_applies, _fused_applies, _run_fused, _plan_fused),
    Path("headdim", headdim.applies, headdim.auto, _run_headdim, projects=False),
    Path("blas", _blas_applies, _blas_applies, _run_blas, _plan_blas),
    Path("range", lambda it, n, d: True, lambda it, n, d: True, _run_range, _plan_range),
)
PATHS = tuple(p.name for p in PATH_TABLE)
_BY_NAME = {p.name: p for p in PATH_TABLE}


def choose_path(it: Interaction, n: int, d: int) -> str:
    """The static choice; "neighbours" is confirmed per call from the sampled neighbour density."""
    return next(p.name for p in PATH_TABLE if p.auto(it, n, d))


def _dense_path(it: Interaction, d: int, n: int = 0) -> str:
    """The first automatic path after the two that depend on the state's structure."""
    return next(p.name for p in PATH_TABLE[2:] if p.auto(it, n, d))


def row_spec(it: Interaction, n: int, dtype) -> rows.RowSpec:
    """The kernels' view of `it` for n particles in `dtype` (see rows.RowSpec)."""
    dtype = np.dtype(dtype)
    t = dtype.type
    return rows.RowSpec(
        score=rows.SCORE_CODE[it.score], beta=t(it.beta), inv2s2=t(1.0 / (2.0 * it.sigma**2)),
        r2=t(radius_bound_sq(it.radius, dtype)) if it.radius is not None else t(0.0),
        use_radius=it.radius is not None, window=int(it.window or 0), causal=bool(it.causal),
        top_k=int(it.top_k or 0), normalise=bool(it.normalise),
        # Σ exp(s − bound) below this means the bound of the row max was too loose (see fused_task)
        tiny=t(float(n) ** 2 * np.finfo(dtype).tiny * np.exp(40.0)))


class VelocityField:
    """v(x) for a fixed interaction, size, dimension and dtype; ``path`` names the kernel used.

    ``prepare(x) -> (state, order)`` and ``restore(state, order)`` are the field's hooks around a
    trajectory: the 1-D HK sweep integrates the opinions in sorted order (the HK map keeps their
    order, so the sweep needs no gather/scatter) and restore puts a saved state back in particle
    order; for every other path they are the identity.
    """

    def __init__(self, it: Interaction, n: int, d: int, dtype, path: str | None = None):
        self.interaction = it
        self.n = n
        self.dtype = np.dtype(dtype)
        self.path = choose_path(it, n, d) if path is None else path
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        if not _BY_NAME[self.path].applies(it, n, d):
            raise ValueError(f"path {self.path!r} does not apply to this interaction (d={d})")
        self.forced = path is not None
        self.Q, self.K, self.V = it.matrices(d, self.dtype)
        self.spec = row_spec(it, n, self.dtype)
        self.sweep = hk1d.SortedSweep() if self.path == "hk1d" else None
        self.fallback = _BY_NAME[_dense_path(it, d)]  # of "neighbours" when the lists do not pay off
        self.dims = (0,) * d  # compile-time constants of the fused kernel (rows.static)
        self.small_dims = self.dims if d <= rows.FUSED_MAX_DIM else ()
        self.score_s, self.radius_s = rows.static(self.spec.score), rows.static(it.radius is not None)
        self.last_path = None  # the path the last call actually took

    def project(self, x):
        """Component-major (xᵀ, (Qx)ᵀ, (Kx)ᵀ, (Vx)ᵀ), each (d, n) contiguous; identity costs one copy."""
        xT = np.ascontiguousarray(x.T, dtype=self.dtype)
        if self.interaction.identity_qkv:
            return xT, xT, xT, xT
        return (xT,) + tuple(np.ascontiguousarray(M @ xT) for M in (self.Q, self.K, self.V))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        out = np.empty(x.shape, dtype=self.dtype)
        path = _BY_NAME[self.path]
        proj = self.project(x) if path.projects else None  # (headdim projected twice before: 3 GEMMs)
        self.last_path = path.run(self, x, proj, out)
        if not self.interaction.normalise and not np.all(np.isfinite(out)):
            raise OverflowError(usa_overflow_message(self.interaction.beta, self.dtype))
        return out

    def weights(self, x: np.ndarray) -> np.ndarray:
        """Dense interaction matrix a_ij (n, n)."""
        xT, qT, kT, _ = self.project(np.asarray(x))
        n = xT.shape[1]
        return dense.rows_range(self.small_dims, self.spec, xT, qT, kT, xT, True,
                                np.empty((n, n), dtype=self.dtype))

    # -- trajectory hooks ---------------------------------------------------------------------
    def prepare(self, x: np.ndarray):
        """(state to integrate, order): 1-D HK opinions sorted (order = the sorting permutation;
        tied opinions are interchangeable, so any sort will do)."""
        order = self.order(x)
        return (x, None) if order is None else (x[order], order)

    def order(self, x: np.ndarray):
        """The working order of prepare (None: the particles' own order)."""
        return hk1d.argsort(np.ascontiguousarray(x[:, 0])) if self.path == "hk1d" else None

    def trajectory_plan(self, parallel: bool = False, samples: int = 1):
        """The plan of kernels/trajectory.py for this field and `samples` systems (None: no
        compiled trajectory). Ensembles of at least LANES_MIN_SAMPLES systems on the dense,
        windowed or causal rows (no top-k, d ≤ 4) run LANES tiles of LANES_PER_TILE samples, vectorised over
        the samples (the last tile padded: trajectory.run); SYMMETRIC_LANES tiles when the scores are
        symmetric (one exp per pair, in explicit vectors: 1.5-2.6x faster than LANES at d = 2-4,
        benchmarks/explicit_simd.md). Fewer systems with symmetric scores, each on one thread or in
        lockstep (not `parallel`), run SYMMETRIC_TILES when the path was chosen automatically (each
        exp once, in square tiles: 1.1-1.8x the fused rows at n = 32-512)."""
        dense_rows = self.path in ("fused", "symmetric")
        symmetric = dense_rows and symmetric_scores(self.interaction, len(self.dims))
        if samples >= LANES_MIN_SAMPLES and dense_rows:
            kind = trajectory.SYMMETRIC_LANES if symmetric else trajectory.LANES
            return trajectory.make_plan(kind, self.dims, self.score_s, self.radius_s, lanes=LANES_PER_TILE)
        if symmetric and not parallel and not self.forced:
            return trajectory.make_plan(trajectory.SYMMETRIC_TILES, self.dims, self.score_s, self.radius_s)
        return _BY_NAME[self.path].plan(self, parallel)

    def work(self, n: int) -> int:
        """Scored pairs of one evaluation, in the units of SERIAL_WORK."""
        it = self.interaction
        if self.path == "hk1d":
            return HK1D_WORK_PER_OPINION * n
        pairs = n * rows.buffer_len(n, it.window or 0, bool(it.causal))
        return pairs * (RANGE_TOP_K_COST if it.top_k else 1)

    def restore(self, x: np.ndarray, order) -> np.ndarray:
        """A state held in the order `order` (from prepare) back in particle order."""
        if order is None:
            return x
        out = np.empty_like(x)
        out[order] = x
        return out


def velocity_field(it: Interaction, n: int, d: int, dtype=np.float64,
                   path: str | None = None) -> VelocityField:
    """The fastest available implementation of x ↦ v for this interaction and shape.

    path forces one of PATHS (for tests and benchmarks); None chooses automatically.
    """
    return VelocityField(it, n, d, dtype, path)
