"""The optimiser and learning-rate schedule, shared by centralised and federated training.

One schedule over the whole training run, written as a function of *progress* in [0, 1]: the
centralised loop's progress is its step over all steps; a federated round r of R covers
progress [(r-1)/R, r/R] and each site spreads that span over its own local steps (sites of
different sizes then follow the same curve). That is how a schedule survives rounds without
shipping optimiser state: every round's local optimiser is fresh (AdamW re-estimates its moments
in a few steps), the learning rate it starts from is where the run's curve is.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from common.config import TrainConfig

# One-cycle's defaults: start and end fractions of the peak learning rate.
START_FRACTION = 1.0 / 25.0
END_FRACTION = 1.0 / 1000.0


def lr_factor(progress: float, schedule: str, warmup_fraction: float) -> float:
    """Multiplier of ``train.lr`` at ``progress`` in [0, 1].

    ``cosine``: linear warm-up from lr/25 to lr over the first ``warmup_fraction``, then cosine
    annealing to lr/1000 (one-cycle's shape). ``constant``: 1 throughout (the paper's Adam).
    """
    if schedule == "constant":
        return 1.0
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup_fraction:
        return START_FRACTION + (1.0 - START_FRACTION) * progress / warmup_fraction
    span = max(1.0 - warmup_fraction, 1e-12)
    cosine = 0.5 * (1.0 + math.cos(math.pi * (progress - warmup_fraction) / span))
    return END_FRACTION + (1.0 - END_FRACTION) * cosine


def build_optimizer(parameters: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) at ``train.lr``; the schedule sets each step's rate."""
    return torch.optim.AdamW(list(parameters), lr=cfg.lr, weight_decay=cfg.weight_decay)


class ProgressSchedule:
    """Sets an optimiser's learning rate for each of ``steps`` steps spanning
    [``start``, ``end``] of the run's progress. Call :meth:`step` before each optimiser step."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps: int, start: float = 0.0, end: float = 1.0):
        self.optimizer, self.cfg = optimizer, cfg
        self.steps, self.start, self.end = max(int(steps), 1), float(start), float(end)
        self.taken = 0

    def progress(self) -> float:
        return self.start + (self.end - self.start) * self.taken / self.steps

    def step(self) -> float:
        lr = self.cfg.lr * lr_factor(self.progress(), self.cfg.schedule, self.cfg.warmup_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.taken += 1
        return lr
