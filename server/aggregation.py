"""Server-side aggregation: FedAvg of weights, exact sums of knowledge statistics, k-means
centroids of the NBI bank, and the screening of updates with absurd norms.

Inputs are validated payload arrays (numpy); outputs are new numpy arrays (nothing passed in is
changed). On the server the bank is the *sums*: :data:`common.records.BANK_STATISTICS`, summed
over the NBI sites (what a student request carries); a site reads them as means
(:meth:`common.losses.KnowledgeBank.from_statistics`). Which statistics exist, and which sum goes
with which count, is :data:`common.records.KNOWLEDGE_STATISTICS`'s. The Lloyd update and k-means
themselves are :mod:`common.grouping`'s, so the server's codebook equals the pooled one.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from common.grouping import kmeans, update_centroids
from common import secagg
from common.records import (
    BANK_STATISTICS,
    CENTROIDS,
    KNOWLEDGE_STATISTICS,
    SUM_COUNT_PAIRS,
    Dims,
    Payload,
    PayloadError,
    empty_statistics,
    mean_of,
    validate,
)

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


def _cap(w: np.ndarray, max_share: float) -> float:
    """The share cap for weights ``w`` [n]: ``max_share``, or 1/m for m sites of weight > 0 if larger."""
    if len(w) == 0 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"site weights {w.tolist()} must be >= 0 and sum to > 0")
    return max(float(max_share), 1.0 / int((w > 0).sum()))


def capped_weights(weights: Sequence[float], max_share: float) -> list[float]:
    """The FedAvg weights [n] with no site's share over the cap: ``weights`` themselves when no
    share is over it (sites of similar size aggregate exactly as without a cap), else
    :func:`capped_shares`."""
    w = np.asarray(weights, dtype=np.float64)
    if not (w / w.sum() > _cap(w, max_share)).any():
        return [float(x) for x in weights]
    return capped_shares(w, max_share).tolist()


def capped_shares(weights: Sequence[float], max_share: float) -> np.ndarray:
    """Each site's share of a weighted aggregate: ``weights`` [n] (>= 0, the sites' own counts)
    normalised, with no share over ``max(max_share, 1/m)`` (m sites of weight > 0): a capped
    site's excess goes to the others in proportion to their weights. Shares already under the
    cap come back as ``weights / sum(weights)``. Returns [n] float64 summing to 1."""
    w = np.asarray(weights, dtype=np.float64)
    cap = _cap(w, max_share)
    capped = np.zeros(len(w), dtype=bool)
    while True:  # each pass caps at least one more site, so at most n passes
        free_mass = 1.0 - cap * capped.sum()
        free = w * ~capped
        shares = np.where(capped, cap, free * (free_mass / free.sum()) if free.sum() > 0 else 0.0)
        over = ~capped & (shares > cap * (1 + 1e-12))
        if not over.any():
            return shares
        capped |= over


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
    return empty_statistics(BANK_STATISTICS, dims)


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
        out[len(centroids) :] = centroids.numpy()[np.arange(k - len(centroids)) % len(centroids)]
    return out


def initial_centroids(seed_replies: Sequence[Mapping[str, np.ndarray]], dims: Dims, seed: int) -> State:
    """Server's first codebooks from the sites' seeds: per class and statistic, k-means over
    all sites' seed clusters -> :data:`common.records.CENTROIDS`."""
    out: State = empty_statistics(CENTROIDS, dims)
    for c in range(dims.C):
        for stat in KNOWLEDGE_STATISTICS:
            k = getattr(dims, stat.slots)
            sums = np.concatenate([r[stat.seed_sum][c].reshape(k, -1) for r in seed_replies])
            counts = np.concatenate([r[stat.seed_count][c] for r in seed_replies])
            out[stat.centroids][c] = _class_centroids(sums, counts, k, seed + c).reshape(out[stat.centroids][c].shape)
    return out


def lloyd_centroids(bank: Mapping[str, np.ndarray], centroids: Mapping[str, np.ndarray], dims: Dims) -> State:
    """The federated Lloyd update: new centroid = summed points / summed count; empty keep."""
    out: State = {}
    for stat in KNOWLEDGE_STATISTICS:
        k = getattr(dims, stat.slots)
        old = centroids[stat.centroids]
        sums = torch.from_numpy(bank[stat.sum].reshape(dims.C, k, -1))
        counts = torch.from_numpy(bank[stat.count])
        new = [update_centroids(sums[c], counts[c], torch.from_numpy(old[c].reshape(k, -1))) for c in range(dims.C)]
        out[stat.centroids] = torch.stack(new).numpy().reshape(old.shape).astype(np.float32)
    return out


# ------------------------------------------------------------------------------- robust aggregation

# The fed.aggregation choices. "mean" is FedAvg / exact sums; the robust ones are unweighted
# over sites on purpose: weights (num-examples, counts) are the sites' own claims, and a
# poisoned site could claim a huge one to buy the influence that the median / trimmed mean
# take away from it. Each honest site then counts once, whatever its size.
from common.config import AGGREGATIONS as ROBUST  # noqa: E402  (the rule names, listed once: common.config.Aggregation)


def _check_method(method: str, trim_fraction: float) -> None:
    if method not in ROBUST:
        raise ValueError(f"unknown aggregation method {method!r}: choose one of {ROBUST}")
    if method == "trimmed_mean" and not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trimmed_mean: trim_fraction {trim_fraction} is outside [0, 0.5)")


def _combine(stack: np.ndarray, method: str, trim_fraction: float, weights: np.ndarray | None = None) -> np.ndarray:
    """Coordinate-wise combination over sites: the one implementation of median / trimmed mean.

    stack [n, ...] float64 (n sites); weights [n] (only read by "mean"; None = unweighted).
    Returns [...] float64. "trimmed_mean" drops the floor(trim_fraction * n) largest and
    smallest values of each coordinate and averages the rest.
    """
    _check_method(method, trim_fraction)
    n = stack.shape[0]
    if n == 0:
        raise ValueError("robust aggregation needs at least one site")
    if method == "median":
        return np.median(stack, axis=0)
    if method == "trimmed_mean":
        cut = int(np.floor(trim_fraction * n))
        if n - 2 * cut < 1:  # unreachable for trim_fraction < 0.5; kept as the guard the contract states
            raise ValueError(f"trimmed_mean: trimming {cut} of each end of {n} values leaves nothing")
        return np.sort(stack, axis=0)[cut : n - cut].mean(axis=0)
    return np.average(stack, axis=0, weights=weights)


def clip_updates(
    states: Sequence[Mapping[str, np.ndarray]], reference: Mapping[str, np.ndarray], ratio: float
) -> tuple[list[State], list[float]]:
    """Norm clipping relative to the median: each update (state - reference over the floating
    tensors, one global L2 norm per state, :func:`update_norm`) is scaled to a norm of at most
    ``ratio`` x the median update norm. Integer tensors (``num_batches_tracked``) and tensors
    absent from ``reference`` pass unchanged.

    ``ratio <= 0`` is off, and a median norm of 0 leaves nothing to compare with (as in
    :func:`norm_outliers`): copies are returned unclipped. Returns (states, scale per state,
    1.0 where not clipped).
    """
    copies = [{k: np.array(v, copy=True) for k, v in state.items()} for state in states]
    if ratio <= 0 or not states:
        return copies, [1.0] * len(states)
    norms = [update_norm(state, reference) for state in states]
    bound = ratio * float(np.median(norms))
    if bound <= 0:
        return copies, [1.0] * len(states)
    out: list[State] = []
    scales: list[float] = []
    for state, copy, norm in zip(states, copies, norms):
        if norm <= bound:
            out.append(copy)
            scales.append(1.0)
            continue
        scale = bound / norm
        clipped: State = {}
        for name, value in state.items():
            if name in reference and value.dtype.kind == "f":
                base = reference[name].astype(np.float64)
                clipped[name] = (base + scale * (value.astype(np.float64) - base)).astype(value.dtype)
            else:
                clipped[name] = copy[name]
        out.append(clipped)
        scales.append(scale)
    return out, scales


def robust_average(
    states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], method: str, trim_fraction: float
) -> State:
    """Aggregate weights by ``method`` (one of :data:`ROBUST`).

    "mean" is :func:`weighted_average` (FedAvg). "median" and "trimmed_mean" are coordinate-wise
    over states and unweighted (a site cannot buy influence with a claimed num-examples; see
    :data:`ROBUST`). Integer buffers are rounded back to their dtype, as weighted_average does.
    """
    _check_method(method, trim_fraction)
    if not states:
        raise ValueError("robust_average needs at least one state")
    if len(weights) != len(states):
        raise ValueError(f"robust_average: {len(weights)} weights for {len(states)} states")
    if method == "mean":
        return weighted_average(states, weights)
    out: State = {}
    for name, first in states[0].items():
        acc = _combine(np.stack([state[name].astype(np.float64) for state in states]), method, trim_fraction)
        out[name] = np.rint(acc).astype(first.dtype) if first.dtype.kind in "iu" else acc.astype(first.dtype)
    return out


def aggregate_weights(
    states: Mapping[str, Sequence[Mapping[str, np.ndarray]]],
    weights: Sequence[float],
    globals_: Mapping[str, Mapping[str, np.ndarray]],
    method: str,
    trim_fraction: float,
    clip_ratio: float,
) -> tuple[dict[str, State], dict[str, list[float]]]:
    """New global weight blocks from the sites' ``states`` ({block: one state per site}): each
    block's updates clipped to ``clip_ratio`` x the median update norm against ``globals_``
    (:func:`clip_updates`, off for ``clip_ratio <= 0``), then :func:`robust_average`'d with the
    sites' ``weights``. -> ({block: new state}, {block: clip scale per site}, clipping on only);
    ``globals_`` is left as it was."""
    out: dict[str, State] = {}
    scales: dict[str, list[float]] = {}
    for block, block_states in states.items():
        block_states = list(block_states)
        if clip_ratio > 0:
            block_states, scales[block] = clip_updates(block_states, globals_[block], clip_ratio)
        out[block] = robust_average(block_states, weights, method, trim_fraction)
    return out, scales


def _robust_slot(means: np.ndarray, counts: np.ndarray, method: str, trim_fraction: float, clip_ratio: float) -> np.ndarray:
    """One (class, slot) of the bank: the sites' means [n, F] (n sites with count > 0), their
    counts [n]. Clips each mean's deviation from the coordinate-wise median to ``clip_ratio`` x
    the median deviation norm (off for ``clip_ratio <= 0``), then combines. Returns [F] float64."""
    if clip_ratio > 0:
        centre = _combine(means, "median", 0.0)
        deviation = means - centre
        norms = np.linalg.norm(deviation, axis=1)
        bound = clip_ratio * float(np.median(norms))
        if bound > 0:
            scale = np.minimum(1.0, bound / np.maximum(norms, np.finfo(np.float64).tiny))
            means = centre + scale[:, None] * deviation
    return _combine(means, method, trim_fraction, weights=counts)


def _site_scales(replies: Sequence[Mapping[str, np.ndarray]], max_share: float) -> np.ndarray | None:
    """Per site [n], the factor its counts are weighted by so that its share of the bank's
    images (``image_count``, summed over classes) is at most :func:`capped_shares`'s; None when
    no site is over the cap (the bank is then the exact sums)."""
    images = np.array([float(reply["image_count"].sum()) for reply in replies])
    if images.sum() <= 0:
        return None
    raw = images / images.sum()
    if not (raw > _cap(images, max_share)).any():
        return None
    return np.divide(capped_shares(images, max_share), raw, out=np.ones_like(raw), where=raw > 0)


def robust_statistics(
    replies: Sequence[Mapping[str, np.ndarray]], method: str, trim_fraction: float, clip_ratio: float, max_share: float = 1.0
) -> State:
    """The knowledge bank from per-site :data:`common.records.BANK_STATISTICS`, robustly.

    prototype_sum [C, S, M, D] with prototype_count [C, S]; foreground_sum /
    background_sum [C, L, D] with foreground_count / background_count [C, L]; image_count [C].

    "mean" with ``clip_ratio <= 0`` is exactly :func:`bank_statistics` (exact sums). Otherwise,
    per (class, slot): each site with a count there gives its mean (sum / count), optionally clipped towards the coordinate-wise median of the sites'
    means (deviation norm at most ``clip_ratio`` x the median deviation norm), and the means are
    combined: "mean" count-weighted, "median" / "trimmed_mean" unweighted (see :data:`ROBUST`).
    The result is written back as combined_mean x total count, so counts stay the exact sums and
    the bank keeps its schema and sum / count reading. Slots with no count anywhere stay zero.

    ``max_share`` (``fed.max_site_share``): a site holding more than that share of the bank's
    images has its counts down-weighted in every count-weighted mean (:func:`_site_scales`);
    with no site over it, the result is as without the cap.
    """
    _check_method(method, trim_fraction)
    if not replies:
        raise ValueError("robust_statistics needs at least one reply")
    out = bank_statistics(replies)  # exact counts (and sums, overwritten below unless plain mean)
    scales = _site_scales(replies, max_share)
    if method == "mean" and clip_ratio <= 0 and scales is None:
        return out
    for sum_name, count_name in SUM_COUNT_PAIRS:
        dtype = replies[0][sum_name].dtype
        counts = np.stack([reply[count_name] for reply in replies])  # [n, *slots]
        # Each site's means [n, *slots, *F] (common.records.mean_of, as a site reads a bank).
        means = mean_of(np.stack([reply[sum_name].astype(np.float64) for reply in replies]), counts)
        result = np.zeros(means.shape[1:], dtype=np.float64)
        for slot in np.ndindex(counts.shape[1:]):
            have = counts[(slice(None),) + slot] > 0
            if not have.any():
                continue
            slot_counts = counts[(slice(None),) + slot][have].astype(np.float64)  # [n']
            slot_means = means[(slice(None),) + slot][have]  # [n', *F]
            weights = slot_counts if scales is None else slot_counts * scales[have]
            combined = _robust_slot(slot_means.reshape(len(slot_counts), -1), weights, method, trim_fraction, clip_ratio)
            result[slot] = combined.reshape(slot_means.shape[1:]) * slot_counts.sum()
        out[sum_name] = result.astype(dtype)
    return out


def unmask_bank(masked_replies: Sequence[Mapping[str, np.ndarray]], dims: Dims, step: str) -> State:
    """The knowledge bank from every NBI site's masked sums (secure aggregation): the masks
    cancel in the sum mod 2**64, which decodes from fixed point to the exact sum. A decoded
    bank that breaks the schema (negative counts: a reply was missing or tampered) is refused."""
    bank = secagg.decode_fixed_point(secagg.sum_masked(masked_replies), {f.name: f.dtype for f in BANK_STATISTICS})
    try:
        validate(Payload("knowledge.sums", arrays=bank, config={"groups": 0, "smallest-group": 0}), dims, sender="the masked sum")
    except PayloadError as err:
        raise PayloadError(
            f"{step}: the masked sums did not decode to a valid bank ({err}); a site's masks did not cancel"
        ) from None
    return bank
