"""The figures of ``ksync figures``: one ``make_<name>(quick=False, out=None, progress=True)`` per
figure, returning the Dataset it plots and writing ``<out>/<name>.{png,pdf,nc}``.

* :data:`FIGURES` — name → registered figure (callable with the same arguments), in run order;
* :data:`MODULES` — the one list of figure modules (add a new module there);
* :func:`register` — decorator that adds a figure function (e.g. the ``compare_<task>`` figures);
* :func:`make_all` — make the named (default: all) figures into a folder.
"""

from analysis.figures._registry import FIGURES, MODULES, FigureEntry, load, make_all, register, select

load()  # imports the figure modules listed in _registry.MODULES, which registers their figures

__all__ = ["FIGURES", "MODULES", "FigureEntry", "make_all", "register", "select"]
