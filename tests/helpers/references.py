"""Independent references: the local rules written out with an explicit im2col, and weak supervision in
exact rational arithmetic. Nothing here calls the library's numerics."""
from __future__ import annotations

import functools
import itertools
import math
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

LAYER_CLASSES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def explicit_padding(module: nn.Module, dims: int) -> list[tuple[int, int]]:
    """(left, right) zero/mode padding per spatial dim, as nn.Conv*d applies it."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return [(0, 0)] * dims
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in module.padding]


def pad_input(x: torch.Tensor, pads: list[tuple[int, int]], mode: str = "zeros") -> torch.Tensor:
    flat = [v for pair in reversed(pads) for v in pair]
    if not any(flat):
        return x
    return F.pad(x, flat) if mode == "zeros" else F.pad(x, flat, mode=mode)


def im2col(xp: torch.Tensor, kernel, stride, dilation, use_unfold: bool | None = None) -> torch.Tensor:
    """``(N, C·prod(K), L)`` columns of an already padded input, channel-major like the weight."""
    dims = xp.dim() - 2
    if use_unfold is None:
        use_unfold = dims == 2
    if use_unfold:
        return F.unfold(xp, tuple(kernel), dilation=tuple(dilation), stride=tuple(stride))
    out = [(xp.shape[2 + i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(dims)]
    patches = []
    for offs in itertools.product(*[range(k) for k in kernel]):
        sl = [slice(None), slice(None)] + [slice(o * dl, o * dl + st * (n - 1) + 1, st)
                                           for o, dl, st, n in zip(offs, dilation, stride, out)]
        patches.append(xp[tuple(sl)])
    cols = torch.stack(patches, dim=2)                     # (N, C, prod K, *out)
    n, c = xp.shape[:2]
    return cols.reshape(n, c * math.prod(kernel), math.prod(out))


class RefGeometry:
    """Reference ``<P ⊗ X>`` and channel means for one layer call, from first principles."""

    def __init__(self, x: torch.Tensor, weight_shape, *, stride=(), pads=(), dilation=(), groups=1,
                 padding_mode="zeros", use_unfold: bool | None = None):
        self.weight_shape = tuple(weight_shape)
        self.linear = len(self.weight_shape) == 2
        if self.linear:
            self.cols = x.reshape(-1, x.shape[-1])           # (R, in)
        else:
            kernel = self.weight_shape[2:]
            xp = pad_input(x, list(pads), padding_mode)
            self.cols = im2col(xp, kernel, stride, dilation, use_unfold)   # (N, C·K, L)
            self.groups = groups

    def flat(self, y: torch.Tensor) -> torch.Tensor:
        """``(R, O)`` for linear, ``(N, O, L)`` for convs."""
        return y.reshape(-1, y.shape[-1]) if self.linear else y.reshape(y.shape[0], y.shape[1], -1)

    def forward(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer output ``(R, O)`` / ``(N, O, L)`` computed from the columns."""
        if self.linear:
            y = self.cols @ weight.t()
            return y if bias is None else y + bias
        o, g = weight.shape[0], self.groups
        ck = self.cols.shape[1] // g
        og = o // g
        outs = [torch.einsum("ok,nkl->nol", weight[i * og:(i + 1) * og].reshape(og, ck),
                             self.cols[:, i * ck:(i + 1) * ck]) for i in range(g)]
        y = torch.cat(outs, 1)
        return y if bias is None else y + bias.reshape(1, -1, 1)

    def correlate(self, post: torch.Tensor) -> torch.Tensor:
        """``<post ⊗ X>`` averaged over rows (linear) or batch x positions (conv); ``post`` flat."""
        if self.linear:
            return torch.einsum("ro,ri->oi", post, self.cols) / post.shape[0]
        n, o, length = post.shape
        g = self.groups
        ck, og = self.cols.shape[1] // g, o // g
        parts = [torch.einsum("nol,nkl->ok", post[:, i * og:(i + 1) * og], self.cols[:, i * ck:(i + 1) * ck])
                 for i in range(g)]
        return torch.cat(parts, 0).reshape(self.weight_shape) / (n * length)

    def channel_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Per-output-channel mean of a flat tensor, shaped to broadcast against the weight."""
        m = t.mean(0) if self.linear else t.mean((0, 2))
        return m.reshape(-1, *([1] * (len(self.weight_shape) - 1)))


def ref_new_weight(rule: str, weight: torch.Tensor, geom: RefGeometry, y: torch.Tensor, lr: float,
                   tau: float = 1.0) -> torch.Tensor:
    """docs/DESIGN.md §2 written out: the weight after one local step (``y`` flat, bias included)."""
    w = weight
    if rule == "freeze":
        return w.clone()
    if rule == "hebbian":
        new = w + lr * geom.correlate(y)
        old_norm = w.reshape(w.shape[0], -1).norm(dim=1)
        new_norm = new.reshape(w.shape[0], -1).norm(dim=1)
        return new * (old_norm / new_norm).reshape(-1, *([1] * (w.dim() - 1)))
    if rule == "oja":
        return w + lr * (geom.correlate(y) - geom.channel_mean(y * y) * w)
    if rule == "softhebb":
        s = torch.softmax(y / tau, dim=1)
        return w + lr * (geom.correlate(s) - geom.channel_mean(s * y) * w)
    raise ValueError(rule)


def module_geometry(module: nn.Module, x: torch.Tensor, use_unfold: bool | None = None) -> RefGeometry:
    """The reference geometry of a call of ``module`` (conv padding mode and 'same' included)."""
    if isinstance(module, nn.Linear):
        return RefGeometry(x, module.weight.shape)
    dims = len(module.kernel_size)
    return RefGeometry(x, module.weight.shape, stride=module.stride, pads=explicit_padding(module, dims),
                       dilation=module.dilation, groups=module.groups, padding_mode=module.padding_mode,
                       use_unfold=use_unfold)


class CallRecorder:
    """Forward hooks recording the (input, output) of every call of the given modules."""

    def __init__(self, model: nn.Module, names):
        self.calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in names}
        self.handles = []
        for name in names:
            def hook(mod, args, out, name=name):
                self.calls[name].append((args[0].detach().clone(), out.detach().clone()))
            self.handles.append(model.get_submodule(name).register_forward_hook(hook))

    def remove(self):
        for h in self.handles:
            h.remove()


def reference_rates(mode: str, losses, base: float, beta=Fraction(9, 10)) -> tuple[list[float], list[bool]]:
    """Weak supervision (docs/DESIGN.md §3) as written: the local rate η_s for s = 0..len(losses)
    from losses[:s] only, in exact rational arithmetic; and for each step whether the float32
    implementation may legitimately decide otherwise (a loss within rounding of its average after a
    non-constant history). The sign mode compares a loss with the average *before* it."""
    out, ambiguous = [base], [False]
    ema, lr, history = None, base, []
    for loss in losses:
        amb = False
        if math.isfinite(loss):
            value = Fraction(float(torch.tensor(loss, dtype=torch.float32)))
            prev = value if ema is None else ema
            ema = beta * prev + (1 - beta) * value
            history.append(value)
            if mode == "sign":
                lr = base if value <= ema else -base
                flat = all(h == value for h in history)
                amb = not flat and abs(value - prev) <= Fraction(1, 10**4) * max(1, abs(value))
            elif mode == "scale":
                lr = base * float(min(Fraction(1), ema / max(value, Fraction(1, 10**12))))
            else:
                lr = base
        out.append(lr)
        ambiguous.append(amb)
    return out, ambiguous


def transposed_cols(x: torch.Tensor, kernel, stride, padding, dilation, output_padding) -> torch.Tensor:
    """``(N, C·prod(K), L_out)`` columns of a transposed conv: column ``p`` holds, for each input channel
    and kernel offset ``k``, the input at the position ``q`` with ``q·s - pad + k·d = p`` (0 where none)."""
    dims = x.dim() - 2
    size_in = x.shape[2:]
    size_out = [(size_in[i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel[i] - 1) + output_padding[i] + 1
                for i in range(dims)]
    patches = []
    for offs in itertools.product(*[range(k) for k in kernel]):
        index, valid = [], []
        for i in range(dims):
            num = torch.arange(size_out[i]) + padding[i] - offs[i] * dilation[i]
            q = torch.div(num, stride[i], rounding_mode="floor")
            index.append(q.clamp(0, size_in[i] - 1))
            valid.append((num % stride[i] == 0) & (q >= 0) & (q < size_in[i]))
        grids = torch.meshgrid(*index, indexing="ij")
        mask = functools.reduce(lambda a, b: a & b, torch.meshgrid(*valid, indexing="ij"))
        patches.append(x[(slice(None), slice(None), *grids)] * mask.to(x.dtype))
    cols = torch.stack(patches, dim=2)                     # (N, C, prod K, *out)
    n, c = x.shape[:2]
    return cols.reshape(n, c * math.prod(kernel), math.prod(size_out))


def filter_major(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A transposed conv weight ``(C_in, C_out/g, *k)`` as ``(C_out, C_in/g, *k)``: row ``o`` is what feeds output
    channel ``o`` (written out channel by channel)."""
    c_in, c_out_g = weight.shape[:2]
    c_in_g = c_in // groups
    return torch.stack([weight[(o // c_out_g) * c_in_g:(o // c_out_g + 1) * c_in_g, o % c_out_g]
                        for o in range(c_out_g * groups)])


class RefTransposedGeometry(RefGeometry):
    """:class:`RefGeometry` of a transposed conv call: its columns, and the weight seen filter-major."""

    def __init__(self, x: torch.Tensor, weight_shape, *, stride, padding, dilation, output_padding, groups=1):
        c_in, c_out_g, *kernel = weight_shape
        self.weight_shape = (c_out_g * groups, c_in // groups, *kernel)
        self.linear = False
        self.groups = groups
        self.cols = transposed_cols(x, kernel, stride, padding, dilation, output_padding)
