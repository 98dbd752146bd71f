"""Knowledge extraction on an NBI site: group prototype sets and token codebook statistics.

Everything per image stays on the site. :func:`extract_site_knowledge` runs the teacher once
per bank refresh and keeps a :class:`SiteKnowledge` (group prototype sets [G, M, D], kept
images' tokens [I, N, D] with their labels); :func:`knowledge_seeds` and :func:`knowledge_sums`
turn it into what leaves: per class and cluster, the sums and counts of each statistic of
:data:`common.records.KNOWLEDGE_STATISTICS` (the prototype sets, the foreground and the
background tokens), as k-means seeds or as one federated Lloyd step's
:data:`common.records.BANK_STATISTICS`; every cluster is made of at least K_min images. The
site's groups are drawn once per refresh from a seed the server sends, and the ClientApp keeps
the SiteKnowledge between the refresh's messages, so every Lloyd step sees the same groups.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from common.config import Config
from common.device import autocast
from common.grouping import Group, cluster_assignment, cluster_statistics, make_groups
from common.losses import BACKGROUND, FOREGROUND
from common.models import LesionQueryHead, PaGKDNet, group_prototypes, labelled_forward
from common.progress import progress, site_log
from common.privacy import add_noise, clip_factors, count_sensitivity, group_sq_norms, max_group_size, noise_generator
from common.records import (
    BANK_STATISTICS,
    DP_COUNT_KEYS,
    DP_FLOAT_KEYS,
    IMAGE_COUNT,
    KNOWLEDGE_STATISTICS,
    Dims,
    empty_statistics,
    seeds_from_statistics,
)


@dataclass
class SiteKnowledge:
    """A site's group-level view, kept local: prototypes [G, M, D] with class labels [G], and
    for each kept image its tokens [I, N, D], token labels [I, N] and class [I]."""

    prototypes: torch.Tensor
    group_labels: torch.Tensor
    group_sizes: torch.Tensor  # [G]
    tokens: torch.Tensor
    token_labels: torch.Tensor
    classes: torch.Tensor

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Its tensors by field name (what the ClientApp keeps in its local state between the
        messages of one bank refresh; never sent)."""
        return {f.name: getattr(self, f.name).contiguous() for f in dataclasses.fields(self)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "SiteKnowledge":
        return cls(**{f.name: tensors[f.name] for f in dataclasses.fields(cls)})


@torch.no_grad()
def extract_site_knowledge(
    teacher: PaGKDNet, head: LesionQueryHead, loader: DataLoader, cfg: Config, device: torch.device, seed: int
) -> SiteKnowledge:
    """Run the frozen teacher over the site's training images (no augmentation), draw
    same-class groups (random or adaptive), and compute each group's prototype set with the
    shared query head. Images outside every group of >= K_min images are dropped here."""
    teacher.to(device).eval()
    head.to(device).eval()
    tokens, token_labels, classes = [], [], []
    started = time.perf_counter()
    for images, labels in progress(loader, "extract", len(loader)):
        images, labels = images.to(device), labels.to(device)
        with autocast(device, cfg.train.amp):
            out, labelled = labelled_forward(teacher, images, labels, cfg.pagkd)
        tokens.append(out.tokens.float())
        token_labels.append(labelled)
        classes.append(labels)
    all_tokens, all_token_labels, all_classes = torch.cat(tokens), torch.cat(token_labels), torch.cat(classes)
    groups: list[Group] = make_groups(all_classes, all_tokens, cfg.pagkd, torch.Generator().manual_seed(seed))
    groups = [g for g in groups if len(g.indices) >= cfg.pagkd.min_group_size]
    if cfg.privacy.noise_multiplier > 0:  # DP: no group above K_max, so the count bound holds
        cap = max_group_size(cfg.pagkd.group_size, cfg.pagkd.min_group_size)
        groups = [dataclasses.replace(g, indices=g.indices[:cap]) for g in groups]
    prototypes, group_labels = [], []
    for start in range(0, len(groups), 64):  # bounded memory for large sites
        p, gl, _ = group_prototypes(head, all_tokens, groups[start : start + 64])
        prototypes.append(p.float())
        group_labels.append(gl)
    site_log.info(
        "knowledge extraction: %d images, %d group(s) of >= %d in %.1f s",
        len(all_classes),
        len(groups),
        cfg.pagkd.min_group_size,
        time.perf_counter() - started,
    )
    kept = torch.cat([g.indices for g in groups]) if groups else torch.zeros(0, dtype=torch.long)
    kept = kept.to(all_tokens.device)
    dim = all_tokens.shape[-1]
    return SiteKnowledge(
        prototypes=torch.cat(prototypes) if prototypes else all_tokens.new_zeros(0, head.num_queries, dim),
        group_labels=torch.cat(group_labels) if group_labels else torch.zeros(0, dtype=torch.long),
        group_sizes=torch.tensor([len(g.indices) for g in groups], dtype=torch.long),
        tokens=all_tokens[kept].cpu(),
        token_labels=all_token_labels[kept].cpu(),
        classes=all_classes[kept].cpu(),
    )


def _class_points(knowledge: SiteKnowledge, class_id: int, label: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens of one class and label as points [T, D], with their image ids [T]."""
    images = (knowledge.classes == class_id).nonzero().squeeze(1)
    tokens = knowledge.tokens[images]  # [I_c, N, D]
    mask = knowledge.token_labels[images] == label  # [I_c, N]
    owners = images[:, None].expand_as(mask)[mask]
    return tokens[mask], owners


@dataclass
class _Points:
    """One class's points for one statistic of :data:`common.records.KNOWLEDGE_STATISTICS`."""

    name: str
    x: torch.Tensor  # [T, F]
    owners: torch.Tensor  # long [T]: image id (tokens) or group id (prototype sets)
    groups: torch.Tensor  # long [T]: group id of each point (the DP unit)
    k: int  # slots
    centroids: torch.Tensor | None  # the server's [k, F], or None when seeding
    whole_groups: bool  # a point is a whole group (>= K_min images already)


def _prototype_points(knowledge: SiteKnowledge, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class c's group prototype sets as points [G_c, M*D], owned by their group."""
    in_class = (knowledge.group_labels == c).nonzero().squeeze(1)
    return knowledge.prototypes[in_class].flatten(1), in_class, in_class


def _token_points(label: int):
    def points(knowledge: SiteKnowledge, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Class c's tokens of one label as points [T, D], owned by their image."""
        tokens, image_ids = _class_points(knowledge, c, label)
        image_group = torch.repeat_interleave(torch.arange(len(knowledge.group_labels)), knowledge.group_sizes)
        return tokens, image_ids, image_group[image_ids]

    return points


# Where a site's points of each statistic come from (a row of the records' table each).
_POINTS = {"prototype": _prototype_points, "foreground": _token_points(FOREGROUND), "background": _token_points(BACKGROUND)}


def _class_blocks(knowledge: SiteKnowledge, dims: Dims, c: int, centroids: dict[str, np.ndarray] | None) -> list[_Points]:
    blocks = []
    for stat in KNOWLEDGE_STATISTICS:
        x, owners, groups = _POINTS[stat.name](knowledge, c)
        k = getattr(dims, stat.slots)
        given = None if centroids is None else torch.from_numpy(centroids[stat.centroids][c]).reshape(k, -1)
        blocks.append(_Points(stat.name, x, owners, groups, k, given, whole_groups=stat.unit == "groups"))
    return blocks


def _statistics(
    knowledge: SiteKnowledge,
    dims: Dims,
    cfg: Config,
    centroids: dict[str, np.ndarray] | None,
    seed: int,
    noise: torch.Generator | None = None,
) -> dict[str, np.ndarray]:
    """Per-class cluster statistics of prototypes and foreground/background tokens.

    With ``centroids`` (the server's current ones) this is a federated Lloyd step; without, a
    local k-means gives this site's seeds. Returns float32/int64 arrays keyed like the records.
    With ``privacy.noise_multiplier`` > 0 the release is differentially private
    (:mod:`common.privacy`): each group's contribution is clipped, the K_min suppression of
    token clusters is left to the noise (a data-dependent cut has unbounded sensitivity; every
    token still comes from a group of >= K_min images), and Gaussian noise from ``noise``
    (default: OS entropy) is added.
    """
    generator = torch.Generator().manual_seed(seed)
    privacy = cfg.privacy
    dp = privacy.noise_multiplier > 0
    out = empty_statistics(BANK_STATISTICS, dims)
    num_groups = len(knowledge.group_labels)
    for c in range(dims.C):
        blocks = _class_blocks(knowledge, dims, c, centroids)
        if dp and centroids is None:
            # A local k-means would let one group move every other group's cluster (unbounded
            # sensitivity): DP seeds put each class's points in one slot, the server's Lloyd
            # steps then split them.
            for b in blocks:
                b.centroids = b.x.new_zeros(1, b.x.shape[1])
        # Assign once (seeding runs the local k-means here) so the DP clip sees the same clusters.
        assigned = [cluster_assignment(b.x, b.k, b.centroids, generator) if len(b.x) else (b.centroids, None) for b in blocks]
        weights: list[torch.Tensor | None] = [None] * len(blocks)
        if dp:
            # A group's contribution: each statistic's points in their slots, all of it scaled
            # to L2 <= clip.
            parts = [(b.x, b.groups, a, b.k) for b, (_, a) in zip(blocks, assigned) if a is not None]
            factors = clip_factors(group_sq_norms(num_groups, parts), privacy.clip)
            weights = [factors[b.groups] for b in blocks]
        for stat, block, (given, _), w in zip(KNOWLEDGE_STATISTICS, blocks, assigned, weights):
            # Prototype sets are one point per group (already >= K_min images); token clusters
            # need K_min distinct images unless DP noise protects them.
            min_owners = 1 if block.whole_groups or dp else cfg.pagkd.min_group_size
            sums, counts = cluster_statistics(block.x, block.owners, block.k, min_owners, given, generator, weights=w)
            shape = dims.resolve(stat.shape)[1:]
            out[stat.sum][c] = sums.reshape(shape).numpy()
            out[stat.count][c] = counts.numpy()
        out[IMAGE_COUNT][c] = int(knowledge.group_sizes[knowledge.group_labels == c].sum())
    if dp:
        bound = count_sensitivity(max_group_size(cfg.pagkd.group_size, cfg.pagkd.min_group_size), knowledge.tokens.shape[1])
        out = add_noise(
            out,
            DP_FLOAT_KEYS,
            DP_COUNT_KEYS,
            privacy.noise_multiplier * privacy.clip,
            privacy.noise_multiplier * bound,
            noise or noise_generator(),
        )
    return out


def knowledge_seeds(knowledge: SiteKnowledge, dims: Dims, cfg: Config, seed: int) -> dict[str, np.ndarray]:
    """This site's k-means seeds: local cluster sums and counts per class (arrays of
    :data:`common.records.KNOWLEDGE_SEEDS_FIELDS`)."""
    return seeds_from_statistics(_statistics(knowledge, dims, cfg, None, seed))


def knowledge_sums(knowledge: SiteKnowledge, dims: Dims, cfg: Config, centroids: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Sufficient statistics for the server's centroids (arrays of
    :data:`common.records.BANK_STATISTICS`). Summed over sites they equal the statistics of
    one site holding all the groups."""
    return _statistics(knowledge, dims, cfg, centroids, seed=0)
