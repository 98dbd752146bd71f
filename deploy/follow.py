"""Follow a run's log and exit with its real outcome (``flwr log --stream`` exits 0 on a failed run).

    python deploy/follow.py RUN_ID [CONNECTION]      # CONNECTION default: fedpagkd

streams ``flwr log RUN_ID CONNECTION --stream``, then reads ``flwr list CONNECTION --run-id RUN_ID``
until the status is ``finished:*``; prints ``run RUN_ID: <status> (<details>)`` and exits 0 only for
``finished:completed`` (1 otherwise, 2 when the status cannot be read). A run Flower reports completed
but that lost sites (the ServerApp's ``run DEGRADED, NOT accepted ...`` line: more sites lost than
``fed.min_site_share`` allows) prints ``run RUN_ID: finished:completed but DEGRADED, NOT accepted
(...): lost <sites>`` and exits 3, as ``python -m server.launch`` does; an accepted degraded run
prints its line and exits 0.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Iterable, Iterator

try:  # `python deploy/follow.py` (this folder on sys.path) or `from deploy import follow`
    import tlscheck
except ImportError:  # pragma: no cover
    from deploy import tlscheck

DEGRADED = "run DEGRADED, "  # the start of the ServerApp's line (server/workflow.py, Protocol.finish)
DEGRADED_EXIT = 3  # server.launch.DEGRADED_EXIT


def status(run_id: str, connection: str) -> dict:
    out = subprocess.run(["flwr", "list", connection, "--run-id", run_id, "--format", "json"], capture_output=True, text=True)
    data = json.loads(out.stdout or "{}")
    if not data.get("success") or not data.get("runs"):
        raise RuntimeError(f"flwr list {connection} --run-id {run_id}: {data.get('error-message') or out.stderr.strip()}")
    return data["runs"][0]


def stream_log(run_id: str, connection: str) -> Iterator[str]:
    """The lines of ``flwr log RUN_ID CONNECTION --stream``, each printed as it comes."""
    with subprocess.Popen(["flwr", "log", run_id, connection, "--stream"], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            yield line


def degraded(lines: Iterable[str]) -> tuple[str, bool] | None:
    """The ServerApp's last ``run DEGRADED, ...`` line (from ``run DEGRADED``) and whether the run
    was accepted; None for a run that lost no site."""
    found = None
    for line in lines:
        if DEGRADED in line:
            text = line[line.index(DEGRADED) :].strip()
            found = (text, text.startswith(DEGRADED + "accepted"))
    return found


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print(__doc__, file=sys.stderr)
        return 2
    run_id, connection = args[0], (args[1] if len(args) > 1 else "fedpagkd")
    lost = degraded(stream_log(run_id, connection))
    try:
        for _ in range(120):  # the log ends just before the status is written
            row = status(run_id, connection)
            if str(row["status"]).startswith("finished:"):
                break
            time.sleep(1.0)
    except (RuntimeError, ValueError) as err:
        print(f"run {run_id}: status unknown: {tlscheck.explain(str(err), connection)}", file=sys.stderr)
        return 2
    if row["status"] == "finished:completed" and lost is not None:
        print(f"run {run_id}: finished:completed but {lost[0][len('run ') :]}")
        return 0 if lost[1] else DEGRADED_EXIT
    print(f"run {run_id}: {row['status']} ({row.get('status-details', '')})")
    return 0 if row["status"] == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
