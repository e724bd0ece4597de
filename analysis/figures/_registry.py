"""The figure registry: name → ``make_<name>(quick=False, out=None, progress=True) -> Dataset``.

:data:`MODULES` is the one list of figure modules, in the order ``ksync figures`` makes their
figures; a new figure module adds its line there. Importing ``analysis.figures`` imports them all
(:func:`load`), and each module registers its functions with the :func:`register` decorator::

    from analysis.figures import register

    @register("compare_lm", group="compare")
    def make_compare_lm(quick=False, out=None, progress=True):
        ...

:data:`FIGURES` keeps the registration order, which is the order ``make_all`` and
``ksync figures`` run them in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import xarray as xr


@dataclass(frozen=True)
class FigureEntry:
    """A registered figure: ``make(quick, out, progress)`` returns the Dataset it plots."""

    name: str
    make: Callable[..., xr.Dataset]
    group: str = "theory"

    @property
    def description(self) -> str:
        doc = (self.make.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else self.name

    def __call__(self, quick: bool = False, out=None, progress: bool = True) -> xr.Dataset:
        return self.make(quick=quick, out=out, progress=progress)


#: The figure modules, in run order (importing one registers its figures). Add new modules here.
MODULES = (
    "analysis.figures.sa",  # sa_sphere, metastability, energy_staircase, collapse_vs_clustering
    "analysis.figures.hk",  # hk_2r
    "analysis.figures.krause",  # krause_phase, causal_sink
    "analysis.figures.phase",  # phase_diagram
    "analysis.figures.compare",  # compare_<task>, one per task with shipped checkpoints
    "analysis.figures.llm",  # llm_sinks (registered when shipped smollm2 adapters exist)
    "analysis.figures.ablation",  # ablation_bridge, sink_training, recall_sweep, trained_vs_simulated
)

#: name → FigureEntry, in registration order
FIGURES: dict[str, FigureEntry] = {}


def load() -> dict[str, FigureEntry]:
    """Import every module of :data:`MODULES` (registering their figures); returns :data:`FIGURES`.
    A listed module that is missing is an error, never skipped."""
    import importlib

    for name in MODULES:
        importlib.import_module(name)
    return FIGURES


def register(name: str | None = None, *, group: str = "theory"):
    """Decorator adding ``make_<name>`` to :data:`FIGURES` (name defaults to the function's name
    without the ``make_`` prefix). Registering a name twice is an error."""

    def decorate(fn):
        key = name or fn.__name__.removeprefix("make_")
        if key in FIGURES and FIGURES[key].make is not fn:
            raise ValueError(f"figure {key!r} is already registered")
        FIGURES[key] = FigureEntry(key, fn, group)
        return fn

    return decorate


def select(names: Iterable[str] | None = None) -> list[str]:
    """The figure names to make, in registry order; ValueError naming an unknown one."""
    if names is None:
        return list(FIGURES)
    names = list(names)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise ValueError(f"unknown figure(s) {unknown}; valid names: {', '.join(FIGURES)}")
    return [n for n in FIGURES if n in names]


def make_all(names: Iterable[str] | None = None, quick: bool = False, out="figures",
             progress: bool = True) -> dict[str, xr.Dataset]:
    """Make the named figures (default: all registered) into ``out``; returns name → Dataset.

    Each Dataset's ``attrs["seconds"]`` records how long its figure took.
    """
    from tqdm.auto import tqdm

    chosen = select(names)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
    results = {}
    with tqdm(chosen, desc="figures", unit="fig", disable=not progress) as bar:
        for name in bar:
            bar.set_postfix_str(name)
            start = time.perf_counter()
            ds = FIGURES[name](quick=quick, out=out, progress=progress)
            ds.attrs["seconds"] = round(time.perf_counter() - start, 2)
            results[name] = ds
    return results
