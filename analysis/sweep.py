"""``analysis.sweep``: the parameter-sweep API of :mod:`analysis.sweeps`, as a module that can also
be called — ``analysis.sweep(model, axes=..., ...)`` runs :func:`analysis.sweeps.sweep`, and
``from analysis.sweep import sweep, plot_sweep, open_sweep, ...`` keeps working. The module is not
shadowed by the function: ``importlib.import_module("analysis.sweep") is analysis.sweep``.
"""

import sys
import types

from analysis.sweeps import *  # noqa: F403
from analysis.sweeps import __all__, sweep  # noqa: F401


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return sweep(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
