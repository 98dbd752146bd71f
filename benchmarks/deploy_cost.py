"""Deployment cost: the same short run on the loopback deployment and on the Ray simulation.

The loopback deployment (tests/harness/loopback.py) is what a hospital runs, on 127.0.0.1: a
SuperLink with TLS and SuperNode authentication, 2 NBI + 2 WLI SuperNodes (``deploy/supernode.py``),
each message handled by a fresh ClientApp process (Flower's process isolation: Python, torch and
timm imported again, the bundle checked and installed). The simulation (``server.launch``) runs the
same run config and sites on Ray, whose workers stay alive between messages. Reported per arm:

* the run's wall time (submit to finished) and the ServerApp's own time from its first to its last
  exchange;
* per exchange kind (teacher round, knowledge steps, student round, evaluation): the mean wall time
  of one exchange (the server's send-to-last-reply time), the slowest site's declared compute time
  in it, and the difference: what the runtime adds to one exchange (process start, imports,
  transfers, polling);
* the ratio deployment / simulation of each.

Writes benchmarks/results/deploy_cost.json and prints a table.

    python -m benchmarks.deploy_cost [--work DIR] [key=value ...]     # run-config overrides
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping

from benchmarks.centralised import environment
from common.files import atomic_write_json
from common.presets import LOOPBACK

OUT = Path(__file__).resolve().parent / "results" / "deploy_cost.json"
SITES = LOOPBACK["data.nbi_sites"] + LOOPBACK["data.wli_sites"]


def exchanges(metrics: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Per exchange kind of a run's ``timing``: count, mean wall, mean slowest compute, mean overhead (s)."""
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in metrics["timing"]:
        by_kind[f"{entry['phase']}:{entry['kind']}"].append(entry)
    rows = {}
    for kind, entries in by_kind.items():
        walls = [e["wall_s"] for e in entries]
        slowest = [max(e["compute_s"].values(), default=0.0) for e in entries]
        rows[kind] = {
            "exchanges": len(entries),
            "wall_s": sum(walls) / len(walls),
            "slowest_compute_s": sum(slowest) / len(slowest),
            "overhead_s": sum(w - c for w, c in zip(walls, slowest)) / len(walls),
        }
    return rows


def arm(wall_s: float, metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "wall_s": wall_s,
        "exchange_wall_s": sum(e["wall_s"] for e in metrics["timing"]),
        "exchanges": exchanges(metrics),
        "final_auc": (metrics.get("final") or {}).get("auc"),
    }


def run_deployment(config: Mapping[str, Any], work: Path) -> dict[str, Any]:
    from tests.harness.loopback import run_loopback

    result = run_loopback(work / "loopback", config, timeout=1800.0, verbose=False)
    if result.status != "finished:completed":
        raise RuntimeError(f"loopback run {result.run_id}: {result.status} ({result.details}); see {result.log}")
    return arm(result.wall_s, result.metrics())


def run_simulation(config: Mapping[str, Any], work: Path) -> dict[str, Any]:
    from server import launch

    config = {**config, "fed.run_dir": str(work / "runs"), "fed.run_name": "simulation"}
    result = launch.simulate(config, num_supernodes=SITES, cpus_per_client=1, work_dir=work / "sim", timeout_s=1800, stream=False)
    return arm(result.wall_s, json.loads((result.run_dir / "metrics.json").read_text()))


def ratios(deployment: Mapping[str, Any], simulation: Mapping[str, Any]) -> dict[str, Any]:
    def ratio(a: float, b: float) -> float | None:
        return a / b if b > 0 else None

    kinds = sorted(set(deployment["exchanges"]) & set(simulation["exchanges"]))
    return {
        "wall": ratio(deployment["wall_s"], simulation["wall_s"]),
        "exchange_wall": ratio(deployment["exchange_wall_s"], simulation["exchange_wall_s"]),
        "per_exchange": {k: ratio(deployment["exchanges"][k]["wall_s"], simulation["exchanges"][k]["wall_s"]) for k in kinds},
    }


def table(result: Mapping[str, Any]) -> str:
    dep, sim, rat = result["deployment"], result["simulation"], result["ratio"]
    lines = [
        f"{'':34s} {'deployment':>12s} {'simulation':>12s} {'ratio':>7s}",
        f"{'run wall (s)':34s} {dep['wall_s']:12.1f} {sim['wall_s']:12.1f} {rat['wall']:7.2f}",
        f"{'exchanges, summed wall (s)':34s} {dep['exchange_wall_s']:12.1f} {sim['exchange_wall_s']:12.1f} {rat['exchange_wall']:7.2f}",
        "per exchange (mean s): wall / slowest site compute / overhead",
    ]
    for kind, value in rat["per_exchange"].items():
        d, s = dep["exchanges"][kind], sim["exchanges"][kind]
        lines.append(
            f"  {kind:32s} {d['wall_s']:5.1f}/{d['slowest_compute_s']:4.1f}/{d['overhead_s']:5.1f}"
            f"  {s['wall_s']:5.1f}/{s['slowest_compute_s']:4.1f}/{s['overhead_s']:5.1f}  {value or float('nan'):7.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="run-config overrides on common.presets.LOOPBACK, e.g. fed.student_rounds=2")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a new temp folder)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    from tests.harness.loopback import _parse_value

    config = dict(LOOPBACK)
    for item in args.overrides:
        key, _, value = item.partition("=")
        config[key] = _parse_value(value)
    work = args.work or Path(tempfile.mkdtemp(prefix="fedpagkd-deploy-cost-"))
    load_before = os.getloadavg()
    deployment = run_deployment(config, work)
    simulation = run_simulation(config, work)
    result = {
        "config": config,
        "environment": {**environment(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "deployment": deployment,
        "simulation": simulation,
        "ratio": ratios(deployment, simulation),
    }
    atomic_write_json(args.out, result)
    print(table(result))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
