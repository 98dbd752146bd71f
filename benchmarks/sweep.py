"""Robustness of the PaGKD gain: federated PaGKD vs FedAvg of the same student, one factor at a
time, with a plot of the gain against each.

    python -m benchmarks.sweep --seeds 0 1 [--factors wli_train nbi_ratio class_alpha group_size num_queries] [key=value ...]

Both methods start the WLI student from the federated NBI teacher (``fed.student_init=teacher``:
in this CPU budget a student from scratch stays near chance, where a gain cannot be read) on the
fast preset (common.presets.FAST), in-process runtime. Gain = AUC(PaGKD) - AUC(FedAvg)
per seed (paired: same seed, same sites, same teacher), reported as mean +/- std and relative %.
Writes benchmarks/results/sweep.json and sweep.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

import common  # noqa: F401
from benchmarks.centralised import environment
from benchmarks.federated import run_once
from common.presets import FAST, METHODS

PAIR = ("fedavg_teacher_init", "fedpagkd_teacher_init")
# factor -> (label, {value: overrides}); NBI sites keep 192 training images in wli_train.
FACTORS: dict[str, tuple[str, dict[Any, dict[str, Any]]]] = {
    "wli_train": (
        "WLI training images per site",
        {n: {"data.train_per_site": n, "data.nbi_train_scale": 192 / n} for n in (48, 96, 192, 384)},
    ),
    "nbi_ratio": (
        "NBI : WLI training images (WLI 96 per site)",
        {r: {"data.train_per_site": 96, "data.nbi_train_scale": r} for r in (0.5, 1, 2, 4)},
    ),
    "class_alpha": ("Dirichlet class balance alpha (0 = balanced)", {a: {"data.class_alpha": a} for a in (0.0, 1.0, 0.3)}),
    "group_size": ("group size K", {k: {"pagkd.group_size": k} for k in (4, 8, 16)}),
    "num_queries": ("queries M", {m: {"model.num_queries": m} for m in (2, 4, 12)}),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--factors", nargs="+", default=list(FACTORS), choices=list(FACTORS))
    parser.add_argument("--run-dir", type=Path, default=Path("runs/benchmark-sweep").resolve())
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sweep.json"))
    args = parser.parse_args(argv)
    base = {**FAST, **dict(item.split("=", 1) for item in args.overrides)}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results: dict[str, dict[str, Any]] = {}
    for factor in args.factors:
        label, values = FACTORS[factor]
        results[factor] = {"label": label, "points": {}}
        for value, overrides in values.items():
            aucs = {m: [] for m in PAIR}
            for seed in args.seeds:
                for method in PAIR:
                    run = run_once(
                        {**base, **METHODS[method], **overrides, "train.seed": seed},
                        "inprocess",
                        args.run_dir,
                        f"{stamp}-{factor}-{value}-{method}-seed{seed}",
                    )
                    aucs[method].append(run["final"]["auc"])
            gains = np.array(aucs[PAIR[1]]) - np.array(aucs[PAIR[0]])
            point = {
                "overrides": overrides,
                "auc": aucs,
                "gain_mean": float(gains.mean()),
                "gain_std": float(gains.std(ddof=1) if len(gains) > 1 else 0.0),
                "relative_gain_pct": float(100 * gains.mean() / np.mean(aucs[PAIR[0]])),
            }
            results[factor]["points"][str(value)] = point
            print(
                f"{factor}={value}: FedAvg {np.mean(aucs[PAIR[0]]):.4f}  PaGKD {np.mean(aucs[PAIR[1]]):.4f}  "
                f"gain {point['gain_mean']:+.4f} +/- {point['gain_std']:.4f} ({point['relative_gain_pct']:+.1f} %)",
                flush=True,
            )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {"seeds": args.seeds, "pair": PAIR, "overrides": base, "factors": results, "environment": environment()}, indent=2
            )
        )
    print(f"\nPaGKD gain over FedAvg (both from the NBI teacher), seeds {args.seeds}; paper: +1.1 to +3.3 % relative AUC")
    print(f"{'factor':<14}{'value':>8}{'FedAvg AUC':>12}{'PaGKD AUC':>11}{'gain':>18}{'relative':>10}")
    for factor, entry in results.items():
        for value, p in entry["points"].items():
            print(
                f"{factor:<14}{value:>8}{np.mean(p['auc'][PAIR[0]]):>12.4f}{np.mean(p['auc'][PAIR[1]]):>11.4f}"
                f"{p['gain_mean']:>+11.4f} +/-{p['gain_std']:.3f}{p['relative_gain_pct']:>+9.1f}%"
            )
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.0), squeeze=False)
    for ax, (factor, entry) in zip(axes[0], results.items()):
        values = list(entry["points"])
        gains = [entry["points"][v]["gain_mean"] for v in values]
        errors = [entry["points"][v]["gain_std"] for v in values]
        ax.errorbar(range(len(values)), gains, errors, marker="o", capsize=3)
        ax.axhline(0, c="grey", lw=0.8)
        ax.set_xticks(range(len(values)), values)
        ax.set_xlabel(entry["label"], fontsize=8)
    axes[0][0].set_ylabel("AUC gain, PaGKD - FedAvg")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
