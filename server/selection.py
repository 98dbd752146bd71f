"""Evaluations and model selection in a federated run.

Sites score a global model on a split and send score histograms; :meth:`ModelSelection.record`
pools them into metrics.json's ``evaluation`` list. On val, the round the shared rule of
:mod:`common.selection` prefers is kept: its weights in the run state's ``best`` (resumable),
its number, AUC and problems in ``metrics["selection"]``. The test split is read once, for the
selected model (:meth:`ModelSelection.evaluate`).
"""

from __future__ import annotations

import functools
import logging
import operator
from typing import Any

import numpy as np

from common.metrics import ScoreHistogram, histogram_metrics
from common.modality import Model, Phase
from common.records import Payload, make, weight_shapes
from common.selection import Choice, prefer
from server.rounds import Blocks, Rounds

log = logging.getLogger("fedpagkd.server")


class ModelSelection:
    """The run's evaluations (``metrics["evaluation"]``) and the selected round per model."""

    def __init__(self, rounds: Rounds):
        self.rounds = rounds

    @property
    def metrics(self) -> dict[str, Any]:
        return self.rounds.state.metrics

    def record(self, model: Model, round_: int, replies: dict[int, Payload], examples_key: str, split: str) -> dict[str, Any]:
        """Pooled and per-site metrics on ``split`` from the score histograms the ``replies`` carry
        (those that scored no image are left out); {} when none scored one."""
        replies = {n: r for n, r in replies.items() if r.config[examples_key] > 0}
        hists = {
            n: ScoreHistogram(r.arrays["score_positives"], r.arrays["score_negatives"], r.arrays["confusion"])
            for n, r in replies.items()
        }
        if not hists:
            log.warning("[evaluate %s, round %d] no site scored a %s image; nothing recorded", model, round_, split)
            return {}
        pooled = functools.reduce(operator.add, hists.values())
        result = {
            "model": str(model),
            "round": round_,
            "split": split,
            "pooled": histogram_metrics(pooled),
            "sites": {self.rounds.name(n): histogram_metrics(h) for n, h in hists.items()},
            "histogram": {
                "positives": pooled.positives.tolist(),
                "negatives": pooled.negatives.tolist(),
                "confusion": pooled.confusion.tolist(),
            },
        }
        self.metrics["evaluation"].append(result)
        self.rounds.board.scalars(f"evaluate_{model}", {"pooled": result["pooled"], "sites": result["sites"]}, round_)
        p = result["pooled"]
        log.info(
            "[evaluate %s, round %d, %s] pooled AUC %.4f ACC %.4f SENS %.4f SPEC %.4f over %d site(s)",
            model,
            round_,
            split,
            p["auc"],
            p["accuracy"],
            p["sensitivity"],
            p["specificity"],
            len(replies),
        )
        return result

    def evaluate(self, model: Model, round_: int, weights: dict[str, np.ndarray], split: str = "test") -> dict[str, Any]:
        """An evaluation of its own: every site of the model's modality scores ``weights`` on ``split``."""
        model = Model(model)
        nodes = sorted(self.rounds.sites_of(model.modality))
        request = make(
            "evaluate", self.rounds.channel.dims, config={"model": str(model), "split": split}, weights={"net": weights}
        )
        step = f"{split} evaluation of the {model} (round {round_})"
        replies, dropped = self.rounds.exchange(
            Phase.EVALUATE, step, {n: request for n in nodes}, {"net": weight_shapes(weights)}
        )
        self.rounds.require(step, model.modality, len(replies), dropped)
        return self.record(model, round_, replies, "num-examples", split)

    def offer(self, model: Model, round_: int, evaluation: dict[str, Any], weights: Blocks) -> None:
        """Keep round ``round_``'s global ``weights`` of ``model`` when :func:`common.selection.prefer`
        ranks its val ``evaluation`` above the round chosen so far."""
        if not evaluation:
            return
        model, chosen = str(model), self.metrics["selection"].get(model)  # str: the state's keys stay plain
        candidate = Choice.of(round_, evaluation)
        if prefer(candidate, Choice.from_json(chosen) if chosen is not None else None):
            self.metrics["selection"][model] = candidate.to_json()
            self.rounds.state.best[model] = {block: {k: a.copy() for k, a in state.items()} for block, state in weights.items()}

    def evaluated(self, model: Model, round_: int, split: str) -> bool:
        return any(e["model"] == model and e["round"] == round_ and e.get("split") == split for e in self.metrics["evaluation"])

    def finish(self, model: Model, rounds: int, weights: Blocks) -> Blocks:
        """After the last of ``rounds`` rounds: score the last global model on val too, and return
        the selected round's weights (the last ones when no site holds a val split). A selected
        model at chance or collapsed is logged as not learned (metrics["selection"])."""
        if not self.evaluated(model, rounds, "val"):
            self.offer(model, rounds, self.evaluate(model, rounds, weights[model], "val"), weights)
        chosen = self.metrics["selection"].get(model)
        if chosen is None:
            log.warning("[selection] no site holds a val split: the %s of the last round (%d) is kept", model, rounds)
            return weights
        log.info("[selection] %s of round %d (pooled val AUC %.4f) of %d", model, chosen["round"], chosen["val_auc"], rounds)
        for problem in chosen["problems"]:
            log.warning("[selection] the %s did not learn: %s", model, problem)
        return self.rounds.state.best[model]
