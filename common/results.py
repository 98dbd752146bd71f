"""A finished run's results as typed records, with the JSON of ``metrics.json``.

:class:`RunResult` is what the server writes (:mod:`server.outputs`) and what the launcher,
the experiment entry point and the benchmarks read back (:meth:`RunResult.read`), like
Flower's ``Result``: attributes instead of string keys. ``to_json`` writes exactly the
``metrics.json`` layout (keys and order); ``from_json`` accepts what older runs wrote (a key
they lack takes its default, one it does not know is kept in ``extra`` and written back).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from common.selection import Choice

METRICS_FILE = "metrics.json"


class _Pooled:
    """A :class:`Figure` attribute that reads its pooled metric of the same name."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, figure: "Figure | None", owner: type | None = None) -> Any:
        return self if figure is None else figure.pooled[self.name]


@dataclass
class Figure:
    """A selected model's test figures (metrics.json's ``final`` / ``final_teacher``):
    ``pooled`` holds :func:`common.metrics.histogram_metrics` of that test evaluation."""

    pooled: dict[str, Any]
    round: int  # the round whose test evaluation this is
    confusion: list[list[int]]  # [true C, predicted C]
    selected_round: int  # the round model selection chose on val

    # The headline metrics as attributes (read from ``pooled``).
    auc, accuracy, sensitivity, specificity = _Pooled(), _Pooled(), _Pooled(), _Pooled()

    def subset(self, names: tuple[str, ...]) -> dict[str, float]:
        """The named pooled metrics, e.g. ``("auc", "accuracy")``."""
        return {name: self.pooled[name] for name in names}

    def to_json(self) -> dict[str, Any]:
        return {**self.pooled, "round": self.round, "confusion": self.confusion, "selected_round": self.selected_round}

    @classmethod
    def from_json(cls, record: Mapping[str, Any] | None) -> "Figure | None":
        if record is None:
            return None
        pooled = {k: v for k, v in record.items() if k not in ("round", "confusion", "selected_round")}
        return cls(pooled, record["round"], record["confusion"], record["selected_round"])


@dataclass
class RunResult:
    """``metrics.json`` of a finished run, field by field in the file's order."""

    # What the protocol recorded round by round (server.state.RunState.metrics).
    teacher: list[dict[str, Any]] = field(default_factory=list)  # {round, loss, sites}
    knowledge: list[dict[str, Any]] = field(default_factory=list)  # {refresh, groups, images_per_class, sites, bank_bytes}
    student: list[dict[str, Any]] = field(default_factory=list)  # {round, loss, ce, den, pro, sites}
    evaluation: list[dict[str, Any]] = field(default_factory=list)  # {model, round, split, pooled, sites, histogram}
    selection: dict[str, Choice] = field(default_factory=dict)  # per model: the round chosen on val
    site_status: dict[str, dict[str, str]] = field(default_factory=dict)  # {site: {phase: "took part" | "dropped in ..."}}
    wall_time_s: float = 0.0
    # Per site: the DP releases it reported at discovery against the ledger's (server.channel.Ledger.reconcile).
    releases_reconciled: dict[str, dict[str, int]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # keys of other versions, kept as they were
    # Traffic, sizes and sites.
    bytes: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, Any] = field(default_factory=dict)
    student_weights_bytes: int = 0
    bank_bytes: int = 0
    bank_share_of_student_upload: float = 0.0
    sites: list[dict[str, Any]] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    # The selected models' test figures (server.outputs.final_figures).
    final: Figure | None = None
    final_student_round: int = 0
    student_rounds: int = 0
    final_teacher: Figure | None = None
    # What did not learn, and the run's status (server.outputs.outcome).
    not_learned: dict[str, list[str]] = field(default_factory=dict)
    not_learned_fixes: str = ""
    status: str = "completed"
    sites_lost: list[str] = field(default_factory=list)
    site_share: float = 0.0
    min_site_share: float = 0.0
    accepted: bool = False
    privacy: dict[str, Any] = field(default_factory=dict)

    def evaluations(self, model: str, split: str) -> list[dict[str, Any]]:
        """The evaluations of ``model`` ('teacher' or 'student') on ``split``, in round order."""
        return [e for e in self.evaluation if e["model"] == model and e.get("split") == split]

    def val_aucs(self, model: str = "student") -> list[float]:
        """Pooled val AUC per scored round of ``model``."""
        return [e["pooled"]["auc"] for e in self.evaluations(model, "val")]

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra":
                record.update(value)
            elif f.name == "selection":
                record[f.name] = {model: choice.to_json() for model, choice in value.items()}
            elif isinstance(value, Figure):
                record[f.name] = value.to_json()
            else:
                record[f.name] = value
        return record

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> "RunResult":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in record.items() if k in names}
        known["selection"] = {m: Choice.from_json(c) for m, c in known.get("selection", {}).items()}
        known["final"] = Figure.from_json(known.get("final"))
        known["final_teacher"] = Figure.from_json(known.get("final_teacher"))
        return cls(**known, extra={k: v for k, v in record.items() if k not in names})

    @classmethod
    def read(cls, run_dir: Path) -> "RunResult":
        """The run folder's ``metrics.json``."""
        return cls.from_json(json.loads((Path(run_dir) / METRICS_FILE).read_text()))
