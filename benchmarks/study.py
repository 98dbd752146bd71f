"""The powered federated study of PaGKD: every arm on the same data, seeds and schedule.

    python -m benchmarks.study --seeds 0 1 2 3 4 5 6 7 8 9                  # default regime
    python -m benchmarks.study --regime scarce --seeds 0 1 2 3 4 5 6 7 8 9  # 48 WLI images per site
    python -m benchmarks.study --arms fedavg_wli_only fedpagkd --seeds 0 1   # a subset

Within a seed every arm sees the same sites (``train.seed`` renders them), the same global
initialisation and the same batch order and augmentation stream (both seeded per site and round).
Federated arms run the real ServerApp protocol and ClientApp handlers in-process
(``benchmarks.federated``); the centralised arms pool the same images (``benchmarks.centralised``).
The test split is read once per run, for the selected model. Resumable: each finished run is
written at once to ``benchmarks/results/study[_<regime>].json``, laid out as::

    {"arms": {NAME: {"auc": [per seed], "seeds": [...], "mean": m, "std": s}},
     "paired": {"A_vs_B": {"mean": x, "ci95": [lo, hi], "p": p, "seeds": n}},
     "default_arm": NAME, "test_images": n, ...}

with every arm against FedAvg WLI-only, and the default arm against every other arm.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

import common  # noqa: F401
from benchmarks.centralised import environment, run_seed
from benchmarks.federated import REPORTED, run_config, run_once, teacher_key, teacher_snapshot
from common.config import config_from_flat, config_from_mapping
from common.files import atomic_write_json
from common.metrics import paired_difference
from common.presets import DEFAULT_METHOD, METHODS, REGIMES
from common.results import RunResult

DEFAULT_ARM = DEFAULT_METHOD  # the Flower run config's default (pyproject.toml): FedAvg from the NBI teacher
BASELINE_ARM = "fedavg_wli_only"
# Centralised counterparts (benchmarks.centralised variants), pooled images of the same sites:
# WLI-only, the default's (a student started from the NBI teacher) and PaGKD's.
CENTRALISED = {"central_wli_only": "wli_only", "central_teacher_init": "wli_only_teacher_init", "central_pagkd": "pagkd"}
ARMS = [*METHODS, *CENTRALISED]
# A federated method and its centralised counterpart: the share of the centralised gain over
# WLI-only that federation keeps (issue 12, item 5), over the seeds both pairs have.
COUNTERPARTS = {"fedavg_teacher_init": "central_teacher_init", "fedpagkd": "central_pagkd"}
# Split sizes of every study and tuning run: synthetic val and test images are free, and model
# selection on a small val split is noisier than the arms' differences. 2 WLI sites: 500 pooled
# val and 2,000 pooled test images.
STUDY_SPLITS = {"data.val_per_site": 250, "data.test_per_site": 1000}
# The arms the regimes compare (plot and table): the default and the group terms on top of its start.
REGIME_ARMS = (DEFAULT_ARM, "fedpagkd_teacher_init")


def run_arm(
    arm: str,
    overrides: dict[str, Any],
    seed: int,
    run_dir: Path,
    teachers: dict[str, Any],
    variant: dict[str, Any] | None = None,
    name: str = "",
) -> dict[str, Any]:
    """One run of one arm -> {"auc": ..., "wall_s": ..., "final": {...}}. ``variant``: overrides
    on top of the arm's own (benchmarks.tune), ``name``: its run folder (default ``<arm>-seed<s>``).
    Federated arms with teacher rounds start from the seed's shared teacher phase (``teachers``:
    teacher_key -> (snapshot, wall s), filled on first use): the teacher rounds each would run."""
    started = time.time()
    if arm in CENTRALISED:
        cfg = config_from_flat({**overrides, "train.seed": seed})
        found: dict[str, Any] = {}
        run_seed(
            cfg,
            seed,
            [CENTRALISED[arm]],
            found,
            lambda name, m: found.__setitem__(name, m),
            teacher_wanted=CENTRALISED[arm] != "wli_only",
        )
        final = found[CENTRALISED[arm]]
        return {
            "auc": final["auc"],
            "final": {k: final[k] for k in REPORTED},
            "wall_s": time.time() - started,
        }
    arm_overrides = {**overrides, **METHODS[arm], **(variant or {}), "train.seed": seed}
    start, teacher_s = None, 0.0
    folder = name or f"{arm}-seed{seed}"
    finished = (run_dir / folder / "metrics.json").exists()  # read back as it is: no teacher phase needed
    if config_from_flat(arm_overrides).needs_nbi_sites and not finished:
        key = teacher_key(arm_overrides)
        if key not in teachers:
            began = time.time()
            snapshot = f"teacher-seed{seed}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
            teachers[key] = (teacher_snapshot(arm_overrides, run_dir, snapshot), time.time() - began)
        start, teacher_s = teachers[key]
    result = run_once(arm_overrides, "inprocess", run_dir, folder, start=start)
    return {
        "auc": result["final"]["auc"],
        "final": result["final"],
        # The arm's own rounds + its share of the teacher phase it started from (the whole of it).
        "wall_s": result["wall_s"] + teacher_s,
        "final_teacher": result.get("final_teacher"),
        "selection": result.get("selection"),
        "method": METHODS[arm],  # what the arm was when it ran (a retuned arm runs again: current())
    }


def current(arm: str, record: dict[str, Any] | None) -> bool:
    """A recorded run still stands for the arm: the arm's settings have not changed since."""
    if record is None:
        return False
    return arm in CENTRALISED or record.get("method") == METHODS[arm]


def finished_record(run: Path) -> dict[str, Any]:
    """A finished federated run folder's study record (as :func:`run_arm` returns it)."""
    result = RunResult.read(run)
    return {
        "auc": result.final.auc,
        "final": result.final.subset(REPORTED),
        "wall_s": result.wall_time_s,
        "final_teacher": result.final_teacher.to_json() if result.final_teacher else None,
        "selection": {model: choice.to_json() for model, choice in result.selection.items()},
        "from": str(run),
    }


def reusable_runs(
    folders: list[Path], arms: list[str], overrides: dict[str, Any], seeds: list[int]
) -> dict[str, dict[str, dict]]:
    """Finished run folders (e.g. benchmarks.tune's) whose config is exactly an arm's config for a
    seed of this study -> {seed: {arm: record}}: the same run, read instead of run again."""

    wanted = {
        json.dumps(run_config(config_from_flat({**overrides, **METHODS[arm], "train.seed": seed})), sort_keys=True): (
            str(seed),
            arm,
        )
        for seed in seeds
        for arm in arms
        if arm in METHODS
    }
    found: dict[str, dict[str, dict]] = {}
    for run in folders:
        if (run / "metrics.json").exists() and (run / "config.json").exists():
            key = json.dumps(run_config(config_from_mapping(json.loads((run / "config.json").read_text()))), sort_keys=True)
            if key in wanted:
                seed, arm = wanted[key]
                found.setdefault(seed, {})[arm] = {**finished_record(run), "method": METHODS[arm]}
    return found


def summarise(per_seed: dict[str, dict[str, dict]], arms: list[str]) -> tuple[dict, dict]:
    """Per arm its AUCs over seeds; the paired differences. Runs of an arm's earlier settings
    (not :func:`current`) are kept in the file, not counted."""
    per_seed = {s: {a: r for a, r in runs.items() if current(a, r)} for s, runs in per_seed.items()}
    table, paired = {}, {}
    for arm in arms:
        seeds = sorted((s for s, runs in per_seed.items() if arm in runs), key=int)
        aucs = [per_seed[s][arm]["auc"] for s in seeds]
        if aucs:
            table[arm] = {
                "auc": aucs,
                "seeds": [int(s) for s in seeds],
                "mean": float(np.mean(aucs)),
                "std": float(np.std(aucs, ddof=1)) if len(aucs) > 1 else 0.0,
            }
    pairs = [(arm, BASELINE_ARM) for arm in arms if arm != BASELINE_ARM]
    pairs += [(DEFAULT_ARM, arm) for arm in arms if arm not in (DEFAULT_ARM, BASELINE_ARM)]
    for a, b in pairs:
        seeds = sorted((s for s, runs in per_seed.items() if a in runs and b in runs), key=int)
        if len(seeds) >= 2:
            paired[f"{a}_vs_{b}"] = paired_difference(
                [per_seed[s][a]["auc"] for s in seeds], [per_seed[s][b]["auc"] for s in seeds]
            )
    return table, paired


def gain_kept(per_seed: dict[str, dict[str, dict]]) -> dict[str, dict[str, Any]]:
    """Per federated method with a centralised counterpart, over the seeds with all four runs: its
    paired gain over FedAvg WLI-only and the counterpart's over centralised WLI-only (each
    :func:`common.metrics.paired_difference`), and the share of the centralised gain federation
    keeps (mean over mean). The share is only defined (else None, with the reason) when the
    centralised gain's 95 % CI is above zero: a ratio to a gain that may be nothing says nothing."""
    kept: dict[str, dict[str, Any]] = {}
    for fed, central in COUNTERPARTS.items():
        arms = (fed, BASELINE_ARM, central, "central_wli_only")
        seeds = sorted((s for s, runs in per_seed.items() if all(current(a, runs.get(a)) for a in arms)), key=int)
        if len(seeds) < 2:
            continue
        fed_gain = paired_difference([per_seed[s][fed]["auc"] for s in seeds], [per_seed[s][BASELINE_ARM]["auc"] for s in seeds])
        central_gain = paired_difference(
            [per_seed[s][central]["auc"] for s in seeds], [per_seed[s]["central_wli_only"]["auc"] for s in seeds]
        )
        defined = central_gain["ci95"][0] > 0
        kept[fed] = {
            "federated_gain": fed_gain,
            "centralised_gain": central_gain,
            "kept": fed_gain["mean"] / central_gain["mean"] if defined else None,
            "why_undefined": None if defined else "the centralised gain's 95 % CI does not exclude zero",
            "seeds": len(seeds),
        }
    return kept


def study_file(regime: str) -> Path:
    return Path(f"benchmarks/results/study{'' if regime == 'default' else '_' + regime}.json")


def markdown_pair(d: dict[str, Any] | None) -> str:
    """A paired difference (:func:`common.metrics.paired_difference`) as a docs/results.md table cell; "" for none."""
    return f"{d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}], p = {d['p']:.3f} (n = {d['seeds']})" if d else ""


def regime_table(arms: tuple[str, ...] = REGIME_ARMS) -> str:
    """The regimes' study files that exist as one markdown table: per regime its overrides, the
    baseline's AUC, and each arm's paired difference to it; then the default against the
    other arm (GKD terms on top of the same start)."""
    pairs = [f"{arm}_vs_{BASELINE_ARM}" for arm in arms] + [f"{arms[0]}_vs_{arm}" for arm in arms[1:]]
    lines = [
        f"| regime | overrides | {BASELINE_ARM} AUC | " + " | ".join(k.replace("_vs_", " - ") for k in pairs) + " |",
        "|---|---|---|" + "---|" * len(pairs),
    ]
    for regime in REGIMES:
        if not study_file(regime).exists():
            continue
        study = json.loads(study_file(regime).read_text())
        base = study["arms"].get(BASELINE_ARM)
        cells = [markdown_pair(study["paired"].get(k)) for k in pairs]
        spelled = ", ".join(f"{k}={v}" for k, v in REGIMES[regime].items()) or "(none)"
        auc = f"{base['mean']:.4f} +/- {base['std']:.4f} (n = {len(base['auc'])})" if base else ""
        lines.append(f"| {regime} | {spelled} | {auc} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_regimes(out: Path, arms: tuple[str, ...] = REGIME_ARMS) -> list[str]:
    """Each arm's paired AUC difference to FedAvg WLI-only (mean, 95 % CI) per data regime, from
    the regimes' study files that exist -> the regimes plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = {r: json.loads(study_file(r).read_text())["paired"] for r in REGIMES if study_file(r).exists()}
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(found), 3.2))
    for offset, arm in zip((-0.08, 0.08), arms):
        points = [
            (i, paired[f"{arm}_vs_{BASELINE_ARM}"])
            for i, paired in enumerate(found.values())
            if f"{arm}_vs_{BASELINE_ARM}" in paired
        ]
        if points:
            xs = [i + offset for i, _ in points]
            means = [d["mean"] for _, d in points]
            errors = [[d["mean"] - d["ci95"][0] for _, d in points], [d["ci95"][1] - d["mean"] for _, d in points]]
            ax.errorbar(xs, means, errors, marker="o", capsize=3, ls="none", label=arm)
    ax.axhline(0, c="grey", lw=0.8)
    key = f"{arms[0]}_vs_{BASELINE_ARM}"
    labels = [f"{r}\n({p[key]['seeds']} seeds)" if key in p else r for r, p in found.items()]
    ax.set_xticks(range(len(found)), labels, fontsize=8)
    ax.set_ylabel(f"AUC - {BASELINE_ARM} (95 % CI)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return list(found)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides key=value on top of the regime")
    parser.add_argument("--seeds", type=int, nargs="*", default=list(range(10)))
    parser.add_argument("--arms", nargs="*", default=ARMS, choices=ARMS)
    parser.add_argument("--regime", default="default", choices=sorted(REGIMES))
    parser.add_argument("--test-per-site", type=int, default=STUDY_SPLITS["data.test_per_site"], help="WLI test images per site")
    parser.add_argument("--val-per-site", type=int, default=STUDY_SPLITS["data.val_per_site"], help="val images per site")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/study").resolve())
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=[],
        help="study JSON files of other processes (same regime and overrides) to take runs from",
    )
    parser.add_argument("--markdown", action="store_true", help="also print the table as markdown (docs/results.md)")
    parser.add_argument("--plot", type=Path, default=None, help="only plot the regimes' study files to this PNG")
    parser.add_argument(
        "--reuse",
        type=Path,
        nargs="+",
        default=[],
        help="finished run folders to read where one is exactly an arm's run (e.g. runs/tune/*)",
    )
    args = parser.parse_args(argv)
    if args.plot:
        print(f"plotted regimes {plot_regimes(args.plot)} to {args.plot}")
        print(regime_table())
        return {}
    out = args.out or study_file(args.regime)
    overrides = {
        **REGIMES[args.regime],
        "data.val_per_site": args.val_per_site,
        "data.test_per_site": args.test_per_site,
        **dict(item.split("=", 1) for item in args.overrides),
    }
    previous = json.loads(out.read_text()) if out.exists() else {}
    per_seed: dict[str, dict[str, dict]] = previous.get("per_seed", {}) if previous.get("overrides") == overrides else {}
    for other in args.merge:  # e.g. two processes that ran different arms or seeds side by side
        theirs = json.loads(other.read_text())
        if theirs.get("overrides") != overrides:
            raise SystemExit(f"{other} was run with overrides {theirs.get('overrides')}, not {overrides}: not merged")
        for seed, runs in theirs["per_seed"].items():
            per_seed.setdefault(seed, {}).update(runs)
    for seed, runs in reusable_runs(args.reuse, args.arms, overrides, args.seeds).items():
        for arm, record in runs.items():
            if not current(arm, per_seed.get(seed, {}).get(arm)):
                per_seed.setdefault(seed, {})[arm] = record
                print(f"seed {seed} {arm}: AUC {record['auc']:.4f}, read from {record['from']} (the same config)")
    cfg = config_from_flat(overrides)

    def write() -> None:
        table, paired = summarise(per_seed, ARMS)
        atomic_write_json(
            out,
            {
                "arms": table,
                "paired": paired,
                "default_arm": DEFAULT_ARM,
                "baseline_arm": BASELINE_ARM,
                "test_images": cfg.data.wli_sites * cfg.data.test_per_site,
                "regime": args.regime,
                "overrides": overrides,
                "gain_kept": gain_kept(per_seed),
                "per_seed": per_seed,
                "environment": environment(),
            },
        )

    for seed in args.seeds:
        teachers: dict[str, Any] = {}  # this seed's shared teacher phases
        for arm in args.arms:
            if current(arm, per_seed.get(str(seed), {}).get(arm)):
                continue
            per_seed.setdefault(str(seed), {})[arm] = run_arm(arm, overrides, seed, args.run_dir / args.regime, teachers)
            print(
                f"seed {seed} {arm}: AUC {per_seed[str(seed)][arm]['auc']:.4f} ({per_seed[str(seed)][arm]['wall_s']:.0f} s)",
                flush=True,
            )
            write()
    write()
    table, paired = summarise(per_seed, ARMS)
    print(f"{'arm':<24}{'n':>3}{'AUC mean':>10}{'std':>8}   paired vs {BASELINE_ARM}: mean [95 % CI] p   {DEFAULT_ARM} vs arm")
    for arm, row in table.items():
        cells = []
        for key in (f"{arm}_vs_{BASELINE_ARM}", f"{DEFAULT_ARM}_vs_{arm}"):
            d = paired.get(key)
            cells.append(
                f"{d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] p={d['p']:.3f} n={d['seeds']}" if d else ""
            )
        print(f"{arm:<24}{len(row['auc']):>3}{row['mean']:>10.4f}{row['std']:>8.4f}   {cells[0]:<44}{cells[1]}")
    if args.markdown:  # docs/results.md's table
        print(f"\n| arm | seeds | AUC mean +/- std | vs {BASELINE_ARM}: mean [95 % CI], Wilcoxon p | {DEFAULT_ARM} vs arm |")
        print("|---|---|---|---|---|")
        for arm, row in table.items():
            cells = [markdown_pair(paired.get(k)) for k in (f"{arm}_vs_{BASELINE_ARM}", f"{DEFAULT_ARM}_vs_{arm}")]
            print(f"| {arm} | {len(row['auc'])} | {row['mean']:.4f} +/- {row['std']:.4f} | {cells[0]} | {cells[1]} |")
    for fed, row in gain_kept(per_seed).items():
        gains = [
            f"{g['mean']:+.4f} [{g['ci95'][0]:+.4f}, {g['ci95'][1]:+.4f}]"
            for g in (row["federated_gain"], row["centralised_gain"])
        ]
        share = f"{100 * row['kept']:.0f} % kept" if row["kept"] is not None else f"no share: {row['why_undefined']}"
        print(
            f"{fed}: federated gain over {BASELINE_ARM} {gains[0]}, centralised counterpart's {gains[1]}: "
            f"{share} ({row['seeds']} seeds)"
        )
    print(f"wrote {out}")
    return {"arms": table, "paired": paired}


if __name__ == "__main__":
    main()
