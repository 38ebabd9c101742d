"""Symbolic tracing that keeps untraceable submodules opaque and records the modes it traced.

``torch.fx.symbolic_trace`` fails deep inside FX on data-dependent control flow, and it bakes
Python-level branches on ``self.training`` into the graph. This pass handles both:

* **Opaque submodules.** When tracing fails inside a submodule (say a conv computing its padding in
  Python from the input size), :func:`trace` keeps that submodule opaque - a leaf, called as a
  whole - and traces again, until the model traces or the failure is in the root module itself.
  ``gm.meta["localsgd_opaque"]`` maps each such submodule's qualified name to a one-line reason
  (the exception and the user's source line), and one ``UserWarning`` per call names them. Conv/linear
  layers inside an opaque submodule are invisible to :func:`~passes.layers.find_layers`: they stay
  on SGD, and :func:`~passes.partition.partition` never puts a call holding such layers into the
  local prefix. ``strict=True`` makes the first failure a :class:`LocalSGDError` naming the source
  line, the submodule and the ``leaf_modules=`` option; a failure in the root always is one.
* **Modes.** FX evaluates ``if self.training:`` (and ``F.batch_norm(..., self.training)``, drop-path)
  once, while tracing: a submodule the tracer traced *through* is frozen into the branch of the mode
  it had then. Leaf modules (``nn.BatchNorm2d``, ``nn.Dropout``, opaque submodules) are called as
  modules and follow their mode at run time. ``gm.meta["localsgd_trace_modes"]`` maps the root
  (``""``) and every traced-through submodule to its ``training`` flag at trace time;
  :func:`modes_changed` lists those whose flag differs now, and :func:`retrace` traces again, with
  the modes as they are now, the same leaf modules and the opaque ones found before (no new warning).
  A graph is only right for the modes it was traced in: run the original module in eval mode, and
  re-trace when ``modes_changed`` is non-empty.
"""
from __future__ import annotations

import inspect
import os
import traceback
import typing
import warnings
from collections.abc import Iterable

import torch.fx as fx
from torch import nn

from .errors import LocalSGDError

__all__ = ["trace", "retrace", "modes_changed", "mode_watch", "LeafSpec", "OPAQUE_META", "MODES_META", "LEAF_META"]

LeafSpec = str | type

#: ``gm.meta`` key: ``{qualified name: reason}`` of the submodules kept opaque because they did not trace
OPAQUE_META = "localsgd_opaque"
#: ``gm.meta`` key: ``{qualified name: training flag at trace time}`` of the root and traced-through submodules
MODES_META = "localsgd_trace_modes"
#: ``gm.meta`` key: the ``leaf_modules`` the caller asked for (for :func:`retrace`)
LEAF_META = "localsgd_leaf_modules"


class _LocalSGDTracer(fx.Tracer):
    """A tracer that keeps chosen modules opaque, remembers where it is and records traced-through modes."""

    def __init__(self, leaf_modules: Iterable[LeafSpec] = ()):
        super().__init__()
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.scope_names: list[str] = []
        self.failed_scope: str | None = None   # innermost submodule whose tracing raised
        self.modes: dict[str, bool] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, qualname)

    def trace(self, root, concrete_args=None):
        if isinstance(root, nn.Module):
            self.modes[""] = root.training
        return super().trace(root, concrete_args)

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        if not self.is_leaf_module(m, path):
            self.modes[path] = m.training   # its forward's Python branches on self.training are decided now
        self.scope_names.append(path)
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
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/torch/" not in f.filename and f.filename != __file__]
    return frames[-1] if frames else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _reason(exc: BaseException) -> str:
    """One line: the user's construct, where it is, and the exception's first line."""
    frame = _user_frame(exc)
    if frame is None:
        return f"cannot trace it ({_first_line(exc)})"
    return (f"cannot trace `{(frame.line or '').strip()}` at {os.path.basename(frame.filename)}:{frame.lineno} "
            f"({_first_line(exc)})")


def _check_leaf_specs(leaf_modules: Iterable[LeafSpec]) -> tuple[LeafSpec, ...]:
    leaf_modules = tuple(leaf_modules)
    for spec in leaf_modules:
        if not isinstance(spec, (str, type)):
            raise TypeError(f"leaf_modules entries must be qualified names or classes, got {spec!r}")
    return leaf_modules


def trace(model: nn.Module, *, leaf_modules: Iterable[LeafSpec] = (), strict: bool = False,
          warn: bool = True) -> fx.GraphModule:
    """Symbolically trace ``model`` with its submodules' modes as they are now.

    A submodule that fails to trace is kept opaque (a leaf; its layers stay on SGD) and tracing
    starts again; ``strict=True`` raises instead. A failure in ``model``'s own ``forward`` always
    raises :class:`LocalSGDError` (naming the source line and the escape hatch).

    Args:
        model: the module to trace.
        leaf_modules: submodule qualified names or module classes to keep as opaque calls
            (their layers then stay on SGD).
        strict: raise :class:`LocalSGDError` on the first submodule that fails to trace.
        warn: emit one ``UserWarning`` naming the submodules kept opaque (if any).

    Returns:
        The traced ``GraphModule`` (sharing parameters and submodules with ``model``), with
        ``meta["localsgd_opaque"]`` (``{name: reason}``), ``meta["localsgd_trace_modes"]``
        (``{name: training}`` of the root ``""`` and the traced-through submodules) and
        ``meta["localsgd_leaf_modules"]`` (the ``leaf_modules`` asked for).

    Example::

        >>> gm = trace(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()))
        >>> [n.op for n in gm.graph.nodes]
        ['placeholder', 'call_module', 'call_module', 'output']
        >>> gm.meta["localsgd_opaque"], gm.meta["localsgd_trace_modes"]
        ({}, {'': True})
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    asked = _check_leaf_specs(leaf_modules)
    opaque: dict[str, str] = {}
    while True:
        tracer = _LocalSGDTracer((*asked, *opaque))
        try:
            graph = tracer.trace(model)
            break
        except Exception as exc:  # FX raises TraceError, TypeError, RuntimeError... for the same cause
            inside = tracer.failed_scope or ""
            if strict or not inside or inside in opaque:
                raise _trace_error(model, exc, inside) from exc
            opaque[inside] = _reason(exc)
    _resolve_string_annotations(graph, model)
    gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    gm.meta[OPAQUE_META] = opaque
    gm.meta[MODES_META] = dict(tracer.modes)
    gm.meta[LEAF_META] = asked
    if opaque and warn:
        warnings.warn(_opaque_warning(model, opaque), UserWarning, stacklevel=2)
    return gm


def _trace_error(model: nn.Module, exc: BaseException, inside: str) -> LocalSGDError:
    frame = _user_frame(exc)
    where = f"{frame.filename}:{frame.lineno}: `{(frame.line or '').strip()}`" if frame else "?"
    hatch = (f"leaf_modules=({inside!r},) (or its class {type(model.get_submodule(inside)).__name__})"
             if inside else "leaf_modules=(<the submodule's name or class>,)")
    return LocalSGDError(
        f"cannot trace {type(model).__name__} with torch.fx: {type(exc).__name__}: {exc}\n"
        f"  failing construct: {where}"
        + (f"\n  inside submodule: {inside!r}" if inside else "")
        + f"\n  fix: make that code traceable (no Python control flow on tensor values), or "
        f"keep the submodule opaque with {hatch}; its layers then stay on SGD."
    )


def _opaque_warning(model: nn.Module, opaque: dict[str, str]) -> str:
    kept = "; ".join(f"kept {name!r} ({type(model.get_submodule(name)).__name__}) opaque: {reason}"
                     for name, reason in opaque.items())
    return (f"{kept}; its layers stay on SGD; pass leaf_modules={tuple(opaque)!r} to silence, "
            "strict=True to make this an error")


def retrace(gm: fx.GraphModule, model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` again, as :func:`trace` made ``gm``, with the submodules' modes as they are now.

    Uses the same ``leaf_modules`` and keeps the submodules found opaque before opaque without
    warning again; the new graph's ``meta["localsgd_opaque"]`` still names them.
    """
    asked = tuple(gm.meta.get(LEAF_META, ()))
    before = dict(gm.meta.get(OPAQUE_META, {}))
    new = trace(model, leaf_modules=(*asked, *before), warn=False)
    new.meta[OPAQUE_META] = {**before, **new.meta[OPAQUE_META]}
    new.meta[LEAF_META] = asked
    if new.meta[OPAQUE_META].keys() - before.keys():   # a mode change made another submodule untraceable
        warnings.warn(_opaque_warning(model, {k: v for k, v in new.meta[OPAQUE_META].items() if k not in before}),
                      UserWarning, stacklevel=2)
    return new


def modes_changed(gm: fx.GraphModule, model: nn.Module) -> list[str]:
    """Names of the modules ``gm`` traced through whose ``training`` flag differs now (``""`` is the root).

    Non-empty means ``gm`` may run branches of the wrong mode: trace again (:func:`retrace`). A
    module that is gone from ``model`` counts as changed. Leaf modules are not listed: they follow
    their mode at run time.

    Example::

        >>> gm = trace(model); model.block.eval()
        >>> modes_changed(gm, model)
        ['block']
    """
    recorded = gm.meta.get(MODES_META)
    if recorded is None:
        raise LocalSGDError("this GraphModule was not made by passes.trace.trace, so its trace-time modes are "
                            "unknown; trace the model with trace(model) first")
    changed = []
    for name, mode in recorded.items():   # get_submodule, not named_modules: this may run every training step
        try:
            module = model.get_submodule(name)
        except AttributeError:
            changed.append(name)
            continue
        if module.training != mode:
            changed.append(name)
    return changed


def mode_watch(gm: fx.GraphModule, model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """``(module, training flag at trace time)`` of the traced-through modules whose code can branch on their
    mode: those whose class (or a base class outside torch.nn) mentions ``training`` in its source, and those
    whose source cannot be read. Comparing these flags is all a training step needs to do to notice that
    ``gm`` no longer matches the modes (a zoo ResNet has none to watch, so the check costs nothing)."""
    recorded = gm.meta.get(MODES_META, {})
    return [(model.get_submodule(name), mode) for name, mode in recorded.items()
            if _reads_mode(type(model.get_submodule(name)))]


_READS_MODE: dict[type, bool] = {}


def _reads_mode(cls: type) -> bool:
    """Whether ``cls``'s own code (its classes up to torch's) may read ``self.training``."""
    if cls not in _READS_MODE:
        reads = False
        for base in cls.__mro__:
            if base.__module__.startswith("torch.") or base is object:
                continue
            try:
                source = inspect.getsource(base)
            except (OSError, TypeError):
                reads = True        # cannot tell: watch it
                break
            if "training" in source:
                reads = True
                break
        _READS_MODE[cls] = reads
    return _READS_MODE[cls]


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
