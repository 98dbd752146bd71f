"""The PaGKD maths: activation maps, token labels, relation masks, GKD-Pro, GKD-Den, the total.

The NBI side of every distillation term is a :class:`KnowledgeBank`, built either from a live
teacher batch (centralised, :func:`bank_from_teacher_batch`) or from the federated sufficient
statistics that NBI sites send (:meth:`KnowledgeBank.from_statistics`). The same loss functions serve
both, so the federated system optimises what the centralised reference does. The bank is
always treated as a constant (stop-gradient): gradients reach only the student side.

Shapes: B images, N tokens per image, D token width, C classes, M queries, G groups,
S prototype sets per class (sub-types), K keys per class (tokens or codebook centroids).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from common.config import PaGKDConfig
from common.records import KNOWLEDGE_STATISTICS, STATISTICS, mean_of

# Token labels of the semantic relation (docs/method.md, GKD-Den).
BACKGROUND, FOREGROUND, UNCERTAIN = 0, 1, 2


# --------------------------------------------------------------------------- activation maps


@torch.no_grad()
def class_activation_maps(feature_map: torch.Tensor, classifier_weight: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of the given class on the last stage, min-max normalised per image.

    For a GAP + linear head, Grad-CAM of class c is ReLU(W_c . F) up to a constant, so no
    backward pass is needed. feature_map [B, Cf, h, w], classifier_weight [C, Cf], classes [B]
    -> [B, h*w] in [0, 1].
    """
    weights = classifier_weight[classes].to(feature_map.dtype)  # [B, Cf]
    cam = torch.relu(torch.einsum("bchw,bc->bhw", feature_map, weights)).flatten(1)
    low = cam.amin(dim=1, keepdim=True)
    high = cam.amax(dim=1, keepdim=True)
    return (cam - low) / (high - low).clamp_min(1e-6)


def label_tokens(cam: torch.Tensor, fg_threshold: float, bg_threshold: float) -> torch.Tensor:
    """cam [B, N] in [0, 1] -> token labels [B, N]: FOREGROUND above fg_threshold,
    BACKGROUND below bg_threshold, UNCERTAIN in between."""
    labels = torch.full_like(cam, UNCERTAIN, dtype=torch.long)
    labels[cam >= fg_threshold] = FOREGROUND
    labels[cam < bg_threshold] = BACKGROUND
    return labels


def cam_token_labels(
    feature_map: torch.Tensor, classifier_weight: torch.Tensor, classes: torch.Tensor, fg_threshold: float, bg_threshold: float
) -> torch.Tensor:
    """Token labels [B, N] of a network's own activation maps for the given classes [B]."""
    cam = class_activation_maps(feature_map.float(), classifier_weight, classes)
    return label_tokens(cam, fg_threshold, bg_threshold)


def relation_weights(token_labels: torch.Tensor, key_labels: torch.Tensor) -> torch.Tensor:
    """Semantic relation between tokens and keys: 1 where labels match, 0 where they differ,
    0.5 where either is uncertain. token_labels [B, N], key_labels [B, K] -> [B, N, K]."""
    tokens = token_labels.unsqueeze(2)
    keys = key_labels.unsqueeze(1)
    relation = (tokens == keys).float()
    uncertain = (tokens == UNCERTAIN) | (keys == UNCERTAIN)
    return torch.where(uncertain, torch.full_like(relation, 0.5), relation)


# --------------------------------------------------------------------------- the NBI side


@dataclass
class KnowledgeBank:
    """Class-wise NBI knowledge the student distils from (constant during a student step).

    prototypes [C, S, M, D] with prototype_valid [C, S]: mean prototype set per class and
    sub-type; keys [C, K, D] with key_labels [C, K] and key_valid [C, K]: NBI tokens (live
    teacher) or foreground/background codebook centroids (federated) per class.
    """

    prototypes: torch.Tensor
    prototype_valid: torch.Tensor
    keys: torch.Tensor
    key_labels: torch.Tensor
    key_valid: torch.Tensor

    @classmethod
    def from_statistics(cls, arrays: Mapping[str, np.ndarray]) -> "KnowledgeBank":
        """Federated form: the means of summed sufficient statistics (arrays of
        :data:`common.records.BANK_STATISTICS`, numpy, as a student request carries them).

        prototype_sum [C, S, M, D] over prototype_count [C, S] groups; foreground_/background_sum
        [C, L, D] over *_count [C, L] tokens (L codebook centroids each); sums become means with
        :func:`common.records.mean_of`. Slots with count 0 are invalid. Keys are the foreground
        then the background centroids, labelled accordingly.
        """
        means = {
            s.sum: torch.from_numpy(np.ascontiguousarray(mean_of(arrays[s.sum], arrays[s.count]))) for s in KNOWLEDGE_STATISTICS
        }
        counts = {s.count: torch.from_numpy(np.ascontiguousarray(arrays[s.count])) for s in KNOWLEDGE_STATISTICS}
        fg, bg = STATISTICS["foreground"], STATISTICS["background"]
        keys = torch.cat([means[fg.sum], means[bg.sum]], dim=1)
        key_labels = torch.cat(
            [
                torch.full_like(counts[fg.count], FOREGROUND, dtype=torch.long),
                torch.full_like(counts[bg.count], BACKGROUND, dtype=torch.long),
            ],
            dim=1,
        )
        key_valid = torch.cat([counts[fg.count] > 0, counts[bg.count] > 0], dim=1)
        proto = STATISTICS["prototype"]
        return cls(means[proto.sum].float(), counts[proto.count] > 0, keys.float(), key_labels, key_valid)

    def to(self, device: torch.device | str) -> "KnowledgeBank":
        return KnowledgeBank(
            *(t.to(device) for t in (self.prototypes, self.prototype_valid, self.keys, self.key_labels, self.key_valid))
        )

    @property
    def num_classes(self) -> int:
        return self.prototypes.shape[0]


def _pad_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length [n_i, ...] tensors into [R, max n, ...] plus a validity mask [R, max n]."""
    longest = max([len(r) for r in rows] + [1])
    out = rows[0].new_zeros((len(rows), longest) + tuple(rows[0].shape[1:]))
    valid = torch.zeros(len(rows), longest, dtype=torch.bool, device=rows[0].device)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
        valid[i, : len(row)] = True
    return out, valid


@torch.no_grad()
def bank_from_teacher_batch(
    prototypes: torch.Tensor,
    group_labels: torch.Tensor,
    tokens: torch.Tensor,
    token_labels: torch.Tensor,
    classes: torch.Tensor,
    num_classes: int,
) -> KnowledgeBank:
    """Centralised form: the live teacher's batch is the bank.

    prototypes [G, M, D] and group_labels [G] from the teacher's groups become S = (groups per
    class) prototype sets per class; tokens [B, N, D] with token_labels [B, N] of images of class
    classes [B] become K = (images of the class x N) keys per class.
    """
    proto_rows = [prototypes[group_labels == c] for c in range(num_classes)]
    bank_protos, proto_valid = _pad_rows(proto_rows)
    key_rows = [tokens[classes == c].flatten(0, 1) for c in range(num_classes)]
    label_rows = [token_labels[classes == c].flatten() for c in range(num_classes)]
    keys, key_valid = _pad_rows(key_rows)
    key_labels, _ = _pad_rows(label_rows)
    return KnowledgeBank(bank_protos.detach(), proto_valid, keys.detach(), key_labels, key_valid)


# --------------------------------------------------------------------------- GKD-Pro


def prototype_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Query-matched similarity of prototype sets: mean over k of cos(a_k, b_k).

    a [..., M, D], b [..., M, D] (broadcast) -> [...]. Query k is compared only with query k:
    the queries are shared, so query k means the same lesion aspect in both modalities.
    """
    return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1).mean(-1)


def group_classification_loss(group_logits: torch.Tensor, group_labels: torch.Tensor) -> torch.Tensor:
    """CE of each group's class from its mean prototype. group_logits [G, C], group_labels [G]."""
    if group_labels.numel() == 0:
        return group_logits.sum() * 0.0
    return F.cross_entropy(group_logits, group_labels)


def gkd_pro_contrastive(
    student_prototypes: torch.Tensor, group_labels: torch.Tensor, bank: KnowledgeBank, temperature: float
) -> torch.Tensor:
    """Query-matched InfoNCE of WLI group prototype sets against the NBI bank.

    student_prototypes [G, M, D], group_labels [G]. Anchor: a WLI group's set; positive: the
    most similar valid NBI set of its class (its sub-type); negatives: the valid NBI sets of
    every other class and the WLI sets of other classes in the batch. Anchors whose class has
    no NBI set are skipped. Returns a scalar (0 with gradient when nothing applies).
    """
    num_groups = student_prototypes.shape[0]
    if num_groups == 0:
        return student_prototypes.sum() * 0.0
    bank_protos = bank.prototypes.to(student_prototypes.dtype)
    to_bank = prototype_similarity(student_prototypes[:, None, None], bank_protos[None]) / temperature  # [G, C, S]
    valid = bank.prototype_valid[None].expand_as(to_bank)
    same_class = F.one_hot(group_labels, bank.num_classes).bool()[:, :, None].expand_as(to_bank)
    positive = to_bank.masked_fill(~(valid & same_class), float("-inf")).flatten(1).amax(dim=1)  # [G]
    bank_negatives = to_bank.masked_fill(~valid | same_class, float("-inf")).flatten(1)  # [G, C*S]
    to_batch = prototype_similarity(student_prototypes[:, None], student_prototypes[None]) / temperature  # [G, G]
    batch_negatives = to_batch.masked_fill(group_labels[:, None] == group_labels[None, :], float("-inf"))
    logits = torch.cat([positive[:, None], bank_negatives, batch_negatives], dim=1)
    has_positive = torch.isfinite(positive)
    if not has_positive.any():
        return student_prototypes.sum() * 0.0
    # -log softmax of the positive (column 0).
    losses = torch.logsumexp(logits[has_positive], dim=1) - positive[has_positive]
    return losses.mean()


# --------------------------------------------------------------------------- GKD-Den


def den_attention(
    tokens: torch.Tensor, token_labels: torch.Tensor, classes: torch.Tensor, bank: KnowledgeBank, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """GKD-Den's relation-guided cross attention of student tokens to same-class NBI keys.

    tokens [B, N, D] (student), token_labels [B, N], classes [B]. Each token attends to the
    keys of its image's class with logits cos(t, k) / temperature scaled by the relation
    weight R (1 same label, 0.5 uncertain); keys with R = 0 (foreground vs background) or
    invalid keys are masked out. Cosine logits (rather than the paper's raw dot products) keep
    the attention temperature independent of feature scale. R multiplies the logits, which an
    additive mask cannot express, hence no SDPA here. Returns (attention [T, K], keys [T, K, D],
    admissible [B, N]) over the T tokens with an admissible key, or None when none has one.
    """
    keys = bank.keys[classes].to(tokens.dtype)  # [B, K, D]
    relation = relation_weights(token_labels, bank.key_labels[classes])  # [B, N, K]
    relation = relation * bank.key_valid[classes][:, None, :]
    logits = torch.einsum("bnd,bkd->bnk", F.normalize(tokens, dim=-1), F.normalize(keys, dim=-1)) / temperature
    logits = (logits * relation).masked_fill(relation == 0, float("-inf"))
    admissible = relation.gt(0).any(dim=-1)  # [B, N]
    if not admissible.any():
        return None
    attention = torch.softmax(logits[admissible], dim=-1)  # [T, K]
    return attention, keys[admissible.nonzero()[:, 0]], admissible


def gkd_den_loss(
    tokens: torch.Tensor, token_labels: torch.Tensor, classes: torch.Tensor, bank: KnowledgeBank, temperature: float
) -> torch.Tensor:
    """1 - cosine between each token [B, N, D] and its reconstruction from the NBI keys it
    attends to (:func:`den_attention`); tokens with no admissible key are skipped."""
    attended = den_attention(tokens, token_labels, classes, bank, temperature)
    if attended is None:
        return tokens.sum() * 0.0
    attention, keys, admissible = attended
    reconstruction = torch.einsum("tk,tkd->td", attention, keys)
    return (1.0 - F.cosine_similarity(tokens[admissible], reconstruction, dim=-1)).mean()


def den_target_spread(
    tokens: torch.Tensor, token_labels: torch.Tensor, classes: torch.Tensor, bank: KnowledgeBank, temperature: float
) -> dict[str, float]:
    """Is GKD-Den more than a centre loss? Over the admissible tokens of [B, N, D]:

    * ``effective_keys``: exp(entropy) of each token's attention, mean (1 = one key; the
      number of admissible keys = uniform attention);
    * ``admissible_keys``: keys a token may attend to, mean;
    * ``centre_cosine``: cosine between a token's target (its reconstruction) and the plain
      mean of its admissible keys, mean: 1 when attention is uniform;
    * ``target_agreement``: cosine between a token's target and the mean target direction of
      the tokens of its (class, token label), mean. Near 1, every token of a class and label
      is pulled to one point: GKD-Den has reduced to a centre loss. Lower: targets of their own;
    * ``token_agreement``: the same for the student tokens themselves (the spread the targets
      are compared with: targets that agree far more than the tokens pull them together).
    """
    attended = den_attention(tokens, token_labels, classes, bank, temperature)
    if attended is None:
        return {k: 0.0 for k in ("effective_keys", "admissible_keys", "centre_cosine", "target_agreement", "token_agreement")} | {
            "tokens": 0
        }
    attention, keys, admissible = attended
    allowed = attention.gt(0)
    entropy = -(attention.clamp_min(1e-12).log() * attention).sum(dim=-1)
    centre = (keys * allowed[..., None]).sum(dim=1) / allowed.sum(dim=1, keepdim=True)
    target = F.normalize(torch.einsum("tk,tkd->td", attention, keys), dim=-1)  # [T, D]
    group = classes[:, None].expand_as(token_labels)[admissible] * 3 + token_labels[admissible]  # [T]: (class, label)

    def agreement(directions: torch.Tensor) -> float:  # [T, D] unit rows
        mean = torch.zeros(int(group.max()) + 1, directions.shape[1], dtype=directions.dtype).index_add_(0, group, directions)
        return float(F.cosine_similarity(directions, mean[group], dim=-1).mean())

    return {
        "effective_keys": float(entropy.exp().mean()),
        "admissible_keys": float(allowed.sum(dim=1).float().mean()),
        "centre_cosine": float(F.cosine_similarity(target, centre, dim=-1).mean()),
        "target_agreement": agreement(target),
        "token_agreement": agreement(F.normalize(tokens[admissible], dim=-1)),
        "tokens": int(len(attention)),
    }


# --------------------------------------------------------------------------- the total


def prototype_regulariser(
    embeddings: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """FedProto's regulariser: mean squared distance of each image's embedding to its class's
    global prototype, over the images whose class has one.

    embeddings [B, D], labels [B], prototypes [C, D] (under stop-gradient), valid bool [C].
    Zero when no image's class has a prototype.
    """
    has = valid[labels]
    if not has.any():
        return embeddings.sum() * 0.0
    diff = embeddings[has] - prototypes.detach()[labels[has]].to(embeddings.dtype)
    return diff.pow(2).sum(dim=1).mean()


@dataclass
class PaGKDTerms:
    """Inputs of the total loss for one student step."""

    logits: torch.Tensor  # [B, C] student class logits
    labels: torch.Tensor  # [B]
    tokens: torch.Tensor  # [B, N, D] student tokens
    token_labels: torch.Tensor  # [B, N] from the student's own activation maps
    prototypes: torch.Tensor  # [G, M, D] student group prototype sets
    group_labels: torch.Tensor  # [G]
    group_logits: torch.Tensor  # [G, C]


def pagkd_loss(
    terms: PaGKDTerms, bank: KnowledgeBank | None, cfg: PaGKDConfig, group_losses_on: bool
) -> tuple[torch.Tensor, dict[str, float]]:
    """L = CE + den_weight * L_Den + pro_weight * (L_con + L_groupCE).

    GKD-Den needs the bank; GKD-Pro's contrastive term needs the bank, its group CE does not.
    ``group_losses_on`` is False during the warm-up epochs, for both modules: GKD-Den's relation
    mask comes from the student's own activation maps, which are noise until CE has shaped them
    (the paper starts its group losses after 5 epochs). Returns (scalar, parts as floats).
    """
    ce = F.cross_entropy(terms.logits, terms.labels)
    total = ce
    parts = {"ce": ce.item()}
    if cfg.use_den and group_losses_on and bank is not None and cfg.den_weight > 0:
        den = gkd_den_loss(terms.tokens, terms.token_labels, terms.labels, bank, cfg.temperature)
        total = total + cfg.den_weight * den
        parts["den"] = den.item()
    if cfg.use_pro and group_losses_on and cfg.pro_weight > 0:
        group_ce = group_classification_loss(terms.group_logits, terms.group_labels)
        pro = group_ce
        parts["group_ce"] = group_ce.item()
        if bank is not None:
            contrastive = gkd_pro_contrastive(terms.prototypes, terms.group_labels, bank, cfg.temperature)
            pro = pro + contrastive
            parts["contrastive"] = contrastive.item()
        total = total + cfg.pro_weight * pro
    parts["total"] = total.item()
    return total, parts
