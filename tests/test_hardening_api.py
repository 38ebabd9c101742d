"""LocalSGDModule behaviour asked for by issue 22 (hardening, round two).

# NOTE FOR THE API OWNER: these tests pin behaviour of localsgd_fx/api.py that the issue-22 branch fixed with
# small edits (set_transition honours max_local, compile_localsgd refuses max_local = the layer count,
# _measure_flops waits for a good first call, end_epoch without a training step keeps t). They must keep
# passing through the LocalSGDModule refactor.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from localsgd_fx import Dynamic, LocalSGDError, compile_localsgd

pytestmark = pytest.mark.single_thread


class Net(nn.Module):
    """conv-bn-relu x2, then a Linear head (3 layers)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def x(channels: int = 1) -> torch.Tensor:
    return torch.randn(4, channels, 6, 6, generator=torch.Generator().manual_seed(1))


def test_item3_max_local_leaves_a_layer_to_sgd():
    with pytest.raises(ValueError, match=r"max_local must be an int in 0\.\.2 \(this model has 3 layers\), got 3"):
        compile_localsgd(Net(), schedule="manual", max_local=3)
    lm = compile_localsgd(Net(), schedule="manual", max_local=1)
    with pytest.raises(LocalSGDError, match="transition 2 is past max_local=1"):
        lm.set_transition(2)
    assert lm.transition == 0
    lm.set_transition(1)
    loss = F.cross_entropy(lm(x()), torch.tensor([0, 1, 0, 1]))
    loss.backward()                                         # something is left to back-propagate


def test_item3_a_schedule_never_moves_past_max_local():
    lm = compile_localsgd(Net(), schedule=Dynamic(alpha=0.99, shift=99, beta=0.9, warmup_epochs=0), max_local=1)
    opt = torch.optim.SGD(lm.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(lm(x()), torch.tensor([0, 1, 0, 1])).backward()
        opt.step()
        assert lm.end_epoch() <= 1


def test_item9_a_bad_first_call_does_not_lose_the_flop_accounting():
    lm = compile_localsgd(Net(), schedule="manual")          # no example inputs: FLOPs from the first call
    with pytest.raises(Exception):
        lm(x(channels=3))                                   # wrong channel count
    lm(x())
    lm.set_transition(1)
    assert lm.local_fraction is not None and 0 < lm.local_fraction < 1
    assert lm.speed_bound is not None and lm.speed_bound > 1
    assert "p = ?" not in lm.explain(print_fn=None)


def test_item10_end_epoch_without_a_step_keeps_t():
    lm = compile_localsgd(Net(), schedule=Dynamic(alpha=0.3, shift=1, beta=0.9, warmup_epochs=1),
                          example_inputs=(x(),))
    for _ in range(4):
        assert lm.end_epoch() == 0                          # nothing trained: nothing to measure
    assert lm.transition == 0
