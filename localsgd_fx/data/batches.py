"""The batch iterator: shuffling and augmentation (random crop, flip) that depend only on ``(seed, epoch)``."""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from .dataset import ImageDataset

__all__ = ["Batches"]


def _epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed that depends only on ``(seed, epoch)``."""
    words = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch)]).generate_state(
        2, np.uint32
    )
    return (int(words[0]) << 31) ^ int(words[1])


class Batches:
    """Shuffling, augmenting batch iterator over an :class:`ImageDataset`.

    The order and the augmentation of epoch ``e`` are drawn from a local ``torch.Generator``
    seeded from ``(seed, e)`` only, so ``batches.epoch(e)`` yields the same batches whenever it
    is called -- a run resumed at epoch ``e`` continues exactly. Augmentation (random crop from
    the zero-padded image, random horizontal flip) is one vectorised gather on the uint8 batch;
    it is then converted to float32 and normalised with the dataset's mean/std. The random
    numbers are drawn on the CPU, so CPU and GPU runs see identical batches.

    Args:
        dataset: The data.
        batch_size: Samples per batch.
        shuffle: Shuffle the order each epoch (else dataset order).
        augment: Apply random crop (and flip) augmentation.
        crop_padding: Zero padding on each side before the random crop (0 disables cropping).
        flip: With ``augment``, flip each image horizontally with probability 1/2.
        drop_last: Drop the final incomplete batch.
        seed: Base seed.
        device: Where the batches are produced (the images are copied there once).
        shard, num_shards: Data-parallel training: every batch (``batch_size`` samples, the
            global batch) is cut into ``num_shards`` contiguous parts whose sizes differ by at
            most one, and this iterator yields part ``shard``. All shards share the epoch's
            order and augmentation, so together they see exactly the unsharded batches. A part
            is empty only in a last batch smaller than ``num_shards``.

    Example:
        >>> ds = ImageDataset("toy", torch.zeros(10, 1, 4, 4, dtype=torch.uint8),
        ...                   torch.arange(10) % 2, 2, (0.0,), (1.0,))
        >>> b = Batches(ds, 4, augment=True, seed=1)
        >>> len(b), [tuple(x.shape) for x, _ in b.epoch(3)]
        (3, [(4, 1, 4, 4), (4, 1, 4, 4), (2, 1, 4, 4)])
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        augment: bool = False,
        crop_padding: int = 4,
        flip: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        device: str | torch.device = "cpu",
        shard: int = 0,
        num_shards: int = 1,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard must be in 0..num_shards-1 = 0..{num_shards - 1}, got {shard}")
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.augment = augment
        self.crop_padding = int(crop_padding)
        self.flip = flip
        self.drop_last = drop_last
        self.seed = int(seed)
        self.device = torch.device(device)
        self.shard, self.num_shards = int(shard), int(num_shards)
        self._images = dataset.images.to(self.device)
        self._labels = dataset.labels.to(self.device)
        c = dataset.images.shape[1]
        std = torch.tensor(dataset.std, dtype=torch.float32)
        mean = torch.tensor(dataset.mean, dtype=torch.float32)
        # x_norm = (x / 255 - mean) / std = x * scale + shift
        self._scale = (1.0 / (255.0 * std)).view(1, c, 1, 1).to(self.device)
        self._shift = (-mean / std).view(1, c, 1, 1).to(self.device)
        self._templates: tuple[Any, torch.Tensor] | None = None  # cache of _augment

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Same as ``epoch(0)`` (convenient for evaluation; use :meth:`epoch` for training)."""
        return self.epoch(0)

    def epoch(self, e: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate over the batches of epoch ``e``.

        Args:
            e: Epoch number; with the seed it fully determines order and augmentation.

        Returns:
            An iterator of ``(x, y)``: ``x`` float32 ``B x C x H x W`` normalised, ``y`` int64
            ``B``, both on ``device``.

        Example:
            >>> for x, y in batches.epoch(5):   # doctest: +SKIP
            ...     loss = model(x).cross_entropy(y)
        """
        n = len(self.dataset)
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, e))
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        offsets = flips = None
        if self.augment:
            p = self.crop_padding
            if p > 0:
                offsets = torch.randint(0, 2 * p + 1, (n, 2), generator=g)
            if self.flip:
                flips = torch.rand(n, generator=g) < 0.5
        stop = len(self) * self.batch_size if self.drop_last else n
        return self._iterate(order, offsets, flips, stop)

    def _iterate(
        self,
        order: torch.Tensor,
        offsets: torch.Tensor | None,
        flips: torch.Tensor | None,
        stop: int,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        dev = self.device
        order = order.to(dev)
        offsets = None if offsets is None else offsets.to(dev)
        flips = None if flips is None else flips.to(dev)
        for start in range(0, stop, self.batch_size):
            end = min(start + self.batch_size, stop)
            if self.num_shards > 1:
                start, end = self._shard_range(start, end)
            idx = order[start:end]
            x = self._images.index_select(0, idx)
            if offsets is not None or flips is not None:
                x = self._augment(
                    x,
                    None if offsets is None else offsets[start:end],
                    None if flips is None else flips[start:end],
                )
            xf = x.to(torch.float32).mul_(self._scale).add_(self._shift)
            yield xf, self._labels.index_select(0, idx)

    def _shard_range(self, start: int, end: int) -> tuple[int, int]:
        """This shard's part of positions ``start..end-1``: the first ``r`` parts get ``q + 1``."""
        q, r = divmod(end - start, self.num_shards)
        k = self.shard
        return start + k * q + min(k, r), start + (k + 1) * q + min(k + 1, r)

    def _augment(
        self, x: torch.Tensor, offsets: torch.Tensor | None, flips: torch.Tensor | None
    ) -> torch.Tensor:
        """Random crop (zero padding) and horizontal flip of a uint8 batch in one gather.

        ``offsets`` (``B x 2``, values in ``[0, 2 * crop_padding]``) are the top-left corners
        ``(dy, dx)`` of the crops in the padded images; ``flips`` (``B``, bool) mirrors the
        chosen crops. Output pixel ``[i, c, y, x]`` is ``padded[i, c, dy + y, dx + x']`` with
        ``x' = w - 1 - x`` if flipped else ``x``, gathered with a single ``index_select`` on
        the flattened padded batch (faster than per-axis gathers or advanced indexing).
        """
        b, c, h, w = x.shape
        p = self.crop_padding if offsets is not None else 0
        if p > 0:
            padded = x.new_zeros(b, c, h + 2 * p, w + 2 * p)
            padded[:, :, p:p + h, p:p + w] = x
        else:
            padded = x
        hp, wp = padded.shape[2], padded.shape[3]
        itype = torch.int32 if padded.numel() < 2**31 else torch.int64
        key = (c, h, w, hp, wp, itype, x.device)
        if self._templates is None or self._templates[0] != key:
            # flat offsets of an unflipped / flipped h x w window at (0, 0) of a padded image
            ch = torch.arange(c, device=x.device).view(c, 1, 1) * (hp * wp)
            row = torch.arange(h, device=x.device).view(1, h, 1) * wp
            col = torch.arange(w, device=x.device).view(1, 1, w)
            tmpl = torch.stack([(ch + row + col).reshape(-1),
                                (ch + row + (w - 1 - col)).reshape(-1)])
            self._templates = (key, tmpl.to(itype))
        tmpl = self._templates[1]
        start = torch.arange(b, device=x.device) * (c * hp * wp)
        if offsets is not None and p > 0:
            start = start + offsets[:, 0] * wp + offsets[:, 1]
        window = tmpl[flips.long()] if flips is not None else tmpl[0].expand(b, -1)
        index = (start.to(itype)[:, None] + window).reshape(-1)
        return padded.reshape(-1).index_select(0, index).view(b, c, h, w)
