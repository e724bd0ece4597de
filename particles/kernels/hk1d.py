"""1-D Hegselmann–Krause: sorted two-pointer sweep with compensated window sums, O(n) per step.

The synchronous HK map preserves the order of opinions (x_i ≤ x_j ⇒ x_i' ≤ x_j', and Euler with
dt ≤ 1 keeps it). particles.simulate therefore integrates 1-D HK in sorted order, and a call on
sorted opinions sweeps them directly. Otherwise the permutation sorting x is computed once and
reused: each call gathers x in that order, checks it is still non-decreasing (re-sorting if not —
noise, dt > 1, or a new state), sweeps, and scatters the result back.

For the sorted opinions the neighbourhood {j : (x_j − x_i)² ≤ r2} is an index interval [lo, hi]
whose ends only move forward, with the same predicate (and the same r2 = radius_bound_sq) as every
other path. The mean over it is (P[hi+1] − P[lo])/(hi − lo + 1) with prefix sums P kept in float64
as an unevaluated sum hi + lo (TwoSum), so window sums keep full relative
accuracy even for 10⁶ opinions.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .fastexp import WINDOW_LANES, count_far_left, count_near, float_key, key_float
from .simd import exact_add, exact_sub, lanes, vload, vsplat, vstore
from .sync import run_group

CHUNK = 1 << 16  # positions per parallel task in the sweep
LOOKAHEAD = WINDOW_LANES  # keys each interval end tests per position (+inf padding past the end)


@njit(cache=True)
def copy_sorted(x, xs):
    """xs[:n] = x; True if x is non-decreasing (the copy and the check in one pass)."""
    bad = 0
    for p in range(x.shape[0]):
        xs[p] = x[p]
        if p > 0:
            bad += x[p] < x[p - 1]
    return bad == 0


PARALLEL_SORT_MIN = 1 << 16  # argsort: below this many opinions one np.argsort is as fast
RADIX_BITS = 11  # digit of radix_sorted_run: 6 passes over 64-bit keys, 2048 counters a pass (16 KiB)


@njit(cache=True, nogil=True)
def merge_split(va, vb, k):
    """(p, k − p): the first k values of the merge of the sorted runs va and vb (ties: a first) are
    va[:p] and vb[:k − p] (bisection on the merge path: a[p] comes before b[k − p − 1] iff
    a[p] ≤ b[k − p − 1])."""
    lo, hi = max(0, k - vb.shape[0]), min(k, va.shape[0])
    while lo < hi:
        p = (lo + hi) // 2
        if va[p] <= vb[k - p - 1]:
            lo = p + 1
        else:
            hi = p
    return lo, k - lo


@njit(cache=True, nogil=True)
def merge_tasks(values, ids, to_values, to_ids, keep_values, tasks):
    """For each task (a, mid, b, first, last): outputs first..last−1 of the merge of the sorted runs
    [a, mid) and [mid, b) of (values, ids) (ties: a first) into to_values[a + first …], to_ids[a + first …]
    (to_values only if keep_values). Each task starts at its own split of the merge path, so the pieces
    of one merge run on different threads and together give the serial merge; the values are read
    sequentially, never gathered through the indices."""
    for t in range(tasks.shape[0]):
        a, mid, b, first, last = tasks[t]
        va, vb, ia, ib = values[a:mid], values[mid:b], ids[a:mid], ids[mid:b]
        p, q = merge_split(va, vb, first)
        for k in range(a + first, a + last):
            if q == vb.shape[0] or (p < va.shape[0] and va[p] <= vb[q]):
                v, i = va[p], ia[p]
                p += 1
            else:
                v, i = vb[q], ib[q]
                q += 1
            if keep_values:
                to_values[k] = v
            to_ids[k] = i


@njit(cache=True, nogil=True)
def radix_sorted_run(x, start, stop, keys, keys_to, idx_to, values, idx):
    """values ← x[start:stop] sorted, idx ← their indices into x: an LSD radix sort, RADIX_BITS a pass,
    of 64-bit keys in the order of the values (fastexp.float_key with its sign bit flipped, so that
    unsigned order is float order: −0 before +0, NaN at the ends); a pass whose digit is the same for
    every key is skipped, and the passes alternate between idx and idx_to so that the last one writes
    idx. The values are the sorted keys turned back into floats (key_float: sequential, bit for bit).
    Stable. keys, keys_to, idx_to: int64 work space; every array has stop − start entries."""
    n = stop - start
    R = 1 << RADIX_BITS
    passes = -(-64 // RADIX_BITS)
    mask, top = np.uint64(R - 1), np.uint64(1) << np.uint64(63)
    counts = np.zeros((passes, R), np.int64)  # every pass's digit counts, from one read of x
    for i in range(n):
        k = np.uint64(float_key(x[start + i])) ^ top
        keys[i] = np.int64(k)
        for p in range(passes):
            counts[p, (k >> np.uint64(p * RADIX_BITS)) & mask] += 1
    live = 0
    for p in range(passes):
        live += counts[p].max() < n  # (n = 0: no pass)
    src, done = idx, 0
    for p in range(passes):
        at = counts[p]
        if at.max() == n:  # one digit for every key: the pass keeps the order
            continue
        dst = idx if (live - 1 - done) % 2 == 0 else idx_to
        first = 0
        for r in range(R):
            first, at[r] = first + at[r], first
        shift = np.uint64(p * RADIX_BITS)
        for i in range(n):
            k = keys[i]
            d = (np.uint64(k) >> shift) & mask
            j = at[d]
            at[d] = j + 1
            keys_to[j] = k
            dst[j] = start + i if done == 0 else src[i]
        keys, keys_to = keys_to, keys
        src = dst
        done += 1
    if live == 0:
        for i in range(n):
            idx[i] = start + i
    for i in range(n):
        values[i] = key_float(np.int64(np.uint64(keys[i]) ^ top), x[start + i])  # x: the float type


def argsort(x: np.ndarray, parts: int | None = None) -> np.ndarray:
    """A permutation sorting the opinions x (1-D) into non-decreasing order: radix_sorted_run of each
    of `parts` pieces (default numba.get_num_threads(), at least PARALLEL_SORT_MIN opinions each) on
    its own thread (the persistent helpers of sync.run_group), then the sorted runs merged pairwise,
    each merge cut into pieces along its merge path so that every thread merges (merge_tasks);
    np.argsort below PARALLEL_SORT_MIN opinions. The work space is one block of numpy memory, which
    asks for huge pages: fresh small pages cost a fault per 4 KiB (7000 faults, 15-20 ms, for
    buffers allocated inside the kernels in a simulate call).
    The sort a 1-D HK run starts with: 10⁶ opinions in 21-23 ms on 2 cores, against 27-28 ms with
    the kernels' own buffers and a one-thread merge, 49 ms with np.argsort of each half and 75 ms for
    one np.argsort (interleaved in one process)."""
    n = x.shape[0]
    if n < PARALLEL_SORT_MIN:
        return np.argsort(x)
    threads = numba.get_num_threads()
    parts = max(1, min(parts or threads, n // PARALLEL_SORT_MIN))
    cuts = np.linspace(0, n, parts + 1).astype(np.int64)
    work = np.empty((4, n), np.int64)  # radix keys, keys_to, idx_to; then the merges' second buffer
    values, ids = np.empty(n, x.dtype), np.empty(n, np.int64)
    run_group(radix_sorted_run, [(x, a, b, work[0, a:b], work[1, a:b], work[2, a:b], values[a:b], ids[a:b])
                                 for a, b in zip(cuts[:-1], cuts[1:])])
    runs = list(cuts)
    if len(runs) == 2:
        return ids
    buffers = [(values, ids), (work[0].view(x.dtype)[:n], work[3])]
    while len(runs) > 2:
        last = len(runs) <= 3
        (src_v, src_i), (dst_v, dst_i) = buffers
        if last:
            dst_i = np.empty(n, np.int64)
        merges = [(runs[k], runs[k + 1], runs[min(k + 2, len(runs) - 1)]) for k in range(0, len(runs) - 1, 2)]
        pieces = -(-threads // len(merges))
        tasks = [(a, mid, b, (b - a) * j // pieces, (b - a) * (j + 1) // pieces)
                 for a, mid, b in merges for j in range(pieces)]
        calls = [(src_v, src_i, dst_v, dst_i, not last, np.array(tasks[t::threads], np.int64).reshape(-1, 5))
                 for t in range(min(threads, len(tasks)))]
        run_group(merge_tasks, calls)
        runs = runs[0::2] + ([runs[-1]] if len(runs) % 2 == 0 else [])
        buffers = buffers[::-1]
    return dst_i


@njit(cache=True)
def gather_sorted(x, perm, xs):
    """xs = x[perm]; returns the number of order violations xs[p] < xs[p − 1]."""
    n = x.shape[0]
    bad = 0
    for p in range(n):  # serial: on 2 shared cores a parallel random gather was slower
        xs[p] = x[perm[p]]
        if p > 0 and x[perm[p]] < x[perm[p - 1]]:
            bad += 1
    return bad


@njit(cache=True, inline="always")
def _two_sum_add(s, c, v):
    """(s, c) ← s + c + v with the rounding error of s + v kept in c (TwoSum; no fastmath here)."""
    t = s + v
    bb = t - s
    c += (s - (t - bb)) + (v - bb)
    return t, c


@njit(cache=True, inline="always")
def _near(xs, p, j, r2):
    """(xs[j] − xs[p])² ≤ r2 (the indices are never negative: as unsigned, numba's wraparound code
    for negative indices goes, which had been most of the sweep's instructions)."""
    u = xs[np.uint64(j)] - xs[np.uint64(p)]
    return u * u <= r2


@njit(cache=True)
def _first_near(xs, p, r2):
    """Smallest j ≤ p with (xs[j] − xs[p])² ≤ r2 (the predicate is monotone on a sorted array)."""
    a, b = 0, p
    while a < b:
        mid = (a + b) // 2
        if _near(xs, p, mid, r2):
            b = mid
        else:
            a = mid + 1
    return a


@njit(cache=True)
def _last_near(xs, n, p, r2):
    """Largest j ≥ p, j < n, with (xs[j] − xs[p])² ≤ r2."""
    a, b = p, n - 1
    while a < b:
        mid = (a + b + 1) // 2
        if _near(xs, p, mid, r2):
            a = mid
        else:
            b = mid - 1
    return a


@njit(cache=True, inline="always")
def _chain(xs, first, last, s, c, p_hi, p_lo, store):
    """(s, c) ← (s, c) + Σ xs[first:last] by TwoSum; store: P[p + 1] ← the running sum at each p."""
    for p in range(first, last):
        s, c = _two_sum_add(s, c, np.float64(xs[p]))
        if store:
            p_hi[p + 1] = s
            p_lo[p + 1] = c
    return s, c


@njit(cache=True, inline="always")
def _vector_total(xs, first, last):
    """Σ xs[first:last] (float64) compensated, as (sum, error): TwoSum in each lane of a vector over
    every lane-th opinion (lane by lane, never contracted: the numbers of the scalar code), the
    lanes then added in order by TwoSum, the rest one at a time: about 8x the scalar chain's speed."""
    L = lanes(xs)
    whole = first + (last - first) // L * L
    s, c = vsplat(0.0), vsplat(0.0)
    for i in range(first, whole, L):
        v = vload(xs, i)
        t = exact_add(s, v)
        bb = exact_sub(t, s)
        c = exact_add(c, exact_add(exact_sub(s, exact_sub(t, bb)), exact_sub(v, bb)))
        s = t
    parts = np.empty(2 * L)
    vstore(parts, 0, s)
    vstore(parts, L, c)
    total, error = 0.0, 0.0
    for k in range(L):
        total, error = _two_sum_add(total, error, parts[k])
        error += parts[L + k]
    return _chain(xs, whole, last, total, error, xs, xs, False)


def _block_total(xs, first, last):  # pragma: no cover - numba overload below
    """Compensated Σ xs[first:last] in float64, as (sum, error)."""
    raise NotImplementedError


@overload(_block_total, jit_options=dict(cache=True))
def _block_total_overload(xs, first, last):
    if xs.dtype == types.float64:
        return lambda xs, first, last: _vector_total(xs, first, last)
    return lambda xs, first, last: _chain(xs, first, last, 0.0, 0.0, xs, xs, False)  # nothing stored


@njit(cache=True)
def prefix_task(xs, n, p_hi, p_lo, sums, task, totals):
    """Block `task` of the prefix sums (opinions task·CHUNK …): totals: sums[:, task] ← its compensated
    total (_block_total); else P[p + 1] for each of its opinions p, its TwoSum chain started from
    sums[:, task], the block's offset (the total of the blocks before it, :func:`_offsets`)."""
    first = task * CHUNK
    last = min(n, first + CHUNK)
    if totals:
        sums[0, task], sums[1, task] = _block_total(xs, first, last)
    else:
        _chain(xs, first, last, sums[0, task], sums[1, task], p_hi, p_lo, True)


@njit(cache=True)
def _offsets(sums):
    """Block totals → each block's offset, the compensated sum of the totals before it (in place)."""
    s, c = 0.0, 0.0
    for b in range(sums.shape[1]):
        total, error = sums[0, b], sums[1, b]
        sums[0, b], sums[1, b] = s, c
        s, c = _two_sum_add(s, c, total)
        c += error


@njit(cache=True)
def prefix_sums(xs, n, p_hi, p_lo):
    """P[k] = Σ_{p<k} xs[p] (k ≤ n) in float64 as the unevaluated sum p_hi[k] + p_lo[k], in blocks of
    CHUNK opinions: the blocks' totals, their offsets, then each block's TwoSum chain from its
    offset (prefix_task). The blocks are fixed, so the numbers do not depend on the thread count."""
    tasks = (n + CHUNK - 1) // CHUNK
    sums = np.empty((2, tasks))
    p_hi[0], p_lo[0] = 0.0, 0.0
    for task in range(tasks):
        prefix_task(xs, n, p_hi, p_lo, sums, task, True)
    _offsets(sums)
    for task in range(tasks):
        prefix_task(xs, n, p_hi, p_lo, sums, task, False)


@njit(parallel=True, cache=True)
def prefix_sums_parallel(xs, n, p_hi, p_lo):
    """:func:`prefix_sums` with its blocks over the cores (the same numbers). 10⁶ opinions on 2 cores:
    0.72 ms, against 1.09 ms for one chain over all of them."""
    tasks = (n + CHUNK - 1) // CHUNK
    sums = np.empty((2, tasks))
    p_hi[0], p_lo[0] = 0.0, 0.0
    for task in prange(tasks):
        prefix_task(xs, n, p_hi, p_lo, sums, task, True)
    _offsets(sums)
    for task in prange(tasks):
        prefix_task(xs, n, p_hi, p_lo, sums, task, False)


@njit(cache=True, inline="always")
def _advance(xs, p, lo, hi, r2):
    """The neighbour interval [lo, hi] of position p from that of an earlier position: both ends only
    move forward, by about one per position. Each end counts the keys it passes among the next
    LOOKAHEAD in one vector compare (the predicate is monotone there, so the count is the step;
    the +inf padding stops hi at n − 1; a key left of the radius is below x_p, so lo never passes
    p) and only a longer jump takes the loop: a step costs one load-compare-popcount latency, not
    one per key."""
    c = xs[np.uint64(p)]
    hi = max(hi, p - 1)  # the keys counted start at p or later, where the predicate is monotone
    step = count_near(xs, hi + 1, c, r2)
    hi += step
    if step == LOOKAHEAD:
        while _near(xs, p, hi + 1, r2):
            hi += 1
    step = count_far_left(xs, lo, c, r2)
    lo += step
    if step == LOOKAHEAD:
        while not _near(xs, p, lo, r2):
            lo += 1
    return lo, hi


@njit(cache=True, inline="always")
def _window_mean(p_hi, p_lo, lo, hi):
    """mean of xs[lo..hi] from the compensated prefix sums."""
    a, b = np.uint64(lo), np.uint64(hi + 1)  # unsigned: no wraparound code (see _near)
    return ((p_hi[b] - p_hi[a]) + (p_lo[b] - p_lo[a])) / (hi - lo + 1)


@njit(cache=True, inline="always")
def _start(xs, n, p, r2):
    """The neighbour interval [lo, hi] of position p, by bisection."""
    return _first_near(xs, p, r2), _last_near(xs, n, p, r2)


@njit(cache=True, error_model="numpy")
def sweep_task(xs, n, p_hi, p_lo, r2, out, task):
    """Positions task·CHUNK … of :func:`sweep` as four chains over consecutive quarters of them,
    advanced in step: each chain starts from its first position's neighbour interval (bisection)
    and advances it one position at a time (:func:`_advance`); the window sum is the difference of
    the compensated prefix sums. An advance waits on the loads of the one before it, so the four
    independent chains overlap those waits (1.25-1.65x faster than two interleaved chains from one
    start, on one core). Every interval is exact whatever the start, so the numbers do not depend
    on the chaining. (error_model numpy: hi − lo + 1 ≥ 1, no division check.)"""
    start = task * CHUNK
    end = min(n, start + CHUNK)
    q = (end - start) // 4
    s0, s1, s2, s3 = start, start + q, start + 2 * q, start + 3 * q
    lo0, hi0 = _start(xs, n, s0, r2)
    lo1, hi1 = _start(xs, n, s1, r2)
    lo2, hi2 = _start(xs, n, s2, r2)
    lo3, hi3 = _start(xs, n, s3, r2)
    for i in range(q):
        lo0, hi0 = _advance(xs, s0 + i, lo0, hi0, r2)
        lo1, hi1 = _advance(xs, s1 + i, lo1, hi1, r2)
        lo2, hi2 = _advance(xs, s2 + i, lo2, hi2, r2)
        lo3, hi3 = _advance(xs, s3 + i, lo3, hi3, r2)
        out[s0 + i] = _window_mean(p_hi, p_lo, lo0, hi0)
        out[s1 + i] = _window_mean(p_hi, p_lo, lo1, hi1)
        out[s2 + i] = _window_mean(p_hi, p_lo, lo2, hi2)
        out[s3 + i] = _window_mean(p_hi, p_lo, lo3, hi3)
    for p in range(start + 4 * q, end):  # the last chain goes on over the remainder
        lo3, hi3 = _advance(xs, p, lo3, hi3, r2)
        out[p] = _window_mean(p_hi, p_lo, lo3, hi3)


@njit(parallel=True, cache=True)
def sweep(xs, n, p_hi, p_lo, r2, out):
    """out[p] = mean{xs[j] : (xs[j] − xs[p])² ≤ r2} for sorted xs[:n] (xs[n:n + LOOKAHEAD] = +inf),
    in parallel tasks of CHUNK positions (:func:`sweep_task`)."""
    for task in prange((n + CHUNK - 1) // CHUNK):
        sweep_task(xs, n, p_hi, p_lo, r2, out, task)


@njit(cache=True)
def sweep_serial(xs, n, p_hi, p_lo, r2, out):
    """:func:`sweep` on the calling thread (the same tasks, so the same numbers)."""
    for task in range((n + CHUNK - 1) // CHUNK):
        sweep_task(xs, n, p_hi, p_lo, r2, out, task)


@njit(parallel=True, cache=True)
def scatter(values, perm, out):
    """out[perm[p]] = values[p]."""
    for p in prange(values.shape[0]):
        out[perm[p]] = values[p]


class SortedSweep:
    """Callable x (n, 1) ↦ v (n, 1), v_i = mean of x_j within the radius; keeps the sort between calls."""

    def __init__(self):
        self.perm = None
        self.resorts = 0
        self.xs = self.p_hi = self.p_lo = self.v = None

    def _buffers(self, n, dtype):
        """Sorted opinions (+inf padded) and prefix sums, kept between calls: fresh multi-MB arrays
        cost a page fault per 4 KiB on first touch, more than the sweep itself at n = 10⁶."""
        if self.xs is None or self.xs.shape[0] != n + LOOKAHEAD or self.xs.dtype != dtype:
            self.xs = np.empty(n + LOOKAHEAD, dtype=dtype)
            self.xs[n:] = np.inf
            self.p_hi, self.p_lo, self.v = np.empty(n + 1), np.empty(n + 1), np.empty(n, dtype=dtype)
        return self.xs, self.p_hi, self.p_lo, self.v

    def __call__(self, x: np.ndarray, r2) -> np.ndarray:
        flat = np.ascontiguousarray(x[:, 0])
        n = flat.shape[0]
        xs, p_hi, p_lo, v = self._buffers(n, flat.dtype)
        out = np.empty_like(flat)
        if copy_sorted(flat, xs):  # e.g. simulate keeps 1-D HK in sorted order: no permutation at all
            prefix_sums_parallel(xs, n, p_hi, p_lo)
            sweep(xs, n, p_hi, p_lo, r2, out)
            return out[:, None]
        if self.perm is None or self.perm.shape[0] != n or gather_sorted(flat, self.perm, xs) > 0:
            self.perm = argsort(flat)
            self.resorts += 1
            gather_sorted(flat, self.perm, xs)
        prefix_sums_parallel(xs, n, p_hi, p_lo)
        sweep(xs, n, p_hi, p_lo, r2, v)
        scatter(v, self.perm, out)
        return out[:, None]
