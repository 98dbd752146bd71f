"""A site's own record of what it sent, and its comparison with the coordinator's egress log.

Every reply a site's ClientApp sends (errors included) is appended, before it leaves, as one JSON
line to ``<state-dir>/egress.jsonl`` (``state-dir`` from the site's node config): time, Flower run
id, run name, site, the request it answers, and :func:`common.egress.describe` of the reply
(kind, bytes, array keys with dtype and shape, weight blocks, scalar config such as group counts).
No array values are written. Without ``state-dir`` nothing is written.

Beside it, ``<state-dir>/releases.json`` counts the statistics releases the site sent
(:data:`common.records.RELEASE_KINDS`) per run ({run name: count}), each before it leaves; the
site reports its count at discovery, so a coordinator whose run folder was rolled back to an
older copy cannot undercount the site's DP budget (:meth:`server.channel.Ledger.reconcile`).

CLI (site or operator)::

    python -m client.egress compare --site-log /var/lib/fedpagkd-site/egress.jsonl \\
        --coordinator runs/<run-name>/egress.json [--site NAME] [--run-id ID ...]

exit 0 when the coordinator's log lists exactly what the site sent for that run, 1 with one line
per difference otherwise, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from common.egress import compare, describe, read_coordinator_log, read_site_log
from common.files import atomic_write_json
from common.records import RELEASE_KINDS, Payload

log = logging.getLogger(__name__)
SITE_LOG = "egress.jsonl"
RELEASES = "releases.json"
STATE_DIR_KEY = "state-dir"  # node config key


def site_log_path(node_config: Mapping[str, Any], name: str = SITE_LOG) -> Path | None:
    """``<state-dir>/<name>`` (the egress log by default), None without a state folder."""
    folder = str(node_config.get(STATE_DIR_KEY, "") or "")
    return Path(folder) / name if folder else None


def release_key(run_name: str, run_id: int) -> str:
    """The run a release counts for: its name (a resumed run keeps it), else its Flower run id."""
    return run_name or f"run-id {int(run_id)}"


class ReleaseCountError(OSError):
    """The site's count of DP releases cannot be read or written; the message names the file and the fix."""


def _read_releases(path: Path) -> dict[str, int]:
    if not path.is_file():
        return {}
    try:
        counts = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReleaseCountError(
            f"{path} (the site's count of DP releases) is not valid JSON ({err}); restore it from a backup"
        ) from None
    if not isinstance(counts, dict) or not all(type(n) is int and n >= 0 for n in counts.values()):
        raise ReleaseCountError(f"{path} (the site's count of DP releases) is not {{run: count}}; restore it from a backup")
    return counts


def releases_made(node_config: Mapping[str, Any], key: str) -> int:
    """The statistics releases this site counted for run ``key`` (0 without a state folder)."""
    path = site_log_path(node_config, RELEASES)
    return _read_releases(path).get(key, 0) if path is not None else 0


def count_release(path: Path, key: str) -> None:
    """One more release of run ``key`` in ``path`` (locked: ClientApp processes of one site may
    overlap; written atomically: a crash leaves the old count or the new one)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            counts = _read_releases(path)
            counts[key] = counts.get(key, 0) + 1
            atomic_write_json(path, counts)
    except ReleaseCountError:
        raise
    except OSError as err:
        raise ReleaseCountError(
            f"cannot update the site's count of DP releases {path} ({err.strerror or err}); make the node config's "
            f"'{STATE_DIR_KEY}' a folder the SuperNode's user can write"
        ) from None


def record(path: Path, *, site: str, run_id: int, run_name: str, request: str, reply: Payload) -> None:
    """Append one line (O_APPEND + fsync: concurrent ClientApp processes never interleave)."""
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run-id": int(run_id),
        "run-name": run_name,
        "site": site,
        "request": request,
        "direction": "from_site",
        **describe(reply),
    }
    line = (json.dumps(entry, sort_keys=True) + "\n").encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        raise OSError(
            f"cannot append to the site egress log {path} ({err.strerror}); make the node config's "
            f"'{STATE_DIR_KEY}' a folder the SuperNode's user can write"
        ) from None


def logged(reply: Payload, node_config: Mapping[str, Any], **meta: Any) -> Payload:
    """``reply`` after recording it in the site's egress log (when ``state-dir`` is set), and a
    statistics release in the site's count of releases. If either cannot be written, the reply
    is replaced by an error naming the file: no record, no statistics (that error is recorded
    too when possible)."""
    path = site_log_path(node_config)
    if path is None:
        return reply
    try:
        if reply.kind in RELEASE_KINDS:
            count_release(path.with_name(RELEASES), release_key(meta["run_name"], meta["run_id"]))
        record(path, **meta, reply=reply)
        return reply
    except OSError as err:
        log.error("%s", err)
        refusal = Payload("error", config={"site-name": str(meta.get("site", "")), "reason": str(err)[:4000]})
        with contextlib.suppress(OSError):
            record(path, **meta, reply=refusal)
        return refusal


def select(entries: Sequence[Mapping[str, Any]], run_name: str, run_ids: Sequence[int]) -> list[Mapping[str, Any]]:
    if run_ids:
        return [e for e in entries if int(e.get("run-id", -1)) in set(run_ids)]
    return [e for e in entries if e.get("run-name") == run_name]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare a site's egress.jsonl with the coordinator's egress.json of one run.")
    sub = parser.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser("compare")
    cmp.add_argument("--site-log", type=Path, required=True, help=f"the site's <state-dir>/{SITE_LOG}")
    cmp.add_argument("--coordinator", type=Path, required=True, help="the run folder's egress.json (or ledger.json)")
    cmp.add_argument("--site", help="site name (default: the one name in the site log)")
    cmp.add_argument(
        "--run-id",
        type=int,
        action="append",
        default=[],
        help="Flower run id(s) to compare (default: the site entries whose run name is the run folder's name)",
    )
    args = parser.parse_args(argv)
    try:
        sent = read_site_log(args.site_log)
        coordinator = read_coordinator_log(args.coordinator)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    names = sorted({str(e.get("site")) for e in sent})
    site = args.site or (names[0] if len(names) == 1 else None)
    if site is None:
        print(f"error: {args.site_log} holds sites {names}: choose one with --site", file=sys.stderr)
        return 2
    run_name = args.coordinator.resolve().parent.name
    chosen = select([e for e in sent if e.get("site") == site], run_name, args.run_id)
    if not chosen:
        print(
            f"error: no entry of site '{site}' in {args.site_log} for run name '{run_name}'"
            f"{' / run ids ' + str(args.run_id) if args.run_id else ''}: pass the run's --run-id (flwr ls)",
            file=sys.stderr,
        )
        return 2
    problems = compare(site, chosen, coordinator)
    runs = sorted({int(e.get("run-id", -1)) for e in chosen})
    if problems:
        print(f"site '{site}', run '{run_name}' (Flower runs {runs}): {len(problems)} difference(s)")
        for line in problems:
            print(f"  - {line}")
        return 1
    print(
        f"site '{site}', run '{run_name}' (Flower runs {runs}): the coordinator's log lists exactly the {len(chosen)} message(s) the site sent"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
