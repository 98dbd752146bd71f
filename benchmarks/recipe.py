"""Does the project's training work? The figures of the training recipe, from their runs.

Subcommands (each writes JSON under benchmarks/results/ and prints a table):

    # the WLI learning curve at 1x / 4x / 16x the default WLI training images, and the Bayes ceiling
    python -m benchmarks.recipe curve --seeds 0 1 2 3 4
    # the report: (a) centralised WLI-only vs the reference CNN, (b) federated FedAvg vs centralised,
    # (c) federated vs centralised NBI teacher with its confusion matrix, (d) the curve and ceiling,
    # (e) wall time and bytes, each mean +/- std over seeds with the paired 95 % CI of the difference
    python -m benchmarks.recipe report

The report reads what these wrote (same seeds, same images per seed, 1,000 pooled WLI test images):

    OMP_NUM_THREADS=1 python -m benchmarks.reference data.test_per_site=500 --seeds 0 1 2 3 4
    OMP_NUM_THREADS=1 python -m benchmarks.centralised "bench.variants=[wli_only]" "bench.seeds=[0,1,2,3,4]" \\
        data.test_per_site=500 bench.out=benchmarks/results/recipe_centralised.json
    OMP_NUM_THREADS=1 python -m benchmarks.federated data.test_per_site=500 --runtime inprocess --methods fedavg_wli_only fedpagkd \\
        --seeds 0 1 2 3 4 --out benchmarks/results/recipe_federated.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

import common  # noqa: F401
from benchmarks.centralised import environment, run_seed
from common.config import config_from_flat
from common.data import SyntheticEndoscopyDataset, severity_posterior, synthetic_site_specs
from common.files import atomic_write_json
from common.metrics import classification_metrics, paired_difference

RESULTS = Path("benchmarks/results")
# Learning curve: training images per WLI site as a multiple of the default 96, and its epochs:
# 1x is the recipe's 40 epochs (320 steps of 24); 4x and 16x get 640 steps (20 and 5 epochs),
# twice the default's, so more data is never handicapped by fewer steps (CPU time caps 16x).
CURVE = {1: 40, 4: 20, 16: 5}
DEFAULT_TRAIN_PER_SITE = 96


def bayes_ceiling(cfg) -> dict[str, float]:
    """Macro AUC of the true class posterior given each WLI test image's latent severity (the
    generator's own variable): no classifier of the images can do better."""
    probs, labels = [], []
    for _, spec in synthetic_site_specs(cfg):
        if spec.modality != "wli":
            continue
        test = SyntheticEndoscopyDataset(spec, "test")
        severity = np.array([test.latents(i)["severity"] for i in range(len(test))])
        probs.append(severity_posterior(severity, spec.num_classes, spec.class_weights))
        labels.append(test.labels)
    metrics = classification_metrics(np.concatenate(probs), np.concatenate(labels))
    return {"auc": metrics["auc"], "accuracy": metrics["accuracy"]}


def curve(seeds: list[int], multiples: list[int], out: Path) -> dict:
    done: dict[str, dict[str, Any]] = json.loads(out.read_text())["per_seed"] if out.exists() else {}
    for seed in seeds:
        for multiple in multiples:
            key = f"{multiple}x"
            results = done.setdefault(str(seed), {})
            if key in results:
                continue
            cfg = config_from_flat(
                {
                    "train.seed": seed,
                    "data.test_per_site": 500,
                    "pagkd.use_pro": False,
                    "pagkd.use_den": False,
                    "data.train_per_site": DEFAULT_TRAIN_PER_SITE * multiple,
                    "train.epochs": CURVE[multiple],
                }
            )
            found: dict[str, Any] = {}
            run_seed(cfg, seed, ["wli_only"], found, lambda name, metrics: found.__setitem__(name, metrics), teacher_wanted=False)
            results[key] = {**found["wli_only"], "epochs": CURVE[multiple], "train_images": 2 * cfg.data.train_per_site}
            if "bayes" not in results:
                results["bayes"] = bayes_ceiling(cfg)
            print(
                f"seed {seed} {key}: AUC {results[key]['auc']:.4f} ({results[key]['train_s']:.0f} s); Bayes ceiling "
                f"{results['bayes']['auc']:.4f}",
                flush=True,
            )
            atomic_write_json(out, {"per_seed": done, "curve_epochs": CURVE, "environment": environment()})
    return done


def _stat(values) -> str:
    values = np.asarray(values, dtype=np.float64)
    return f"{values.mean():.4f} +/- {values.std(ddof=1) if len(values) > 1 else 0:.4f}"


def _ci(d: dict) -> str:
    return f"{d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] (n={d['seeds']}, Wilcoxon p={d['p']:.3f})"


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def federated_runs(pattern: str = "recipe_federated*.json") -> dict[str, dict[str, dict]]:
    """{method: {seed: run}} from every benchmarks/results/``pattern`` file (runs split over
    several processes, each a ``benchmarks.federated`` call with its own seeds)."""
    merged: dict[str, dict[str, dict]] = {}
    for path in sorted(RESULTS.glob(pattern)):
        data = json.loads(path.read_text())
        for method, runs in data["runs"].items():
            for seed, run in zip(data["seeds"], runs):
                merged.setdefault(method, {})[str(seed)] = run
    return merged


def variant_runs() -> dict[str, tuple[str, dict, dict[str, dict]]]:
    """{variant: (method, its overrides, {seed: run})} from benchmarks/results/recipe_variant_<variant>.json:
    a method of the recipe's federated runs with a setting changed (one method per file)."""
    variants = {}
    for path in sorted(RESULTS.glob("recipe_variant_*.json")):
        data = json.loads(path.read_text())
        ((method, runs),) = data["runs"].items()
        variants[path.stem.removeprefix("recipe_variant_")] = (
            method,
            data["overrides"],
            dict(zip(map(str, data["seeds"]), runs)),
        )
    return variants


def report(out: Path) -> dict:
    """Every figure the runs above produced, paired by seed; missing inputs are skipped."""
    lines, result = [], {}
    reference, central = _load("reference.json"), _load("recipe_centralised.json")
    federated, curve_runs = federated_runs(), _load("recipe_curve.json")
    if reference and central:
        seeds = sorted(set(reference["per_seed"]) & set(central["per_seed"]), key=int)
        ref = [reference["per_seed"][s]["wli"]["auc"] for s in seeds]
        cen = [central["per_seed"][s]["wli_only"]["auc"] for s in seeds]
        diff = paired_difference(cen, ref)
        result["a"] = {
            "seeds": seeds,
            "reference_auc": ref,
            "centralised_wli_only_auc": cen,
            "paired": diff,
            "reference_nbi_auc": [reference["per_seed"][s]["nbi"]["auc"] for s in seeds if "nbi" in reference["per_seed"][s]],
        }
        lines += [
            "(a) centralised WLI-only student vs the plain reference CNN, same images, 1,000 WLI test images",
            f"    reference CNN (WLI) {_stat(ref)}   student {_stat(cen)}   student - reference {_ci(diff)}",
        ]
        if result["a"]["reference_nbi_auc"]:
            lines.append(f"    reference CNN on NBI {_stat(result['a']['reference_nbi_auc'])}")
    if federated and central:
        fed_runs = federated.get("fedavg_wli_only", {})
        seeds = sorted(set(fed_runs) & set(central["per_seed"]), key=int)
        pairs = [(fed_runs[s]["final"]["auc"], central["per_seed"][s]["wli_only"]["auc"]) for s in seeds]
        if pairs:
            diff = paired_difference(*zip(*pairs))
            result["b"] = {"federated": [p[0] for p in pairs], "centralised": [p[1] for p in pairs], "paired": diff}
            lines += [
                "(b) federated WLI-only FedAvg vs centralised WLI-only",
                f"    federated {_stat(result['b']['federated'])}   centralised {_stat(result['b']['centralised'])}   "
                f"federated - centralised {_ci(diff)}",
            ]
        # The federated teacher of a seed is the same in every arm that trains one (same rounds and
        # seeds); the default run's (fedavg_teacher_init) come first: they were measured with the
        # selection that never keeps a collapsed round.
        with_teacher = {**federated.get("fedpagkd", {}), **federated.get("fedavg_teacher_init", {})}
        teacher_seeds = sorted(
            (s for s in set(with_teacher) & set(central["per_seed"]) if with_teacher[s].get("final_teacher")), key=int
        )
        teacher_runs = [(with_teacher[s]["final_teacher"], central["per_seed"][s]["nbi_teacher"]) for s in teacher_seeds]
        if teacher_runs:
            diff = paired_difference([f["auc"] for f, _ in teacher_runs], [c["auc"] for _, c in teacher_runs])
            recalls = [np.diag(np.array(f["confusion"])) / np.array(f["confusion"]).sum(axis=1) for f, _ in teacher_runs]
            result["c"] = {
                "federated": [f["auc"] for f, _ in teacher_runs],
                "centralised": [c["auc"] for _, c in teacher_runs],
                "paired": diff,
                "min_class_recall": [float(r.min()) for r in recalls],
                "confusion": [f["confusion"] for f, _ in teacher_runs],
            }
            lines += [
                "(c) NBI teacher: federated (10 rounds x 4 local epochs) vs centralised (40 epochs), 1,000 NBI test images",
                f"    federated {_stat(result['c']['federated'])}   centralised {_stat(result['c']['centralised'])}   "
                f"federated - centralised {_ci(diff)}",
                f"    seeds {teacher_seeds}; smallest per-class recall of the federated teacher per seed: "
                f"{[round(r, 3) for r in result['c']['min_class_recall']]}",
                f"    confusion matrix (rows: true class) of seed {teacher_seeds[0]}: {teacher_runs[0][0]['confusion']}",
            ]
    # Arm against arm, paired by seed: the methods against WLI-only FedAvg, and whether the group
    # terms add anything on top of the default run's teacher start.
    comparisons = [
        ("fedpagkd", "fedavg_wli_only"),
        ("fedavg_teacher_init", "fedavg_wli_only"),
        ("fedpagkd_teacher_init", "fedavg_teacher_init"),
        ("fedpagkd_teacher_init", "fedavg_wli_only"),
    ]
    for arm, other in comparisons:
        if federated.get(arm) and federated.get(other):
            both = sorted(set(federated[arm]) & set(federated[other]), key=int)
            values = [federated[arm][s]["final"]["auc"] for s in both]
            others = [federated[other][s]["final"]["auc"] for s in both]
            diff = paired_difference(values, others)
            result[f"{arm}_vs_{other}"] = {arm: values, other: others, "paired": diff, "seeds": both}
            lines += [
                f"{arm} vs {other}, federated, same seeds and data",
                f"    {arm} {_stat(values)}   {other} {_stat(others)}   difference {_ci(diff)}",
            ]
    for name, (method, overrides, runs) in variant_runs().items():
        recipe_runs = federated.get(method, {})
        both = sorted(set(runs) & set(recipe_runs), key=int)
        if not both:
            continue
        values, recipe = [runs[s]["final"]["auc"] for s in both], [recipe_runs[s]["final"]["auc"] for s in both]
        diff = paired_difference(values, recipe)
        result.setdefault("variants", {})[name] = {
            "method": method,
            "overrides": overrides,
            "seeds": both,
            "auc": values,
            "recipe_auc": recipe,
            "paired": diff,
            "wall_s": [runs[s]["wall_s"] for s in both],
        }
        lines += [
            f"(b') federated {method}, recipe variant {name} ({overrides}) vs the recipe's {method} runs",
            f"    variant {_stat(values)}   recipe {_stat(recipe)}   variant - recipe {_ci(diff)}",
        ]
        if central:
            cen_both = [s for s in both if s in central["per_seed"]]
            cen_diff = paired_difference(
                [runs[s]["final"]["auc"] for s in cen_both], [central["per_seed"][s]["wli_only"]["auc"] for s in cen_both]
            )
            result["variants"][name]["vs_centralised"] = cen_diff
            lines.append(f"    variant - centralised WLI-only {_ci(cen_diff)}")
    if curve_runs:
        per_seed = curve_runs["per_seed"]
        keys = sorted({k for r in per_seed.values() for k in r if k.endswith("x")}, key=lambda k: int(k[:-1]))
        result["d"] = {k: [r[k]["auc"] for r in per_seed.values() if k in r] for k in keys}
        result["d"]["bayes"] = [r["bayes"]["auc"] for r in per_seed.values() if "bayes" in r]
        if central:
            result["d"]["1x"] = [central["per_seed"][s]["wli_only"]["auc"] for s in per_seed if s in central["per_seed"]]
        lines.append("(d) centralised WLI-only learning curve (AUC), and the Bayes ceiling from the latent severity")
        for k in ["1x", *[k for k in keys if k != "1x"]]:
            if result["d"].get(k):
                lines.append(f"    {k:>4} the default WLI training images: {_stat(result['d'][k])}  (n={len(result['d'][k])})")
        lines.append(f"    Bayes ceiling: {_stat(result['d']['bayes'])}")
    if federated and central:
        fed = list(federated.get("fedavg_wli_only", {}).values())
        if fed:
            sent = [sum(e["sent"] + e["received"] for e in r["bytes"].values()) for r in fed]
            cen_s = [r["wli_only"]["train_s"] for r in central["per_seed"].values()]
            result["e"] = {"federated_wall_s": [r["wall_s"] for r in fed], "federated_bytes": sent, "centralised_train_s": cen_s}
            lines += [
                "(e) cost to the final AUC (in-process federation: no transport time; 1 thread)",
                f"    federated WLI-only: wall {_stat(result['e']['federated_wall_s'])} s, "
                f"{np.mean(sent) / 2**20:.1f} MiB on the wire; centralised WLI-only: {_stat(cen_s)} s, 0 bytes",
            ]
    print("\n".join(lines))
    atomic_write_json(out, {"figures": result, "lines": lines, "environment": environment()})
    print(f"wrote {out}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("curve", help="the WLI learning curve and the Bayes ceiling")
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    c.add_argument("--multiples", type=int, nargs="+", default=[4, 16], choices=sorted(CURVE))
    c.add_argument("--out", type=Path, default=RESULTS / "recipe_curve.json")
    r = sub.add_parser("report", help="the figures (a)-(e) from the runs' JSON")
    r.add_argument("--out", type=Path, default=RESULTS / "recipe.json")
    args = parser.parse_args(argv)
    if args.command == "curve":
        curve(args.seeds, args.multiples, args.out)
    else:
        report(args.out)


if __name__ == "__main__":
    main()
