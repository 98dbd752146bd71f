"""Differential privacy of the NBI knowledge statistics (a site's sums and counts).

The unit of privacy is one *group* (>= K_min same-class images; groups are disjoint, so an
image is in exactly one), neighbouring datasets add or remove one group. A site's release is
its per-class cluster sums and counts (k-means seeds, or one federated Lloyd step):

* **float sums** (prototype sums, foreground/background token sums): each
  group's whole contribution, the vector of its per-cluster sums across all of them, is scaled
  to L2 <= ``clip`` (:func:`clip_factors`), so one group moves the float part by at most
  ``clip``; Gaussian noise of std ``noise_multiplier * clip`` is added to every entry.
* **counts** (groups per prototype slot, images per class, tokens per centroid): a group adds
  1 group, at most K_max images and at most K_max x N tokens, so its count vector has L2 <=
  :func:`count_sensitivity`; Gaussian noise of std ``noise_multiplier`` x that bound is added,
  then the counts are rounded and clamped at 0 (post-processing keeps the guarantee).

Each release is therefore two Gaussian mechanisms of the same noise multiplier
(:data:`MECHANISMS_PER_RELEASE`); the server composes them over every release with an RDP
accountant. Noise comes from the operating system's entropy (:func:`noise_generator`), never
from a seed the server knows, or the server could subtract it.

What this does not give: an *image*-level guarantee. Groups are drawn per refresh by a seeded
permutation of each class's images, so removing one image can regroup the others; the guarantee
holds for the group as the unit, given the site's grouping. An image-level one would need a
grouping that removing one image leaves intact elsewhere (e.g. groups from a keyed hash of
image ids), which is not built.

Pure torch; no Flower import.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

MECHANISMS_PER_RELEASE = 2  # the float sums and the counts


def max_group_size(group_size: int, min_group_size: int) -> int:
    """K_max: random groups are cut into chunks of K, a last chunk < K_min joins its neighbour.
    Under DP, larger (adaptive) groups are truncated to this, so the count bound holds."""
    return group_size + min_group_size - 1


def count_sensitivity(max_group: int, tokens_per_image: int) -> float:
    """L2 bound of one group's count vector: 1 group in one slot, <= K_max images of its class,
    <= K_max x N foreground/background tokens spread over the centroids (L2 <= L1)."""
    return float(np.sqrt(1 + max_group**2 + (max_group * tokens_per_image) ** 2))


def group_sq_norms(num_groups: int, blocks: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]) -> torch.Tensor:
    """Squared L2 norm of each group's contribution to per-cluster sums.

    Each block is (x [T, F] points, group [T] long group id of each point, assign [T] long
    cluster of each point, k clusters): the group's contribution to that block is its
    per-cluster sums [k, F]. Norms of all blocks add. Returns [num_groups].
    """
    out = torch.zeros(num_groups, dtype=torch.float64)
    for x, group, assign, k in blocks:
        if x.shape[0] == 0:
            continue
        sums = torch.zeros(num_groups * k, x.shape[1], dtype=torch.float64)
        sums.index_add_(0, group * k + assign, x.double())
        out += sums.pow(2).sum(1).view(num_groups, k).sum(1)
    return out


def clip_factors(sq_norms: torch.Tensor, clip: float) -> torch.Tensor:
    """min(1, clip / ||u_g||) per group: the scale that bounds each contribution to ``clip``."""
    norms = sq_norms.sqrt()
    return torch.where(norms > clip, clip / norms.clamp_min(1e-30), torch.ones_like(norms)).float()


def noise_generator() -> torch.Generator:
    """A generator seeded from the OS entropy pool (fresh per release)."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


def add_noise(
    stats: Mapping[str, np.ndarray],
    float_keys: Sequence[str],
    count_keys: Sequence[str],
    float_std: float,
    count_std: float,
    generator: torch.Generator,
) -> dict[str, np.ndarray]:
    """Gaussian noise on a release: N(0, float_std^2) on every float sum, N(0, count_std^2)
    on every count (then rounded, clamped at 0). Other keys pass unchanged; dtypes are kept."""
    out = dict(stats)
    for keys, std in ((float_keys, float_std), (count_keys, count_std)):
        for key in keys:
            value = stats[key]
            noise = torch.randn(value.shape, generator=generator, dtype=torch.float64).numpy() * std
            noisy = value.astype(np.float64) + noise
            out[key] = (np.clip(np.rint(noisy), 0, None) if value.dtype.kind in "iu" else noisy).astype(value.dtype)
    return out
