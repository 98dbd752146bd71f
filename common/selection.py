"""Model selection on the validation split: one rule for centralised training (per epoch,
:class:`client.train.ValidationSelector`) and federated training (per round,
:mod:`server.selection`).

A candidate ranks by :func:`common.metrics.selection_key`: a model that learned before one that
did not (however high the latter's AUC on a small val split), then the higher macro AUC. Ties
go to the later epoch or round: it trained longer on the same evidence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from common.metrics import learning_problems, selection_key


@dataclass
class Choice:
    """One scored epoch or round: its number, its pooled val AUC (-inf when NaN) and why it did
    not learn (empty when it did)."""

    step: int
    val_auc: float
    problems: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, step: int, evaluation: Mapping[str, Any]) -> "Choice":
        """``evaluation``: ``{"pooled": metrics, "histogram": {"confusion": [C, C]}}``."""
        learned, auc = selection_key(evaluation)
        return cls(step, auc, [] if learned else learning_problems(evaluation))

    @property
    def key(self) -> tuple[bool, float]:
        return (not self.problems, self.val_auc)

    def to_json(self) -> dict[str, Any]:
        """As metrics.json's ``selection[<model>]`` writes it."""
        return {"round": self.step, "val_auc": self.val_auc, "problems": list(self.problems)}

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> "Choice":
        return cls(int(record["round"]), float(record["val_auc"]), list(record["problems"]))


def prefer(candidate: Choice, chosen: Choice | None) -> bool:
    """Whether ``candidate`` replaces the ``chosen`` one (the first candidate always does)."""
    return chosen is None or candidate.key >= chosen.key
