"""One progress bar for long work: tqdm, kept on the screen when the work finishes and cleared when it
fails, so that a failing command's stderr holds its one-line error and nothing else."""

from __future__ import annotations

from contextlib import contextmanager

from tqdm.auto import tqdm


@contextmanager
def progress_bar(*, enabled: bool = True, **kwargs):
    """``with progress_bar(total=n, desc=...) as bar: ... bar.update(k)``; ``enabled=False`` shows nothing."""
    bar = tqdm(disable=not enabled, **kwargs)
    try:
        yield bar
    except BaseException:
        bar.leave = False
        raise
    finally:
        bar.close()
