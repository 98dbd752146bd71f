"""Follow a run's log and exit with its real outcome (``flwr log --stream`` exits 0 on a failed run).

    python deploy/follow.py RUN_ID [CONNECTION]      # CONNECTION default: fedpagkd

streams ``flwr log RUN_ID CONNECTION --stream``, then reads ``flwr list CONNECTION --run-id RUN_ID``
until the status is ``finished:*``; prints ``run RUN_ID: <status> (<details>)`` and exits 0 only for
``finished:completed`` (1 otherwise, 2 when the status cannot be read).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time


def status(run_id: str, connection: str) -> dict:
    out = subprocess.run(["flwr", "list", connection, "--run-id", run_id, "--format", "json"], capture_output=True, text=True)
    data = json.loads(out.stdout or "{}")
    if not data.get("success") or not data.get("runs"):
        raise RuntimeError(f"flwr list {connection} --run-id {run_id}: {data.get('error-message') or out.stderr.strip()}")
    return data["runs"][0]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print(__doc__, file=sys.stderr)
        return 2
    run_id, connection = args[0], (args[1] if len(args) > 1 else "fedpagkd")
    subprocess.run(["flwr", "log", run_id, connection, "--stream"])
    try:
        for _ in range(120):  # the log ends just before the status is written
            row = status(run_id, connection)
            if str(row["status"]).startswith("finished:"):
                break
            time.sleep(1.0)
    except (RuntimeError, ValueError) as err:
        print(f"run {run_id}: status unknown: {err}", file=sys.stderr)
        return 2
    print(f"run {run_id}: {row['status']} ({row.get('status-details', '')})")
    return 0 if row["status"] == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
