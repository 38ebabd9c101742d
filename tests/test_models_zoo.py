"""Tests for models_zoo: registry, fx-traceability, shapes, parameter counts, structure."""
from __future__ import annotations

import pickle

import pytest
import torch
import torch.fx
from torch import nn

import models_zoo
from models_zoo import count_parameters, get_model, list_models

EXPECTED_NAMES = [
    "smallcnn", "resnet20", "resnet32", "resnet56", "resnet18", "resnet34", "resnet50",
    "vgg11_bn", "vgg16_bn", "mobilenetv2", "densenet_bc", "wrn16_4",
]
INPUTS = {"fmnist": (1, 28, 28), "cifar": (3, 32, 32)}
BATCH = 2


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Batch-2 forwards gain nothing from intra-op threads, and on 2 shared CPU cores
    OpenMP spin-waiting made this file ~10x slower; run single-threaded, then restore."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _input(shape: tuple[int, int, int], seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, *shape, generator=g)


def _built(name: str, in_channels: int, num_classes: int = 10) -> tuple[nn.Module, torch.fx.GraphModule]:
    """Freshly seeded eval-mode model and its symbolic trace (rebuilt per test: caching
    the big models costs more memory than the rebuild costs time)."""
    torch.manual_seed(0)
    model = get_model(name, num_classes=num_classes, in_channels=in_channels).eval()
    return model, torch.fx.symbolic_trace(model)


def test_list_models() -> None:
    assert list_models() == EXPECTED_NAMES
    list_models().append("junk")  # returns a copy
    assert list_models() == EXPECTED_NAMES


@pytest.mark.parametrize("data", list(INPUTS))
@pytest.mark.parametrize("name", list_models())
def test_trace_matches_eager_eval(name: str, data: str) -> None:
    shape = INPUTS[data]
    model, traced = _built(name, shape[0], 10)
    x = _input(shape)
    with torch.no_grad():
        eager, fx_out = model(x), traced(x)
    assert eager.shape == (BATCH, 10)
    assert torch.isfinite(eager).all()
    torch.testing.assert_close(fx_out, eager)


@pytest.mark.parametrize("name", list_models())
def test_trace_matches_eager_train(name: str) -> None:
    """Train mode: BN uses batch statistics, dropout is re-seeded, so outputs must match."""
    torch.manual_seed(0)
    model = get_model(name, in_channels=3).train()
    traced = torch.fx.symbolic_trace(model)
    assert traced.training
    x = _input(INPUTS["cifar"])
    with torch.no_grad():
        torch.manual_seed(123)
        eager = model(x)
        torch.manual_seed(123)
        fx_out = traced(x)
    torch.testing.assert_close(fx_out, eager)


@pytest.mark.parametrize("name", list_models())
def test_traced_model_pickles(name: str) -> None:
    """A traced zoo model survives pickle (string annotations once broke GraphModule.__reduce__)."""
    model, traced = _built(name, 1, 10)
    loaded = pickle.loads(pickle.dumps(traced))
    x = _input(INPUTS["fmnist"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), traced(x), rtol=0, atol=0)


def test_traced_gradients_match_eager() -> None:
    torch.manual_seed(0)
    model = get_model("smallcnn", in_channels=1).train()
    traced = torch.fx.symbolic_trace(model)
    x, y = _input(INPUTS["fmnist"]), torch.tensor([3, 7])
    grads = []
    for m in (model, traced):
        m.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    assert all(g is not None for g in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("name", list_models())
def test_output_shape(name: str, num_classes: int) -> None:
    data = "cifar" if num_classes == 10 else "fmnist"  # both inputs x 10 classes are covered above
    shape = INPUTS[data]
    model, _ = _built(name, shape[0], num_classes)
    with torch.no_grad():
        out = model(_input(shape))
    assert out.shape == (BATCH, num_classes)


@pytest.mark.parametrize("name", list_models())
def test_structure(name: str) -> None:
    """At least one conv, the last learnable layer (in execution order) is the Linear
    classifier, and every module is called at exactly one site of the traced graph."""
    model, traced = _built(name, 3, 10)
    targets = [n.target for n in traced.graph.nodes if n.op == "call_module"]
    assert len(targets) == len(set(targets)), "a module instance is called at two sites"
    mods = dict(model.named_modules())
    assert any(isinstance(mods[t], nn.Conv2d) for t in targets)
    learnable = [t for t in targets if any(True for _ in mods[t].parameters(recurse=False))]
    last = mods[learnable[-1]]
    assert isinstance(last, nn.Linear) and last.out_features == 10
    # every Conv/Linear of the model is discovered as a call_module site
    layers = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert layers <= set(targets)
    # and all parameters belong to modules that are actually called
    called_params = sum(p.numel() for t in set(targets) for p in mods[t].parameters(recurse=False))
    assert called_params == count_parameters(model)


def test_standard_init() -> None:
    torch.manual_seed(0)
    model = get_model("resnet20")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
    conv = model.layer3[0].conv2  # 64 -> 64, 3x3: kaiming fan_out std = sqrt(2 / (64*9))
    assert abs(conv.weight.std().item() - (2 / (64 * 9)) ** 0.5) < 0.01


def test_seeded_construction_is_deterministic() -> None:
    torch.manual_seed(5)
    a = get_model("smallcnn").state_dict()
    torch.manual_seed(5)
    b = get_model("smallcnn").state_dict()
    for k in a:
        assert torch.equal(a[k], b[k])


def test_imagenet_resnet_param_counts() -> None:
    # torchvision reference values
    assert count_parameters(get_model("resnet18", 1000, 3, stem="imagenet")) == 11_689_512
    assert count_parameters(get_model("resnet50", 1000, 3, stem="imagenet")) == 25_557_032


def test_resnet20_param_count() -> None:
    n = count_parameters(get_model("resnet20"))
    # 269,722 with option-A shortcuts + 2 option-B projections (576 + 2,176) = 272,474
    assert n == 272_474
    assert 260_000 <= n <= 280_000


def test_resnet_stems() -> None:
    cifar = get_model("resnet18", in_channels=1)
    imnet = get_model("resnet18", in_channels=1, stem="imagenet")
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity)
    assert imnet.conv1.kernel_size == (7, 7) and imnet.conv1.stride == (2, 2)
    assert isinstance(imnet.maxpool, nn.MaxPool2d)
    imnet.eval()
    with torch.no_grad():
        assert imnet(_input(INPUTS["fmnist"])).shape == (BATCH, 10)
    with pytest.raises(ValueError, match="stem"):
        get_model("resnet18", stem="tiny")


def test_cifar_resnet_shortcuts_are_conv_or_identity() -> None:
    model = get_model("resnet56")
    for block in model.modules():
        if isinstance(block, models_zoo.resnet_cifar.CifarBasicBlock):
            sc = block.shortcut
            assert isinstance(sc, nn.Identity) or isinstance(sc[0], nn.Conv2d)


def test_model_options() -> None:
    small = get_model("densenet_bc", depth=40)
    assert count_parameters(small) < count_parameters(get_model("densenet_bc"))
    assert count_parameters(get_model("mobilenetv2", width_mult=0.5)) < 2_236_682
    wrn = get_model("wrn16_4", dropout=0.3)
    assert any(isinstance(m, nn.Dropout) and m.p == 0.3 for m in wrn.modules())
    with pytest.raises(ValueError, match="6n\\+4"):
        get_model("densenet_bc", depth=41)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError) as exc:
        get_model("resnet-20")
    msg = str(exc.value)
    assert "resnet-20" in msg and "Did you mean 'resnet20'" in msg
    for name in EXPECTED_NAMES:
        assert name in msg


def test_name_is_case_insensitive() -> None:
    assert isinstance(get_model("SmallCNN"), models_zoo.SmallCNN)


def test_unknown_kwarg_is_clear() -> None:
    with pytest.raises(TypeError, match="stem") as exc:
        get_model("resnet20", stem="imagenet")
    assert "resnet20" in str(exc.value)
    with pytest.raises(TypeError, match="width_mult"):
        get_model("resnet18", width_mult=2.0)


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_bad_num_classes(bad) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        get_model("smallcnn", num_classes=bad)
