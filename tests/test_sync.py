"""The lockstep barrier (particles/kernels/sync.py): every thread leaves a round only after all have
arrived, and sees the largest flag of that round."""

import numpy as np
import pytest
from numba import njit

from particles.kernels.sync import arrive, new_sync, run_group


@njit(nogil=True)
def _rounds(words, me, parties, steps, log):
    """Per step: write my slot of log, meet, check that every thread's write of this step is
    visible and that the round's flags OR'ed are the one raised (step·(me + 1) by thread step % parties),
    meet again (so that log is not rewritten while another thread reads it). Returns the errors."""
    errors, round_ = 0, 0
    for step in range(steps):
        log[me] = step
        flag = step * (me + 1) if step % parties == me else 0
        top, _ = arrive(words, me, parties, round_, flag)
        for k in range(parties):
            errors += log[k] != step  # a thread not yet at this step, or already past it: the barrier leaked
        errors += top != step * (step % parties + 1)
        arrive(words, me, parties, round_ + 1, 0)
        round_ += 2
    return errors


def test_barrier_rounds_and_flags():
    for parties in (1, 2, 3):
        words, log = new_sync(parties), np.full(parties, -1, np.int64)
        steps = 2000
        errors = run_group(_rounds, [(words, np.int64(me), np.int64(parties), np.int64(steps), log)
                                     for me in range(parties)])
        assert errors == [0] * parties
        assert words[0] == 2 * steps * parties  # every arrival counted


def test_a_failing_thread_releases_the_others():
    """A call of the group that raises (here: before it ever arrives) aborts the barrier: the others
    stop waiting, and run_group raises that exception once all have returned."""
    parties = 3
    words, log = new_sync(parties), np.full(parties, -1, np.int64)

    def call(me):
        if me == 2:
            raise RuntimeError("helper failed")
        return _rounds(words, np.int64(me), np.int64(parties), np.int64(100), log)

    with pytest.raises(RuntimeError, match="helper failed"):
        run_group(call, [(me,) for me in range(parties)], words)
    assert words[-8] == 1  # the abort word


def test_a_forked_child_starts_its_own_helpers():
    """After a fork the parent's helper threads do not exist in the child: the child's pool is
    forgotten, and a lockstep group in the child still runs (it would otherwise wait for ever)."""
    import multiprocessing as mp

    from particles.kernels import sync

    words = new_sync(2)
    run_group(_rounds, [(words, np.int64(me), np.int64(2), np.int64(10), np.zeros(2, np.int64))
                        for me in range(2)])
    assert sync._pool[0] is not None
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        assert pool.apply_async(_child_group).get(timeout=120) == [0, 0]


def _child_group():
    words, log = new_sync(2), np.full(2, -1, np.int64)
    calls = [(words, np.int64(me), np.int64(2), np.int64(50), log) for me in range(2)]
    return run_group(_rounds, calls, words)
