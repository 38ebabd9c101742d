"""localsgd_fx: LoCal+SGD (selective localized learning) as a torch.fx compiler pass.

    >>> from localsgd_fx import compile_localsgd
    >>> model = compile_localsgd(model, schedule="dynamic")
"""
from passes.errors import LocalSGDError

from .api import DEFAULT_LOCAL_LR, LocalSGDModule, compile_localsgd
from .rules import LocalRule, list_rules, register_rule
from .schedules import Dynamic, Static, make_schedule

__all__ = ["LocalSGDError", "LocalSGDModule", "compile_localsgd", "DEFAULT_LOCAL_LR", "LocalRule", "register_rule",
           "list_rules", "Dynamic", "Static", "make_schedule"]
__version__ = "0.1.0"
