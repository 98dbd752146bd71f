"""Behaviour unchanged, shown: a seeded run's fingerprint before and after a refactor.

A fingerprint is what a run computed, not how long it took: the selected rounds and final
figures, every evaluation (per round, per split, per site), the bytes per phase, the bank's size,
and a SHA-256 of every tensor the run saved (the student checkpoint and the server state). Two
fingerprints of the same seeded run are equal when the code computes the same thing; wall times
and paths are left out.

The runs are short in-process federations (:func:`benchmarks.federated.run_once`,
``--runtime inprocess``) of a few methods on the embedded default. The overrides of each run are
stored in the fingerprint file, so a later tree re-runs exactly the same flat config even if the
named configurations moved::

    OMP_NUM_THREADS=1 python -m benchmarks.fingerprint record --out before.json   # on the old tree
    OMP_NUM_THREADS=1 python -m benchmarks.fingerprint rerun before.json --out after.json  # new tree
    python -m benchmarks.fingerprint compare before.json after.json                 # exit 1 on a difference

The thread count changes float results; record it with the file (it is) and compare like with like.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import common.compat  # noqa: F401  (torchvision on CPU torch, before timm)
import numpy as np
from safetensors.numpy import load_file

# Short runs: two teacher rounds, three student rounds, one local epoch (all phases, minutes each).
SHORT = {"fed.teacher_rounds": 2, "fed.student_rounds": 3, "train.local_epochs": 1, "train.seed": 0}
# Which methods: the default run, PaGKD with both group terms, and the two baselines whose code
# paths a redesign of the student round touches (FedProto's prototypes, the joint site selection).
METHOD_NAMES = ("default", "fedpagkd_teacher_init", "fedproto_wli", "fedavg_joint")
# Keys of metrics.json that depend on the clock or the machine, not on what was computed.
VOLATILE = ("timing", "wall_s", "wall_time_s")


def method_overrides(name: str) -> dict[str, Any]:
    """The flat overrides of one named method (``default``: the Config defaults)."""
    from common.presets import METHODS

    return {**SHORT} if name == "default" else {**METHODS[name], **SHORT}


def tensor_digests(run_dir: Path) -> dict[str, str]:
    """{file/tensor: sha256 of its bytes} for every safetensors file the run saved."""
    digests = {}
    for path in sorted(run_dir.rglob("*.safetensors")):
        for key, array in sorted(load_file(str(path)).items()):
            digests[f"{path.relative_to(run_dir)}/{key}"] = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
    return digests


def run_fingerprint(run_dir: Path) -> dict[str, Any]:
    """What a finished run folder computed: metrics.json less its volatile keys, and tensor digests."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "metrics": {k: v for k, v in metrics.items() if k not in VOLATILE},
        "tensors": tensor_digests(run_dir),
    }


def fingerprint_runs(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Run each {name: overrides} in-process in a scratch folder and fingerprint it."""
    from benchmarks.federated import run_once

    out = {"threads": os.environ.get("OMP_NUM_THREADS", "unset"), "runs": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for name, overrides in runs.items():
            print(f"[fingerprint] {name} ...", flush=True)
            run_once(overrides, "inprocess", Path(scratch), name)
            out["runs"][name] = {"overrides": overrides, **run_fingerprint(Path(scratch) / name)}
    return out


def differences(before: Any, after: Any, where: str = "") -> list[str]:
    """Every path at which two JSON values differ (exact: the same seeded run gives the same floats)."""
    if isinstance(before, dict) and isinstance(after, dict):
        found = [f"{where}/{k}: only in {'before' if k in before else 'after'}" for k in before.keys() ^ after.keys()]
        for key in sorted(before.keys() & after.keys()):
            found += differences(before[key], after[key], f"{where}/{key}")
        return found
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [d for i, (b, a) in enumerate(zip(before, after)) for d in differences(b, a, f"{where}[{i}]")]
    return [] if before == after else [f"{where}: {before!r} -> {after!r}"[:300]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    record = sub.add_parser("record", help="run the named methods and write their fingerprints")
    record.add_argument("--methods", nargs="+", default=list(METHOD_NAMES))
    record.add_argument("--out", type=Path, required=True)
    rerun = sub.add_parser("rerun", help="run the overrides stored in a fingerprint file again")
    rerun.add_argument("before", type=Path)
    rerun.add_argument("--out", type=Path, required=True)
    compare = sub.add_parser("compare", help="list the differences of two fingerprint files")
    compare.add_argument("before", type=Path)
    compare.add_argument("after", type=Path)
    args = parser.parse_args(argv)

    if args.command == "compare":
        before, after = (json.loads(p.read_text()) for p in (args.before, args.after))
        print(f"{'run':28s} {'differences':>11s}  threads {before['threads']} -> {after['threads']}")
        total = 0
        for name in sorted(before["runs"].keys() | after["runs"].keys()):
            found = differences(before["runs"].get(name), after["runs"].get(name))
            total += len(found)
            print(f"{name:28s} {len(found):11d}")
            for line in found[:20]:
                print(f"    {line}")
        return 1 if total else 0
    runs = (
        {m: method_overrides(m) for m in args.methods}
        if args.command == "record"
        else {name: run["overrides"] for name, run in json.loads(args.before.read_text())["runs"].items()}
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(fingerprint_runs(runs), indent=1, sort_keys=True))
    print(f"[fingerprint] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
