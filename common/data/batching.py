"""From a site's dataset to training batches: resize/normalise, batch augmentation, class-balanced batches.

* :func:`build_transform`: PIL image -> float tensor [3, S, S], ImageNet-normalised (the same
  for training and evaluation).
* :class:`BatchAugment`: endoscopy augmentation of a normalised batch [B, 3, H, W] on its
  device (dihedral or rotation, then brightness / contrast / saturation jitter).
* :class:`ClassBalancedBatchSampler`: batches of ~``batch_size / C`` images per present class
  (PaGKD's class groups), reproducible from ``(seed, epoch)``; with ``balanced=False`` plain
  shuffled batches (every image once per epoch, the site's own class balance), same interface.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from common.config import Augment
from common.data.base import IMAGENET_MEAN, IMAGENET_STD, DataError


def build_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> float tensor [3, S, S]: resized and normalised with ImageNet mean/std.

    The same for training and evaluation; training augmentation runs on whole batches,
    on the training device (:class:`BatchAugment`), not per image in the loader.
    """
    from torchvision.transforms import v2  # after `import common` (compat shim)

    if image_size < 1:
        raise DataError(f"image_size={image_size}: must be >= 1")
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((image_size, image_size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class BatchAugment(torch.nn.Module):
    """Endoscopy augmentation of a normalised batch [B, 3, H, W], as tensor ops on its device.

    Endoscopes have no canonical "up", so orientation is augmented, in one of two ways:

    * ``dihedral`` (default): one of the 8 exact 90-degree rotations / flips per image. Nothing is
      interpolated, so the fine texture that carries the class (pits of a ~5 px period, vessels
      under 1.5 px wide at 64 px) is kept exactly.
    * ``rotate``: any angle within +-``rotation_deg`` and random flips, one ``affine_grid`` +
      bilinear ``grid_sample`` (corners fill black, like the dark rim of the field of view). At
      64 px this removes about 62 % of an image's Laplacian energy; it is the paper's 448-px
      augmentation, kept for ``preset=paper``.

    Then brightness / contrast / saturation jitter by factors in [1 - color_jitter, 1 +
    color_jitter]. Hue is left alone: hue shifts change the tissue colour that carries the
    diagnosis. Per-image randomness comes from the ``generator`` (CPU), so a seeded run is
    reproducible on any device.
    """

    MODES = typing.get_args(Augment)  # ("dihedral", "rotate"): train.augment's choices

    def __init__(self, rotation_deg: float = 180.0, flips: bool = True, color_jitter: float = 0.0, mode: str = "dihedral"):
        super().__init__()
        if mode not in self.MODES:
            raise DataError(f"augmentation mode {mode!r} is not one of {list(self.MODES)}")
        self.rotation_deg, self.flips, self.color_jitter, self.mode = rotation_deg, flips, color_jitter, mode
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("luma", torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1), persistent=False)

    @staticmethod
    def dihedral(pixels: torch.Tensor, turns: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] (H == W), turns [B] in 0..3 quarter turns, flip [B] bool -> [B, 3, H, W]."""
        out = pixels.clone()
        for k in range(1, 4):
            chosen = turns == k
            if chosen.any():
                out[chosen] = torch.rot90(pixels[chosen], k, dims=(2, 3))
        out[flip] = out[flip].flip(3)
        return out

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        batch = images.shape[0]
        mean, std = self.mean.to(images), self.std.to(images)

        def uniform(low: float, high: float) -> torch.Tensor:
            return (torch.rand(batch, generator=generator) * (high - low) + low).to(images)

        pixels = images * std + mean  # [0, 1]: black fill and jitter act on real intensities
        if self.mode == "dihedral":
            turns = torch.randint(0, 4, (batch,), generator=generator).to(images.device)
            flip = (
                (torch.rand(batch, generator=generator) < 0.5).to(images.device)
                if self.flips
                else torch.zeros(batch, dtype=torch.bool, device=images.device)
            )
            pixels = self.dihedral(pixels, turns, flip)
        else:
            angle = uniform(-1.0, 1.0) * torch.pi * self.rotation_deg / 180.0
            flip_x = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0) if self.flips else torch.ones_like(angle)
            flip_y = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0) if self.flips else torch.ones_like(angle)
            cos, sin = torch.cos(angle), torch.sin(angle)
            zero = torch.zeros_like(angle)
            theta = torch.stack(
                [torch.stack([cos * flip_x, -sin * flip_y, zero], 1), torch.stack([sin * flip_x, cos * flip_y, zero], 1)], 1
            )  # [B, 2, 3]
            grid = torch.nn.functional.affine_grid(theta, list(pixels.shape), align_corners=False)
            pixels = torch.nn.functional.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if self.color_jitter > 0:
            low, high = 1.0 - self.color_jitter, 1.0 + self.color_jitter
            luma = self.luma.to(pixels)
            pixels = pixels * uniform(low, high).view(-1, 1, 1, 1)  # brightness
            mean_gray = (pixels * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)
            pixels = (pixels - mean_gray) * uniform(low, high).view(-1, 1, 1, 1) + mean_gray  # contrast
            gray = (pixels * luma).sum(1, keepdim=True)
            pixels = gray + (pixels - gray) * uniform(low, high).view(-1, 1, 1, 1)  # saturation
        return (pixels.clamp(0, 1) - mean) / std


class ClassBalancedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches with ~``batch_size / C`` images of each present class (PaGKD's class groups).

    Each class is drawn from its own reshuffled, cycled permutation: every image is used once
    before any repeats, and small classes repeat (sampling with replacement across passes).
    When ``batch_size`` is not a multiple of C, the extra slots go to random classes. The
    order depends only on ``(seed, epoch)``; call :meth:`set_epoch` each epoch.
    ``num_batches`` defaults to ``ceil(N / batch_size)``.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        batch_size: int,
        seed: int = 0,
        num_batches: int | None = None,
        balanced: bool = True,
    ) -> None:
        self.balanced = balanced
        labels_np = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64).reshape(-1)
        if labels_np.size == 0:
            raise DataError("ClassBalancedBatchSampler: labels is empty; the split has no images")
        if batch_size < 1:
            raise DataError(f"ClassBalancedBatchSampler: batch_size={batch_size} must be >= 1")
        if num_batches is not None and num_batches < 0:
            raise DataError(f"ClassBalancedBatchSampler: num_batches={num_batches} must be >= 0")
        self.labels = labels_np
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.epoch = 0
        self.classes = np.unique(labels_np)
        self._members = [np.flatnonzero(labels_np == c) for c in self.classes]
        self.num_batches = int(math.ceil(labels_np.size / batch_size)) if num_batches is None else int(num_batches)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch]))
        if not self.balanced:  # one permutation of the split, cut into batches
            order = rng.permutation(self.labels.size)
            for start in range(0, min(self.num_batches * self.batch_size, order.size), self.batch_size):
                yield [int(j) for j in order[start : start + self.batch_size]]
            return
        k = len(self.classes)
        base, extra = divmod(self.batch_size, k)
        queues = [np.empty(0, dtype=np.int64) for _ in range(k)]
        cursors = [0] * k
        for _ in range(self.num_batches):
            per_class = np.full(k, base)
            if extra:
                per_class[rng.choice(k, size=extra, replace=False)] += 1
            batch = []
            for i in range(k):
                need = int(per_class[i])
                while queues[i].size - cursors[i] < need:  # refill with a fresh permutation
                    queues[i] = np.concatenate([queues[i][cursors[i] :], rng.permutation(self._members[i])])
                    cursors[i] = 0
                batch.append(queues[i][cursors[i] : cursors[i] + need])
                cursors[i] += need
            yield [int(j) for j in rng.permutation(np.concatenate(batch))]
