"""Tests of ``passes.trace`` (issue 21): opaque submodules, trace-time modes, and the partition of opaque calls.

* a submodule FX cannot trace is kept opaque, named in ``meta["localsgd_opaque"]`` with a one-line
  reason and in one ``UserWarning``; ``strict=True`` and failures in the root raise ``LocalSGDError``;
* ``meta["localsgd_trace_modes"]`` records the root's and every traced-through submodule's mode,
  ``modes_changed`` lists the ones that changed, ``retrace`` traces with the modes of now;
* a call of an opaque submodule holding layers is never part of the local prefix.
"""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from helpers.zoo_quirks import BNAct, PadSameConv, build_quirk
from passes import LocalSGDError, find_layers, partition
from passes.layers import holds_hidden_layers
from passes.trace import LEAF_META, MODES_META, OPAQUE_META, modes_changed, retrace, trace

pytestmark = pytest.mark.single_thread


@contextlib.contextmanager
def no_warnings():
    """Any warning is an error inside (a trace that should be silent)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


class RootBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:          # data-dependent control flow in the root itself
            return self.conv(x)
        return self.conv(-x)


def two_padsame() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), PadSameConv(4, 4, 3, stride=2), PadSameConv(4, 4, 3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


# ---------------------------------------------------------------------------------------- modes
def test_trace_records_the_modes_of_root_and_traced_through_modules_only():
    model, _ = build_quirk("bnact")
    gm = trace(model)
    assert gm.meta[MODES_META] == {"": True, "act1": True, "act2": True, "head": True}   # no leaves (conv1, bn3)
    model.eval()
    assert set(trace(model).meta[MODES_META].values()) == {False}


def test_modes_changed_names_traced_through_modules_whose_flag_moved():
    model, _ = build_quirk("bnact")
    gm = trace(model)
    assert modes_changed(gm, model) == []
    model.bn3.eval()                               # a leaf follows its mode at run time: not a change
    assert modes_changed(gm, model) == []
    model.act1.eval()                              # a "frozen" fused BN+act: its traced branch is stale
    assert modes_changed(gm, model) == ["act1"]
    model.eval()
    assert modes_changed(gm, model) == ["", "act1", "act2", "head"]
    model.train()
    assert modes_changed(gm, model) == []


def test_modes_changed_counts_a_removed_module_and_refuses_a_foreign_graph():
    model, _ = build_quirk("bnact")
    gm = trace(model)
    del model.act2
    assert modes_changed(gm, model) == ["act2"]
    with pytest.raises(LocalSGDError, match="not made by passes.trace.trace"):
        modes_changed(fx.symbolic_trace(nn.Sequential(nn.Conv2d(1, 1, 1))), model)


@pytest.mark.parametrize("name", ["bnact", "droppath"])
def test_a_graph_is_right_only_for_its_trace_time_modes_and_retrace_follows_the_modes_of_now(name):
    model, x = build_quirk(name)
    gm = trace(model)
    model.eval()
    with torch.no_grad():
        stale = gm(x)          # leaves are in eval mode now, the traced-through branch is not (it moves BN stats)
        expected = model(x)
        assert not torch.allclose(stale, expected), "the quirk should make the stale graph wrong"
        fresh = retrace(gm, model)
        assert modes_changed(fresh, model) == []
        assert set(fresh.meta[MODES_META].values()) == {False}
        assert_close(fresh(x), expected)


def test_retrace_keeps_the_opaque_and_leaf_modules_without_warning_again():
    model, x = build_quirk("padsame")
    with pytest.warns(UserWarning):
        gm = trace(model, leaf_modules=(nn.ReLU,))
    model.eval()
    with no_warnings():
        again = retrace(gm, model)
    assert again.meta[OPAQUE_META] == gm.meta[OPAQUE_META]
    assert again.meta[LEAF_META] == (nn.ReLU,)
    assert_close(again(x), model(x))


# -------------------------------------------------------------------------------- opaque submodules
def test_untraceable_submodule_is_kept_opaque_with_one_warning_and_a_one_line_reason():
    model, x = build_quirk("padsame")
    with pytest.warns(UserWarning) as record:
        gm = trace(model)
    assert len(record) == 1
    msg = str(record[0].message)
    assert "\n" not in msg
    assert msg.startswith("kept 'blocks.0.0' (PadSameConv) opaque: cannot trace `return max((math.ceil(size / stride)")
    assert "zoo_quirks.py:" in msg and "(TraceError: symbolically traced variables cannot be used" in msg
    assert "its layers stay on SGD; pass leaf_modules=('blocks.0.0',) to silence, strict=True" in msg
    reason = gm.meta[OPAQUE_META]["blocks.0.0"]
    assert list(gm.meta[OPAQUE_META]) == ["blocks.0.0"] and reason in msg and "\n" not in reason
    assert "blocks.0.0" in [n.target for n in gm.graph.nodes if n.op == "call_module"]   # called as a whole
    assert find_layers(gm).names == ["stem", "conv", "head.fc"]                          # its conv is invisible
    assert_close(gm(x), model(x))


def test_every_untraceable_submodule_is_kept_opaque_and_named_in_the_one_warning():
    model = two_padsame()
    x = torch.randn(2, 3, 9, 9)
    with pytest.warns(UserWarning) as record:
        gm = trace(model)
    assert len(record) == 1
    assert list(gm.meta[OPAQUE_META]) == ["1", "2"]
    assert "kept '1' (PadSameConv) opaque" in str(record[0].message)
    assert "kept '2' (PadSameConv) opaque" in str(record[0].message)
    assert "leaf_modules=('1', '2') to silence" in str(record[0].message)
    assert_close(gm(x), model(x))


def test_strict_tracing_raises_the_clear_error_on_the_first_untraceable_submodule():
    model, _ = build_quirk("padsame")
    with pytest.raises(LocalSGDError) as info:
        trace(model, strict=True)
    msg = str(info.value)
    assert "inside submodule: 'blocks.0.0'" in msg and "leaf_modules=('blocks.0.0',) (or its class PadSameConv)" in msg
    assert "zoo_quirks.py" in msg and "math.ceil(size / stride)" in msg


def test_a_failure_in_the_root_forward_still_raises():
    with pytest.raises(LocalSGDError, match=r"(?s)cannot trace RootBranch.*if x.sum\(\) > 0:"):
        trace(RootBranch())


def test_modules_the_caller_names_leaves_are_not_reported_and_do_not_warn():
    model, _ = build_quirk("padsame")
    with no_warnings():
        gm = trace(model, leaf_modules=(PadSameConv,))
    assert gm.meta[OPAQUE_META] == {} and gm.meta[LEAF_META] == (PadSameConv,)


def test_warn_false_is_silent_but_still_records():
    with no_warnings():
        gm = trace(two_padsame(), warn=False)
    assert list(gm.meta[OPAQUE_META]) == ["1", "2"]


# ------------------------------------------------------------------------ opaque calls in the partition
def test_holds_hidden_layers():
    assert not holds_hidden_layers(nn.Conv2d(1, 1, 1)) and not holds_hidden_layers(nn.BatchNorm2d(1))
    assert not holds_hidden_layers(BNAct(2)) and not holds_hidden_layers(nn.Sequential(nn.ReLU()))
    assert holds_hidden_layers(PadSameConv(1, 1, 1))                 # a conv with its own forward
    assert holds_hidden_layers(nn.Sequential(nn.ReLU(), nn.Linear(2, 2)))


@pytest.mark.parametrize("name", ["padsame", "all"])
def test_an_opaque_call_holding_layers_is_never_in_the_prefix(name):
    model, _ = build_quirk(name)
    with pytest.warns(UserWarning):
        gm = trace(model)
    order = find_layers(gm)
    opaque = {n.name for n in gm.graph.nodes if n.op == "call_module" and n.target in gm.meta[OPAQUE_META]}
    assert opaque
    for t in range(order.local_limit + 1):     # past the limit partition refuses t (test_layer_kinds)
        assert not opaque & partition(gm, order, t).prefix, f"t={t}"


def test_a_layer_behind_an_opaque_call_holding_layers_never_becomes_local():
    # input BatchNorm -> opaque conv -> conv: the opaque call's layers need back-propagation, so the conv behind it
    # cannot become local (it would sit outside the prefix with a detached weight: silently frozen), and neither
    # the BatchNorm nor the opaque call ever joins a prefix
    model = nn.Sequential(nn.BatchNorm2d(3), PadSameConv(3, 4, 3), nn.Conv2d(4, 4, 3), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 2))
    gm = trace(model, leaf_modules=("1",))
    order = find_layers(gm)
    assert order.names == ["2", "5"] and order.local_limit == 0
    with pytest.raises(LocalSGDError, match="stays on SGD"):
        partition(gm, order, 1)
    assert not partition(gm, order, 0).prefix


def test_functional_relu_module_behind_the_quirks_still_traces_in_both_modes():
    # BNAct in eval mode uses the running statistics: a fresh trace in eval equals the module
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BNAct(4)).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert_close(trace(model)(x), F.relu(model[1](model[0](x))))


@pytest.mark.parametrize("name", ["bnact", "droppath", "all"])
def test_measuring_shapes_changes_no_buffer_and_no_random_state(name):
    # the graph runs once for FLOP counts; code traced through in train mode would move BN statistics
    # (eval mode reaches only the leaves) and drop path would draw random numbers
    model, x = build_quirk(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = trace(model)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    rng = torch.get_rng_state()
    assert find_layers(gm, (x,)).layers[0].flops > 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert_close(dict(model.named_buffers()), buffers, rtol=0, atol=0)
    assert model.training and gm.training


def test_a_leaf_container_holding_layers_bounds_the_prefix_and_stays_out_of_it():
    # a submodule kept opaque (here by leaf_modules) whose conv the graph cannot see: its conv learns by SGD, so
    # neither the call nor a layer behind it may join a prefix (the layer would sit outside it, frozen)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU()), nn.Conv2d(4, 4, 3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    gm = trace(model, leaf_modules=("1",))
    order = find_layers(gm)
    assert order.names == ["0", "2", "5"] and order.local_limit == 1
    block = next(n.name for n in gm.graph.nodes if n.op == "call_module" and n.target == "1")
    assert block not in partition(gm, order, 1).prefix
    with pytest.raises(LocalSGDError, match="stays on SGD"):
        partition(gm, order, 2)
