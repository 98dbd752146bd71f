"""Robustness and privacy of federated PaGKD: poisoned sites with and without a defence, and
AUC against the differential-privacy budget of the NBI knowledge statistics.

    python -m benchmarks.robustness poisoning --seeds 0 1 [key=value ...]
    python -m benchmarks.robustness privacy --seeds 0 1 --sigmas 0 0.5 1 2 4 [key=value ...]

Runs use the in-process runtime (server.inprocess: the real ServerApp protocol and ClientApp
handlers, no SuperLink/Ray) so a poisoned site is a fault hook that rewrites that site's genuine
reply. Poisoning: 3 NBI + 3 WLI sites; nbi-0 poisons its knowledge statistics (prototype and
token sums) and wli-0 its student update, each by one attack: ``sign_flip`` (x -strength),
``scale`` (x strength) or ``random`` (Gaussian of strength x the honest norm); strength 20 keeps
every attack under the server's norm-outlier screen (fed.max_norm_ratio = 100), so only the
robust rule stands between it and the model. Defences: fed.aggregation median / trimmed_mean
(with fed.clip_ratio). Privacy: privacy.noise_multiplier sigma per run; epsilon is the run's own
accounting (Flower's RDP accountant). Writes benchmarks/results/{poisoning,privacy}.json + PNG.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

import common  # noqa: F401
from benchmarks.centralised import environment
from benchmarks.federated import REPORTED, run_once
from client.wire import MESSAGE_TYPE, from_recorddict, to_recorddict
from common.records import KNOWLEDGE_STATISTICS
from common.presets import ROBUSTNESS
from flwr.app import Message
from server.workflow import FederationError

# common.presets.ROBUSTNESS: the fast setting, both group terms, the WLI student from the NBI teacher.
BASE: dict[str, Any] = ROBUSTNESS
ATTACKS = ("sign_flip", "scale", "random")
DEFENCES = {
    "none": {},
    "median": {"fed.aggregation": "median"},
    "trimmed_mean": {"fed.aggregation": "trimmed_mean", "fed.trim_fraction": 0.34},
    "median+clip": {"fed.aggregation": "median", "fed.clip_ratio": 2.0},
}
# Every statistic's float sum (common.records' table).
POISONED_STATISTICS = tuple(stat.sum for stat in KNOWLEDGE_STATISTICS)


def attack_array(value: np.ndarray, reference: np.ndarray, attack: str, strength: float, rng: np.random.Generator) -> np.ndarray:
    """The poisoned version of ``value`` relative to ``reference`` (the global model, or zero for statistics)."""
    delta = value.astype(np.float64) - reference
    if attack == "sign_flip":
        delta = -strength * delta
    elif attack == "scale":
        delta = strength * delta
    elif attack == "random":
        delta = rng.standard_normal(delta.shape) * strength * (np.linalg.norm(delta) / np.sqrt(max(delta.size, 1)))
    else:
        raise ValueError(f"unknown attack '{attack}'; choose from {ATTACKS}")
    return (reference + delta).astype(value.dtype)


def poisoning_faults(attack: str, strength: float, nbi_node: int, wli_node: int, seed: int) -> Callable:
    """faults(grid) for benchmarks.federated.run_once: the NBI node poisons its knowledge sums,
    the WLI node its student update (relative to the global student it was sent)."""
    rng = np.random.default_rng(seed)

    def factory(grid):
        def poison(node_id: int, message: Message) -> Message | None:
            reply = grid.deliver(node_id, message)
            kind = message.metadata.message_type
            if reply.has_error() or kind not in (MESSAGE_TYPE["knowledge.stats"], MESSAGE_TYPE["student.train"]):
                return reply
            payload = from_recorddict(reply.content)
            if payload.kind in ("knowledge.sums",):
                for key in POISONED_STATISTICS:
                    payload.arrays[key] = attack_array(payload.arrays[key], 0.0, attack, strength, rng)
            elif payload.kind == "student.update":
                sent = from_recorddict(message.content).weights
                for block, weights in payload.weights.items():
                    payload.weights[block] = {
                        k: attack_array(v, sent[block][k], attack, strength, rng) if v.dtype.kind == "f" else v
                        for k, v in weights.items()
                    }
            return Message(to_recorddict(payload), reply_to=message)

        return {nbi_node: poison, wli_node: poison}

    return factory


def summarise(results: list[dict[str, Any]]) -> dict[str, float]:
    row: dict[str, float] = {}
    for key in REPORTED:
        values = np.array([r["final"][key] for r in results])
        row[f"{key}_mean"], row[f"{key}_std"] = float(values.mean()), float(values.std(ddof=1) if len(values) > 1 else 0.0)
    return row


def poisoning(args, base: dict[str, Any], run_dir: Path, stamp: str) -> dict[str, Any]:
    base = {**base, "data.nbi_sites": 3, "data.wli_sites": 3}
    nbi_node, wli_node = 101, 104  # nbi-0 and wli-0 (node ids 101.. in partition order: NBI first)
    cases = [("clean", "none"), ("clean", "median")] + [(a, d) for a in args.attacks for d in args.defences]
    runs: dict[str, list[dict[str, Any]]] = {}
    for seed in args.seeds:
        for attack, defence in cases:
            name = f"{attack}/{defence}"
            faults = None if attack == "clean" else poisoning_faults(attack, args.strength, nbi_node, wli_node, seed)
            started = time.time()
            try:
                result = run_once(
                    {**base, **DEFENCES[defence], "train.seed": seed},
                    "inprocess",
                    run_dir,
                    f"{stamp}-{attack}-{defence}-seed{seed}",
                    faults,
                )
            except FederationError as err:
                # The poisoned global model broke every site (e.g. a negative BatchNorm variance
                # makes NaN scores): the run stops. Counted as a constant predictor in the table.
                c = int(base.get("data.num_classes", 3))
                chance = {"auc": 0.5, "accuracy": 1 / c, "sensitivity": 1 / c, "specificity": 1 - 1 / c}
                result = {"failed": str(err), "final": chance, "wall_s": time.time() - started}
            runs.setdefault(name, []).append(result)
            status = f"FAILED ({result['failed'][:120]})" if "failed" in result else f"AUC {result['final']['auc']:.4f}"
            print(f"seed {seed} {name}: {status} in {result['wall_s']:.0f} s", flush=True)
    summary = {name: {**summarise(r), "failed": sum("failed" in x for x in r), "runs": len(r)} for name, r in runs.items()}
    print(
        f"\npoisoning (nbi-0 statistics + wli-0 update, strength {args.strength}), mean +/- std over seeds {args.seeds}; "
        "a failed run (the model broke every site) counts as a constant predictor (AUC 0.5)"
    )
    print(f"{'attack/defence':<24}" + "".join(f"{k.upper()[:4]:>17}" for k in REPORTED) + f"{'failed':>8}")
    for name, row in summary.items():
        print(
            f"{name:<24}"
            + "".join(f"{row[f'{k}_mean']:>10.4f} +/-{row[f'{k}_std']:.3f}" for k in REPORTED)
            + f"{row['failed']:>5}/{row['runs']}"
        )
    return {"strength": args.strength, "summary": summary, "runs": runs}


def privacy(args, base: dict[str, Any], run_dir: Path, stamp: str) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {}
    for seed in args.seeds:
        for sigma in args.sigmas:
            result = run_once(
                {**base, "privacy.noise_multiplier": sigma, "privacy.clip": args.clip, "train.seed": seed},
                "inprocess",
                run_dir,
                f"{stamp}-sigma{sigma}-seed{seed}",
            )
            runs.setdefault(str(sigma), []).append(result)
            eps = result["privacy"]["max_epsilon"]
            print(
                f"seed {seed} sigma {sigma}: AUC {result['final']['auc']:.4f}, epsilon {eps}, {result['wall_s']:.0f} s",
                flush=True,
            )
    summary = {}
    for sigma, results in runs.items():
        summary[sigma] = {
            **summarise(results),
            "epsilon": results[0]["privacy"]["max_epsilon"],
            "releases_per_site": max(results[0]["privacy"]["releases"].values()),
        }
    print(f"\nAUC vs epsilon (delta {base.get('privacy.delta', 1e-5)}, clip {args.clip}), mean +/- std over seeds {args.seeds}")
    print(f"{'sigma':>6}{'epsilon':>12}{'AUC':>20}{'ACC':>20}")
    for sigma, row in summary.items():
        eps = "no DP" if row["epsilon"] is None else f"{row['epsilon']:.2f}"
        print(
            f"{sigma:>6}{eps:>12}{row['auc_mean']:>13.4f} +/-{row['auc_std']:.3f}{row['accuracy_mean']:>13.4f} +/-{row['accuracy_std']:.3f}"
        )
    return {"clip": args.clip, "summary": summary, "runs": runs}


def plot(kind: str, result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    rows = result["summary"]
    if kind == "privacy":
        points = [(row["epsilon"], row) for row in rows.values() if row["epsilon"] is not None]
        points.sort(key=lambda p: p[0])
        ax.errorbar([p[0] for p in points], [p[1]["auc_mean"] for p in points], [p[1]["auc_std"] for p in points], marker="o")
        if "0.0" in rows:
            ax.axhline(rows["0.0"]["auc_mean"], ls="--", c="grey", label="no DP")
            ax.legend()
        ax.set_xscale("log")
        ax.set_xlabel("epsilon per NBI site (delta 1e-5)")
    else:
        names = list(rows)
        ax.bar(range(len(names)), [rows[n]["auc_mean"] for n in names], yerr=[rows[n]["auc_std"] for n in names])
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("final pooled WLI AUC")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("poisoning", "privacy"))
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--defences", nargs="+", default=["none", "median", "trimmed_mean"], choices=list(DEFENCES))
    parser.add_argument("--strength", type=float, default=20.0)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--clip", type=float, default=10.0)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/benchmark-robustness").resolve())
    args = parser.parse_args(argv)
    base = {**BASE, **dict(item.split("=", 1) for item in args.overrides)}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    result = (poisoning if args.kind == "poisoning" else privacy)(args, base, args.run_dir, stamp)
    out = Path(f"benchmarks/results/{args.kind}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seeds": args.seeds, "overrides": base, **result, "environment": environment()}, indent=2))
    plot(args.kind, result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
