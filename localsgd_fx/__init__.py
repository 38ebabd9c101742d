"""localsgd_fx: LoCal+SGD (selective localized learning) as a torch.fx compiler pass.

    >>> from localsgd_fx import compile_localsgd
    >>> model = compile_localsgd(model, total_epochs=8)

Names are imported lazily: importing the package does not import torch, so the line below runs
before torch (and its OpenMP runtime) is loaded, for the ``localsgd`` command, ``python -m
localsgd_fx`` and scripts that import the package first.
"""
from __future__ import annotations

import importlib
import os

# Short OpenMP spin-waits: on a shared 2-core machine, busy-waiting threads steal the other process's
# core (measured: 1.5-3x the CPU time per step under load). libgomp reads the variable once, when
# torch loads it; a value set by the user wins.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

__version__ = "0.1.0"

_EXPORTS = {
    "LocalSGDError": "passes.errors",
    "LocalSGDModule": "localsgd_fx.api",
    "compile_localsgd": "localsgd_fx.api",
    "DEFAULT_RULE": "localsgd_fx.api",
    "DEFAULT_LOCAL_LR": "localsgd_fx.api",
    "DEFAULT_SAMPLE_FRACTION": "localsgd_fx.api",
    "TrainStep": "localsgd_fx.capture",
    "LocalRule": "localsgd_fx.rules",
    "register_rule": "localsgd_fx.rules",
    "list_rules": "localsgd_fx.rules",
    "Dynamic": "localsgd_fx.schedules",
    "Budget": "localsgd_fx.schedules",
    "Static": "localsgd_fx.schedules",
    "Plasticity": "localsgd_fx.schedules",
    "GradNorm": "localsgd_fx.schedules",
    "make_schedule": "localsgd_fx.schedules",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'localsgd_fx' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
