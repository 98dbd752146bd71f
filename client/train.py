"""Local training and evaluation loops (plain PyTorch, no Flower).

The federated ClientApp and the centralised reference call the same loops; the maths they
optimise lives in :mod:`common.losses`. A ``bank_source`` supplies the NBI side of each student
step: a fixed federated bank, or the live teacher's batch in the centralised reference.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from client.baselines import LossTerm
from common.config import Config
from common.data import BatchAugment, ClassBalancedBatchSampler
from common.device import autocast, to_device
from common.grouping import random_groups
from common.losses import (
    KnowledgeBank,
    PaGKDTerms,
    bank_from_teacher_batch,
    group_classification_loss,
    pagkd_loss,
)
from common.metrics import classification_metrics, confusion_matrix
from common.models import LesionQueryHead, PaGKDNet, group_prototypes, group_view
from common.optim import ProgressSchedule, build_optimizer
from common.progress import progress, site_log
from common.selection import Choice, prefer

log = logging.getLogger(__name__)

BankSource = Callable[[], "KnowledgeBank | None"]


def balanced_loader(dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0, balanced: bool = True) -> DataLoader:
    """Class-balanced batches (the paper's batches; every class forms a group in every batch);
    ``balanced=False``: shuffled batches at the split's own class balance (``train.sampler=shuffle``)."""
    sampler = ClassBalancedBatchSampler(dataset.labels, batch_size, seed=seed, balanced=balanced)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, persistent_workers=num_workers > 0)


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def _epochs(
    loader: DataLoader,
    epochs: int,
    first_epoch: int,
    cfg: Config,
    device: torch.device,
    seed: int,
    on_epoch_end: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(epoch, augmented images on device, labels on device) for each training batch;
    ``on_epoch_end(epoch)`` runs after each epoch's last batch (e.g. model selection)."""
    augment = BatchAugment(cfg.train.rotation_deg, cfg.train.flips, cfg.train.color_jitter, cfg.train.augment)
    generator = torch.Generator().manual_seed(seed + 31)
    for epoch in range(first_epoch, first_epoch + epochs):
        if hasattr(loader.batch_sampler, "set_epoch"):
            loader.batch_sampler.set_epoch(epoch)
        started, seen = time.perf_counter(), 0
        for images, labels in progress(loader, f"epoch {epoch + 1}", len(loader)):
            images = augment(images.to(device, non_blocking=True), generator)
            seen += len(labels)
            yield epoch, to_device(images, device, cfg.train.channels_last), labels.to(device)
        site_log.info(
            "local epoch %d/%d: %d images in %.1f s", epoch - first_epoch + 1, epochs, seen, time.perf_counter() - started
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch)


@dataclass
class Span:
    """The share of the run's learning-rate schedule a call to a training loop covers
    (:mod:`common.optim`): the whole run centrally, [(r-1)/R, r/R] in federated round r of R."""

    start: float = 0.0
    end: float = 1.0


class ValidationSelector:
    """Model selection on the validation split: after every epoch, score the network on
    ``loader`` and keep a copy of the weights :mod:`common.selection` prefers (the rule federated
    rounds follow too); :meth:`restore` loads them back (without val images nothing is
    selected: the last epoch's weights stay). The test split is never read here."""

    def __init__(self, net: PaGKDNet, loader: DataLoader, device: torch.device, amp: bool):
        self.net, self.loader, self.device, self.amp = net, loader, device, amp
        self.chosen: Choice | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[float] = []

    def __call__(self, epoch: int) -> None:
        probs, labels, _ = predict(self.net, self.loader, self.device, self.amp)
        self.net.train()
        if len(labels) == 0:
            return
        confusion = confusion_matrix(labels, probs.argmax(axis=1), probs.shape[1])
        candidate = Choice.of(epoch, {"pooled": classification_metrics(probs, labels), "histogram": {"confusion": confusion}})
        self.history.append(candidate.val_auc)
        if prefer(candidate, self.chosen):
            self.chosen = candidate
            self.best_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    @property
    def best_epoch(self) -> int:
        """The selected epoch (-1 before any was scored)."""
        return self.chosen.step if self.chosen is not None else -1

    @property
    def best_auc(self) -> float:
        """Val AUC of the selected epoch (-inf before any was scored)."""
        return self.chosen.val_auc if self.chosen is not None else -math.inf

    def restore(self) -> None:
        if self.best_state is not None:
            self.net.load_state_dict(self.best_state)


@dataclass
class TrainResult:
    num_examples: int
    losses: dict[str, float]  # mean of each loss part over the steps
    # The optimiser's state_dict after the last step (moments per parameter), for a caller that
    # carries it into its next call (train.keep_optimizer_state).
    optimizer_state: dict | None = None


class _Mean:
    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0

    def add(self, parts: dict[str, float]) -> None:
        self.steps += 1
        for key, value in parts.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def result(self, num_examples: int) -> TrainResult:
        return TrainResult(num_examples, {k: v / max(self.steps, 1) for k, v in self.sums.items()})


def _train_mode_optimizer(
    cfg: Config,
    net: PaGKDNet,
    head: LesionQueryHead,
    device: torch.device,
    steps: int,
    span: Span,
    optimizer_state: dict | None = None,
) -> tuple[torch.optim.Optimizer, ProgressSchedule]:
    """Move both modules to the device in train mode; AdamW over both, with the run's schedule
    over ``span`` spread across these ``steps``. ``optimizer_state``: an earlier call's
    ``TrainResult.optimizer_state`` for the same modules (its moments carry on; the schedule
    still sets every step's rate)."""
    net.to(device).train()
    head.to(device).train()
    optimizer = build_optimizer(list(net.parameters()) + list(head.parameters()), cfg.train)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)  # ValueError when the modules' shapes differ
    return optimizer, ProgressSchedule(optimizer, cfg.train, steps, span.start, span.end)


def train_teacher(
    teacher: PaGKDNet,
    head: LesionQueryHead,
    loader: DataLoader,
    cfg: Config,
    device: torch.device,
    epochs: int,
    seed: int,
    span: Span = Span(),
    on_epoch_end: Callable[[int], None] | None = None,
    optimizer_state: dict | None = None,
) -> TrainResult:
    """NBI teacher: CE on the backbone + classifier; group CE on the (detached-feature) token
    embedding and the shared query head, so the NBI token space and queries are class-aware
    before any student distils from them. ``span``: the schedule's share this call covers;
    ``optimizer_state``: see :func:`_train_mode_optimizer`."""
    optimizer, schedule = _train_mode_optimizer(cfg, teacher, head, device, epochs * len(loader), span, optimizer_state)
    generator = torch.Generator().manual_seed(seed)
    meter, seen = _Mean(), 0
    for _, images, labels in _epochs(loader, epochs, 0, cfg, device, seed, on_epoch_end):
        with autocast(device, cfg.train.amp):
            out = teacher(images)
            ce = F.cross_entropy(out.logits, labels)
            groups = random_groups(labels.cpu(), cfg.pagkd.group_size, cfg.pagkd.min_group_size, generator)
            prototypes, group_labels, _ = group_prototypes(head, out.tokens, groups)
            group_ce = group_classification_loss(head.classify(prototypes), group_labels)
            loss = ce + group_ce
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        schedule.step()
        optimizer.step()
        meter.add({"total": loss.item(), "ce": ce.item(), "group_ce": group_ce.item()})
        seen += len(labels)
    result = meter.result(seen)
    result.optimizer_state = optimizer.state_dict()
    return result


def train_student(
    student: PaGKDNet,
    head: LesionQueryHead,
    loader: DataLoader,
    bank_source: BankSource,
    cfg: Config,
    device: torch.device,
    epochs: int,
    seed: int,
    first_epoch: int = 0,
    group_losses: bool | None = None,
    terms: Sequence[LossTerm] = (),
    span: Span = Span(),
    on_epoch_end: Callable[[int], None] | None = None,
    optimizer_state: dict | None = None,
) -> TrainResult:
    """WLI student: CE + GKD-Den + GKD-Pro against the bank that ``bank_source`` returns.

    With ``bank_source`` returning None (and use_pro/use_den off) this is the WLI-only baseline.
    ``group_losses`` forces the group terms on/off; None follows ``pagkd.warmup_epochs``.
    ``terms``: the baselines' terms added to the loss (:mod:`client.baselines`, e.g. FedProto's
    regulariser); each sees every step's tokens and labels. ``span``: the
    schedule's share this call covers; ``on_epoch_end(epoch)`` e.g. a :class:`ValidationSelector`;
    ``optimizer_state``: see :func:`_train_mode_optimizer`.
    """
    optimizer, schedule = _train_mode_optimizer(cfg, student, head, device, epochs * len(loader), span, optimizer_state)
    generator = torch.Generator().manual_seed(seed)
    meter, seen = _Mean(), 0
    for epoch, images, labels in _epochs(loader, epochs, first_epoch, cfg, device, seed, on_epoch_end):
        group_on = group_losses if group_losses is not None else epoch >= cfg.pagkd.warmup_epochs
        bank = bank_source()
        with autocast(device, cfg.train.amp):
            view = group_view(student, head, images, labels, cfg.pagkd, generator, grouped=cfg.pagkd.use_pro and group_on)
            out = view.out
            pagkd_terms = PaGKDTerms(
                out.logits,
                labels,
                out.tokens,
                view.token_labels,
                view.prototypes,
                view.group_labels,
                head.classify(view.prototypes),
            )
            loss, parts = pagkd_loss(pagkd_terms, bank, cfg.pagkd, group_on)
            for term in terms:
                extra, extra_parts = term(out.tokens, labels, last_epoch=epoch == first_epoch + epochs - 1)
                if extra is not None:
                    loss = loss + extra
                    parts.update(extra_parts, total=loss.item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        schedule.step()
        optimizer.step()
        meter.add(parts)
        seen += len(labels)
    result = meter.result(seen)
    result.optimizer_state = optimizer.state_dict()
    return result


def live_teacher_bank(
    teacher: PaGKDNet, head: LesionQueryHead, nbi_loader: DataLoader, cfg: Config, device: torch.device, seed: int
) -> BankSource:
    """Centralised reference: each student step distils from a fresh NBI batch of the frozen
    teacher (groups re-drawn every batch, never paired with the WLI batch)."""
    generator = torch.Generator().manual_seed(seed + 7919)
    batches = _epochs(nbi_loader, 10**9, 0, cfg, device, seed + 1)
    num_classes = teacher.classifier.out_features

    @torch.no_grad()
    def next_bank() -> KnowledgeBank:
        teacher.eval()
        was_training = head.training
        head.eval()
        _, images, labels = next(batches)
        with autocast(device, cfg.train.amp):
            view = group_view(teacher, head, images, labels, cfg.pagkd, generator)
        head.train(was_training)
        tokens = view.out.tokens.float()
        return bank_from_teacher_batch(view.prototypes.float(), view.group_labels, tokens, view.token_labels, labels, num_classes)

    return next_bank


@torch.no_grad()
def predict(net: PaGKDNet, loader: DataLoader, device: torch.device, amp: bool = True) -> tuple[np.ndarray, np.ndarray, float]:
    """Class probabilities [N, C], labels [N] and mean CE over a loader."""
    net.to(device).eval()
    probs, labels, loss_sum = [], [], 0.0
    for images, target in progress(loader, "evaluate", len(loader)):
        images = images.to(device)
        with autocast(device, amp):
            logits = net(images).logits.float()
        loss_sum += F.cross_entropy(logits, target.to(device), reduction="sum").item()
        probs.append(torch.softmax(logits, dim=1).cpu().numpy())
        labels.append(target.numpy())
    if not probs:
        return np.zeros((0, net.classifier.out_features), np.float32), np.zeros(0, np.int64), float("nan")
    all_labels = np.concatenate(labels).astype(np.int64)
    return np.concatenate(probs), all_labels, loss_sum / len(all_labels)
