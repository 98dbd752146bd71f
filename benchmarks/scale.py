"""Scale: the same federated run with N = 4, 16, 64 sites on the Ray simulation runtime.

Each N is a real ``flwr run`` (local SuperLink, Ray, N virtual SuperNodes, half NBI and half WLI)
of tiny heterogeneous sites (long-tailed sizes, Dirichlet class balance, per-site rendering
shift; 32 px, timm ``test_resnet``, 1 teacher + 2 student rounds). Reported per N:

* wall time per round (teacher and student rounds: the server's exchange wall time);
* framework overhead per round = round wall time - the slowest site's compute (what the issue
  asks) and, since N sites share the machine's cores, also round wall - sum(compute) / slots
  (slots = min(N, cores / cpus-per-client): the time ideal packing of the same compute would take);
* peak memory of the whole run: the proportional set size (PSS, shared pages split between
  processes, so libraries are not counted N times) summed over every process of the run
  (SuperLink, SuperExec, flwr-simulation, Ray's GCS/raylet/workers), sampled every second;
* bytes per student round (both directions).

``--overhead-default`` adds one N = 4 run of the default model (ResNet-18, 64 px, 96 images) for the
overhead target at 4 sites. Writes benchmarks/results/scale.json and scale.png; prints a table.

    python -m benchmarks.scale [--sizes 4 16 64] [--overhead-default] [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

import common  # noqa: F401
from benchmarks.centralised import environment
from common.files import atomic_write_json
from common.presets import SCALE
from common.results import RunResult
from server.processes import processes_with_env

# The tiny heterogeneous sites of every N: common.presets.SCALE.
TINY_SITES: dict[str, Any] = SCALE
# The default model at 4 sites, for the overhead target (the run config's own defaults).
DEFAULT_MODEL: dict[str, Any] = {"fed.teacher_rounds": 1, "fed.student_rounds": 2, "train.device": "cpu"}


class RunMemory:
    """Peak over time of the summed PSS of every process whose environment has FLWR_HOME=``home``."""

    def __init__(self, home: Path, every_s: float = 1.0) -> None:
        self.marker = f"FLWR_HOME={home}"
        self.every_s = every_s
        self.peak_bytes = 0
        self.peak_processes: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "RunMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            total, names = 0, {}
            for pid in processes_with_env(self.marker):
                try:
                    pss = _pss_bytes(pid)
                    with open(f"/proc/{pid}/comm") as handle:
                        name = handle.read().strip()
                except OSError:  # gone, or not ours to read
                    continue
                total += pss
                names[name] = names.get(name, 0) + pss
            if total > self.peak_bytes:
                self.peak_bytes, self.peak_processes = total, names


def _pss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        for line in handle:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def round_overheads(timing: list[dict[str, Any]], slots: int) -> list[dict[str, Any]]:
    """Per teacher/student round of a run's ``timing`` (:attr:`common.results.RunResult.timing`):
    wall, slowest and summed site compute, both overheads."""
    rows = []
    for entry in timing:
        if entry["phase"] not in ("teacher", "student") or not entry["compute_s"]:
            continue
        compute = list(entry["compute_s"].values())
        wall = entry["wall_s"]
        packed = sum(compute) / min(slots, len(compute))
        rows.append(
            {
                "phase": entry["phase"],
                "round": entry["round"],
                "sites": entry["sites"],
                "wall_s": wall,
                "slowest_site_s": max(compute),
                "sum_compute_s": sum(compute),
                "overhead_vs_slowest": (wall - max(compute)) / wall,
                "overhead_vs_packed": (wall - packed) / wall,
            }
        )
    return rows


def run_size(label: str, overrides: dict[str, Any], sites: int, work: Path, cpus_per_client: int) -> dict[str, Any]:
    from server.launch import simulate

    nbi = sites // 2
    config = {
        **overrides,
        "data.nbi_sites": nbi,
        "data.wli_sites": sites - nbi,
        "fed.run_dir": str(work / "runs"),
        "fed.run_name": label,
    }
    flower_work = work / f"flower-{label}"
    with RunMemory(flower_work / "flwr-home") as memory:
        result = simulate(config, sites, cpus_per_client, work_dir=flower_work, stream=False)
    outcome = RunResult.read(result.run_dir)
    slots = max(1, min(sites, (os.cpu_count() or 1) // cpus_per_client))
    rounds = round_overheads(outcome.timing, slots)
    student = [r for r in rounds if r["phase"] == "student"]
    student_bytes = outcome.bytes["student"]
    return {
        "label": label,
        "sites": sites,
        "run_wall_s": result.wall_s,
        "rounds": rounds,
        "student_round_wall_s": float(np.mean([r["wall_s"] for r in student])),
        "overhead_vs_slowest": float(np.mean([r["overhead_vs_slowest"] for r in rounds])),
        "overhead_vs_packed": float(np.mean([r["overhead_vs_packed"] for r in rounds])),
        "peak_memory_bytes": memory.peak_bytes,
        "peak_memory_by_process": memory.peak_processes,
        "bytes_per_student_round": (student_bytes["sent"] + student_bytes["received"]) / max(len(student), 1),
        "final_auc": outcome.final.auc if outcome.final else None,
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'run':<14}{'sites':>6}{'student round s':>17}{'overhead vs slowest':>21}{'vs packed':>11}"
        f"{'peak PSS GiB':>14}{'MiB/student round':>19}{'run s':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['label']:<14}{r['sites']:>6}{r['student_round_wall_s']:>17.1f}{100 * r['overhead_vs_slowest']:>20.1f}%"
            f"{100 * r['overhead_vs_packed']:>10.1f}%{r['peak_memory_bytes'] / 2**30:>14.2f}"
            f"{r['bytes_per_student_round'] / 2**20:>19.2f}{r['run_wall_s']:>8.0f}"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiny = [r for r in rows if r["label"].startswith("tiny")]
    n = [r["sites"] for r in tiny]
    panels = [
        ("student round wall time (s)", [r["student_round_wall_s"] for r in tiny]),
        ("overhead (% of round)", [100 * r["overhead_vs_packed"] for r in tiny]),
        ("peak memory, PSS (GiB)", [r["peak_memory_bytes"] / 2**30 for r in tiny]),
        ("bytes per student round (MiB)", [r["bytes_per_student_round"] / 2**20 for r in tiny]),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (title, values) in zip(axes, panels):
        ax.plot(n, values, "k-o")
        ax.set_xscale("log", base=2)
        ax.set_xticks(n, [str(x) for x in n])
        ax.set_xlabel("sites (N)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].plot(n, [100 * r["overhead_vs_slowest"] for r in tiny], "r--o", label="vs slowest site")
    axes[1].legend(["vs ideal packing", "vs slowest site"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--overhead-default", action="store_true", help="also N=4 with the default model (ResNet-18, 64 px)")
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/scale.json")
    parser.add_argument("overrides", nargs="*", help="run-config overrides on top of the tiny sites, key=value")
    args = parser.parse_args(argv)
    overrides = {**TINY_SITES, **dict(o.split("=", 1) for o in args.overrides)}  # strings: the config parses them
    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="fedpagkd-scale-"))
    rows = []
    for sites in args.sizes:
        rows.append(run_size(f"tiny-{sites}", overrides, sites, work, args.cpus_per_client))
        print(table(rows[-1:]), flush=True)
    if args.overhead_default:
        rows.append(run_size("resnet18-64px", DEFAULT_MODEL, 4, work, args.cpus_per_client))
    atomic_write_json(out, {"overrides": overrides, "rows": rows, "environment": environment()})
    plot(rows, out.with_suffix(".png"))
    print(table(rows))
    print(f"wrote {out} and {out.with_suffix('.png')} (run folders in {work})")


if __name__ == "__main__":
    main()
