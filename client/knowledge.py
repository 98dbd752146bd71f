"""Knowledge extraction on an NBI site: group prototype sets and token codebook statistics.

Everything per image stays in this process. What leaves is per-class sums and counts
(:data:`common.records.BANK_STATISTICS`) or per-class cluster seeds, each cluster made of at
least K_min images. The site's groups are drawn once per bank refresh from a seed the server
sends, so every Lloyd iteration of the federated k-means sees the same groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from client.train import autocast, make_groups
from common.config import Config
from common.grouping import Group, cluster_statistics
from common.losses import BACKGROUND, FOREGROUND, cam_token_labels
from common.models import LesionQueryHead, PaGKDNet, group_prototypes
from common.records import Dims


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
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with autocast(device, cfg.train.amp):
            out = teacher(images)
        tokens.append(out.tokens.float())
        token_labels.append(
            cam_token_labels(out.feature_map, teacher.classifier.weight, labels, cfg.pagkd.fg_threshold, cfg.pagkd.bg_threshold)
        )
        classes.append(labels)
    all_tokens, all_token_labels, all_classes = torch.cat(tokens), torch.cat(token_labels), torch.cat(classes)
    groups: list[Group] = make_groups(all_classes, all_tokens, cfg, torch.Generator().manual_seed(seed))
    groups = [g for g in groups if len(g.indices) >= cfg.pagkd.min_group_size]
    prototypes, group_labels = [], []
    for start in range(0, len(groups), 64):  # bounded memory for large sites
        p, gl, _ = group_prototypes(head, all_tokens, groups[start : start + 64])
        prototypes.append(p.float())
        group_labels.append(gl)
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


def _statistics(
    knowledge: SiteKnowledge, dims: Dims, cfg: Config, centroids: dict[str, np.ndarray] | None, seed: int
) -> dict[str, np.ndarray]:
    """Per-class cluster statistics of prototypes and foreground/background tokens.

    With ``centroids`` (the server's current ones) this is a federated Lloyd step; without, a
    local k-means gives this site's seeds. Returns float32/int64 arrays keyed like the records.
    """
    generator = torch.Generator().manual_seed(seed)
    k_min = cfg.pagkd.min_group_size
    flat = dims.M * dims.D
    out = {
        "prototype_sum": np.zeros((dims.C, dims.S, dims.M, dims.D), np.float32),
        "prototype_sqsum": np.zeros((dims.C, dims.S, dims.M, dims.D), np.float32),
        "prototype_count": np.zeros((dims.C, dims.S), np.int64),
        "image_count": np.zeros(dims.C, np.int64),
    }
    for name in ("foreground", "background"):
        out[f"{name}_sum"] = np.zeros((dims.C, dims.L, dims.D), np.float32)
        out[f"{name}_count"] = np.zeros((dims.C, dims.L), np.int64)
    for c in range(dims.C):
        in_class = knowledge.group_labels == c
        points = knowledge.prototypes[in_class].reshape(-1, flat)
        owners = torch.arange(points.shape[0])  # each point is already a group of >= K_min images
        given = None if centroids is None else torch.from_numpy(centroids["prototype_centroids"][c]).reshape(dims.S, flat)
        sums, counts, sqsums = cluster_statistics(points, owners, dims.S, 1, given, generator)
        out["prototype_sum"][c] = sums.reshape(dims.S, dims.M, dims.D).numpy()
        out["prototype_sqsum"][c] = sqsums.reshape(dims.S, dims.M, dims.D).numpy()
        out["prototype_count"][c] = counts.numpy()
        out["image_count"][c] = int(knowledge.group_sizes[in_class].sum())
        for name, label in (("foreground", FOREGROUND), ("background", BACKGROUND)):
            tokens, image_ids = _class_points(knowledge, c, label)
            given = None if centroids is None else torch.from_numpy(centroids[f"{name}_centroids"][c])
            sums, counts, _ = cluster_statistics(tokens, image_ids, dims.L, k_min, given, generator)
            out[f"{name}_sum"][c] = sums.numpy()
            out[f"{name}_count"][c] = counts.numpy()
    return out


def knowledge_seeds(knowledge: SiteKnowledge, dims: Dims, cfg: Config, seed: int) -> dict[str, np.ndarray]:
    """This site's k-means seeds: local cluster sums and counts per class (arrays of
    :data:`common.records.KNOWLEDGE_SEEDS_FIELDS`)."""
    stats = _statistics(knowledge, dims, cfg, None, seed)
    return {
        "prototype_seed_sum": stats["prototype_sum"],
        "prototype_seed_count": stats["prototype_count"],
        "foreground_seed_sum": stats["foreground_sum"],
        "foreground_seed_count": stats["foreground_count"],
        "background_seed_sum": stats["background_sum"],
        "background_seed_count": stats["background_count"],
    }


def knowledge_sums(
    knowledge: SiteKnowledge, dims: Dims, cfg: Config, centroids: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Sufficient statistics for the server's centroids (arrays of
    :data:`common.records.BANK_STATISTICS`). Summed over sites they equal the statistics of
    one site holding all the groups."""
    return _statistics(knowledge, dims, cfg, centroids, seed=0)
