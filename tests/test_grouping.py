"""Random and adaptive same-class groups, and the k-means (with its federated statistics)."""

from __future__ import annotations

import pytest
import torch

from common.grouping import (
    Group,
    adaptive_groups,
    assign_nearest,
    centroid_sums,
    kmeans,
    random_groups,
    update_centroids,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _labels(counts: list[int], seed: int = 0) -> torch.Tensor:
    """Shuffled long [sum(counts)] labels with counts[c] images of class c."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return labels[torch.randperm(len(labels), generator=_gen(seed))]


def _features(labels: torch.Tensor, seed: int = 0, dim: int = 8) -> torch.Tensor:
    """float [N, dim]: a class-dependent mean plus noise."""
    return labels.float().unsqueeze(1) * 3.0 + torch.randn(len(labels), dim, generator=_gen(seed))


def _make_groups(kind: str, labels: torch.Tensor, group_size: int, min_size: int, seed: int) -> list[Group]:
    if kind == "random":
        return random_groups(labels, group_size, min_size, _gen(seed))
    return adaptive_groups(_features(labels, seed), labels, group_size, min_size, _gen(seed))


def _check_groups(groups: list[Group], labels: torch.Tensor, min_size: int) -> None:
    """Every group single-class and >= min_size; no index twice; all images of kept classes covered."""
    seen = torch.cat([g.indices for g in groups])
    assert len(seen) == len(torch.unique(seen)), "an index is in two groups"
    for g in groups:
        assert g.indices.dtype == torch.long
        assert len(g) >= min_size
        assert (labels[g.indices] == g.class_id).all()
    counts = torch.bincount(labels)
    kept = {c for c in range(len(counts)) if counts[c] >= min_size}
    assert {g.class_id for g in groups} == kept
    expected = torch.nonzero(torch.isin(labels, torch.tensor(sorted(kept), dtype=torch.long))).reshape(-1)
    assert torch.equal(torch.sort(seen).values, expected)


# ---------------------------------------------------------------- both groupings

KINDS = ["random", "adaptive"]
COUNTS = [[24, 24, 24], [50, 7, 3, 13], [5, 100], [8, 9, 10, 11, 12]]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("group_size,min_size", [(8, 4), (6, 6), (5, 1)])
def test_groups_partition_single_class_min_size(kind, counts, group_size, min_size):
    labels = _labels(counts)
    _check_groups(_make_groups(kind, labels, group_size, min_size, seed=0), labels, min_size)


@pytest.mark.parametrize("kind", KINDS)
def test_class_below_min_size_gives_no_group(kind):
    labels = _labels([20, 3, 20])
    groups = _make_groups(kind, labels, group_size=8, min_size=4, seed=0)
    assert 1 not in {g.class_id for g in groups}
    assert {g.class_id for g in groups} == {0, 2}


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_by_seed(kind):
    labels = _labels([40, 33, 27])
    a = _make_groups(kind, labels, 8, 4, seed=5)
    b = _make_groups(kind, labels, 8, 4, seed=5)
    assert [(g.class_id, g.subtype) for g in a] == [(g.class_id, g.subtype) for g in b]
    assert all(torch.equal(x.indices, y.indices) for x, y in zip(a, b))


def test_random_groups_differ_across_seeds():
    labels = _labels([40, 33, 27])
    a = random_groups(labels, 8, 4, _gen(1))
    b = random_groups(labels, 8, 4, _gen(2))
    assert any(not torch.equal(x.indices, y.indices) for x, y in zip(a, b))


def test_adaptive_groups_differ_across_seeds():
    # Structureless features: different seeds should land on different partitions.
    labels = torch.zeros(60, dtype=torch.long)
    features = torch.randn(60, 4, generator=_gen(0))
    a = adaptive_groups(features, labels, 10, 3, _gen(1))
    b = adaptive_groups(features, labels, 10, 3, _gen(2))
    sets_a = {frozenset(g.indices.tolist()) for g in a}
    sets_b = {frozenset(g.indices.tolist()) for g in b}
    assert sets_a != sets_b


def test_random_groups_sizes():
    # 23 images, groups of 8, min 4: 8 + 8 + 7 (remainder 7 kept); min 8: 8 + 15 (remainder merged).
    labels = torch.zeros(23, dtype=torch.long)
    assert sorted(len(g) for g in random_groups(labels, 8, 4, _gen(0))) == [7, 8, 8]
    assert sorted(len(g) for g in random_groups(labels, 8, 8, _gen(0))) == [8, 15]
    # Fewer than group_size but at least min_size: one group.
    assert [len(g) for g in random_groups(torch.zeros(5, dtype=torch.long), 8, 4, _gen(0))] == [5]


def test_invalid_sizes_rejected():
    labels = torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError):
        random_groups(labels, 4, 5, _gen(0))
    with pytest.raises(ValueError):
        adaptive_groups(torch.randn(10, 2), labels, 4, 0, _gen(0))


# ---------------------------------------------------------------- adaptive groups


def _blobs(centres: torch.Tensor, per_blob: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points [len(centres) * per_blob, D] around the centres, and their blob id [N] (shuffled)."""
    blob = torch.arange(len(centres)).repeat_interleave(per_blob)
    x = centres[blob] + spread * torch.randn(len(blob), centres.shape[1], generator=_gen(seed))
    perm = torch.randperm(len(blob), generator=_gen(seed + 1000))
    return x[perm], blob[perm]


@pytest.mark.parametrize("seed", range(5))
def test_adaptive_groups_separate_blobs_within_a_class(seed):
    # Class 0 is two well-separated sub-types of 20 images; class 1 is one blob of 20.
    x0, blob = _blobs(torch.tensor([[0.0, 0.0], [10.0, 10.0]]), 20, 0.5, seed)
    x1, _ = _blobs(torch.tensor([[-10.0, 5.0]]), 20, 0.5, seed + 7)
    features = torch.cat([x0, x1])
    labels = torch.cat([torch.zeros(40, dtype=torch.long), torch.ones(20, dtype=torch.long)])
    groups = adaptive_groups(features, labels, group_size=20, min_size=5, generator=_gen(seed))
    class0 = [g for g in groups if g.class_id == 0]
    assert sorted(g.subtype for g in class0) == [0, 1]
    for g in class0:
        assert len(torch.unique(blob[g.indices])) == 1, "a group mixes the two sub-types"
    assert [len(g) for g in groups if g.class_id == 1] == [20]


def test_adaptive_small_cluster_merged_into_nearest():
    # 30 points near 0, 2 outliers near (5, 0), 30 near (20, 0): k = 62 // 20 = 3; the outliers'
    # cluster (2 < min_size) must join the nearer large cluster (the one at 0).
    near0, _ = _blobs(torch.tensor([[0.0, 0.0]]), 30, 0.3, 0)
    far, _ = _blobs(torch.tensor([[20.0, 0.0]]), 30, 0.3, 1)
    outliers = torch.tensor([[5.0, 0.0], [5.2, 0.1]])
    features = torch.cat([near0, far, outliers])
    labels = torch.zeros(len(features), dtype=torch.long)
    groups = adaptive_groups(features, labels, group_size=20, min_size=5, generator=_gen(0))
    _check_groups(groups, labels, 5)
    with_outliers = [g for g in groups if 60 in g.indices.tolist()]
    assert len(with_outliers) == 1 and 61 in with_outliers[0].indices.tolist()
    assert (features[with_outliers[0].indices, 0] < 10).all()


def test_adaptive_subtype_order_by_size():
    x, _ = _blobs(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]), 1, 0.0, 0)
    features = torch.cat([x[0].expand(10, 2), x[1].expand(30, 2), x[2].expand(20, 2)])
    labels = torch.zeros(60, dtype=torch.long)
    groups = adaptive_groups(features, labels, group_size=20, min_size=5, generator=_gen(3))
    assert [(g.subtype, len(g)) for g in groups] == [(0, 30), (1, 20), (2, 10)]


# ---------------------------------------------------------------- k-means


@pytest.mark.parametrize("seed", range(5))
def test_kmeans_recovers_three_blobs(seed):
    centres = torch.tensor([[0.0, 0.0, 0.0], [8.0, 0.0, 0.0], [0.0, 8.0, 4.0]])
    x, blob = _blobs(centres, 50, 0.5, seed)
    found, assign = kmeans(x, 3, iters=50, generator=_gen(seed))
    assert found.shape == (3, 3) and assign.shape == (150,)
    # One cluster per blob, each centroid near its blob's centre.
    mapping = {int(b): int(assign[blob == b][0]) for b in range(3)}
    assert len(set(mapping.values())) == 3
    for b, k in mapping.items():
        assert (assign[blob == b] == k).all()
        assert torch.dist(found[k], centres[b]) < 0.3


def test_kmeans_k_at_least_n():
    x = torch.randn(4, 3, generator=_gen(0))
    for k in (4, 10):
        centroids, assign = kmeans(x, k, iters=10, generator=_gen(0))
        assert torch.equal(centroids, x)
        assert torch.equal(assign, torch.arange(4))


def test_kmeans_duplicate_points_and_deterministic():
    # Only two distinct points but k = 3: seeding must still pick distinct rows, no NaN.
    x = torch.tensor([[0.0, 0.0]] * 5 + [[1.0, 1.0]] * 5)
    centroids, assign = kmeans(x, 3, iters=10, generator=_gen(0))
    assert torch.isfinite(centroids).all()
    assert len(torch.unique(assign)) == 2
    again = kmeans(x, 3, iters=10, generator=_gen(0))
    assert torch.equal(centroids, again[0]) and torch.equal(assign, again[1])


def test_assign_nearest():
    centroids = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    x = torch.tensor([[1.0, 1.0], [9.0, -1.0], [4.9, 0.0], [5.1, 0.0]])
    assert assign_nearest(x, centroids).tolist() == [0, 1, 0, 1]


def test_centroid_sums_over_sites_equal_pooled():
    # Integer-valued features: float sums are exact, so site sums must add up bit for bit.
    x = torch.randint(-50, 50, (101, 6), generator=_gen(0)).float()
    centroids = torch.randint(-50, 50, (5, 6), generator=_gen(1)).float()
    assign = assign_nearest(x, centroids)
    pooled_sums, pooled_counts = centroid_sums(x, assign, 5)
    split = 37
    a_sums, a_counts = centroid_sums(x[:split], assign_nearest(x[:split], centroids), 5)
    b_sums, b_counts = centroid_sums(x[split:], assign_nearest(x[split:], centroids), 5)
    assert torch.equal(a_sums + b_sums, pooled_sums)
    assert torch.equal(a_counts + b_counts, pooled_counts)
    assert pooled_counts.dtype == torch.long and int(pooled_counts.sum()) == 101
    federated = update_centroids(a_sums + b_sums, a_counts + b_counts, centroids)
    assert torch.equal(federated, update_centroids(pooled_sums, pooled_counts, centroids))
    for k in range(5):
        if pooled_counts[k] > 0:
            torch.testing.assert_close(federated[k], x[assign == k].mean(dim=0))


def test_update_centroids_keeps_empty():
    sums = torch.tensor([[4.0, 2.0], [0.0, 0.0]])
    counts = torch.tensor([2, 0])
    old = torch.tensor([[9.0, 9.0], [7.0, 7.0]])
    assert update_centroids(sums, counts, old).tolist() == [[2.0, 1.0], [7.0, 7.0]]
