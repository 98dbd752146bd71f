"""What a site sent, in one format for both sides, and the comparison of the two logs.

The coordinator records every reply it receives in ``egress.json`` (``server.workflow.Ledger``);
each site appends what it sent to its own ``<state-dir>/egress.jsonl`` (``client.egress``). Both
describe a message with :func:`describe` (kind, bytes, array keys with dtype and shape, weight
blocks, scalar config values such as group counts), so a site can check, without trusting the
coordinator's word, that the coordinator's log lists exactly what left its building:
:func:`compare` (and ``python -m client.egress compare``).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from common.records import Payload

# Fields of :func:`describe` that both sides must agree on.
COMPARED = ("kind", "bytes", "arrays", "weights", "config")


def describe(payload: Payload) -> dict[str, Any]:
    """The audit record of one message: no values of arrays, only what and how much."""
    return {
        "kind": payload.kind,
        "bytes": payload.num_bytes(),
        "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in payload.arrays.items()},
        "weights": {b: {"tensors": len(w), "bytes": int(sum(a.nbytes for a in w.values()))} for b, w in payload.weights.items()},
        "config": {k: v for k, v in payload.config.items() if isinstance(v, (int, float, bool, str))},
    }


def read_site_log(path: Path) -> list[dict[str, Any]]:
    """The entries of a site's ``egress.jsonl``; a torn last line (a crash while writing) is skipped,
    any other bad line raises naming the file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no site egress log (is 'state-dir' set in this site's node config?)")
    lines = path.read_text().splitlines()
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON line ({err})") from None
    return entries


def read_coordinator_log(path: Path) -> list[dict[str, Any]]:
    """The entries of a run folder's ``egress.json`` (a list) or ``ledger.json`` (its ``egress``)."""
    data = json.loads(path.read_text())
    return list(data["egress"] if isinstance(data, dict) else data)


def _key(entry: Mapping[str, Any]) -> str:
    return json.dumps({k: entry.get(k) for k in COMPARED}, sort_keys=True)


def _brief(entry: Mapping[str, Any]) -> str:
    shapes = ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in sorted((entry.get("arrays") or {}).items()))
    weights = ", ".join(f"{b} {w['tensors']} tensors" for b, w in sorted((entry.get("weights") or {}).items()))
    return (
        f"'{entry.get('kind')}' of {entry.get('bytes')} bytes"
        + (f" [{shapes}]" if shapes else "")
        + (f" [{weights}]" if weights else "")
    )


def compare(site: str, sent: Sequence[Mapping[str, Any]], coordinator: Iterable[Mapping[str, Any]]) -> list[str]:
    """Differences between what site ``site`` logged as sent and what the coordinator logged as
    received from it (``direction == "from_site"``), as sentences; empty when they agree.

    Messages are compared as a multiset of their :data:`COMPARED` fields (the order of replies
    within an exchange is not fixed). A message the site sent that the coordinator did not
    record (e.g. a reply that came after ``fed.round_timeout``) is listed as such, and so is a
    message the coordinator attributes to the site that the site never sent."""
    received = [e for e in coordinator if e.get("direction") == "from_site" and e.get("site") == site]
    mine, theirs = Counter(_key(e) for e in sent), Counter(_key(e) for e in received)
    by_key = {_key(e): e for e in [*sent, *received]}
    problems = []
    for key in sorted(mine - theirs):
        n = (mine - theirs)[key]
        problems.append(f"site '{site}' sent {n} x {_brief(by_key[key])} that the coordinator's log does not list")
    for key in sorted(theirs - mine):
        n = (theirs - mine)[key]
        problems.append(f"the coordinator's log lists {n} x {_brief(by_key[key])} from site '{site}' that the site did not send")
    return problems
