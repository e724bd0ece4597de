"""Threads in lockstep: a spin barrier for numba code running on several Python threads at once, and
the persistent pool of helper threads that runs them.

One system of a few dozen to a thousand particles takes microseconds per step: too little for a
numba parallel loop per step (its launch costs about a microsecond, waking a sleeping worker far
more), enough for two threads that each own half of the rows and meet at a barrier twice a step
(:func:`kernels.trajectory.integrate_rows`). The barrier is a shared counter: each thread adds one
atomically and spins (with the CPU's pause hint) until every party of this round has arrived,
about 40 ns on a 2-core AMD EPYC; a thread that has waited SPIN_PAUSES pauses yields its core
instead (more threads than cores). It also combines one flag per thread (a failure code), so
that every thread leaves the stepping loop at the same step, and it can be aborted (a thread of
the group failed and will never arrive).
"""

from __future__ import annotations

import os
import platform
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core.extending import intrinsic

_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
_POSIX = os.name == "posix"
SPIN_PAUSES = 1 << 12  # pauses (about 27 ns each on an AMD EPYC) before a waiting thread yields its core
FLAG_STRIDE = 8  # int64 words between two threads' flags (one 64-byte cache line each)


def _element_pointer(context, builder, array_t, array, index_t, index):
    data = context.make_array(array_t)(context, builder, array).data
    return builder.gep(data, [context.cast(builder, index, index_t, types.intp)])


def _int64_array(array):
    return isinstance(array, types.Array) and array.dtype == types.int64 and array.ndim == 1


@intrinsic
def atomic_add(typingctx, array, index, value):
    """array[index] += value as one sequentially consistent atomic read-modify-write (int64 array);
    returns the old value."""
    if not (_int64_array(array) and isinstance(index, types.Integer) and isinstance(value, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
        amount = context.cast(builder, args[2], signature.args[2], types.int64)
        return builder.atomic_rmw("add", pointer, amount, "seq_cst")

    return types.int64(array, index, value), codegen


@intrinsic
def atomic_load(typingctx, array, index):
    """array[index] read with acquire ordering (int64 array): no later load moves before it."""
    if not (_int64_array(array) and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
        return builder.load_atomic(pointer, "acquire", 8)

    return types.int64(array, index), codegen


@intrinsic
def cpu_pause(typingctx):
    """The spin-wait hint (x86 ``pause``; nothing elsewhere): frees the core's resources for the
    sibling thread while spinning."""

    def codegen(context, builder, signature, args):
        if _X86:
            void = ir.FunctionType(ir.VoidType(), [])
            builder.call(builder.module.declare_intrinsic("llvm.x86.sse2.pause", fnty=void), [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def os_yield(typingctx):
    """sched_yield(): give the core to another runnable thread (POSIX; a no-op elsewhere). A waiting
    thread calls it after SPIN_PAUSES pauses, so that more threads than cores (other processes, two
    lockstep runs at once) still make progress instead of spinning through whole time slices."""

    def codegen(context, builder, signature, args):
        if _POSIX:
            fn = builder.module.globals.get("sched_yield")
            if fn is None:
                fn = ir.Function(builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


ABORT = 8  # flag bit arrive returns when a thread of the group failed (see abort)


def new_sync(parties: int) -> np.ndarray:
    """The shared int64 words of one barrier: the counter (word 0, alone on its cache line), two
    rounds of flags, one cache line per thread, and the abort word (the last line)."""
    return np.zeros(FLAG_STRIDE * (2 + 2 * parties), np.int64)


def abort(sync: np.ndarray) -> None:
    """Tell every thread waiting at this barrier to give up (arrive returns ABORT): a thread of the
    group failed and will never arrive."""
    sync[-FLAG_STRIDE] = 1


@njit(cache=True, nogil=True)
def arrive(sync, me, parties, round_, flag):
    """Barrier round `round_` (0, 1, 2, … on every thread in the same order) for thread `me` of
    `parties`: publishes `flag`, waits until every party has arrived; returns (the flags of this
    round OR'ed, whether the wait was slow: longer than SPIN_PAUSES pauses, about 0.1 ms, so that
    this thread yielded its core). Flags alternate between two slots by round parity: a thread can
    be at most one round ahead of the slowest, so the slot of round r is next written in round
    r + 2, after everyone has read it. If the group was aborted (abort) while waiting: (ABORT, True)."""
    slot = FLAG_STRIDE * (1 + (round_ % 2) * parties)
    stop = FLAG_STRIDE * (1 + 2 * parties)
    sync[slot + FLAG_STRIDE * me] = flag
    atomic_add(sync, 0, 1)
    target = (round_ + 1) * parties
    spins = 0
    while atomic_load(sync, 0) < target:
        if atomic_load(sync, stop) != 0:
            return ABORT, True
        if spins < SPIN_PAUSES:
            cpu_pause()
            spins += 1
        else:
            os_yield()
    top = flag
    for k in range(parties):
        top |= sync[slot + FLAG_STRIDE * k]
    return top, spins >= SPIN_PAUSES


_pool_lock = threading.Lock()
_pool: list = [None, 0]  # the executor and its worker count


def _forget_pool():
    """In a forked child: the parent's helper threads do not exist there (a job queued to them would
    never run, and its group would wait for it for ever), so start afresh."""
    global _pool_lock
    _pool_lock = threading.Lock()
    _pool[:] = [None, 0]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def run_group(fn, calls, sync=None):
    """fn(*args) for every args of `calls` at once: the first on the calling thread, the others on
    persistent helper threads; returns their results in order. The helpers of one group are queued
    together (under a lock) and the pool has a worker for each, so groups that wait on each other
    inside (a barrier) never wait behind another group's helpers. fn must release the GIL. sync: the
    group's barrier words, aborted (abort) when a call raises, so that the others stop waiting; the
    first exception is raised once every call has returned."""

    def guarded(*args):
        try:
            return fn(*args)
        except BaseException:
            if sync is not None:
                abort(sync)
            raise

    if len(calls) == 1:
        return [fn(*calls[0])]
    with _pool_lock:
        executor, workers = _pool
        if executor is None or workers < len(calls) - 1:
            if executor is not None:
                executor.shutdown(wait=False)
            executor = ThreadPoolExecutor(len(calls) - 1, thread_name_prefix="krause-sync")
            _pool[:] = [executor, len(calls) - 1]
        jobs = [executor.submit(guarded, *args) for args in calls[1:]]
    try:
        first = guarded(*calls[0])
    finally:
        for job in jobs:  # wait for every helper (an aborted group returns soon)
            job.exception()
    return [first] + [job.result() for job in jobs]
