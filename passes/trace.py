"""Symbolic tracing with errors that name the failing construct and the escape hatch.

``torch.fx.symbolic_trace`` fails deep inside FX on data-dependent control flow; this pass
re-raises such failures as :class:`LocalSGDError` naming the user's source line, the submodule
being traced, and the ``leaf_modules=`` option that keeps that submodule opaque.
"""
from __future__ import annotations

import traceback
import typing
from collections.abc import Iterable

import torch.fx as fx
from torch import nn

from .errors import LocalSGDError

__all__ = ["trace", "LeafSpec"]

LeafSpec = str | type


class _LocalSGDTracer(fx.Tracer):
    """A tracer that keeps user-chosen modules opaque and remembers where it is."""

    def __init__(self, leaf_modules: Iterable[LeafSpec] = ()):
        super().__init__()
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.scope_names: list[str] = []
        self.failed_scope: str | None = None   # innermost submodule whose tracing raised

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.scope_names.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_scope is None:   # the scope stack unwinds before trace() sees the error
                self.failed_scope = self.scope_names[-1]
            raise
        finally:
            self.scope_names.pop()


def _user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost traceback frame outside torch: the user's construct that broke tracing."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename and f.filename != __file__]
    return frames[-1] if frames else None


def trace(model: nn.Module, *, leaf_modules: Iterable[LeafSpec] = ()) -> fx.GraphModule:
    """Symbolically trace ``model``; untraceable constructs raise a :class:`LocalSGDError`.

    Args:
        model: the module to trace.
        leaf_modules: submodule qualified names or module classes to keep as opaque calls
            (their layers then stay on SGD).

    Returns:
        The traced ``GraphModule`` (sharing parameters and submodules with ``model``).

    Example::

        >>> gm = trace(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()))
        >>> [n.op for n in gm.graph.nodes]
        ['placeholder', 'call_module', 'call_module', 'output']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    leaf_modules = tuple(leaf_modules)
    for spec in leaf_modules:
        if not isinstance(spec, (str, type)):
            raise TypeError(f"leaf_modules entries must be qualified names or classes, got {spec!r}")
    tracer = _LocalSGDTracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # FX raises TraceError, TypeError, RuntimeError... for the same cause
        frame = _user_frame(exc)
        where = f"{frame.filename}:{frame.lineno}: `{(frame.line or '').strip()}`" if frame else "?"
        inside = tracer.failed_scope or ""
        hatch = (f"leaf_modules=({inside!r},) (or its class {type(model.get_submodule(inside)).__name__})"
                 if inside else "leaf_modules=(<the submodule's name or class>,)")
        raise LocalSGDError(
            f"cannot trace {type(model).__name__} with torch.fx: {type(exc).__name__}: {exc}\n"
            f"  failing construct: {where}"
            + (f"\n  inside submodule: {inside!r}" if inside else "")
            + f"\n  fix: make that code traceable (no Python control flow on tensor values), or "
            f"keep the submodule opaque with {hatch}; its layers then stay on SGD."
        ) from exc
    _resolve_string_annotations(graph, model)
    return fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)


def _resolve_string_annotations(graph: fx.Graph, model: nn.Module) -> None:
    """Turn the forward's string annotations on input/output nodes into types (or drop them).

    FX copies ``forward``'s annotations onto the placeholder and output nodes; under
    ``from __future__ import annotations`` they are strings, which the generated code imports as
    bogus globals, so the ``GraphModule`` cannot be pickled or saved with ``torch.save``.
    """
    try:
        hints = typing.get_type_hints(type(model).forward)
    except Exception:  # noqa: BLE001 - an annotation naming something unimportable: drop them all
        hints = {}
    for node in graph.nodes:
        if isinstance(node.type, str):
            node.type = hints.get("return" if node.op == "output" else node.target)
