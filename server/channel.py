"""The server's line to the sites: :class:`Channel` sends validated payloads over a Flower
``Grid`` and returns the valid replies (dropping, with the reason, every error, malformed,
misaddressed, duplicate, late or stale one), and :class:`Ledger` records every exchange.

Every request sent carries a fresh random nonce (:attr:`common.records.Payload.nonce`, 128
bits: unique across rounds, resends and runs), and a reply counts only when it echoes the
nonce of the request it answers. Matching by message id (below) already ignores a reply
addressed to another request; the nonce also drops a reply whose *content* was recorded
earlier (another run's, or an earlier round's re-sent as the answer to this one).

The ledger holds bytes and messages per phase (both directions), the egress log of every
message (keys, shapes, bytes: what a site logs of its own), each exchange's wall time with the
replying sites' declared compute time, and each NBI site's count of statistics releases (what
its DP budget is spent on, :mod:`server.accounting`). It is written, sealed with the run's key
(:func:`server.state.seal`), before every request goes out and after every exchange.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from client.wire import MESSAGE_TYPE, compute_seconds, from_recorddict, to_recorddict
from common.data import SITE_NAME_RE
from common.egress import describe
from common.files import atomic_write_json
from common.records import Dims, Payload, PayloadError, reply_kind, validate
from server.liveness import Loss, send_and_watch
from server.state import StateError, read_json, run_folder_io, seal, state_key, unseal

log = logging.getLogger("fedpagkd.server")
# A site's SuperNode refusing a bundle (deploy/supernode.py, before any app code runs) answers with a
# Flower ClientApp error "<class '...UntrustedBundle'>:<'site 'NAME' REFUSES app bundle ...'>": its name.
SITE_REFUSAL_RE = re.compile(r":<'site '([A-Za-z0-9._-]+)' REFUSES app bundle ")  # a safe name only (SITE_NAME_RE)
LEDGER = "ledger.json"  # the run's traffic and releases, written after every exchange
NODE_UNAVAILABLE = "lost: its SuperNode missed its heartbeats (Flower: Node Unavailable)"


@dataclass
class Ledger:
    """Bytes and messages per phase, both directions, the egress log of every message, and
    each NBI site's statistics releases (its DP budget).

    Written to ``path`` after every exchange (not only with the state after a finished round):
    what a site sent in a round that was interrupted stays in its audit log, and the releases
    it made then stay counted in its epsilon, when the run resumes and does that round again."""

    bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    egress: list[dict[str, Any]] = field(default_factory=list)
    # One entry per exchange: its wall time and each replying site's declared compute time.
    timing: list[dict[str, Any]] = field(default_factory=list)
    releases: dict[str, int] = field(default_factory=dict)
    path: Path | None = None
    seq: int = 0  # writes so far: the state records it, so an older copy of the ledger is refused

    def write(self) -> None:
        """Write the whole ledger, sealed with the run's key (:func:`server.state.seal`)."""
        if self.path is not None:
            self.seq += 1
            body = {"bytes": self.bytes, "egress": self.egress, "timing": self.timing, "releases": self.releases, "seq": self.seq}
            with run_folder_io(self.path.parent):
                atomic_write_json(self.path, seal(body, state_key(self.path.parent)))

    def load(self, saved_seq: int, saved_releases: dict[str, int]) -> None:
        """Restore from ``path``, which must be this run's (keyed digest), at least as recent as
        the state (``saved_seq`` writes) and count at least the state's releases per site."""
        assert self.path is not None
        if not self.path.is_file():
            raise StateError(
                f"{self.path} (the run's traffic, egress audit and DP releases) is missing; restore it from a "
                "backup or start a new run with another fed.run_name: a run without it would undercount epsilon"
            )
        with run_folder_io(self.path.parent):
            saved = unseal(read_json(self.path), state_key(self.path.parent), self.path)
        short = {site: n for site, n in saved_releases.items() if saved["releases"].get(site, 0) < n}
        if saved["seq"] < saved_seq or short:
            raise StateError(
                f"{self.path} is older than the run's state (write {saved['seq']} < {saved_seq}"
                + (f"; fewer DP releases for {sorted(short)}" if short else "")
                + "): restore the latest ledger from a backup or use another fed.run_name"
            )
        self.bytes, self.egress, self.timing, self.releases = saved["bytes"], saved["egress"], saved["timing"], saved["releases"]
        self.seq = saved["seq"]

    def add(self, phase: str, direction: str, site: str, payload: Payload) -> None:
        size = payload.num_bytes()
        entry = self.bytes.setdefault(phase, {"sent": 0, "received": 0, "messages": 0})
        entry["sent" if direction == "to_site" else "received"] += size
        entry["messages"] += 1
        self.egress.append({"phase": phase, "direction": direction, "site": site, **describe(payload)})  # a site logs the same

    def count_releases(self, sites: Iterable[str]) -> None:
        """One more statistics release for each of these NBI sites (counted before they are
        asked, whether or not a reply arrives or is used: a site may have released it)."""
        for site in sites:
            self.releases[site] = self.releases.get(site, 0) + 1

    def reconcile(self, counted_by_sites: dict[str, int]) -> dict[str, dict[str, int]]:
        """Take each site's own count of its releases for this run where it exceeds the ledger's
        (the run folder was restored from an older copy: the releases made since then were lost
        with it) -> {site: {"ledger": before, "site": taken}}, each one logged by site name."""
        raised = {}
        for site, count in sorted(counted_by_sites.items()):
            if count > self.releases.get(site, 0):
                raised[site] = {"ledger": self.releases.get(site, 0), "site": count}
                self.releases[site] = count
                log.warning(
                    "[discover] site '%s' counts %d statistics release(s) for this run, the run's ledger %d (its folder "
                    "restored from an older copy?): the privacy report counts the site's %d",
                    site,
                    count,
                    raised[site]["ledger"],
                    count,
                )
        return raised

    def snapshot(self) -> dict[str, Any]:
        """What the run state records of the ledger (its write count pins this ledger's version)."""
        return {
            "bytes": self.bytes,
            "timing": self.timing,
            "egress": self.egress,
            "releases": self.releases,
            "ledger_seq": self.seq,
        }

    def rename(self, names: dict[str, str]) -> None:
        """Entries logged under a placeholder (``node <id>`` before discovery) get the site's name."""
        for entry in self.egress:
            entry["site"] = names.get(entry["site"], entry["site"])


class Channel:
    """Sends validated payloads to sites and returns the valid replies, dropping the rest."""

    def __init__(self, grid: Grid, dims: Dims, timeout: float, ledger: Ledger, resends: int = 0, lost_after: float = 60.0):
        """``lost_after``: seconds without a heartbeat after which a site's SuperNode is taken as
        lost (``fed.site_lost_s``, :mod:`server.liveness`); a grid that answers in-process
        (``grid.in_process``) has no SuperNodes to watch."""
        self.grid, self.dims, self.timeout, self.ledger, self.resends = grid, dims, timeout, ledger, resends
        self.lost_after = lost_after
        self.names: dict[int, str] = {}
        self.issued: dict[str, str] = {}  # every nonce this run sent -> which request carried it (for drop reasons)

    def name(self, node_id: int) -> str:
        return self.names.get(node_id, f"node {node_id}")

    def _bind(self, node_id: int, payload: Payload) -> Payload:
        """``payload`` with a fresh nonce for ``node_id`` (remembered, to name what a stale reply answers)."""
        nonce = secrets.token_hex(16)
        round_ = payload.config.get("round")
        self.issued[nonce] = f"'{payload.kind}' request{f' of round {round_}' if round_ else ''} sent to '{self.name(node_id)}'"
        return dataclasses.replace(payload, nonce=nonce)

    def _unbound(self, nonce: str) -> str:
        """Why a reply echoing ``nonce`` is not the answer to the request it came back to."""
        if not nonce:
            return "its reply echoes no nonce, so it cannot be bound to this request (a site older than protocol 6? upgrade it)"
        if nonce in self.issued:
            return f"its reply answers the {self.issued[nonce]}, not this request (a stale or replayed reply)"
        return "its reply answers a request this run never sent (recorded in another run, or before the server restarted)"

    def exchange(
        self, phase: str, requests: dict[int, Payload], reference: dict[str, dict] | None = None, releases: bool = False
    ) -> tuple[dict[int, Payload], dict[int, str]]:
        """-> (valid replies by node, reason by node for each dropped site).

        A site whose ClientApp stopped responding (Flower's ``CLIENT_APP_CRASHED``: the process
        died, or missed its heartbeats on a loaded machine) or whose SuperNode restarted while it
        held the request is asked the same request again, up to ``resends`` times, each with a
        fresh ``timeout``: nothing of it reached the server, and the same request gives the same
        reply. Any other error is the site's answer and final.
        ``releases``: each request asks an NBI site for statistics; every send, a resend too,
        counts one release of that site (:meth:`Ledger.count_releases`)."""
        ok, dropped, crashed = self._send(phase, requests, reference, releases)
        for resend in range(1, self.resends + 1):
            if not crashed:
                break
            for node_id in sorted(crashed):
                log.warning(
                    "[%s] site '%s': %s; asking again (%d/%d, fed.resend_crashed)",
                    phase,
                    self.name(node_id),
                    dropped.pop(node_id),
                    resend,
                    self.resends,
                )
            more_ok, more_dropped, crashed = self._send(phase, {n: requests[n] for n in crashed}, reference, releases)
            ok.update(more_ok)
            dropped.update(more_dropped)
        for node_id, reason in dropped.items():
            log.warning("[%s] dropped site '%s': %s", phase, self.name(node_id), reason)
        return ok, dropped

    def _send(
        self, phase: str, requests: dict[int, Payload], reference: dict[str, dict] | None, releases: bool
    ) -> tuple[dict[int, Payload], dict[int, str], set[int]]:
        """One send of ``requests`` -> (valid replies, reasons of the dropped, the dropped
        whose ClientApp crashed)."""
        if releases:
            self.ledger.count_releases(self.name(n) for n in requests)
        requests = {node_id: self._bind(node_id, payload) for node_id, payload in requests.items()}
        messages = []
        for node_id, payload in requests.items():
            self.ledger.add(phase, "to_site", self.name(node_id), payload)
            messages.append(Message(to_recorddict(payload), dst_node_id=node_id, message_type=MESSAGE_TYPE[payload.kind]))
        self.ledger.write()  # before sending: a crash while waiting keeps what was asked of the sites
        started = time.perf_counter()
        replies, losses = self._send_and_receive(messages)
        first = next(iter(requests.values()), None)
        timing = {
            "phase": phase,
            "kind": first.kind if first else "",
            "round": first.config.get("round") if first else None,
            "sites": len(requests),
            "wall_s": time.perf_counter() - started,
            "compute_s": {},
        }
        self.ledger.timing.append(timing)
        # Match replies to requests by message id: errors the SuperLink itself answers with
        # (e.g. Node Unavailable) come from node 1, not from the site. Pushing sets the ids;
        # the in-process grid leaves them empty, hence the fallback to the sender only then.
        # With ids, a reply to none of this exchange's requests (a late reply to an earlier
        # round, which may come from a site asked again now) is ignored, never taken for its
        # sender's answer to this round.
        by_message_id = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
        ok: dict[int, Payload] = {}
        dropped: dict[int, str] = {}
        crashed: set[int] = set()
        for reply in replies:
            sender = reply.metadata.src_node_id
            node_id = by_message_id.get(reply.metadata.reply_to_message_id) if by_message_id else sender
            if node_id not in requests:
                log.warning("[%s] ignored a reply from '%s' that answers no request of this round", phase, self.name(sender))
                continue
            site = self.name(node_id)
            if node_id in ok or node_id in dropped:  # one request, one answer: a second one is not this site's word
                ok.pop(node_id, None)
                crashed.discard(node_id)
                dropped[node_id] = "sent more than one reply to one request"
                continue
            if not reply.has_error() and (seconds := compute_seconds(reply.content)) is not None:
                timing["compute_s"][site] = seconds
            if reply.has_error():
                if named := SITE_REFUSAL_RE.search(reply.error.reason):
                    self.names.setdefault(node_id, named.group(1))  # a refusal before discovery
                if reply.error.code == ErrorCode.CLIENT_APP_CRASHED:
                    crashed.add(node_id)
                lost = reply.error.code == ErrorCode.NODE_UNAVAILABLE
                dropped[node_id] = NODE_UNAVAILABLE if lost else f"ClientApp error: {reply.error.reason}"
                continue
            try:
                payload = from_recorddict(reply.content, f"site '{site}'")
                self.ledger.add(phase, "from_site", site, payload)
                if payload.kind == "error":
                    validate(payload, self.dims, sender=f"site '{site}'")
                    named = str(payload.config.get("site-name") or "")
                    if SITE_NAME_RE.fullmatch(named):  # a refusal before discovery names the site (a safe name only)
                        self.names.setdefault(node_id, named)
                    # A site that could not read the request's nonce refuses without one: still its answer.
                    stale = payload.nonce not in ("", requests[node_id].nonce)
                    dropped[node_id] = self._unbound(payload.nonce) if stale else payload.config["reason"]
                    continue
                expected = reply_kind(requests[node_id])
                if payload.kind != expected:
                    raise PayloadError(
                        f"site '{site}': replied '{payload.kind}' to '{requests[node_id].kind}', expected '{expected}'"
                    )
                validate(payload, self.dims, reference, sender=f"site '{site}'")
                if payload.nonce != requests[node_id].nonce:
                    raise PayloadError(self._unbound(payload.nonce))
                ok[node_id] = payload
            except (PayloadError, KeyError) as err:
                dropped[node_id] = str(err)
        for node_id, loss in losses.items():
            if node_id not in ok and node_id not in dropped:
                dropped[node_id] = loss.reason
                if loss.restarted:
                    crashed.add(node_id)
        for node_id in requests:
            if node_id not in ok and node_id not in dropped:
                dropped[node_id] = f"no reply within {self.timeout:.0f} s (fed.round_timeout)"
        self.ledger.write()
        return ok, dropped, crashed

    def _send_and_receive(self, messages: list[Message]) -> tuple[list[Message], dict[int, Loss]]:
        """-> (the replies, each site given up on as lost or restarted while it was waited for)."""
        if getattr(self.grid, "in_process", False):
            return list(self.grid.send_and_receive(messages, timeout=self.timeout)), {}
        return send_and_watch(self.grid, messages, self.timeout, self.lost_after)
