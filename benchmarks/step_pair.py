"""Plain SGD and the full local prefix of ResNet-20 (hebbian), one hand-written step each, interleaved.

For A/B comparisons between two checkouts (run it alternately from each, ``PYTHONPATH`` at the checkout): the
step is written out here rather than taken from the library, so both sides time the same code around the model.

    GOMP_SPINCOUNT=1000 PYTHONPATH=$PWD python3 benchmarks/step_pair.py
"""
import time

import torch
import torch.nn.functional as F

import models_zoo
from localsgd_fx import compile_localsgd

torch.manual_seed(0)
net = models_zoo.get_model("resnet20", 10, 1)
x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
lm = compile_localsgd(net, rule="hebbian", schedule="manual")
opt = torch.optim.SGD(lm.parameters(), lr=1e-3, momentum=0.9)
full = len(lm.layer_order) - 1


def step():
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(lm(x), y)
    loss.backward()
    opt.step()
    lm.observe_loss(loss.detach())


for t in (0, full):               # warm-up: graphs emitted, caches filled
    lm.set_transition(t, force=True)
    for _ in range(3):
        step()
times = {0: [], full: []}
for _ in range(9):
    for t in times:
        lm.set_transition(t, force=True)
        start = time.perf_counter()
        step()
        times[t].append(time.perf_counter() - start)
med = {t: 1e3 * sorted(v)[len(v) // 2] for t, v in times.items()}
print(f"sgd {med[0]:.1f} ms  t{full} {med[full]:.1f} ms  ratio {med[full] / med[0]:.3f}")
