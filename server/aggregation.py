"""Server-side aggregation: FedAvg of weights, exact sums of knowledge statistics, k-means
centroids of the NBI bank, and the screening of updates with absurd norms.

Inputs are validated payload arrays (numpy); outputs are numpy. The Lloyd update and k-means
themselves are :mod:`common.grouping`'s, so the server's codebook equals the pooled one.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from common.grouping import kmeans, update_centroids
from common.records import BANK_STATISTICS, Dims

State = dict[str, np.ndarray]


def weighted_average(states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> State:
    """FedAvg: sum_i w_i * state_i / sum_i w_i, per tensor; integer buffers (BatchNorm's
    ``num_batches_tracked``) are rounded back to their dtype."""
    if not states:
        raise ValueError("weighted_average needs at least one state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weighted_average: weights {list(weights)} sum to {total}")
    out: State = {}
    for name, first in states[0].items():
        acc = np.zeros(first.shape, dtype=np.float64)
        for state, weight in zip(states, weights):
            acc += state[name].astype(np.float64) * (weight / total)
        out[name] = np.rint(acc).astype(first.dtype) if first.dtype.kind in "iu" else acc.astype(first.dtype)
    return out


def update_norm(state: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of (state - reference) over the floating tensors."""
    squares = sum(
        float(np.sum((state[k].astype(np.float64) - reference[k].astype(np.float64)) ** 2))
        for k in reference
        if reference[k].dtype.kind == "f"
    )
    return float(np.sqrt(squares))


def norm_outliers(norms: Sequence[float], max_ratio: float) -> list[int]:
    """Indices of updates whose norm exceeds ``max_ratio`` x the median norm (a site that
    diverged or scaled its update). Needs at least 3 updates to have a meaningful median."""
    if len(norms) < 3:
        return []
    median = float(np.median(norms))
    return [i for i, n in enumerate(norms) if median > 0 and n > max_ratio * median]


def sum_statistics(replies: Sequence[Mapping[str, np.ndarray]], names: Sequence[str]) -> State:
    """Exact element-wise sums of the named arrays over sites (float64 accumulation, then
    the wire dtype), so the total equals one site holding all the data."""
    out: State = {}
    for name in names:
        first = replies[0][name]
        acc = np.zeros(first.shape, dtype=np.float64 if first.dtype.kind == "f" else np.int64)
        for reply in replies:
            acc += reply[name]
        out[name] = acc.astype(first.dtype)
    return out


def bank_statistics(replies: Sequence[Mapping[str, np.ndarray]]) -> State:
    """The knowledge bank: summed :data:`common.records.BANK_STATISTICS` of the NBI sites."""
    return sum_statistics(replies, [f.name for f in BANK_STATISTICS])


def empty_bank(dims: Dims) -> State:
    """A bank with no knowledge (every count 0): what a WLI-only student is sent."""
    return {f.name: np.zeros(dims.resolve(f.shape), dtype=f.dtype) for f in BANK_STATISTICS}


def _class_centroids(seed_sum: np.ndarray, seed_count: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k centroids for one class from the pooled seeds of all sites.

    seed_sum [P, F], seed_count [P] (P pooled seed clusters). The seed means are clustered
    with k-means (each seed weighted once); fewer than k seeds leave the rest zero (their
    slots then receive no points, or points only if nothing better exists).
    """
    means = seed_sum[seed_count > 0] / seed_count[seed_count > 0, None]
    out = np.zeros((k, seed_sum.shape[1]), dtype=np.float32)
    if len(means) == 0:
        return out
    centroids, _ = kmeans(torch.from_numpy(means.astype(np.float32)), k, 20, torch.Generator().manual_seed(seed))
    out[: len(centroids)] = centroids.numpy()
    if len(centroids) < k:  # too few seeds: repeat the last ones so every slot is a real location
        out[len(centroids):] = centroids.numpy()[np.arange(k - len(centroids)) % len(centroids)]
    return out


def initial_centroids(seed_replies: Sequence[Mapping[str, np.ndarray]], dims: Dims, seed: int) -> State:
    """Server's first codebooks from the sites' seeds: per class, k-means over all seeds."""
    out: State = {
        "prototype_centroids": np.zeros((dims.C, dims.S, dims.M, dims.D), np.float32),
        "foreground_centroids": np.zeros((dims.C, dims.L, dims.D), np.float32),
        "background_centroids": np.zeros((dims.C, dims.L, dims.D), np.float32),
    }
    for c in range(dims.C):
        for name, k in (("prototype", dims.S), ("foreground", dims.L), ("background", dims.L)):
            sums = np.concatenate([r[f"{name}_seed_sum"][c].reshape(k, -1) for r in seed_replies])
            counts = np.concatenate([r[f"{name}_seed_count"][c] for r in seed_replies])
            out[f"{name}_centroids"][c] = _class_centroids(sums, counts, k, seed + c).reshape(out[f"{name}_centroids"][c].shape)
    return out


def lloyd_centroids(bank: Mapping[str, np.ndarray], centroids: Mapping[str, np.ndarray], dims: Dims) -> State:
    """The federated Lloyd update: new centroid = summed points / summed count; empty keep."""
    out: State = {}
    for name, k in (("prototype", dims.S), ("foreground", dims.L), ("background", dims.L)):
        old = centroids[f"{name}_centroids"]
        sums = torch.from_numpy(bank[f"{name}_sum"].reshape(dims.C, k, -1))
        counts = torch.from_numpy(bank[f"{name}_count"])
        new = [update_centroids(sums[c], counts[c], torch.from_numpy(old[c].reshape(k, -1))) for c in range(dims.C)]
        out[f"{name}_centroids"] = torch.stack(new).numpy().reshape(old.shape).astype(np.float32)
    return out
