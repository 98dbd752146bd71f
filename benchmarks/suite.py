"""Does the recipe learn on images it was not made on? Every family of the suite, four arms, paired.

For the embedded default and each family of :mod:`benchmarks.families` (written on first use),
for each seed, four arms on the same images:

* ``reference``: the plain CNN of :mod:`benchmarks.reference`, its recipe unchanged (the yardstick);
* ``central``: the project's WLI-only student trained centrally (:mod:`benchmarks.centralised`);
* ``federated``: the WLI-only FedAvg student (``common.presets.METHODS["fedavg_wli_only"]``);
* ``default``: the shipped default run, nothing overridden (student from the NBI teacher).

The federated arms run the real ServerApp protocol and ClientApp handlers in-process
(``--runtime inprocess``). The table gives each arm's pooled WLI test AUC (mean +/- std) and the
paired differences the issue's targets read, with their 95 % CIs over seeds:
central - reference >= -0.02, federated - central >= -0.03, default - federated >= -0.01.

    python -m benchmarks.suite run --seeds 0 1 2                     # every family, every arm
    python -m benchmarks.suite run --families stripes spots --arms reference central
    python -m benchmarks.suite run --tag jitter0.1 train.color_jitter=0.1   # an ablation: overrides on the project's arms
    python -m benchmarks.suite report [--tag TAG]                    # the table from what was written

Results: ``benchmarks/results/suite/<tag>/<family>.json`` (one file per family, so two processes
with disjoint ``--families`` can run side by side; give each ``OMP_NUM_THREADS=1``), resumed run
by run: a finished (family, seed, arm) is never run twice under the same overrides.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import common  # noqa: F401  (torchvision shim before timm)
from benchmarks import reference
from benchmarks.centralised import environment, run_seed
from benchmarks.families import DEFAULT_OUT, FAMILIES, family_root
from benchmarks.federated import run_once
from client.site import federation_sites
from common.config import config_from_flat
from common.files import atomic_write_json
from common.metrics import paired_difference
from common.presets import METHODS

RESULTS = Path("benchmarks/results/suite")
EMBEDDED = "embedded"
HELDOUT = "heldout"  # a family the project never sees (--heldout ROOT:C), judged after the defaults were chosen
ARMS = ("reference", "central", "federated", "default")
# (arm, arm it is compared with, the target for the mean difference)
TARGETS = (("central", "reference", -0.02), ("federated", "central", -0.03), ("default", "federated", -0.01))


def family_overrides(family: str, families_dir: Path, heldout: str = "") -> dict[str, Any]:
    """The data keys of a family: nothing for the embedded default, the held-out family's
    ``ROOT:C`` (a federation written outside the project, C classes), else its written root."""
    if family == EMBEDDED:
        return {}
    if family == HELDOUT:
        root, classes = heldout.rsplit(":", 1)
        return {"data.root": str(Path(root).resolve()), "data.num_classes": int(classes)}
    return {"data.root": str(family_root(family, families_dir).resolve()), "data.num_classes": FAMILIES[family].num_classes}


def run_arm(arm: str, data: dict[str, Any], overrides: dict[str, Any], seed: int, run_dir: Path) -> dict[str, Any]:
    """One arm on one family and seed -> {"auc", "accuracy", "train_ce", "wall_s", ...}."""
    started = time.time()
    if arm == "reference":  # the yardstick's own recipe: no project override reaches it
        cfg = config_from_flat({**data, "train.seed": seed})
        sites = federation_sites(cfg)
        result = reference.train_and_test(
            reference.pooled(sites, "wli", "train"), reference.pooled(sites, "wli", "test"), cfg.data.num_classes, seed,
            **reference.RECIPE,
        )  # fmt: skip
        return {
            "auc": result["auc"],
            "accuracy": result["accuracy"],
            "train_ce": result["train_ce_last"],
            "wall_s": time.time() - started,
        }
    if arm == "central":
        cfg = config_from_flat({**data, **overrides, "train.seed": seed})
        found: dict[str, Any] = {}
        run_seed(cfg, seed, ["wli_only"], found, found.__setitem__, teacher_wanted=False)
        r = found["wli_only"]
        return {
            "auc": r["auc"], "accuracy": r["accuracy"], "train_ce": r["train_losses"].get("ce"),
            "best_epoch": r["best_epoch"], "wall_s": time.time() - started,
        }  # fmt: skip
    method = METHODS["fedavg_wli_only"] if arm == "federated" else {}
    with tempfile.TemporaryDirectory(dir=run_dir) as folder:
        result = run_once({**data, **overrides, **method, "train.seed": seed}, "inprocess", Path(folder), "run")
        metrics = json.loads((Path(folder) / "run" / "metrics.json").read_text())
    students = metrics.get("student") or [{}]
    return {
        "auc": result["final"]["auc"],
        "accuracy": result["final"]["accuracy"],
        "train_ce": students[-1].get("ce"),
        "selected_round": (result["selection"] or {}).get("student", {}).get("round"),
        "teacher_auc": (result["final_teacher"] or {}).get("auc"),
        "not_learned": metrics.get("not_learned"),
        "wall_s": time.time() - started,
    }


def run(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    folder = RESULTS / args.tag
    folder.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.gettempdir()) / "fedpagkd-suite"
    run_dir.mkdir(exist_ok=True)
    for family in args.families:
        out = folder / f"{family}.json"
        saved = json.loads(out.read_text()) if out.exists() else {}
        if saved.get("overrides", overrides) != overrides:
            raise SystemExit(f"{out} was written with overrides {saved['overrides']}, not {overrides}: use another --tag")
        results: dict[str, dict[str, Any]] = saved.get("per_seed", {})
        if family == HELDOUT and not args.heldout:
            raise SystemExit("--families heldout needs --heldout ROOT:C (the held-out federation's folder and its class count)")
        data = family_overrides(family, args.families_dir, args.heldout)
        for seed in args.seeds:
            for arm in args.arms:
                if arm in results.get(str(seed), {}):
                    continue
                result = run_arm(arm, data, overrides, seed, run_dir)
                results.setdefault(str(seed), {})[arm] = result
                atomic_write_json(
                    out,
                    {
                        "family": family, "overrides": overrides, "per_seed": results, "threads": torch.get_num_threads(),
                        "environment": environment(),
                    },
                )  # fmt: skip
                print(f"{args.tag} {family} seed {seed} {arm}: AUC {result['auc']:.4f} in {result['wall_s']:.0f} s", flush=True)
    print(format_table(summarise(folder)))


def summarise(folder: Path) -> dict[str, dict[str, Any]]:
    """{family: {arm: mean/std/n, "diffs": {"a-b": paired difference + target + met}}} of the written files."""
    table = {}
    for path in sorted(folder.glob("*.json")):
        saved = json.loads(path.read_text())
        per_seed = saved["per_seed"]
        row: dict[str, Any] = {"threads": saved.get("threads")}
        for arm in ARMS:
            values = [r[arm]["auc"] for r in per_seed.values() if arm in r]
            if values:
                row[arm] = {
                    "mean": float(np.mean(values)),
                    "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                    "n": len(values),
                }
        row["diffs"] = {}
        for arm, base, target in TARGETS:
            seeds = [s for s, r in per_seed.items() if arm in r and base in r]
            if seeds:
                diff = paired_difference(
                    np.array([per_seed[s][arm]["auc"] for s in seeds]), np.array([per_seed[s][base]["auc"] for s in seeds])
                )
                row["diffs"][f"{arm}-{base}"] = {**diff, "target": target, "met": diff["mean"] >= target}
        table[saved["family"]] = row
    return table


def format_table(table: dict[str, dict[str, Any]]) -> str:
    arms = "".join(f"{arm:>17}" for arm in ARMS)
    diffs = "".join(f"{f'{a}-{b} (>= {t})':>34}" for a, b, t in TARGETS)
    lines = [f"{'family':<10}{arms}{diffs}"]
    for family, row in table.items():
        cells = "".join(f"{row[a]['mean']:>10.4f}+/-{row[a]['std']:.3f}" if a in row else f"{'-':>17}" for a in ARMS)
        for a, b, _ in TARGETS:
            d = row["diffs"].get(f"{a}-{b}")
            if d is None:
                cells += f"{'-':>34}"
                continue
            low, high = d["ci95"]
            cells += f"{d['mean']:>+9.4f} [{low:+.3f}, {high:+.3f}] n={d['seeds']} {'ok' if d['met'] else 'MISS':>4}"
        lines.append(f"{family:<10}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("run", "report"))
    parser.add_argument("overrides", nargs="*", help="key=value on the project's arms (the reference's recipe never changes)")
    parser.add_argument("--families", nargs="+", default=[EMBEDDED, *FAMILIES], choices=[EMBEDDED, *FAMILIES, HELDOUT])
    parser.add_argument("--heldout", default="", help="ROOT:C of the held-out family (kept outside the repository)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tag", default="default", help="results folder under benchmarks/results/suite/")
    parser.add_argument("--families-dir", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    overrides = dict(item.split("=", 1) for item in args.overrides)
    if args.command == "report":
        table = summarise(RESULTS / args.tag)
        print(format_table(table))
        atomic_write_json(RESULTS / f"{args.tag}-summary.json", table)
        return
    run(args, overrides)


if __name__ == "__main__":
    main()
