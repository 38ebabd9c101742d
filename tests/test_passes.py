"""Property tests of the FX passes through ``compile_localsgd``: random CNN DAGs, the zoo, goldens.

For random models and random ``t`` (see ``helpers.random_cnn``: mostly branching DAGs, mostly ``t > 0``):

* the forward equals the untransformed model's forward with the weights as they were before the
  update; SGD-region gradients equal the reference's; prefix parameters get ``.grad is None``;
  BatchNorm running statistics update exactly as in the reference (train mode);
* every local layer's weight moved by exactly the rule's update, checked against the independent
  im2col / einsum reference of ``helpers.references``;
* nothing of the prefix is saved for backward except the crossing tensors, and less is saved than
  at ``t = 0``;
* the emitted graphs lint, survive dead-code elimination and deep copies.
"""
from __future__ import annotations

import copy
from pathlib import Path

import networkx as nx
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

from helpers.golden import check_golden
from helpers.hypothesis_profile import examples
from helpers.prefix_oracle import expected_prefix, prefix_parameters
from helpers.random_cnn import build, cnn_specs, randomize_batchnorm, transitions
from helpers.references import CallRecorder, module_geometry, ref_new_weight
from helpers.saved_tensors import check_nothing_saved_from_prefix, run_recording_saved, saved_bytes
from helpers.state import clone_state, grads
from localsgd_fx import LocalSGDError, compile_localsgd
from localsgd_fx.cost import speed_bound
from localsgd_fx.metrics import format_table
from localsgd_fx.ops import LOCAL_UPDATE
from passes import LAYER_COLUMNS, find_layers, layer_rows, partition, rewrite, to_dot, trace
from passes.inspection import REGION_COLOURS
from passes.partition import check_transition
from passes.rewrite import PARTITION_META, ROLE_META, LocalUpdateSpec

pytestmark = pytest.mark.single_thread

GOLDEN = Path(__file__).parent / "golden"
RULES = ["hebbian", "oja", "softhebb", "freeze"]


# ------------------------------------------------------------------------------- the harness
def fused_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is LOCAL_UPDATE]


def check_local_step(model: nn.Module, x: torch.Tensor, t: int, rule: str = "hebbian", lr: float = 0.05,
                     check_updates: bool = True, grad_tol: dict | None = None, check_eval: bool = True) -> dict:
    """Compile ``model``, run one train step at transition ``t`` and check it against a deep copy.

    Checks: forward output, SGD gradients, ``grad is None`` in the prefix, buffers, the partition
    against the oracle, the rule update of every local layer, unchanged biases and SGD weights,
    ``graph.lint()``; then (``check_eval``) that eval mode gives the original module's output with the
    updated weights. Returns some facts for further checks.
    """
    ref = copy.deepcopy(model)
    lm = compile_localsgd(model, rule=rule, schedule="manual", local_lr=lr, weak_supervision="off", sample_fraction=1.0)
    n_layers = len(lm.layer_order)
    t = min(t, n_layers)
    lm.set_transition(t, force=True)   # t = n_layers (all local, past max_local) is asked explicitly
    local = lm.layer_order.names[:t]
    before = clone_state(model)

    rec = CallRecorder(ref, local) if check_updates else None
    out_ref = ref(x)
    if rec is not None:
        rec.remove()
    gout = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(7), dtype=out_ref.dtype)
    (out_ref * gout).sum().backward()

    out = lm(x)
    assert_close(out, out_ref)
    if out.requires_grad:
        (out * gout).sum().backward()
    else:
        assert t == n_layers, "the output is cut from autograd although an SGD layer remains"

    # the partition is the prefix of docs/DESIGN.md §1.2 (re-derived independently)
    prefix, crossing = expected_prefix(ref, local)
    gm = lm.graph_module
    gm.graph.lint()
    if t > 0:
        part = gm.meta[PARTITION_META]
        assert set(part.prefix) == prefix
        assert set(part.crossing) == crossing
        assert len(fused_nodes(gm)) == sum(len(layer.call_sites) for layer in lm.layer_order.layers[:t])
    no_grad = prefix_parameters(ref, prefix) | {f"{n}.{p}" for n in local for p in ("weight", "bias")}

    ref_grads = grads(ref)
    for name, p in model.named_parameters():
        if name in no_grad:
            assert p.grad is None, f"prefix parameter {name} received a gradient"
        elif ref_grads[name] is None:
            assert p.grad is None, name
        else:
            assert p.grad is not None, f"SGD parameter {name} received no gradient"
            assert_close(p.grad, ref_grads[name], **(grad_tol or {}))
    for name, b in model.named_buffers():
        assert_close(b, dict(ref.named_buffers())[name], msg=f"buffer {name}")

    # weights: SGD layers and every bias untouched; local layers moved by the rule exactly
    after = dict(model.named_parameters())
    local_weights = {f"{n}.weight" for n in local}
    for name, value in before.items():
        if name in after and name not in local_weights:
            assert torch.equal(after[name].detach(), value), f"{name} changed"
    if rec is not None:
        for name in local:
            module = ref.get_submodule(name)
            (xin, yout), = rec.calls[name]
            geom = module_geometry(module, xin)
            assert_close(geom.forward(module.weight, module.bias), geom.flat(yout))   # the reference itself
            expected = ref_new_weight(rule, before[f"{name}.weight"], geom, geom.flat(yout), lr)
            new = after[f"{name}.weight"].detach()
            assert_close(new - before[f"{name}.weight"], expected - before[f"{name}.weight"],
                         rtol=1e-6, atol=1e-10 if new.dtype == torch.float64 else 1e-6, msg=f"update of {name}")
    if check_eval:
        check_eval_equals_original(lm, model, x)
    return {"lm": lm, "t": t, "n_layers": n_layers, "local": local}


def check_eval_equals_original(lm, model: nn.Module, x: torch.Tensor) -> None:
    """In eval mode the compiled module gives what the original module gives (train mode restored after)."""
    lm.eval()
    assert not model.training
    with torch.no_grad():
        assert_close(lm(x), model(x), msg=lambda m: f"eval output at t={lm.transition}: {m}")
    lm.train()


def check_saved(model: nn.Module, x: torch.Tensor, t: int) -> None:
    """Nothing of the prefix is saved for backward (crossing tensors aside), and less than at t=0."""
    lm = compile_localsgd(model, rule="hebbian", schedule="manual", weak_supervision="off", sample_fraction=1.0)
    n_layers = len(lm.layer_order)
    t = min(t, n_layers)
    _, _, saved0 = run_recording_saved(lm.graph_for(0), x)
    gm = lm.graph_for(t)
    out, rec, saved = run_recording_saved(gm, x)
    if t == 0:
        return
    local = lm.layer_order.names[:t]
    weights = [model.get_submodule(n).weight for n in local]
    check_nothing_saved_from_prefix(gm, rec, saved, forbidden_tensors=weights)
    part = gm.meta[PARTITION_META]
    if t == n_layers:
        assert not out.requires_grad and saved == []
    prefix_convs = [layer for layer in lm.layer_order.layers[:t]
                    if layer.kind.startswith("conv") and any(s in part.prefix for s in layer.call_sites)]
    if prefix_convs:
        assert saved_bytes(saved) < saved_bytes(saved0)


# ------------------------------------------------------------------------ random 2-d CNNs
@examples(100)
@given(spec=cnn_specs(dims=2), data=st.data())
def test_random_cnn_any_t_matches_reference(spec, data):
    model, x = build(spec)
    n_layers = len(find_layers(trace(model)))
    t = data.draw(transitions(n_layers), label="t")
    rule = data.draw(st.sampled_from(RULES), label="rule")
    check_local_step(model, x, t, rule=rule)


@examples(40)
@given(spec=cnn_specs(dims=2, fused_bn=True), data=st.data())
def test_random_cnn_with_fused_bn_matches_reference_in_train_mode(spec, data):
    """Nets with a fused BatchNorm + ReLU (traced through, in train mode): right in train mode."""
    model, x = build(spec)
    n_layers = len(find_layers(trace(model)))
    t = data.draw(transitions(n_layers), label="t")
    check_local_step(model, x, t, rule=data.draw(st.sampled_from(RULES), label="rule"), check_eval=False)


@settings(examples(15), phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(spec=cnn_specs(dims=2, fused_bn=True), data=st.data())
def test_random_cnn_with_fused_bn_eval_equals_original(spec, data):
    """The eval half of the test above: eval mode after a train step gives the original module's output."""
    model, x = build(spec)
    n_layers = len(find_layers(trace(model)))
    t = data.draw(transitions(n_layers), label="t")
    facts = check_local_step(model, x, t, check_eval=False)
    check_eval_equals_original(facts["lm"], model, x)


@examples(30)
@given(spec=cnn_specs(dims=2))
def test_random_cnn_t0_is_plain_sgd(spec):
    model, x = build(spec)
    facts = check_local_step(model, x, 0)
    lm = facts["lm"]
    assert lm.graph_module is lm.graph_for(0)
    assert not fused_nodes(lm.graph_module)


@examples(60)
@given(spec=cnn_specs(dims=2, min_ops=2), data=st.data())
def test_random_cnn_nothing_saved_from_prefix(spec, data):
    model, x = build(spec)
    n_layers = len(find_layers(trace(model)))
    t = data.draw(st.integers(1, n_layers), label="t")
    check_saved(model, x, t)


@examples(30)
@given(spec=cnn_specs(dims=2))
def test_every_emitted_graph_lints_and_keeps_updates_through_dce(spec):
    model, x = build(spec)
    lm = compile_localsgd(model, rule="hebbian", schedule="manual", sample_fraction=1.0)
    n_layers = len(lm.layer_order)
    for t in range(n_layers + 1):
        gm = lm.graph_for(t)
        gm.graph.lint()
        graph = fx.GraphModule(gm, copy.deepcopy(gm.graph)).graph
        fused = len([n for n in graph.nodes if n.target is LOCAL_UPDATE])
        grad_switches = len([n for n in graph.nodes if n.target is torch._C._set_grad_enabled])
        graph.eliminate_dead_code()
        graph.lint()
        assert len([n for n in graph.nodes if n.target is LOCAL_UPDATE]) == fused
        assert len([n for n in graph.nodes if n.target is torch._C._set_grad_enabled]) == grad_switches
        assert fused == t   # no shared modules in the generator: one site per layer
        if t:
            assert grad_switches == 2


@examples(40)
@given(spec=cnn_specs(dims=2))
def test_layer_order_is_topological(spec):
    model, _ = build(spec)
    gm = trace(model)
    order = find_layers(gm)
    dag = nx.DiGraph()
    dag.add_edges_from((i.name, n.name) for n in gm.graph.nodes for i in n.all_input_nodes)
    site = {layer.call_sites[0]: layer.index for layer in order.layers}
    assert [layer.index for layer in order.layers] == list(range(len(order)))
    convs = {n.target for n in gm.graph.nodes if n.op == "call_module"
             and isinstance(gm.get_submodule(n.target), (nn.Conv2d, nn.Linear))}
    assert set(order.names) == convs
    for a, ia in site.items():
        for b in nx.descendants(dag, a):
            if b in site:
                assert ia < site[b], f"layer {a} feeds {b} but is ordered after it"


@examples(15)
@given(spec=cnn_specs(dims=2, min_ops=2), data=st.data())
def test_deepcopy_of_local_module_runs_identically(spec, data):
    model, x = build(spec)
    lm = compile_localsgd(model, rule="hebbian", schedule="manual", local_lr=0.05, weak_supervision="off",
                          sample_fraction=1.0)
    lm.set_transition(data.draw(st.integers(1, len(lm.layer_order)), label="t"), force=True)   # all local too
    lm.graph_module  # populate the caches before copying
    twin = copy.deepcopy(lm)
    before = clone_state(model)
    out_twin = twin(x)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the copy shares state"
    out = lm(x)
    assert_close(out_twin, out)
    assert_close(twin.model.state_dict(), model.state_dict())
    assert twin.transition == lm.transition
    assert all(p is not q for p, q in zip(twin.parameters(), lm.parameters()))


# ------------------------------------------------------------------------ 1-d / 3-d / MLP
@examples(40)
@given(spec=cnn_specs(dims=1), data=st.data())
def test_random_conv1d_net_matches_reference(spec, data):
    model, x = build(spec)
    t = data.draw(transitions(len(find_layers(trace(model)))), label="t")
    check_local_step(model, x, t, rule=data.draw(st.sampled_from(RULES), label="rule"))
    check_saved(model, x, max(t, 1))


@examples(25)
@given(spec=cnn_specs(dims=3, max_ops=5), data=st.data())
def test_random_conv3d_net_matches_reference(spec, data):
    model, x = build(spec)
    t = data.draw(transitions(len(find_layers(trace(model)))), label="t")
    check_local_step(model, x, t, rule=data.draw(st.sampled_from(RULES), label="rule"))
    check_saved(model, x, max(t, 1))


class MLP(nn.Module):
    """Linear-only: flatten, hidden layers, and a Linear applied on a (batch, tokens, features) input."""

    def __init__(self, widths, tokens):
        super().__init__()
        self.tokens = tokens
        self.embed = nn.Linear(widths[0], widths[0])
        self.flatten = nn.Flatten()
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip([widths[0] * tokens] + widths[1:-1], widths[1:]))
        self.act = nn.Tanh()

    def forward(self, x):
        h = self.flatten(self.act(self.embed(x)))
        for i, layer in enumerate(self.hidden):
            h = layer(h)
            if i < len(self.hidden) - 1:
                h = self.act(h)
        return h


@examples(25)
@given(widths=st.lists(st.integers(2, 6), min_size=2, max_size=5), tokens=st.integers(1, 3),
       rule=st.sampled_from(RULES), seed=st.integers(0, 1000), data=st.data())
def test_linear_only_mlp_matches_reference(widths, tokens, rule, seed, data):
    torch.manual_seed(seed)
    model = MLP(widths, tokens).double()
    x = torch.randn(3, tokens, widths[0], dtype=torch.float64)
    t = data.draw(transitions(len(widths)), label="t")
    facts = check_local_step(model, x, t, rule=rule)
    assert facts["n_layers"] == len(widths)
    assert facts["lm"].layer_order.layers[0].kind == "linear"


# ------------------------------------------- regression: work on the input before the first layer
@pytest.mark.parametrize("pre", ["flatten", "avgpool", "batchnorm", "scale"])
def test_first_layer_behind_an_input_op_is_local(pre):
    """A local layer whose input is computed from the placeholder (flatten, pooling, an input
    BatchNorm, arithmetic) must still run the local update in the prefix."""
    torch.manual_seed(0)
    if pre == "flatten":
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    else:
        first = {"avgpool": nn.AvgPool2d(2), "batchnorm": nn.BatchNorm2d(1), "scale": None}[pre]

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.pre = first
                self.conv = nn.Conv2d(1, 3, 3, padding=1)
                self.fc = nn.Linear(3, 3)

            def forward(self, x):
                h = self.pre(x) if self.pre is not None else x * 2.0
                return self.fc(torch.flatten(F.adaptive_avg_pool2d(torch.relu(self.conv(h)), 1), 1))

        model = Net()
    model = model.double()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    facts = check_local_step(model, x, 1, rule="oja", lr=0.1)
    gm = facts["lm"].graph_module
    assert len(fused_nodes(gm)) == 1
    assert not gm.meta[PARTITION_META].outside_local_sites


# ------------------------------------------------------------------ dead-code elimination
def test_dce_keeps_a_fused_update_whose_output_is_unused():
    conv = nn.Conv2d(2, 3, 3)
    lr = torch.tensor(0.1)
    graph = fx.Graph()
    x = graph.placeholder("x")
    w = graph.get_attr("weight")
    b = graph.get_attr("bias")
    rate = graph.get_attr("lr")
    graph.call_function(LOCAL_UPDATE, (x, w, b, rate, "oja", [1, 1], [0, 0], [1, 1], 1, 1.0, None, 0))
    graph.output(x)
    root = nn.Module()
    root.weight, root.bias = conv.weight, conv.bias
    root.register_buffer("lr", lr)
    gm = fx.GraphModule(root, graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    assert len(fused_nodes(gm)) == 1
    before = conv.weight.detach().clone()
    with torch.no_grad():
        gm(torch.randn(2, 2, 5, 5))
    assert not torch.equal(before, conv.weight.detach())


def test_dce_on_emitted_graph_keeps_unused_local_branch():
    """A local conv whose output feeds nothing (a dead branch of the original model) still updates
    after dead-code elimination of the emitted graph."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(1, 2, 3)
            self.dead = nn.Conv2d(2, 2, 1)
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            h = self.a(x)
            self.dead(h)       # result unused
            return self.fc(h.mean((2, 3)))

    model = Net()
    lm = compile_localsgd(model, rule="hebbian", schedule="manual", local_lr=0.1, weak_supervision="off",
                          sample_fraction=1.0)
    assert lm.layer_order.names == ["a", "dead", "fc"]
    lm.set_transition(2)
    gm = lm.graph_module
    gm.graph.eliminate_dead_code()
    gm.recompile()
    assert len(fused_nodes(gm)) == 2
    before = model.dead.weight.detach().clone()
    lm(torch.randn(2, 1, 6, 6)).sum().backward()
    assert not torch.equal(before, model.dead.weight.detach())


# --------------------------------------------------------------------------------- zoo
try:
    import models_zoo
    ZOO = models_zoo.list_models()
except (ImportError, AttributeError):   # pragma: no cover - the zoo is written by a colleague
    models_zoo, ZOO = None, []

#: zoo models whose reference forward/backward dominates the run time (still run, but labelled)
ZOO_SLOW = {"resnet18", "resnet34", "resnet50", "vgg11_bn", "vgg16_bn", "densenet_bc", "mobilenetv2", "resnet56",
            "wrn16_4"}
needs_zoo = pytest.mark.skipif(models_zoo is None, reason="models_zoo.list_models is not available yet")


def _zoo_model(name: str, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = models_zoo.get_model(name, num_classes=10, in_channels=1).to(dtype).train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()              # deterministic; dropout is no part of the pass
    randomize_batchnorm(model, torch.Generator().manual_seed(1))
    return model


@needs_zoo
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ZOO_SLOW else n for n in ZOO])
def test_zoo_model_matches_reference_and_saves_nothing_from_prefix(name):
    model = _zoo_model(name)
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    init = clone_state(model)
    ref = copy.deepcopy(model)
    out_ref = ref(x)
    gout = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(3))
    (out_ref * gout).sum().backward()
    ref_grads, ref_buffers = grads(ref), dict(ref.named_buffers())

    lm = compile_localsgd(model, rule="hebbian", schedule="manual", weak_supervision="off", local_lr=0.01,
                          sample_fraction=1.0)
    n_layers = len(lm.layer_order)
    tol = dict(rtol=1e-4, atol=1e-5)

    out0, _, saved0 = run_recording_saved(lm.graph_for(0), x)
    assert_close(out0, out_ref)
    (out0 * gout).sum().backward()
    for pname, p in model.named_parameters():
        assert_close(p.grad, ref_grads[pname], **tol, msg=f"t=0 gradient of {pname}")
    bytes0 = saved_bytes(saved0)
    del out0, saved0

    for t in sorted({1, n_layers // 2, n_layers - 1}):
        model.load_state_dict(init)
        model.zero_grad(set_to_none=True)
        lm.set_transition(t)
        gm = lm.graph_for(t)
        gm.graph.lint()
        out, rec, saved = run_recording_saved(gm, x)
        assert_close(out, out_ref, msg=f"t={t} output")
        local = lm.layer_order.names[:t]
        check_nothing_saved_from_prefix(gm, rec, saved,
                                        forbidden_tensors=[model.get_submodule(n).weight for n in local])
        assert saved_bytes(saved) < bytes0, f"t={t}: saved {saved_bytes(saved)} >= {bytes0} bytes at t=0"
        del rec, saved
        (out * gout).sum().backward()
        prefix, _ = expected_prefix(ref, local)
        assert set(gm.meta[PARTITION_META].prefix) == prefix
        no_grad = prefix_parameters(ref, prefix)
        assert {f"{n}.weight" for n in local} <= no_grad
        for pname, p in model.named_parameters():
            if pname in no_grad:
                assert p.grad is None, f"t={t}: prefix parameter {pname} got a gradient"
            else:
                assert_close(p.grad, ref_grads[pname], **tol, msg=f"t={t} gradient of {pname}")
        for bname, b in model.named_buffers():
            assert_close(b, ref_buffers[bname], msg=f"t={t} buffer {bname}")
        for pname, value in init.items():      # only local weights moved
            if pname.endswith(".weight") and pname[:-7] in local:
                assert not torch.equal(value, model.state_dict()[pname]), f"{pname} did not move"


@needs_zoo
@pytest.mark.parametrize("name,rule", [("smallcnn", "hebbian"), ("resnet20", "oja"), ("mobilenetv2", "softhebb")])
def test_zoo_rule_updates_match_reference(name, rule):
    model = _zoo_model(name, torch.float64)
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t = {"smallcnn": 3, "resnet20": 7, "mobilenetv2": 6}[name]
    check_local_step(model, x, t, rule=rule, lr=0.05)


# ------------------------------------------------------------------------------ golden
class TinyResNet(nn.Module):
    """Three convs with a residual connection, BatchNorm and a Linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        r = F.relu(self.bn2(self.conv2(h)))
        h = F.relu(h + self.conv3(r))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


@pytest.mark.parametrize("t", [1, 2, 3])
def test_golden_rewritten_code(t):
    lm = compile_localsgd(TinyResNet(), rule="hebbian", schedule="manual", sample_fraction=1.0)
    lm.set_transition(t)
    check_golden(lm.graph_module.code, GOLDEN / f"tiny_resnet_t{t}.py.txt")


def test_golden_model_runs_and_matches_reference():
    torch.manual_seed(0)
    model = TinyResNet().double()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    for t in range(4):
        check_local_step(copy.deepcopy(model), x, t, rule="hebbian")
        check_saved(copy.deepcopy(model), x, max(t, 1))


# ------------------------------------------------------------------- the passes directly
def test_find_layers_orders_shortcut_beside_first_conv_and_counts_flops():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_a = nn.Conv2d(2, 4, 3, stride=2, padding=1)
            self.conv_b = nn.Conv2d(4, 4, 3, padding=1)
            self.shortcut = nn.Conv2d(2, 4, 1, stride=2)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            h = self.conv_b(torch.relu(self.conv_a(x))) + self.shortcut(x)
            return self.fc(h.mean((2, 3)))

    x = torch.randn(2, 2, 8, 8)
    order = find_layers(trace(Block()), (x,))
    assert order.names == ["conv_a", "shortcut", "conv_b", "fc"]
    assert [layer.depth for layer in order.layers] == [0, 0, 1, 2]
    assert order.layers[0].flops == 2 * (4 * 4 * 4) * (2 * 9)
    assert order.layers[1].flops == 2 * (4 * 4 * 4) * 2
    assert order.layers[3].flops == 2 * 3 * 4
    shares = order.flop_shares()
    assert shares is not None and abs(sum(shares) - 1) < 1e-12
    assert order.local_fraction(2) == pytest.approx(shares[0] + shares[1])
    table = format_table(layer_rows(order, 2), LAYER_COLUMNS)
    assert "LOCAL" in table.splitlines()[2] and "SGD" in table.splitlines()[-1]


def test_partition_and_rewrite_direct():
    model = TinyResNet()
    gm = trace(model)
    order = find_layers(gm)
    assert partition(gm, order, 0).prefix == frozenset()
    part = partition(gm, order, 2)
    assert set(part.local_layers) == {"conv1", "conv2"}
    assert {"conv1", "bn1", "relu", "conv2", "bn2", "relu_1"} == set(part.prefix)
    assert set(part.crossing) == {"relu", "relu_1"}
    for bad in (-1, 5, 1.5):
        with pytest.raises(LocalSGDError, match="out of range"):
            check_transition(order, bad)
    spec = LocalUpdateSpec(op=LOCAL_UPDATE, lr=torch.tensor(0.0), rule="hebbian")
    new = rewrite(gm, order, 2, spec)
    new.graph.lint()
    assert new.meta[PARTITION_META] == part
    assert len(fused_nodes(new)) == 2
    x = torch.randn(2, 1, 6, 6)
    model.eval()
    assert_close(new(x), gm(x))            # lr 0: nothing moves, same function
    same = rewrite(gm, order, 0, spec)
    assert not fused_nodes(same)
    assert_close(same(x), gm(x))
    dot = to_dot(new)
    assert dot.startswith('digraph "localsgd"') and "penwidth" in dot and dot.rstrip().endswith("}")


def test_to_dot_reads_node_roles_from_the_rewrite_meta_not_from_names():
    class Named(nn.Module):   # user nodes whose names look like the rewrite's own
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2, self.fc = nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3), nn.Linear(2, 3)
            self.out_detached, self.grad_enabled = nn.ReLU(), nn.Identity()

        def forward(self, x):
            h = self.conv2(torch.relu(self.conv1(x)))
            return self.fc(self.grad_enabled(self.out_detached(h)).mean((2, 3)))

    gm = trace(Named())
    new = rewrite(gm, find_layers(gm), 1, LocalUpdateSpec(op=LOCAL_UPDATE, lr=torch.tensor(0.0), rule="hebbian"))
    roles = {n.name: n.meta.get(ROLE_META) for n in new.graph.nodes}
    assert roles["conv1"] == "local_update" and roles["relu_detached"] == "crossing"
    assert sorted(r for r in roles.values() if r == "grad_mode") == ["grad_mode"] * 3
    assert roles["out_detached"] is None and roles["grad_enabled"] is None
    lines = {line.split('"')[1]: line for line in to_dot(new).splitlines()
             if line.startswith('  "') and "->" not in line}
    assert REGION_COLOURS["local"] in lines["conv1"] and "penwidth" in lines["conv1"]
    assert REGION_COLOURS["crossing"] in lines["relu_detached"]
    for name in ("out_detached", "grad_enabled", "conv2"):
        assert REGION_COLOURS["sgd"] in lines[name] and "penwidth" not in lines[name], name


def test_speed_bound_formula():
    assert speed_bound(0.0) == 1.0
    assert speed_bound(1.0) == pytest.approx(1.5)
    assert speed_bound(0.5) == pytest.approx(3 / 2.5)
    assert speed_bound(1.0, gemms=0) == pytest.approx(3.0)
    assert speed_bound(0.5, gemms=0) == pytest.approx(3 / 2)
    assert speed_bound(1.0, sample_fraction=0.5) == pytest.approx(3 / 1.5)
