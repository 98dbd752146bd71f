"""What a finished run leaves in its folder, and the figures it reports.

:func:`run_summary` builds ``metrics.json`` (a :class:`common.results.RunResult`): the run's
metrics with the traffic and timings, the bank's size against one student upload, the selected models' test figures (:func:`final_figures`),
what did not learn, the run's status (:func:`outcome`) and its privacy report.
:func:`write_outputs` writes ``metrics.json``, ``egress.json``, ``config.json``, the student
checkpoint (:mod:`common.checkpoint`) and the plots (:func:`write_plots`: AUC per round, pooled
and per site, and the final student's ROC; matplotlib is imported only then).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from common.checkpoint import STUDENT_CHECKPOINT, save_checkpoint
from common.config import Config, config_to_dict
from common.data import default_class_names
from common.files import atomic_write_json
from common.metrics import ScoreHistogram, histogram_roc, learning_problems, not_learned_fixes, training_problems
from common.results import METRICS_FILE, Figure, RunResult


def _test_figure(metrics: Mapping[str, Any], model: str) -> Figure | None:
    """``model``'s last test evaluation (the selected model's: the test split is read once)."""
    tests = [e for e in metrics["evaluation"] if e["model"] == model and e.get("split") == "test"]
    if not tests:
        return None
    last = tests[-1]
    selected = metrics["selection"].get(model, {}).get("round", last["round"])
    return Figure(last["pooled"], last["round"], last["histogram"]["confusion"], selected)


def final_figures(metrics: Mapping[str, Any], student_rounds: int) -> dict[str, Any]:
    """``final``: the selected global student's test figures (None when no student round ran:
    a teacher's figure is never reported as the student's), with the rounds behind it;
    ``final_teacher``: the selected NBI teacher's test figures."""
    student = _test_figure(metrics, "student")
    return {
        "final": student,
        "final_student_round": student.selected_round if student else 0,
        "student_rounds": student_rounds,
        "final_teacher": _test_figure(metrics, "teacher"),
    }


def not_learned(metrics: Mapping[str, Any], num_classes: int) -> dict[str, list[str]]:
    """{model: why it did not learn} for the teacher and the student, on every kind of data:

    * the selected round's val evaluation at chance or collapsed (:func:`learning_problems`);
    * without a val split anywhere (nothing was selected: the last round is kept), the same
      checks on its test evaluation, the one figure there is;
    * the student's mean training CE of its last round still near ln C (:func:`training_problems`):
      what shows a student at chance even where no evaluation split could.
    """
    found: dict[str, list[str]] = {}
    for model in ("teacher", "student"):
        chosen = metrics["selection"].get(model)
        problems = list(chosen["problems"]) if chosen else []
        tests = [e for e in metrics["evaluation"] if e["model"] == model and e.get("split") == "test"]
        if chosen is None and tests:
            problems += [f"{p} on the test split (no site holds a val split)" for p in learning_problems(tests[-1])]
        if model == "student" and metrics.get("student"):
            last = metrics["student"][-1]
            problems += training_problems(last["ce"], num_classes, f"in student round {last['round']}")
        if problems:
            found[model] = problems
    return found


def outcome(metrics: Mapping[str, Any], min_site_share: float) -> dict[str, Any]:
    """``status``: completed (every discovered site took part in every phase it was asked
    to) or degraded; ``accepted``: the share of sites never dropped reaches
    ``fed.min_site_share`` (the launcher exits non-zero when it does not)."""
    status = metrics.get("site_status", {})
    lost = sorted(name for name, phases in status.items() if any(v.startswith("dropped") for v in phases.values()))
    share = 1.0 - len(lost) / len(status) if status else 0.0
    return {
        "status": "degraded" if lost else "completed",
        "sites_lost": lost,
        "site_share": share,
        "min_site_share": min_site_share,
        "accepted": share >= min_site_share,
    }


def run_summary(
    metrics: Mapping[str, Any],
    ledger: Mapping[str, Any],
    student: Mapping[str, np.ndarray],
    bank: Mapping[str, np.ndarray],
    sites: list[dict[str, Any]],
    class_names: tuple[str, ...],
    student_rounds: int,
    min_site_share: float,
    privacy: dict[str, Any],
    data_root: str = "",
) -> RunResult:
    """``metrics.json`` of a finished run: the protocol's ``metrics`` (its per-round records) and
    what this adds (``ledger``: :meth:`server.channel.Ledger.snapshot`)."""
    student_bytes = int(sum(a.nbytes for a in student.values()))
    bank_bytes = int(sum(a.nbytes for a in bank.values()))
    return dataclasses.replace(
        RunResult.from_json(metrics),
        bytes=ledger["bytes"],
        timing=ledger["timing"],
        student_weights_bytes=student_bytes,
        bank_bytes=bank_bytes,
        bank_share_of_student_upload=bank_bytes / student_bytes,
        sites=sites,
        class_names=list(class_names),
        **final_figures(metrics, student_rounds),
        # Models that did not learn: a run says so rather than ending with a quiet number.
        **_not_learned_entries(metrics, len(class_names), data_root),
        **outcome(metrics, min_site_share),
        privacy=privacy,
    )


def _not_learned_entries(metrics: Mapping[str, Any], num_classes: int, data_root: str) -> dict[str, Any]:
    found = not_learned(metrics, num_classes)
    return {"not_learned": found, "not_learned_fixes": not_learned_fixes(data_root) if found else ""}


def write_outputs(
    run_dir: Path,
    result: RunResult,
    egress: list[dict[str, Any]],
    cfg: Config,
    student: Mapping[str, np.ndarray],
    class_names: tuple[str, ...],
) -> None:
    """metrics.json, egress.json, config.json, the student checkpoint and the plots."""
    atomic_write_json(run_dir / METRICS_FILE, result.to_json())
    atomic_write_json(run_dir / "egress.json", egress)
    atomic_write_json(run_dir / "config.json", config_to_dict(cfg))
    save_checkpoint(run_dir / STUDENT_CHECKPOINT, student, cfg, class_names)
    write_plots(run_dir, result)


def write_plots(run_dir: Path, result: RunResult) -> list[Path]:
    """auc.png and roc.png in the run folder (nothing when no student was evaluated)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: sites and CI have no display
    import matplotlib.pyplot as plt

    evaluations = [e for e in result.evaluation if e["model"] == "student"]
    if not evaluations:
        return []
    rounds = [e["round"] for e in evaluations]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, [e["pooled"]["auc"] for e in evaluations], "k-o", label="pooled")
    for site in evaluations[-1]["sites"]:
        ax.plot(rounds, [e["sites"].get(site, {}).get("auc", np.nan) for e in evaluations], "--", alpha=0.7, label=site)
    ax.set(xlabel="student round", ylabel="macro AUC (one-vs-rest)", title="WLI student AUC per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    auc_path = run_dir / "auc.png"
    fig.tight_layout()
    fig.savefig(auc_path, dpi=110)
    plt.close(fig)

    last = evaluations[-1]["histogram"]
    hist = ScoreHistogram(np.array(last["positives"]), np.array(last["negatives"]), np.array(last["confusion"]))
    names = result.class_names or default_class_names(hist.num_classes)
    fig, ax = plt.subplots(figsize=(5, 5))
    for c in range(hist.num_classes):
        fpr, tpr = histogram_roc(hist, c)
        ax.plot(fpr, tpr, label=f"{names[c]} (AUC {evaluations[-1]['pooled']['auc_per_class'][c]:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="Final WLI student, pooled ROC")
    ax.legend(fontsize=8)
    roc_path = run_dir / "roc.png"
    fig.tight_layout()
    fig.savefig(roc_path, dpi=110)
    plt.close(fig)
    return [auc_path, roc_path]
