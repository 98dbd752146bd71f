"""The PaGKD maths (common/losses.py): activation maps, token labels, relations, the bank,
GKD-Pro, GKD-Den and the total, checked against explicit (loop) references and limits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.config import PaGKDConfig
from common.losses import (
    BACKGROUND,
    FOREGROUND,
    UNCERTAIN,
    KnowledgeBank,
    PaGKDTerms,
    bank_from_teacher_batch,
    class_activation_maps,
    den_target_spread,
    gkd_den_loss,
    gkd_pro_contrastive,
    group_classification_loss,
    label_tokens,
    pagkd_loss,
    prototype_similarity,
    relation_weights,
)

# Sizes all different: classes, sub-types, queries, width, centroids, tokens per image, groups, images.
C, S, M, D, L, N, G, B = 3, 2, 4, 16, 5, 6, 7, 8


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed))


# --------------------------------------------------------------------------- activation maps


def _explicit_grad_cam(feature_map: torch.Tensor, head: nn.Linear, classes: torch.Tensor) -> torch.Tensor:
    """Textbook Grad-CAM with autograd: channel weights = spatial mean of d logit_c / d F."""
    fmap = feature_map.clone().requires_grad_()
    logits = head(fmap.mean(dim=(2, 3)))
    chosen = logits.gather(1, classes[:, None]).sum()
    (grad,) = torch.autograd.grad(chosen, fmap)
    alpha = grad.mean(dim=(2, 3), keepdim=True)  # [B, Cf, 1, 1]
    cam = torch.relu((alpha * fmap).sum(dim=1)).flatten(1).detach()  # [B, h*w]
    low, high = cam.amin(1, keepdim=True), cam.amax(1, keepdim=True)
    assert (high - low).min() > 1e-4, "degenerate test input"
    return (cam - low) / (high - low)


@pytest.mark.parametrize("seed", range(3))
def test_class_activation_maps_equal_explicit_grad_cam(seed):
    torch.manual_seed(seed)
    cf, h, w = 12, 3, 5
    head = nn.Linear(cf, C)
    feature_map = torch.relu(_randn(B, cf, h, w, seed=seed))  # post-ReLU, like a backbone's last stage
    classes = torch.randint(0, C, (B,), generator=_gen(seed))
    expected = _explicit_grad_cam(feature_map, head, classes)
    got = class_activation_maps(feature_map, head.weight, classes)
    assert got.shape == (B, h * w)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(got.amin(1), torch.zeros(B)) and torch.allclose(got.amax(1), torch.ones(B))


def test_class_activation_maps_use_the_given_class_and_carry_no_grad():
    feature_map = torch.relu(_randn(2, 4, 2, 2, seed=1)).requires_grad_()
    weight = _randn(C, 4, seed=2).requires_grad_()
    cam0 = class_activation_maps(feature_map, weight, torch.tensor([0, 0]))
    cam1 = class_activation_maps(feature_map, weight, torch.tensor([1, 0]))
    assert not cam0.requires_grad
    assert not torch.allclose(cam0[0], cam1[0])
    torch.testing.assert_close(cam0[1], cam1[1])


def test_class_activation_map_of_an_all_negative_image_is_zero_not_nan():
    feature_map = torch.ones(1, 2, 2, 2)
    weight = -torch.ones(C, 2)
    cam = class_activation_maps(feature_map, weight, torch.tensor([0]))
    assert torch.equal(cam, torch.zeros(1, 4))


def test_label_tokens_thresholds():
    cam = torch.tensor([[0.0, 0.29, 0.3, 0.45, 0.59, 0.6, 1.0]])
    labels = label_tokens(cam, fg_threshold=0.6, bg_threshold=0.3)
    B_, F_, U_ = BACKGROUND, FOREGROUND, UNCERTAIN
    assert labels.tolist() == [[B_, B_, U_, U_, U_, F_, F_]]
    assert labels.dtype == torch.long
    # equal thresholds: nothing is uncertain
    same = label_tokens(cam, fg_threshold=0.45, bg_threshold=0.45)
    assert same.tolist() == [[B_, B_, B_, F_, F_, F_, F_]]
    assert len({BACKGROUND, FOREGROUND, UNCERTAIN}) == 3


def test_relation_weights_values():
    labels = torch.tensor([[FOREGROUND, BACKGROUND, UNCERTAIN]])
    keys = torch.tensor([[FOREGROUND, BACKGROUND, UNCERTAIN, FOREGROUND]])
    relation = relation_weights(labels, keys)
    assert relation.shape == (1, 3, 4)
    expected = torch.tensor([[[1.0, 0.0, 0.5, 1.0], [0.0, 1.0, 0.5, 0.0], [0.5, 0.5, 0.5, 0.5]]])
    assert torch.equal(relation, expected)
    assert set(relation.unique().tolist()) == {0.0, 0.5, 1.0}


# --------------------------------------------------------------------------- the bank


def _statistics(seed: int = 0):
    gen = _gen(seed)
    proto_count = torch.randint(0, 4, (C, S), generator=gen)
    proto_count[0, 0], proto_count[1, 1] = 0, 3
    fg_count = torch.randint(0, 5, (C, L), generator=gen)
    bg_count = torch.randint(0, 5, (C, L), generator=gen)
    fg_count[2] = 0  # a class with no foreground centroid at all
    bg_count[0, 0] = 7
    proto_sum = torch.randn(C, S, M, D, generator=gen, dtype=torch.float64) * proto_count[..., None, None]
    fg_sum = torch.randn(C, L, D, generator=gen, dtype=torch.float64) * fg_count[..., None]
    bg_sum = torch.randn(C, L, D, generator=gen, dtype=torch.float64) * bg_count[..., None]
    return proto_sum, proto_count, fg_sum, fg_count, bg_sum, bg_count


def bank_from_statistics(proto_sum, proto_count, fg_sum, fg_count, bg_sum, bg_count) -> KnowledgeBank:
    """The six statistics as the record arrays that :meth:`KnowledgeBank.from_statistics` reads."""
    arrays = {
        "prototype_sum": proto_sum,
        "prototype_count": proto_count,
        "foreground_sum": fg_sum,
        "foreground_count": fg_count,
        "background_sum": bg_sum,
        "background_count": bg_count,
    }
    return KnowledgeBank.from_statistics({k: v.numpy() for k, v in arrays.items()})


def test_bank_from_statistics():
    proto_sum, proto_count, fg_sum, fg_count, bg_sum, bg_count = _statistics()
    bank = bank_from_statistics(proto_sum, proto_count, fg_sum, fg_count, bg_sum, bg_count)
    assert bank.prototypes.shape == (C, S, M, D) and bank.prototype_valid.shape == (C, S)
    assert bank.keys.shape == (C, 2 * L, D)
    assert bank.key_labels.shape == bank.key_valid.shape == (C, 2 * L)
    assert bank.prototypes.dtype == bank.keys.dtype == torch.float32
    assert bank.num_classes == C
    assert torch.equal(bank.prototype_valid, proto_count > 0)
    for c in range(C):
        for s in range(S):
            if proto_count[c, s] > 0:
                expected = (proto_sum[c, s] / proto_count[c, s]).float()
                torch.testing.assert_close(bank.prototypes[c, s], expected)
        for i in range(L):
            # foreground centroids first, then background, labelled accordingly
            assert bank.key_labels[c, i] == FOREGROUND and bank.key_labels[c, L + i] == BACKGROUND
            assert bool(bank.key_valid[c, i]) == bool(fg_count[c, i] > 0)
            assert bool(bank.key_valid[c, L + i]) == bool(bg_count[c, i] > 0)
            if fg_count[c, i] > 0:
                torch.testing.assert_close(bank.keys[c, i], (fg_sum[c, i] / fg_count[c, i]).float())
            if bg_count[c, i] > 0:
                torch.testing.assert_close(bank.keys[c, L + i], (bg_sum[c, i] / bg_count[c, i]).float())
    assert not bank.key_valid[2, :L].any()
    assert torch.isfinite(bank.prototypes).all() and torch.isfinite(bank.keys).all()


def test_bank_from_statistics_is_additive_over_sites():
    """Summed site statistics give the mean over the pooled groups."""
    a = _statistics(1)
    b = _statistics(2)
    pooled = bank_from_statistics(*(x + y for x, y in zip(a, b)))
    total = a[1] + b[1]
    ok = total > 0
    mean = (a[0] + b[0])[ok] / total[ok][:, None, None]
    torch.testing.assert_close(pooled.prototypes[ok], mean.float())


def test_bank_from_teacher_batch_shapes_and_contents():
    prototypes = _randn(5, M, D, seed=1)
    group_labels = torch.tensor([0, 2, 0, 0, 2])  # class 1 has no group
    tokens = _randn(B, N, D, seed=2)
    token_labels = torch.randint(0, 3, (B, N), generator=_gen(3))
    classes = torch.tensor([0, 1, 2, 0, 0, 2, 1, 0])
    bank = bank_from_teacher_batch(prototypes, group_labels, tokens, token_labels, classes, C)
    assert bank.prototypes.shape == (C, 3, M, D)
    assert bank.prototype_valid.tolist() == [[True, True, True], [False, False, False], [True, True, False]]
    torch.testing.assert_close(bank.prototypes[2, :2], prototypes[[1, 4]])
    torch.testing.assert_close(bank.prototypes[0], prototypes[[0, 2, 3]])
    assert bank.keys.shape == (C, 4 * N, D)
    assert bank.key_valid.sum(1).tolist() == [4 * N, 2 * N, 2 * N]
    torch.testing.assert_close(bank.keys[1, : 2 * N], tokens[[1, 6]].flatten(0, 1))
    assert torch.equal(bank.key_labels[1, : 2 * N], token_labels[[1, 6]].flatten())


# --------------------------------------------------------------------------- GKD-Pro


def test_prototype_similarity():
    a = _randn(G, M, D, seed=1)
    torch.testing.assert_close(prototype_similarity(a, a), torch.ones(G))
    torch.testing.assert_close(prototype_similarity(a, 3.0 * a), torch.ones(G))  # scale-free
    torch.testing.assert_close(prototype_similarity(a, -a), -torch.ones(G))
    # query k is matched with query k only: a permutation of the queries is a different set
    assert (prototype_similarity(a, a[:, torch.roll(torch.arange(M), 1)]) < 0.9).all()
    # broadcasting [G, 1, M, D] x [1, C, M, D] -> [G, C]
    assert prototype_similarity(a[:, None], _randn(C, M, D, seed=2)[None]).shape == (G, C)


def _separated_bank(seed: int = 0) -> KnowledgeBank:
    """Class c's queries are basis vectors disjoint from every other class's: cos = 0 across classes."""
    assert C * M <= D
    eye = torch.eye(D)
    protos = torch.stack([eye[c * M : (c + 1) * M] for c in range(C)])[:, None]  # [C, 1, M, D]
    return bank_from_statistics(protos, torch.ones(C, 1, dtype=torch.long), *_empty_codebook())


def _empty_codebook():
    zeros = torch.zeros(C, L, D)
    counts = torch.zeros(C, L, dtype=torch.long)
    return zeros, counts, zeros, counts


def test_gkd_pro_minimal_at_the_bank_and_grows_with_noise():
    bank = _separated_bank()
    labels = torch.tensor([0, 1, 2, 0, 2])
    clean = bank.prototypes[labels, 0]  # [G, M, D]
    losses = []
    for level in (0.0, 0.1, 0.3, 1.0, 3.0):
        per_seed = [
            gkd_pro_contrastive(clean + level * _randn(*clean.shape, seed=s), labels, bank, temperature=0.1) for s in range(3)
        ]
        losses.append(torch.stack(per_seed).mean().item())
    assert losses[0] < 1e-3, losses
    assert all(b > a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] > 1.0, losses


def _reference_contrastive(student, labels, bank, temperature):
    """Loop form of the docstring: positive = best valid same-class NBI set; negatives = valid
    NBI sets of other classes and the WLI sets of other classes in the batch."""
    losses = []
    for g in range(len(labels)):
        c = int(labels[g])
        sims_pos = [
            prototype_similarity(student[g], bank.prototypes[c, s]) / temperature
            for s in range(bank.prototypes.shape[1])
            if bank.prototype_valid[c, s]
        ]
        if not sims_pos:
            continue
        positive = torch.stack(sims_pos).max()
        negatives = [
            prototype_similarity(student[g], bank.prototypes[o, s]) / temperature
            for o in range(bank.num_classes)
            for s in range(bank.prototypes.shape[1])
            if o != c and bank.prototype_valid[o, s]
        ]
        negatives += [
            prototype_similarity(student[g], student[h]) / temperature for h in range(len(labels)) if int(labels[h]) != c
        ]
        logits = torch.stack([positive] + negatives)
        losses.append(torch.logsumexp(logits, 0) - positive)
    return torch.stack(losses).mean()


@pytest.mark.parametrize("seed", range(3))
def test_gkd_pro_matches_loop_reference(seed):
    gen = _gen(seed)
    valid = torch.rand(C, S, generator=gen) > 0.3
    valid[1] = False  # class 1 has no NBI set: its anchors are skipped
    valid[0, 0] = True
    bank = KnowledgeBank(
        _randn(C, S, M, D, seed=seed + 10),
        valid,
        torch.zeros(C, 1, D),
        torch.zeros(C, 1, dtype=torch.long),
        torch.zeros(C, 1, dtype=torch.bool),
    )
    labels = torch.randint(0, C, (G,), generator=gen)
    labels[:2] = torch.tensor([0, 1])
    student = _randn(G, M, D, seed=seed + 20)
    got = gkd_pro_contrastive(student, labels, bank, temperature=0.2)
    torch.testing.assert_close(got, _reference_contrastive(student, labels, bank, 0.2), atol=1e-5, rtol=1e-5)


def test_gkd_pro_skips_anchors_without_a_bank_set():
    bank = _separated_bank()
    bank.prototype_valid[2] = False
    labels = torch.tensor([0, 2])
    student = bank.prototypes[torch.tensor([0, 1]), 0].clone()  # the class-2 anchor is far from its (invalid) set
    with_skip = gkd_pro_contrastive(student, labels, bank, 0.1)
    # only the class-0 anchor counts (the class-2 group is still its batch negative)
    torch.testing.assert_close(with_skip, _reference_contrastive(student, labels, bank, 0.1))
    assert with_skip < 1e-3


def test_gkd_pro_returns_zero_with_grad_when_nothing_applies():
    bank = _separated_bank()
    bank.prototype_valid[:] = False
    student = _randn(3, M, D, seed=4).requires_grad_()
    loss = gkd_pro_contrastive(student, torch.tensor([0, 1, 2]), bank, 0.1)
    assert loss.item() == 0.0 and loss.requires_grad and loss.dim() == 0
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))
    empty = torch.zeros(0, M, D, requires_grad=True)
    loss = gkd_pro_contrastive(empty, torch.zeros(0, dtype=torch.long), _separated_bank(), 0.1)
    assert loss.item() == 0.0 and loss.requires_grad


def test_group_classification_loss():
    logits = _randn(G, C, seed=3)
    labels = torch.randint(0, C, (G,), generator=_gen(3))
    torch.testing.assert_close(group_classification_loss(logits, labels), F.cross_entropy(logits, labels))
    empty = torch.zeros(0, C, requires_grad=True)
    loss = group_classification_loss(empty, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0 and loss.requires_grad


# --------------------------------------------------------------------------- GKD-Den


def _codebook_bank(seed: int = 0) -> tuple[KnowledgeBank, torch.Tensor, torch.Tensor]:
    """A bank of L foreground and L background centroids per class (counts 1: keys = sums)."""
    fg, bg = _randn(C, L, D, seed=seed), _randn(C, L, D, seed=seed + 1)
    ones = torch.ones(C, L, dtype=torch.long)
    protos = torch.zeros(C, S, M, D)
    bank = bank_from_statistics(protos, torch.zeros(C, S, dtype=torch.long), fg, ones, bg, ones)
    return bank, fg, bg


def _tokens_equal_to_keys(bank: KnowledgeBank, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image b's tokens are exactly its class's keys, labelled like them. -> tokens [B, 2L, D], labels."""
    return bank.keys[classes].clone(), bank.key_labels[classes].clone()


def test_gkd_den_zero_at_the_keys_and_grows_with_noise():
    bank, _, _ = _codebook_bank()
    classes = torch.tensor([0, 2, 1, 0])
    tokens, labels = _tokens_equal_to_keys(bank, classes)
    losses = []
    for level in (0.0, 0.1, 0.3, 1.0, 3.0):
        per_seed = [
            gkd_den_loss(tokens + level * _randn(*tokens.shape, seed=s), labels, classes, bank, temperature=0.01)
            for s in range(3)
        ]
        losses.append(torch.stack(per_seed).mean().item())
    assert losses[0] < 1e-4, losses
    assert all(b > a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] > 0.3, losses


def test_gkd_den_relation_mask_forbids_the_other_label():
    """A token equal to a background key but labelled foreground may not reconstruct from it."""
    bank, fg, bg = _codebook_bank()
    classes = torch.tensor([1])
    tokens = bg[1, :1][None]  # [1, 1, D]
    as_background = gkd_den_loss(tokens, torch.tensor([[BACKGROUND]]), classes, bank, 0.01)
    as_foreground = gkd_den_loss(tokens, torch.tensor([[FOREGROUND]]), classes, bank, 0.01)
    assert as_background < 1e-4
    assert as_foreground > 0.1
    # keys of another class are never used either
    other_class = gkd_den_loss(tokens, torch.tensor([[BACKGROUND]]), torch.tensor([0]), bank, 0.01)
    assert other_class > 0.1


def _reference_den(tokens, token_labels, classes, bank, temperature):
    losses = []
    for b in range(tokens.shape[0]):
        c = int(classes[b])
        for n in range(tokens.shape[1]):
            t = tokens[b, n]
            weights, keys = [], []
            for k in range(bank.keys.shape[1]):
                if not bank.key_valid[c, k]:
                    continue
                tl, kl = int(token_labels[b, n]), int(bank.key_labels[c, k])
                r = 0.5 if UNCERTAIN in (tl, kl) else float(tl == kl)
                if r == 0:
                    continue
                weights.append(F.cosine_similarity(t, bank.keys[c, k], dim=0) / temperature * r)
                keys.append(bank.keys[c, k])
            if not keys:
                continue
            attention = torch.softmax(torch.stack(weights), 0)
            reconstruction = (attention[:, None] * torch.stack(keys)).sum(0)
            losses.append(1 - F.cosine_similarity(t, reconstruction, dim=0))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("seed", range(3))
def test_gkd_den_matches_loop_reference(seed):
    bank, _, _ = _codebook_bank(seed)
    bank.key_valid[torch.rand(bank.key_valid.shape, generator=_gen(seed)) < 0.3] = False
    bank.key_valid[2, :L] = False  # class 2: no foreground key -> its foreground tokens are skipped
    classes = torch.tensor([0, 2, 1, 2])
    tokens = _randn(4, N, D, seed=seed + 5)
    labels = torch.randint(0, 3, (4, N), generator=_gen(seed + 6))
    labels[1, 0] = FOREGROUND
    got = gkd_den_loss(tokens, labels, classes, bank, temperature=0.5)
    torch.testing.assert_close(got, _reference_den(tokens, labels, classes, bank, 0.5), atol=1e-5, rtol=1e-5)


def test_gkd_den_zero_with_grad_when_no_key_is_admissible():
    bank, _, _ = _codebook_bank()
    bank.key_valid[:] = False
    tokens = _randn(2, N, D, seed=3).requires_grad_()
    loss = gkd_den_loss(tokens, torch.zeros(2, N, dtype=torch.long), torch.tensor([0, 1]), bank, 0.1)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(tokens.grad, torch.zeros_like(tokens))


# --------------------------------------------------------------------------- the total


class _Side(nn.Module):
    """A tiny stand-in network: features -> tokens, logits, prototypes."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.tokens = nn.Linear(D, D)
        self.classifier = nn.Linear(D, C)
        self.queries = nn.Linear(D, M * D)
        self.group_classifier = nn.Linear(D, C)

    def forward(self, x: torch.Tensor, groups: list[torch.Tensor]):
        tokens = self.tokens(x)  # [B, N, D]
        logits = self.classifier(tokens.mean(1))
        pooled = torch.stack([tokens[g].mean(dim=(0, 1)) for g in groups])  # [G, D]
        prototypes = self.queries(pooled).reshape(len(groups), M, D)
        return tokens, logits, prototypes, self.group_classifier(prototypes.mean(1))


def _batch():
    classes = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    groups = [torch.tensor([0, 1, 6]), torch.tensor([2, 3, 7]), torch.tensor([4, 5])]
    group_labels = torch.tensor([0, 1, 2])
    token_labels = torch.randint(0, 3, (B, N), generator=_gen(9))
    return classes, groups, group_labels, token_labels


def _terms(student: _Side, x, classes, groups, group_labels, token_labels) -> PaGKDTerms:
    tokens, logits, prototypes, group_logits = student(x, groups)
    return PaGKDTerms(logits, classes, tokens, token_labels, prototypes, group_labels, group_logits)


def test_gradients_reach_only_the_student_side():
    classes, groups, group_labels, token_labels = _batch()
    teacher, student = _Side(1), _Side(2)
    nbi = _randn(B, N, D, seed=1).requires_grad_()  # teacher inputs that require grad
    t_tokens, _, t_prototypes, _ = teacher(nbi, groups)
    assert t_tokens.requires_grad and t_prototypes.requires_grad
    bank = bank_from_teacher_batch(t_prototypes, group_labels, t_tokens, token_labels, classes, C)
    for tensor in (bank.prototypes, bank.keys):
        assert not tensor.requires_grad

    terms = _terms(student, _randn(B, N, D, seed=2), classes, groups, group_labels, token_labels)
    cfg = PaGKDConfig(use_pro=True, use_den=True, pro_weight=1.0, den_weight=1.0)
    total, parts = pagkd_loss(terms, bank, cfg, group_losses_on=True)
    total.backward()
    assert set(parts) == {"ce", "den", "group_ce", "contrastive", "total"}
    assert parts["den"] > 0 and parts["contrastive"] > 0
    assert nbi.grad is None
    assert all(p.grad is None for p in teacher.parameters())
    for name, p in student.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("use_pro", [True, False])
@pytest.mark.parametrize("use_den", [True, False])
@pytest.mark.parametrize("group_losses_on", [True, False])
@pytest.mark.parametrize("with_bank", [True, False])
def test_pagkd_loss_flags(use_pro, use_den, group_losses_on, with_bank):
    classes, groups, group_labels, token_labels = _batch()
    bank = None
    if with_bank:
        t_tokens, _, t_prototypes, _ = _Side(1)(_randn(B, N, D, seed=1), groups)
        bank = bank_from_teacher_batch(t_prototypes, group_labels, t_tokens, token_labels, classes, C)
    student = _Side(2)
    terms = _terms(student, _randn(B, N, D, seed=2), classes, groups, group_labels, token_labels)
    cfg = PaGKDConfig(use_pro=use_pro, use_den=use_den, den_weight=0.7, pro_weight=0.3, temperature=0.2)
    total, parts = pagkd_loss(terms, bank, cfg, group_losses_on=group_losses_on)

    expected_keys = {"ce", "total"}
    if use_den and with_bank and group_losses_on:  # the warm-up holds back both modules
        expected_keys.add("den")
    if use_pro and group_losses_on:
        expected_keys.add("group_ce")
        if with_bank:
            expected_keys.add("contrastive")
    assert set(parts) == expected_keys

    ce = F.cross_entropy(terms.logits, classes)
    expected = ce
    if "den" in parts:
        expected = expected + 0.7 * gkd_den_loss(terms.tokens, token_labels, classes, bank, 0.2)
    if "group_ce" in parts:
        pro = F.cross_entropy(terms.group_logits, group_labels)
        if "contrastive" in parts:
            pro = pro + gkd_pro_contrastive(terms.prototypes, group_labels, bank, 0.2)
        expected = expected + 0.3 * pro
    torch.testing.assert_close(total, expected)
    assert math.isclose(parts["total"], total.item(), rel_tol=1e-6)
    assert math.isclose(parts["ce"], ce.item(), rel_tol=1e-6)
    # switched-off terms give no gradient to what only they use
    total.backward()
    prototype_grad = student.queries.weight.grad
    if "group_ce" in parts:
        assert prototype_grad is not None and prototype_grad.abs().sum() > 0
    else:
        assert prototype_grad is None


def test_zero_weights_switch_terms_off():
    classes, groups, group_labels, token_labels = _batch()
    teacher = _Side(1)
    t_tokens, _, t_prototypes, _ = teacher(_randn(B, N, D, seed=1), groups)
    bank = bank_from_teacher_batch(t_prototypes, group_labels, t_tokens, token_labels, classes, C)
    terms = _terms(_Side(2), _randn(B, N, D, seed=2), classes, groups, group_labels, token_labels)
    total, parts = pagkd_loss(
        terms, bank, PaGKDConfig(use_pro=True, use_den=True, den_weight=0.0, pro_weight=0.0), group_losses_on=True
    )
    assert set(parts) == {"ce", "total"}
    torch.testing.assert_close(total, F.cross_entropy(terms.logits, classes))


def test_bank_to_device_keeps_everything():
    bank, _, _ = _codebook_bank()
    moved = bank.to("cpu")
    for name in ("prototypes", "prototype_valid", "keys", "key_labels", "key_valid"):
        assert torch.equal(getattr(moved, name), getattr(bank, name))


def _one_class_bank(keys: torch.Tensor) -> KnowledgeBank:
    """One class, foreground keys [K, D] only (every token below is foreground)."""
    k, d = keys.shape
    return KnowledgeBank(
        torch.zeros(1, 1, 1, d),
        torch.zeros(1, 1, dtype=torch.bool),
        keys[None],
        torch.full((1, k), FOREGROUND),
        torch.ones(1, k, dtype=torch.bool),
    )


def test_den_target_spread_tells_a_centre_loss_from_targets_of_their_own():
    gen = _gen(0)
    tokens = torch.randn(2, 6, 8, generator=gen)
    labels = torch.full((2, 6), FOREGROUND)
    classes = torch.zeros(2, dtype=torch.long)
    # Four copies of one key: every token gets the same target, uniform attention.
    centre = den_target_spread(tokens, labels, classes, _one_class_bank(torch.ones(4, 8)), temperature=0.1)
    assert centre["effective_keys"] == pytest.approx(4.0) and centre["admissible_keys"] == 4.0
    assert centre["target_agreement"] == pytest.approx(1.0) and centre["centre_cosine"] == pytest.approx(1.0)
    assert centre["token_agreement"] < 0.9 and centre["tokens"] == 12
    # The keys are the tokens themselves, attended sharply: each token's target is (nearly) its own.
    own = den_target_spread(tokens, labels, classes, _one_class_bank(tokens.reshape(12, 8)), temperature=0.01)
    assert own["effective_keys"] < 1.5
    assert own["target_agreement"] == pytest.approx(own["token_agreement"], abs=0.05) and own["target_agreement"] < 0.9
    # No admissible key (background tokens, foreground keys only): nothing measured.
    none = den_target_spread(tokens, torch.full((2, 6), BACKGROUND), classes, _one_class_bank(torch.ones(4, 8)), 0.1)
    assert none["tokens"] == 0
