"""The figures of ``ksync figures``: one ``make_<name>(quick=False, out=None, progress=True)`` per
figure, returning the Dataset it plots and writing ``<out>/<name>.{png,pdf,nc}``.

* :data:`FIGURES` — name → registered figure (callable with the same arguments), in run order;
* :func:`register` — decorator that adds a figure function (e.g. the ``compare_<task>`` figures);
* :func:`make_all` — make the named (default: all) figures into a folder.
"""

from analysis.figures._registry import FIGURES, FigureEntry, make_all, register, select

# importing the figure modules registers their figures, in this order
# isort: off
from analysis.figures import sa  # noqa: F401
from analysis.figures import hk  # noqa: F401
from analysis.figures import krause  # noqa: F401
from analysis.figures import compare  # noqa: F401
# isort: on

__all__ = ["FIGURES", "FigureEntry", "make_all", "register", "select"]
