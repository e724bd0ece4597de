"""One progress bar for long work: tqdm, kept on the screen when the work finishes and cleared when it
fails, so that a failing command's stderr holds its one-line error and nothing else."""

from __future__ import annotations

from contextlib import contextmanager

from tqdm.auto import tqdm


@contextmanager
def progress_bar(*, enabled: bool = True, **kwargs):
    """``with progress_bar(total=n, desc=...) as bar: ... bar.update(k)``; ``enabled=False`` shows nothing
    (and builds no tqdm: a bar that does nothing, for calls that take less time than tqdm's set-up)."""
    if not enabled:
        yield _NoBar()
        return
    bar = tqdm(**kwargs)
    try:
        yield bar
    except BaseException:
        bar.leave = False
        raise
    finally:
        bar.close()


class _NoBar:
    """What a disabled bar offers its callers."""

    def update(self, n=1):
        pass
