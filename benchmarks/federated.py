"""Federated PaGKD vs federated WLI-only FedAvg, same rounds and seeds; bytes and wall time.

Each run is a real ``flwr run`` Ray simulation (``--runtime flower``, default) or, for quick
sweeps, the same ServerApp protocol and ClientApp handlers called in-process
(``--runtime inprocess``: no SuperLink/Ray transport; identical maths and messages).

    python -m benchmarks.federated --seeds 0 1 2 [--runtime flower] [key=value ...]

Writes benchmarks/results/federated.json and prints: final pooled WLI AUC/ACC/SENS/SPEC
(mean +/- std), wall time, bytes per phase, and the bank's share of one student upload.
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
from common.config import Config, config_from_flat, config_to_flat
from common.presets import FAST, METHODS  # the methods: the registry's (common/presets.py)

REPORTED = ("auc", "accuracy", "sensitivity", "specificity")
# Keys the teacher rounds never read: runs that differ only in these share one teacher phase
# (teacher_snapshot). Everything else (data, model, lr, schedule, keep_optimizer_state, the
# teacher's group CE's pagkd.group_size / min_group_size, ...) is read by the teacher rounds.
STUDENT_PHASE_KEYS = (
    "pagkd.",
    "fed.student_init",
    "fed.student_sites",
    "fed.fedproto_weight",
    "fed.student_rounds",
    "fed.bank_refresh_every",
)
TEACHER_READS = ("pagkd.group_size", "pagkd.min_group_size")
# Keys that never change what a run computes, only how a deployment recovers (an in-process run
# never sees a crashed ClientApp): left out of teacher_key, so the runs from before such a key
# existed and those after it share one teacher phase.
RECOVERY_KEYS = ("fed.resend_crashed", "fed.site_lost_s")


def _student_phase(key: str) -> bool:
    return key.startswith(STUDENT_PHASE_KEYS) and key not in TEACHER_READS


def run_config(cfg: Config) -> dict[str, Any]:
    """A run's flat config less where its folder is: what makes two runs the same run."""
    return {k: v for k, v in config_to_flat(cfg).items() if k not in ("fed.run_dir", "fed.run_name")}


def teacher_key(overrides: dict[str, Any]) -> str:
    """What the teacher phase of a run with these overrides reads: its :func:`run_config` less the
    student-phase keys (two spellings of one config give one key)."""
    flat = run_config(config_from_flat(overrides))
    return json.dumps({k: v for k, v in sorted(flat.items()) if not _student_phase(k) and k not in RECOVERY_KEYS})


def teacher_snapshot(overrides: dict[str, Any], run_dir: Path, name: str):
    """The server's state after the teacher rounds and the teacher's selection, before anything
    of the student phase (the teacher's test figure and the first bank come with the run that
    starts from it): ``run_once(..., start=snapshot)`` of any run with the same
    :func:`teacher_key` then does exactly what its own teacher rounds would have done (same
    seeds, same sites, same selected teacher) and skips them. In-process runtime."""
    from server.inprocess import InProcessGrid, synthetic_node_configs
    from server.state import RunLock
    from server.workflow import Protocol

    # One config per teacher_key (so any run of that key resumes the same folder): the student-
    # phase keys at their defaults, and distilling: its teacher phase stops before the teacher's
    # test evaluation, which the run started from the snapshot then does as its own would.
    flat, default = config_to_flat(config_from_flat(overrides)), config_to_flat(Config())
    canonical = {k: default[k] if _student_phase(k) else v for k, v in flat.items()}
    overrides = {
        **canonical,
        "pagkd.use_pro": True,
        "fed.student_init": "teacher",
        "fed.run_dir": str(run_dir),
        "fed.run_name": name,
    }
    cfg = config_from_flat(overrides)
    grid = InProcessGrid(synthetic_node_configs(cfg.data.nbi_sites + cfg.data.wli_sites), config_to_flat(cfg))
    (run_dir / name).mkdir(parents=True, exist_ok=True)
    protocol = Protocol(grid, cfg, run_dir / name)
    with RunLock(protocol.run_dir):
        protocol.start()
        protocol.teacher_phase()
    return protocol.run_state


def run_once(overrides: dict[str, Any], runtime: str, run_dir: Path, name: str, faults=None, start=None) -> dict[str, Any]:
    """One run. ``faults(grid)`` -> {node id: fault hook} (server.inprocess); ``start``: a
    :func:`teacher_snapshot` to start from; both in-process runtime only."""
    if (faults or start is not None) and runtime != "inprocess":
        raise ValueError("fault hooks and a teacher snapshot need --runtime inprocess")
    overrides = {**overrides, "fed.run_dir": str(run_dir), "fed.run_name": name}
    cfg = config_from_flat(overrides)
    started = time.time()
    if runtime == "flower":
        from server.launch import simulate

        simulate(overrides, cfg.data.nbi_sites + cfg.data.wli_sites, stream=False)
    else:
        from server.workflow import run_federation
        from server.inprocess import InProcessGrid, synthetic_node_configs

        grid = InProcessGrid(synthetic_node_configs(cfg.data.nbi_sites + cfg.data.wli_sites), config_to_flat(cfg))
        grid.faults = faults(grid) if faults else {}
        run_federation(grid, cfg, run_dir / name, start)
    metrics = json.loads((run_dir / name / "metrics.json").read_text())
    return {
        "final": {k: metrics["final"][k] for k in REPORTED},
        # The selected NBI teacher's test figures with its confusion matrix (None without teacher rounds).
        "final_teacher": metrics.get("final_teacher"),
        "selection": metrics.get("selection"),
        "auc_per_round": [
            e["pooled"]["auc"] for e in metrics["evaluation"] if e["model"] == "student" and e.get("split") == "val"
        ],
        "wall_s": time.time() - started,
        "bytes": metrics["bytes"],
        "bank_bytes": metrics["bank_bytes"],
        "student_weights_bytes": metrics["student_weights_bytes"],
        "bank_share_of_student_upload": metrics["bank_share_of_student_upload"],
        "privacy": metrics.get("privacy"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--runtime", choices=("flower", "inprocess"), default="flower")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/benchmark-federated").resolve())
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/federated.json"))
    parser.add_argument(
        "--fast", action="store_true", help="start from the fast preset (common.presets.FAST), then the overrides"
    )
    args = parser.parse_args(argv)
    base = {**(FAST if args.fast else {}), **dict(item.split("=", 1) for item in args.overrides)}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        for method in args.methods:
            overrides = {**base, **METHODS[method], "train.seed": seed}
            result = run_once(overrides, args.runtime, args.run_dir, f"{stamp}-{method}-seed{seed}")
            runs[method].append(result)
            print(f"seed {seed} {method}: AUC {result['final']['auc']:.4f} in {result['wall_s']:.0f} s", flush=True)
    summary = {}
    for method, results in runs.items():
        row = {}
        for key in REPORTED:
            values = np.array([r["final"][key] for r in results])
            row[f"{key}_mean"], row[f"{key}_std"] = float(values.mean()), float(values.std(ddof=1) if len(values) > 1 else 0)
        row["wall_s_mean"] = float(np.mean([r["wall_s"] for r in results]))
        summary[method] = row
    print(f"\nfederated, {args.runtime} runtime, mean +/- std over seeds {args.seeds}")
    # Relative AUC gain over the FedAvg of the same start (the paper reports +1.1 to +3.3 %).
    reference = {m: "fedavg_teacher_init" if "teacher_init" in m else "fedavg_wli_only" for m in summary}
    for method, row in summary.items():
        ref = summary.get(reference[method])
        row["relative_auc_gain_pct"] = None if ref is None else 100 * (row["auc_mean"] / ref["auc_mean"] - 1)
    print(f"{'method':<22}" + "".join(f"{k.upper()[:4]:>17}" for k in REPORTED) + f"{'wall s':>9}{'gain %':>9}")
    for method, row in summary.items():
        gain = "" if row["relative_auc_gain_pct"] is None else f"{row['relative_auc_gain_pct']:+.1f}"
        print(
            f"{method:<22}"
            + "".join(f"{row[f'{k}_mean']:>10.4f} +/-{row[f'{k}_std']:.3f}" for k in REPORTED)
            + f"{row['wall_s_mean']:>9.0f}{gain:>9}"
        )
    example = next(iter(runs.get("fedpagkd", []) or next(iter(runs.values()))))
    print("\nbytes per phase (first run of fedpagkd):")
    for phase, entry in example["bytes"].items():
        print(
            f"  {phase:<10} sent {entry['sent'] / 2**20:9.2f} MiB  received {entry['received'] / 2**20:9.2f} MiB  messages {entry['messages']}"
        )
    print(
        f"knowledge bank {example['bank_bytes']} B = {100 * example['bank_share_of_student_upload']:.3f} % of one student upload "
        f"({example['student_weights_bytes'] / 2**20:.1f} MiB)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "runtime": args.runtime,
                "seeds": args.seeds,
                "overrides": base,
                "summary": summary,
                "runs": runs,
                "environment": environment(),
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
