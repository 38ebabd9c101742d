"""The user-facing API of ``compile_localsgd`` / ``LocalSGDModule``."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import localsgd_fx
import models_zoo
from helpers.devices import requires_cuda
from helpers.references import RefGeometry, ref_new_weight
from helpers.state import clone_state
from localsgd_fx import DEFAULT_RULE, Budget, Dynamic, LocalSGDError, LocalSGDModule, compile_localsgd
from localsgd_fx.cli import build_parser
from localsgd_fx.ops import LOCAL_UPDATE
from localsgd_fx.train import TrainConfig
from passes.rewrite import PARTITION_META
from passes.trace import trace

pytestmark = pytest.mark.single_thread


class Net(nn.Module):
    """conv-bn-relu x2, then a Linear head (3 layers)."""

    def __init__(self, width: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 2)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def make(seed: int = 0, dtype=torch.float32) -> Net:
    torch.manual_seed(seed)
    return Net().to(dtype)


def batch(seed: int = 1, dtype=torch.float32, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 1, 6, 6, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------- parameters
def test_same_parameter_objects_and_module_type():
    model = make()
    lm = compile_localsgd(model, total_epochs=4)
    assert isinstance(lm, LocalSGDModule) and isinstance(lm, nn.Module)
    assert lm.model is model
    assert [id(p) for p in lm.parameters()] == [id(p) for p in model.parameters()]
    assert lm.layer_order.names == ["conv1", "conv2", "fc"]
    assert [name for name, _ in lm.layers] == ["conv1", "conv2", "fc"]
    assert lm.transition == 0 and lm.epoch == 0
    assert lm.max_local == 2


def test_optimizer_built_before_compiling_trains_the_sgd_region():
    model = make(dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lm = compile_localsgd(model, rule="oja", schedule="manual", local_lr=0.05, weak_supervision="off",
                          sample_fraction=1.0)
    lm.set_transition(1)
    before = clone_state(model)
    x = batch(dtype=torch.float64)
    out = lm(x)
    loss = out.square().mean()
    loss.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    lm.observe_loss(loss)
    after = dict(model.named_parameters())
    # prefix (conv1, bn1): no gradients; conv1 moved by the local rule only, bn1 affine unchanged
    for name in ("conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias"):
        assert grads[name] is None, name
    assert torch.equal(after["conv1.bias"].detach(), before["conv1.bias"])
    assert torch.equal(after["bn1.weight"].detach(), before["bn1.weight"])
    y = F.conv2d(x, before["conv1.weight"], before["conv1.bias"], padding=1)
    geom = RefGeometry(x, before["conv1.weight"].shape, stride=(1, 1), pads=[(1, 1), (1, 1)], dilation=(1, 1))
    assert_close(after["conv1.weight"].detach(),
                 ref_new_weight("oja", before["conv1.weight"], geom, geom.flat(y), 0.05))
    # SGD region: plain SGD steps
    for name in ("conv2.weight", "conv2.bias", "bn2.weight", "bn2.bias", "fc.weight", "fc.bias"):
        assert_close(after[name].detach(), before[name] - 0.1 * grads[name])


def test_default_rule_is_freeze_and_leaves_the_prefix_bit_identical():
    """With no ``rule`` the local prefix is frozen: a training step at t > 0 leaves every prefix parameter bit for
    bit as it was (even at a local rate that would move an updating rule), while the SGD layers learn."""
    assert TrainConfig().rule == localsgd_fx.DEFAULT_RULE == DEFAULT_RULE == "freeze"
    assert build_parser().parse_args(["inspect"]).rule == build_parser().parse_args(["train"]).rule == "freeze"
    model, twin = make(), make()
    lm = compile_localsgd(model, schedule="manual", local_lr=0.5, sample_fraction=1.0)
    hebbian = compile_localsgd(twin, rule="hebbian", schedule="manual", local_lr=0.5, sample_fraction=1.0)
    assert lm.rule.key == "freeze" and lm.rule.gemms == 0
    x, y = batch(n=4), torch.tensor([0, 1, 1, 0])
    for net, wrapper in ((model, lm), (twin, hebbian)):
        wrapper.set_transition(2)                            # conv1, conv2 local; fc by SGD
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        before = clone_state(net)
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(wrapper(x), y)
            loss.backward()
            opt.step()
            wrapper.observe_loss(loss.detach())
        after = {name: p.detach() for name, p in net.named_parameters()}
        for name in ("fc.weight", "fc.bias"):
            assert not torch.equal(after[name], before[name]), f"SGD parameter {name} did not move"
        prefix = ("conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias", "conv2.weight", "conv2.bias")
        if wrapper is lm:
            assert int(lm.supervision.steps) == 0          # freeze reads no local rate: no per-step work for it
            for name in prefix:
                assert torch.equal(after[name], before[name]), f"frozen prefix parameter {name} changed"
        else:   # the same steps with an updating rule do move the local weights: the check above can fail
            assert not torch.equal(after["conv1.weight"], before["conv1.weight"])
            assert not torch.equal(after["conv2.weight"], before["conv2.weight"])


# ------------------------------------------------------------------------- transitions
def test_set_transition_rules():
    lm = compile_localsgd(make(), schedule="manual", sample_fraction=1.0)
    lm.set_transition(2)
    with pytest.raises(LocalSGDError, match="never back"):
        lm.set_transition(1)
    assert lm.transition == 2
    lm.set_transition(1, force=True)
    assert lm.transition == 1
    with pytest.raises(LocalSGDError, match="past max_local=2"):   # every layer local: nothing to back-propagate
        lm.set_transition(3)
    lm.set_transition(3, force=True)          # every layer local (asked explicitly) is allowed
    for bad in (-1, 4, 1.5, "1", True, None):
        with pytest.raises(LocalSGDError, match="out of range"):
            lm.set_transition(bad)
    assert lm.transition == 3


def test_graphs_are_cached_per_t_and_re_emitted_when_t_moves():
    lm = compile_localsgd(make(), schedule="manual", sample_fraction=1.0)
    g0 = lm.graph_module
    lm.set_transition(1)
    g1 = lm.graph_module
    assert g1 is not g0 and lm.graph_for(1) is g1 and lm.graph_for(0) is g0
    assert len([n for n in g1.graph.nodes if n.target is LOCAL_UPDATE]) == 1
    assert len([n for n in lm.graph_for(2).graph.nodes if n.target is LOCAL_UPDATE]) == 2
    assert g1.meta[PARTITION_META].local_layers == ("conv1",)


# --------------------------------------------------------------------- errors that speak
class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.inner(x)
        return x


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 3, 3, padding=1)
        self.that_submodule = Gate()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.that_submodule(self.stem(x)).mean((2, 3)))


def test_untraceable_model_names_the_construct_and_the_escape_hatch():
    # compile_localsgd keeps an untraceable submodule opaque with a warning (issue 21); strict tracing raises
    with pytest.warns(UserWarning, match=r"kept 'that_submodule' \(Gate\) opaque: cannot trace `if x.sum\(\) > 0:`"):
        assert compile_localsgd(Gated(), total_epochs=4).layer_order.names == ["stem", "fc"]
    with pytest.raises(LocalSGDError) as info:
        trace(Gated(), strict=True)
    msg = str(info.value)
    assert "if x.sum() > 0:" in msg
    assert "that_submodule" in msg and "leaf_modules=('that_submodule',)" in msg
    assert "test_api.py" in msg


def test_untraceable_nested_submodule_is_named_by_its_qualified_name():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Sequential(nn.ReLU(), Gate()), nn.Flatten())
    with pytest.raises(LocalSGDError, match=r"leaf_modules=\('1\.1',\) \(or its class Gate\)"):
        trace(model, strict=True)
    with pytest.warns(UserWarning, match=r"kept '1\.1' \(Gate\) opaque.*leaf_modules=\('1\.1',\) to silence"):
        assert compile_localsgd(model, total_epochs=4).layer_order.names == ["0"]
    lm = compile_localsgd(model, leaf_modules=("1.1",), total_epochs=4)
    assert lm.layer_order.names == ["0"]


@pytest.mark.parametrize("leaf", ["that_submodule", Gate])
def test_leaf_modules_escape_hatch_compiles_and_runs(leaf):
    torch.manual_seed(0)
    model = Gated()
    lm = compile_localsgd(model, rule="hebbian", leaf_modules=(leaf,), schedule="manual", local_lr=0.1,
                          sample_fraction=1.0)
    assert lm.layer_order.names == ["stem", "fc"]           # the leaf's conv stays opaque (SGD)
    lm.set_transition(1)
    w = model.stem.weight.detach().clone()
    x = torch.randn(2, 1, 5, 5)
    lm(x).sum().backward()
    assert not torch.equal(w, model.stem.weight.detach())
    assert model.stem.weight.grad is None and model.fc.weight.grad is not None


def test_model_without_layers_is_a_clear_error():
    with pytest.raises((LocalSGDError, ValueError), match="no nn.Conv1d/2d/3d or nn.Linear"):
        compile_localsgd(nn.Sequential(nn.BatchNorm2d(2), nn.ReLU()))

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(2, 1, 3, 3))

        def forward(self, x):
            return F.conv2d(x, self.w * 2)      # a computed weight: not a layer (a parameter's would be one)

    with pytest.raises(LocalSGDError, match="torch.nn.functional"), pytest.warns(UserWarning, match="conv2d"):
        compile_localsgd(Functional())
    with pytest.raises(TypeError):
        compile_localsgd(lambda x: x)


def test_argument_validation():
    model = make()
    with pytest.raises(ValueError, match="compile"):
        compile_localsgd(model, compile="yes")
    with pytest.raises(TypeError, match="example_inputs"):
        compile_localsgd(model, example_inputs=batch())
    with pytest.raises(ValueError, match="max_local"):
        compile_localsgd(model, max_local=4)
    with pytest.raises(ValueError):
        compile_localsgd(model, schedule="sometimes")


# --------------------------------------------------------------------------- state
def _train_epoch(lm: LocalSGDModule, model: nn.Module, deltas: dict[str, float], losses=(1.0, 0.5)) -> int:
    """A scripted 'epoch': move the named weights by the given amount, feed losses, end the epoch."""
    with torch.no_grad():
        for name, amount in deltas.items():
            model.get_submodule(name).weight.add_(amount)
    for loss in losses:
        lm.observe_loss(torch.tensor(loss))
    return lm.end_epoch()


def test_dynamic_schedule_moves_t_when_update_norms_say_so():
    model = make()
    lm = compile_localsgd(model, schedule=Dynamic(alpha=0.3, shift=1, beta=0.9, warmup_epochs=1),
                          example_inputs=(batch(),))
    assert _train_epoch(lm, model, {"conv1": 0.1, "conv2": 0.1, "fc": 0.1}) == 0       # warm-up epoch
    assert _train_epoch(lm, model, {"conv1": 0.1, "conv2": 0.1, "fc": 0.1}) == 0       # δ = W̄: keep
    g = lm.graph_module
    assert _train_epoch(lm, model, {"conv1": 0.001, "conv2": 0.1, "fc": 0.1}) == 1     # δ << α·W̄: move
    assert lm.graph_module is not g and lm.graph_module.meta[PARTITION_META].local_layers == ("conv1",)
    assert lm.history[-1]["transition_before"] == 0 and lm.history[-1]["transition"] == 1
    assert _train_epoch(lm, model, {"conv2": 0.0, "fc": 0.1}) == 2                     # conv2 stopped
    for _ in range(3):                                                                 # never past max_local
        assert _train_epoch(lm, model, {"fc": 0.0}) == 2
    assert lm.epoch == 7


def test_default_schedule_is_the_budget_plan_and_needs_the_run_length():
    with pytest.raises(ValueError, match="pass total_epochs=<the epochs you train> to compile_localsgd"):
        compile_localsgd(make())
    lm = compile_localsgd(make(), total_epochs=8)
    assert isinstance(lm.schedule, Budget) and lm.schedule.total_epochs == 8


def test_dynamic_schedule_string():
    model = make()
    lm = compile_localsgd(model, schedule="dynamic")
    assert isinstance(lm.schedule, Dynamic)
    _train_epoch(lm, model, {"conv1": 1.0, "conv2": 1.0, "fc": 1.0})
    _train_epoch(lm, model, {"conv1": 1.0, "conv2": 1.0, "fc": 1.0})
    assert _train_epoch(lm, model, {"conv1": 0.0, "conv2": 1.0, "fc": 1.0}) == 1


def test_state_dict_round_trip_restores_transition_epoch_schedule_and_supervision():
    model = make()
    lm = compile_localsgd(model, rule="hebbian", schedule=Dynamic(alpha=0.3, shift=1, warmup_epochs=1),
                          weak_supervision="sign", sample_fraction=1.0)     # an updating rule: the rate matters
    _train_epoch(lm, model, {"conv1": 0.1, "conv2": 0.1, "fc": 0.1}, losses=(1.0, 2.0))
    _train_epoch(lm, model, {"conv1": 0.001, "conv2": 0.1, "fc": 0.1}, losses=(2.0, 3.0))
    assert lm.transition == 1
    lm(batch())
    state = copy.deepcopy(lm.state_dict())

    fresh_model = make(seed=5)
    fresh = compile_localsgd(fresh_model, rule="hebbian", schedule=Dynamic(alpha=0.3, shift=1, warmup_epochs=1),
                             sample_fraction=1.0)
    fresh.load_state_dict(state)
    assert fresh.transition == 1 and fresh.epoch == 2
    assert fresh.schedule.state_dict() == lm.schedule.state_dict()
    assert fresh.history == lm.history
    assert float(fresh.supervision.lr) == float(lm.supervision.lr) < 0     # the last loss rose
    assert_close(fresh_model.state_dict(), model.state_dict())
    # resumes exactly: same decisions and same forward from here on
    for deltas in ({"conv2": 0.1, "fc": 0.1}, {"conv2": 0.0, "fc": 0.1}):
        assert _train_epoch(lm, model, deltas) == _train_epoch(fresh, fresh_model, deltas)
    assert fresh.transition == lm.transition == 2
    x = batch(3)
    assert_close(fresh(x), lm(x))
    assert_close(fresh_model.state_dict(), model.state_dict())


def test_state_dict_of_a_different_model_is_refused():
    lm = compile_localsgd(make(), schedule="manual", sample_fraction=1.0)
    lm.set_transition(1)
    state = lm.state_dict()

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Conv2d(1, 3, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            return self.head(self.first(x).mean((2, 3)))

    other = compile_localsgd(Other(), schedule="manual", sample_fraction=1.0)
    with pytest.raises(LocalSGDError, match="other layers"):
        other.load_state_dict(state)
    assert other.transition == 0


@pytest.mark.parametrize("version", [0, 2, None])
def test_state_of_another_release_is_refused_and_leaves_state_untouched(version):
    lm = compile_localsgd(make(), schedule="manual", sample_fraction=1.0)
    lm.set_transition(2)
    lm.epoch = 4
    state = copy.deepcopy(lm.state_dict())
    state["_extra_state"]["version"] = version
    fresh_model = make(seed=3)
    before = clone_state(fresh_model)
    fresh = compile_localsgd(fresh_model, schedule="manual", sample_fraction=1.0)
    with pytest.raises(LocalSGDError, match=f"version {version!r}.*reads version 1"):
        fresh.load_state_dict(state)
    assert (fresh.transition, fresh.epoch) == (0, 0)
    assert_close(clone_state(fresh_model), before, rtol=0, atol=0)   # no weight was loaded either


def test_failed_load_of_same_named_but_reshaped_model_leaves_state_untouched():
    lm = compile_localsgd(make(), schedule="manual", sample_fraction=1.0)
    lm.set_transition(2)
    lm.epoch = 9
    state = lm.state_dict()
    torch.manual_seed(0)
    wide = compile_localsgd(Net(width=5), schedule="manual", sample_fraction=1.0)
    with pytest.raises((LocalSGDError, RuntimeError)):
        wide.load_state_dict(state)
    assert (wide.transition, wide.epoch) == (0, 0)


# ------------------------------------------------------------------------ modes
def test_eval_mode_runs_the_original_model_and_updates_nothing():
    model = make()
    ref = copy.deepcopy(model).eval()
    lm = compile_localsgd(model, rule="hebbian", schedule="manual", local_lr=0.5, sample_fraction=1.0)
    lm.set_transition(2)
    lm.eval()
    before = clone_state(model)
    x = batch()
    assert_close(lm(x), ref(x))
    assert_close(clone_state(model), before)
    lm.train()
    lm(x)
    assert not torch.equal(before["conv1.weight"], model.conv1.weight.detach())


class SharedConv(nn.Module):
    """``conv_s`` is called three times: twice before ``conv_b`` and once after it."""

    def __init__(self):
        super().__init__()
        self.conv_s = nn.Conv2d(3, 3, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.relu(self.conv_s(x))
        h = torch.relu(self.conv_s(h))
        g = self.conv_s(self.conv_b(h))
        return self.fc(g.mean((2, 3)))


def test_shared_module_is_one_layer_with_several_sites():
    torch.manual_seed(0)
    model = SharedConv().double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    lm = compile_localsgd(model, rule="oja", schedule="manual", local_lr=0.1, weak_supervision="off",
                          example_inputs=(x,), sample_fraction=1.0)
    first = lm.layer_order.layers[0]
    assert lm.layer_order.names == ["conv_s", "conv_b", "fc"]
    assert first.call_sites == ("conv_s", "conv_s_1", "conv_s_2")
    assert first.flops == 3 * 2 * (3 * 25) * (3 * 9)             # summed over the three sites
    lm.set_transition(1)
    part = lm.graph_module.meta[PARTITION_META]
    assert part.outside_local_sites == ("conv_s_2",)

    # what the code does: each prefix site updates in turn (the second sees the first's update); the
    # site behind the SGD layer uses the final weight as a constant
    w0, b_s = model.conv_s.weight.detach().clone(), model.conv_s.bias.detach().clone()
    ref_b = copy.deepcopy(model.conv_b)
    ref_fc = copy.deepcopy(model.fc)

    def step(w, inp):
        y = F.conv2d(inp, w, b_s, padding=1)
        geom = RefGeometry(inp, w.shape, stride=(1, 1), pads=[(1, 1), (1, 1)], dilation=(1, 1))
        return y, ref_new_weight("oja", w, geom, geom.flat(y), 0.1)

    y1, w1 = step(w0, x)
    h1 = torch.relu(y1)
    y2, w2 = step(w1, h1)
    g = F.conv2d(ref_b(torch.relu(y2)), w2, b_s, padding=1)
    expected = ref_fc(g.mean((2, 3)))
    out = lm(x)
    assert_close(out, expected)
    assert_close(model.conv_s.weight.detach(), w2)
    expected.sum().backward()
    out.sum().backward()
    assert model.conv_s.weight.grad is None and model.conv_s.bias.grad is None
    assert_close(model.conv_b.weight.grad, ref_b.weight.grad)
    assert_close(model.fc.weight.grad, ref_fc.weight.grad)

    lm.set_transition(2)                                           # now every site is in the prefix
    assert lm.graph_module.meta[PARTITION_META].outside_local_sites == ()
    assert len([n for n in lm.graph_module.graph.nodes if n.target is LOCAL_UPDATE]) == 4
    lm(x).sum().backward()


def test_inplace_makes_the_model_itself_run_the_local_forward():
    model = make()
    lm = compile_localsgd(model, rule="hebbian", schedule="manual", local_lr=0.1, inplace=True, sample_fraction=1.0)
    lm.set_transition(1)
    x = batch()
    w = model.conv1.weight.detach().clone()
    model(x).sum().backward()
    assert not torch.equal(w, model.conv1.weight.detach())
    assert model.conv1.weight.grad is None and model.conv2.weight.grad is not None
    # model.eval() (the user's usual call) must stop the local updates too
    model.eval()
    w = model.conv1.weight.detach().clone()
    with torch.no_grad():
        model(x)
    assert torch.equal(w, model.conv1.weight.detach()), "model.eval() left local updates running"
    model.train()
    model(x)
    assert not torch.equal(w, model.conv1.weight.detach())


@pytest.mark.parametrize("rule, saved_gemms", [("hebbian", 1), ("freeze", 2)])
def test_explain_mentions_the_bound(rule, saved_gemms):
    """A local layer costs 1 + its rule's update GEMMs of an SGD layer's 3: 3/(3-p) for hebbian, 3/(3-2p) for freeze."""
    model = make()
    lm = compile_localsgd(model, rule=rule, schedule="manual", example_inputs=(batch(),), sample_fraction=1.0)
    lm.set_transition(2)
    text = lm.explain(print_fn=None)
    p = lm.local_fraction
    assert 0 < p < 1
    assert lm.speed_bound == pytest.approx(3 / (3 - saved_gemms * p))
    assert "bound" in text and f"{lm.speed_bound:.3f}x" in text and f"{p:.3f}" in text
    assert "LOCAL" in text and "SGD" in text and "conv1" in text
    printed = []
    lm.explain(print_fn=printed.append)
    assert printed == [text]
    # no shapes yet: says so, does not guess
    unknown = compile_localsgd(make(), schedule="manual", sample_fraction=1.0)
    assert "?" in unknown.explain(print_fn=None)
    unknown(batch())
    assert unknown.speed_bound == pytest.approx(1.0)


def test_first_call_measures_shapes_with_one_extra_forward():
    model = make()
    lm = compile_localsgd(model, schedule="manual", sample_fraction=1.0)
    calls = []
    model.conv1.register_forward_hook(lambda mod, args, out: calls.append(mod.training))
    lm(batch())
    assert calls == [False, True]          # one eval-mode shape propagation, then the real forward
    assert lm.layer_order.layers[0].flops == 2 * 3 * 36 * 9
    lm(batch())
    assert calls == [False, True, True]


def test_to_float64_re_emits_graphs_and_runs():
    model = make()
    lm = compile_localsgd(model, rule="hebbian", schedule="manual", local_lr=0.1, weak_supervision="off",
                          sample_fraction=1.0)
    lm.set_transition(1)
    lm(batch())
    g = lm.graph_module
    lm.to(torch.float64)
    assert model.conv1.weight.dtype == torch.float64 and lm.supervision.lr.dtype == torch.float64
    assert lm.graph_module is not g
    x = batch(dtype=torch.float64)
    w0 = model.conv1.weight.detach().clone()
    out = lm(x)
    assert out.dtype == torch.float64
    out.sum().backward()
    assert model.fc.weight.grad.dtype == torch.float64
    assert not torch.equal(w0, model.conv1.weight.detach())
    lm.eval()
    ref = copy.deepcopy(model).eval()
    assert_close(lm(x), ref(x))


class WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("offset", torch.zeros(1, 1, 1, 1))
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(self.conv(x - self.offset).mean((2, 3)))


def test_to_float64_keeps_get_attr_buffers_in_sync():
    torch.manual_seed(0)
    model = WithBuffer()
    lm = compile_localsgd(model, schedule="manual", sample_fraction=1.0)
    lm.to(torch.float64)
    with torch.no_grad():
        model.offset.fill_(3.0)
    lm.eval()
    x = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    assert_close(lm(x), model.fc(model.conv(x - 3.0).mean((2, 3))))


def test_deepcopy_and_state_of_the_wrapper():
    model = make()
    lm = compile_localsgd(model, rule="hebbian", schedule="manual", local_lr=0.1, sample_fraction=1.0)
    lm.set_transition(1)
    x = batch()
    lm(x)
    twin = copy.deepcopy(lm)
    assert twin.transition == 1 and twin.model is not model
    assert_close(twin(x), lm(x))
    assert_close(twin.model.state_dict(), model.state_dict())


# --------------------------------------------------------------------- torch.compile
@requires_cuda
@pytest.mark.parametrize("mode", ["on", "reduce-overhead"])
def test_cuda_compiled_matches_eager(mode):
    torch.manual_seed(0)
    model = make().cuda()
    twin = copy.deepcopy(model)
    compiled = compile_localsgd(model, rule="hebbian", schedule="manual", local_lr=0.1, weak_supervision="off",
                                sample_fraction=1.0, compile=mode)
    eager = compile_localsgd(twin, rule="hebbian", schedule="manual", compile=False, local_lr=0.1,
                             weak_supervision="off", sample_fraction=1.0)
    for lm in (compiled, eager):
        lm.set_transition(2)
    x = batch().cuda()
    a, b = compiled(x), eager(x)
    assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert_close(model.conv1.weight, twin.conv1.weight, rtol=1e-4, atol=1e-5)
    assert compiled.compile_count == 1


@requires_cuda
def test_cuda_one_compile_per_distinct_t():
    model = make().cuda()
    lm = compile_localsgd(model, schedule="manual", sample_fraction=1.0, compile="on")
    x = batch().cuda()
    for t in (0, 1, 1, 2, 2):
        lm.set_transition(t)
        lm(x).sum().backward()
    assert lm.compile_count == 3


def test_compiled_zoo_model_pickles_and_torch_saves():
    torch.manual_seed(0)
    lm = compile_localsgd(models_zoo.get_model("smallcnn", 10, 1), rule="hebbian", schedule="manual",
                          sample_fraction=1.0)
    lm.set_transition(2)
    x = torch.randn(4, 1, 28, 28)
    buf = io.BytesIO()
    torch.save(lm, buf)
    for loaded in (pickle.loads(pickle.dumps(lm)), torch.load(io.BytesIO(buf.getvalue()), weights_only=False)):
        assert loaded.transition == 2 and loaded.layer_order.names == lm.layer_order.names
        twin = copy.deepcopy(lm)
        assert_close(loaded(x), twin(x), rtol=0, atol=0)                 # a train step: local updates included
        assert_close(loaded.model.features[0][0].weight, twin.model.features[0][0].weight, rtol=0, atol=0)
        loaded.eval(), twin.eval()
        assert_close(loaded(x), twin(x), rtol=0, atol=0)


def test_explain_shows_the_budget_plan_before_training_and_the_run_follows_it():
    model = make()
    lm = compile_localsgd(model, total_epochs=4, example_inputs=(batch(),))
    line = next(x for x in lm.explain(print_fn=None).splitlines() if x.startswith("planned t per epoch"))
    plan, _ = lm.schedule.planned(lm.layer_order.flop_shares())
    assert str(plan) in line and "run-speedup bound" in line and lm.schedule.plan is None   # explain changes nothing
    assert max(plan) > 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    for _ in range(4):
        seen.append(lm.transition)
        loss = lm(batch()).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        lm.end_epoch()
    assert seen == plan
