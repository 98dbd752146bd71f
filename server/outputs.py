"""Plots of a finished run: AUC per round (pooled and per site) and the final student's ROC."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: sites and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.data import default_class_names  # noqa: E402
from common.metrics import ScoreHistogram, histogram_roc  # noqa: E402


def write_plots(run_dir: Path, summary: dict[str, Any]) -> list[Path]:
    """auc.png and roc.png in the run folder (nothing when no student was evaluated)."""
    evaluations = [e for e in summary["evaluation"] if e["model"] == "student"]
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
    names = summary.get("class_names") or default_class_names(hist.num_classes)
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
