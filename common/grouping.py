"""Same-class groups of images for group-level distillation, and the k-means they rely on.

Two ways to form groups within each class:

* :func:`random_groups`: the paper's way, a random partition re-drawn every epoch;
* :func:`adaptive_groups`: k-means on the images' features within the class, so that a group is
  one coherent sub-type (the paper's stated weakness is that groups are random).

No group ever has fewer than ``min_size`` images (K_min in the protocol: smaller groups would
leak too much about single images and give noisy prototypes).

The k-means is written around its sufficient statistics: :func:`centroid_sums` gives per-centroid
sums and counts, which add over sites, and :func:`update_centroids` turns the (summed) statistics
into the next centroids. :func:`kmeans` uses the same two functions locally, so the federated
Lloyd step (server sums the sites' statistics) equals the pooled one.

Everything is deterministic given the ``torch.Generator``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = [
    "Group",
    "adaptive_groups",
    "assign_nearest",
    "centroid_sums",
    "kmeans",
    "make_groups",
    "random_groups",
    "update_centroids",
]


# eq=False: a field-wise == would compare tensors and raise; compare .indices explicitly instead.
@dataclass(frozen=True, eq=False)
class Group:
    """A set of same-class images.

    Attributes:
        class_id: the class every image of the group belongs to.
        indices: long [K], indices into the batch / dataset the labels came from.
        subtype: adaptive grouping only: rank of the within-class cluster it came from (0 = largest).
    """

    class_id: int
    indices: torch.Tensor
    subtype: int = 0

    def __len__(self) -> int:
        return int(self.indices.numel())


def _check_sizes(group_size: int, min_size: int) -> None:
    if not 1 <= min_size <= group_size:
        raise ValueError(f"need 1 <= min_size <= group_size, got min_size={min_size}, group_size={group_size}")


def _class_indices(labels: torch.Tensor, min_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (class, long [n_c] indices of that class, ascending) for classes with >= min_size images.

    Classes come in ascending order, so the generator is consumed in a fixed order.
    """
    labels = labels.reshape(-1)
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).reshape(-1)
        if idx.numel() >= min_size:  # a class too small to form one group is dropped
            yield int(c), idx


def random_groups(labels: torch.Tensor, group_size: int, min_size: int, generator: torch.Generator) -> list[Group]:
    """Random same-class groups of ``group_size`` images.

    Per class: shuffle its indices and cut them into chunks of ``group_size``; a last chunk
    smaller than ``min_size`` joins the previous chunk of that class. Classes with fewer than
    ``min_size`` images give no group.

    Args:
        labels: long [N] class of each image.
        group_size: target number of images per group.
        min_size: smallest allowed group (1 <= min_size <= group_size).
        generator: source of randomness; the same seed gives the same groups.

    Returns:
        Groups ordered by class; together they partition the kept images' indices.
    """
    _check_sizes(group_size, min_size)
    groups: list[Group] = []
    for c, idx in _class_indices(labels, min_size):
        perm = torch.randperm(idx.numel(), generator=generator, device=generator.device)
        chunks = list(idx[perm.to(idx.device)].split(group_size))
        if len(chunks) > 1 and chunks[-1].numel() < min_size:
            chunks[-2:] = [torch.cat(chunks[-2:])]
        groups.extend(Group(class_id=c, indices=chunk) for chunk in chunks)
    return groups


def assign_nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (squared euclidean) for every row of ``x``.

    Args:
        x: [N, D] points.
        centroids: [K, D].

    Returns:
        long [N] in [0, K); ties go to the lower index.
    """
    return torch.cdist(x, centroids).argmin(dim=1)


def centroid_sums(x: torch.Tensor, assign: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sufficient statistics of one Lloyd step: per-centroid sums and counts.

    Sums and counts add over disjoint parts of the data (sites), so
    ``update_centroids(sum of sums, sum of counts, ...)`` equals the update on the pooled data.

    Args:
        x: [N, D] points.
        assign: long [N] centroid index of each point, in [0, k).
        k: number of centroids.

    Returns:
        sums [k, D] (dtype of ``x``) and counts long [k].
    """
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, assign, x)
    counts = torch.zeros(k, dtype=torch.long, device=x.device).index_add_(0, assign, torch.ones_like(assign))
    return sums, counts


def update_centroids(sums: torch.Tensor, counts: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """The Lloyd update from (possibly site-summed) statistics.

    Args:
        sums: [K, D] per-centroid sums of assigned points.
        counts: long [K] per-centroid counts.
        centroids: [K, D] current centroids; kept for clusters with no point.

    Returns:
        [K, D] new centroids: sums / counts where counts > 0, else the current centroid.
    """
    nonempty = counts > 0
    means = sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype)
    return torch.where(nonempty.unsqueeze(1), means, centroids.to(sums.dtype))


def _kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: long [k] indices of distinct rows of ``x`` [N, D] (k <= N)."""
    n = x.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=generator, device=generator.device))]
    nearest_sq = torch.cdist(x, x[chosen[0]].unsqueeze(0)).squeeze(1).pow(2)  # [N]
    for _ in range(1, k):
        weights = nearest_sq.clone()
        weights[chosen] = 0.0
        if weights.sum() <= 0:
            # All remaining points coincide with chosen centres: take the first unused row so
            # that the k indices stay distinct.
            taken = torch.zeros(n, dtype=torch.bool)
            taken[chosen] = True
            nxt = int(torch.nonzero(~taken)[0])
        else:
            nxt = int(torch.multinomial(weights.to(generator.device), 1, generator=generator))
        chosen.append(nxt)
        dist_sq = torch.cdist(x, x[nxt].unsqueeze(0)).squeeze(1).pow(2)
        nearest_sq = torch.minimum(nearest_sq, dist_sq)
    return torch.tensor(chosen, dtype=torch.long, device=x.device)


def _reseed_empty(x: torch.Tensor, centroids: torch.Tensor, assign: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Move every empty centroid onto one of the points farthest from their own centroid.

    Deterministic (no randomness): the m empty clusters take the m worst-fitted points, in order.
    """
    empty = torch.nonzero(counts == 0).reshape(-1)
    if empty.numel() == 0:
        return centroids
    misfit = (x - centroids[assign]).pow(2).sum(dim=1)  # [N]
    farthest = misfit.topk(min(empty.numel(), x.shape[0])).indices
    centroids = centroids.clone()
    centroids[empty[: farthest.numel()]] = x[farthest]
    return centroids


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding.

    Args:
        x: [N, D] points (N >= 1).
        k: number of clusters; if k >= N each point is its own cluster and N centroids come back.
        iters: maximum number of Lloyd steps (stops early when assignments no longer change).
        generator: randomness of the seeding; same seed, same result.

    Returns:
        centroids [min(k, N), D] (float dtype of ``x``) and assign long [N].
    """
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be [N, D] with N >= 1, got shape {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not x.is_floating_point():
        x = x.float()
    n = x.shape[0]
    if k >= n:
        return x.clone(), torch.arange(n, device=x.device)

    centroids = x[_kmeans_plus_plus(x, k, generator)]
    assign = assign_nearest(x, centroids)
    for _ in range(iters):
        sums, counts = centroid_sums(x, assign, k)
        centroids = _reseed_empty(x, update_centroids(sums, counts, centroids), assign, counts)
        new_assign = assign_nearest(x, centroids)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return centroids, assign


def _merge_small_clusters(centroids: torch.Tensor, counts: torch.Tensor, min_size: int) -> torch.Tensor:
    """Target cluster of every cluster: itself if it has >= min_size points, else the nearest such one.

    Args:
        centroids: [K, D].
        counts: long [K], at least one >= min_size.

    Returns:
        long [K] cluster each cluster's points end up in.
    """
    large = torch.nonzero(counts >= min_size).reshape(-1)
    target = large[assign_nearest(centroids, centroids[large])]
    # A large cluster keeps its own points even if another large centroid happens to coincide.
    target[large] = large
    return target


def adaptive_groups(
    features: torch.Tensor,
    labels: torch.Tensor,
    group_size: int,
    min_size: int,
    generator: torch.Generator,
    iters: int = 25,
) -> list[Group]:
    """Same-class groups that are coherent sub-types: k-means on features within each class.

    Per class with n_c >= min_size images: k-means with k = max(1, n_c // group_size); clusters
    smaller than ``min_size`` join the nearest cluster (centroid distance) that is not. Each
    remaining cluster is one group; its ``subtype`` is its rank by size (descending), ties broken by
    the smallest image index, so the numbering does not depend on k-means' internal order. Groups
    have about ``group_size`` images on average but are not cut to it: a sub-type stays whole.

    Args:
        features: [N, D] image features (e.g. pooled backbone features).
        labels: long [N] class of each image.
        group_size: target images per group (sets k).
        min_size: smallest allowed group (1 <= min_size <= group_size).
        generator: randomness of the k-means seeding.
        iters: Lloyd steps per class.

    Returns:
        Groups ordered by class, then subtype; indices ascending within a group; together they
        partition the kept images' indices.
    """
    _check_sizes(group_size, min_size)
    if features.ndim != 2 or features.shape[0] != labels.numel():
        raise ValueError(f"features must be [N, D] with N = {labels.numel()}, got {tuple(features.shape)}")
    groups: list[Group] = []
    for c, idx in _class_indices(labels, min_size):
        k = max(1, idx.numel() // group_size)
        centroids, assign = kmeans(features[idx], k, iters, generator)
        counts = torch.bincount(assign, minlength=len(centroids))
        # The mean cluster size is >= group_size >= min_size, so some cluster is large enough.
        assign = _merge_small_clusters(centroids, counts, min_size)[assign]
        members = [idx[assign == j] for j in torch.unique(assign).tolist()]
        members.sort(key=lambda m: (-m.numel(), int(m[0])))
        groups.extend(Group(class_id=c, indices=m, subtype=rank) for rank, m in enumerate(members))
    return groups


def cluster_assignment(
    x: torch.Tensor,
    k: int,
    centroids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    iters: int = 10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroids [k', F] and each point's nearest one (long [T]).

    With ``centroids`` (the server's) points are assigned to them (a federated Lloyd step);
    without, a local k-means with k clusters gives them (seeding).
    """
    if centroids is None:
        if generator is None:
            raise ValueError("cluster_assignment needs a generator when it seeds its own centroids")
        centroids, _ = kmeans(x, k, iters, generator)
    return centroids, assign_nearest(x, centroids.to(x.dtype))


def cluster_statistics(
    x: torch.Tensor,
    owners: torch.Tensor,
    k: int,
    min_owners: int,
    centroids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    iters: int = 10,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-cluster sums and counts, suppressing clusters of too few images.

    The one statistic NBI sites send for both the prototype bank and the token codebooks.
    Points go to clusters by :func:`cluster_assignment`. A cluster whose points come from fewer
    than ``min_owners`` distinct images (``owners`` [T], an image id per point) is zeroed, so
    nothing summarises fewer than K_min images.

    Args:
        x: [T, F] points (tokens, or flattened group prototype sets).
        owners: long [T] image (or group) id of each point.
        k: slots in the output (centroids beyond k' or clusters beyond T stay zero).
        min_owners: K_min.
        weights: optional [T] scale of each point in the sums (the DP clip
            factor of its group, :mod:`common.privacy`); counts stay counts of points.

    Returns:
        sums [k, F], counts long [k].
    """
    sums = x.new_zeros(k, x.shape[1])
    counts = torch.zeros(k, dtype=torch.long, device=x.device)
    if x.shape[0] == 0:
        return sums, counts
    centroids, assign = cluster_assignment(x, k, centroids, generator, iters)
    used = centroids.shape[0]
    scale = 1.0 if weights is None else weights.to(x.dtype)[:, None]
    part_sums, part_counts = centroid_sums(x * scale, assign, used)
    distinct = torch.tensor([owners[assign == j].unique().numel() for j in range(used)], dtype=torch.long, device=x.device)
    keep = (distinct >= min_owners)[:, None]
    sums[:used] = torch.where(keep, part_sums, 0)
    counts[:used] = torch.where(keep[:, 0], part_counts, 0)
    return sums, counts


def make_groups(labels: torch.Tensor, tokens: torch.Tensor, pagkd, generator: torch.Generator) -> list[Group]:
    """Same-class groups of a set of images, the way ``pagkd`` (a :class:`common.config.PaGKDConfig`)
    says: ``random`` (the paper's) or ``adaptive`` (k-means on the images' mean tokens).

    labels [B], tokens [B, N, D] (only read for adaptive grouping)."""
    if pagkd.grouping == "adaptive":
        features = tokens.detach().float().mean(dim=1).cpu()
        return adaptive_groups(features, labels.cpu(), pagkd.group_size, pagkd.min_group_size, generator)
    return random_groups(labels.cpu(), pagkd.group_size, pagkd.min_group_size, generator)
