"""Tuning on the validation split, the same budget for the method and its baseline.

    python -m benchmarks.tune --seeds 0 1                     # every arm's candidates
    python -m benchmarks.tune --arms fedpagkd_teacher_init    # one arm

Each tuned arm gets the same number of candidate settings (:data:`CANDIDATES`), each run on the
same seeds and data as :mod:`benchmarks.study` (its default regime and split sizes). A candidate
is scored by the pooled val AUC of the round model selection keeps (the study selects rounds the
same way), averaged over the seeds; the best per arm is the one the registry spells in
``common.presets.METHODS``. Test AUCs are recorded for the record, never used to choose.
Resumable: runs are named by arm, candidate and seed (``runs/tune/``), and a finished one is read
back; writes ``benchmarks/results/tune.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

import common  # noqa: F401
from benchmarks.centralised import environment
from benchmarks.study import STUDY_SPLITS, run_arm
from common.files import atomic_write_json
from common.presets import TUNED_FEDPROTO, TUNED_GROUP_TERMS

# arm -> {candidate: overrides on top of the arm}; the first is the arm as it stood before tuning.
# Each candidate spells every key its arm tunes, so it means the same after METHODS takes the
# chosen one; the chosen candidates are the registry's tuned values (common.presets.TUNED_*), read
# here, and tests/test_presets.py checks that the results files still choose them.
# Four each. PaGKD from the teacher: the group terms' weights and CE-only warm-up (the paper:
# L_Den at 1, 0.001 on GKD-Pro, after a CE-only start). Its baseline, FedAvg from the teacher,
# has no group terms: its four are the learning rate and the optimiser state across rounds.
CANDIDATES: dict[str, dict[str, dict[str, Any]]] = {
    "fedpagkd_teacher_init": {
        "preset": {"pagkd.den_weight": 1.0, "pagkd.pro_weight": 0.1, "pagkd.warmup_epochs": 0},
        "paper": {"pagkd.den_weight": 1.0, "pagkd.pro_weight": 0.001, "pagkd.warmup_epochs": 8},
        "light": dict(TUNED_GROUP_TERMS),  # chosen: the registry spells it (common/presets.py)
        "den_heavy": {"pagkd.den_weight": 3.0, "pagkd.pro_weight": 0.01, "pagkd.warmup_epochs": 8},
    },
    # FedProto-style: the regulariser's weight (1.0 collapsed it: docs/results.md), with the
    # AdamW state kept across rounds, FedAvg WLI-only's best setting that it builds on.
    "fedproto_wli": {
        "preset": {"fed.fedproto_weight": 1.0, "train.keep_optimizer_state": False},
        "w0.1": dict(TUNED_FEDPROTO),  # chosen
        "w0.01": {"fed.fedproto_weight": 0.01, "train.keep_optimizer_state": True},
        "w0.001": {"fed.fedproto_weight": 0.001, "train.keep_optimizer_state": True},
    },
    "fedavg_teacher_init": {
        "preset": {"train.lr": 3e-3, "train.keep_optimizer_state": False},
        "lr1.5e-3": {"train.lr": 1.5e-3, "train.keep_optimizer_state": False},
        "lr6e-3": {"train.lr": 6e-3, "train.keep_optimizer_state": False},
        "kept_optimizer": {"train.lr": 3e-3, "train.keep_optimizer_state": True},
    },
}


# Design checks of issue 12, each on top of the arm's chosen candidate, same seeds (--design):
# a bank refreshed once mid-run against the fixed one, and the GKD-Den codebook size.
DESIGN: dict[str, dict[str, dict[str, Any]]] = {
    "fedpagkd_teacher_init": {
        "refresh_every5": {"fed.bank_refresh_every": 5},
        "codebook2": {"pagkd.codebook_size": 2},
        "codebook32": {"pagkd.codebook_size": 32},
    }
}


def summarise(runs: dict[str, dict[str, dict[str, dict]]]) -> dict[str, Any]:
    """runs[arm][candidate][seed] -> per arm: each candidate's mean val / test AUC and the choice."""
    table: dict[str, Any] = {}
    for arm, candidates in runs.items():
        rows = {}
        for name, by_seed in candidates.items():
            seeds = sorted(by_seed, key=int)
            rows[name] = {
                "seeds": [int(s) for s in seeds],
                "val_auc": [by_seed[s]["val_auc"] for s in seeds],
                "test_auc": [by_seed[s]["auc"] for s in seeds],
                "val_auc_mean": float(np.mean([by_seed[s]["val_auc"] for s in seeds])),
                "test_auc_mean": float(np.mean([by_seed[s]["auc"] for s in seeds])),
            }
        complete = [n for n, r in rows.items() if len(r["seeds"]) == max(len(r["seeds"]) for r in rows.values())]
        table[arm] = {"candidates": rows, "chosen": max(complete, key=lambda n: rows[n]["val_auc_mean"])}
    return table


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--arms", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--run-dir", type=Path, default=Path("runs/tune").resolve())
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/tune[_design].json")
    parser.add_argument("--design", action="store_true", help="the DESIGN checks on top of tune.json's chosen candidates")
    args = parser.parse_args(argv)
    candidates = CANDIDATES
    if args.design:
        tuned = json.loads(Path("benchmarks/results/tune.json").read_text())
        candidates = {}
        for arm, checks in DESIGN.items():
            chosen = tuned["arms"][arm]["chosen"]
            base = CANDIDATES[arm][chosen]
            candidates[arm] = {chosen: base, **{f"{chosen}.{name}": {**base, **v} for name, v in checks.items()}}
        args.arms = [a for a in args.arms if a in candidates]
    args.out = args.out or Path(f"benchmarks/results/tune{'_design' if args.design else ''}.json")
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    runs: dict[str, dict[str, dict[str, dict]]] = previous.get("runs", {}) if previous.get("overrides") == STUDY_SPLITS else {}
    for seed in args.seeds:
        teachers: dict[str, Any] = {}  # this seed's shared teacher phases (benchmarks.study.run_arm)
        for arm in args.arms:
            for name, variant in candidates[arm].items():
                if str(seed) in runs.get(arm, {}).get(name, {}):
                    continue
                result = run_arm(arm, STUDY_SPLITS, seed, args.run_dir, teachers, variant, f"{arm}-{name}-seed{seed}")
                selected = result["selection"]["student"]
                runs.setdefault(arm, {}).setdefault(name, {})[str(seed)] = {
                    "val_auc": selected["val_auc"],
                    "round": selected["round"],
                    "auc": result["auc"],
                    "wall_s": result["wall_s"],
                    "overrides": variant,
                }
                print(f"seed {seed} {arm} {name}: val AUC {selected['val_auc']:.4f} (round {selected['round']})", flush=True)
                table = summarise(runs)
                atomic_write_json(
                    args.out,
                    {
                        "arms": table,
                        "runs": runs,
                        "overrides": STUDY_SPLITS,
                        "candidates": CANDIDATES,
                        "environment": environment(),
                    },
                )
    table = summarise(runs)
    print(f"{'arm':<24}{'candidate':<16}{'seeds':>6}{'val AUC':>9}{'test AUC':>10}")
    for arm, entry in table.items():
        for name, row in entry["candidates"].items():
            mark = "  <- chosen (val)" if name == entry["chosen"] else ""
            print(f"{arm:<24}{name:<16}{len(row['seeds']):>6}{row['val_auc_mean']:>9.4f}{row['test_auc_mean']:>10.4f}{mark}")
    print(f"wrote {args.out}")
    return table


if __name__ == "__main__":
    main()
