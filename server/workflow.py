"""The FedPaGKD protocol (DESIGN.md section 3), over a Flower ``Grid``.

discover -> teacher rounds (NBI FedAvg) -> knowledge refresh (NBI seeds + federated Lloyd
steps; the server sums exactly) -> student rounds (WLI, CE + GKD-Pro + GKD-Den against the
bank; refreshed every T rounds) -> evaluation from score histograms -> final student.

Every request and reply passes :func:`common.records.validate`. A reply that is an error,
malformed, non-finite, late, or an outlier in norm is dropped and logged with the site's
name; a round goes on while at least ``fed.min_<modality>_sites`` replies remain, and the
run stops with a :class:`FederationError` saying which sites failed and why when not.
After every finished round the state is written atomically (:mod:`server.state`), so a
restarted ServerApp with the same ``fed.run_name`` resumes at the last finished round.
"""

from __future__ import annotations

import functools
import json
import logging
import operator
import random
import re
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from flwr.app import Message
from flwr.serverapp import Grid

from client.app import dims_of
from client.wire import MESSAGE_TYPE, compute_seconds, from_recorddict, state_to_numpy, to_recorddict
from common import secagg
from common.config import Config, config_to_dict, config_to_flat
from common.egress import describe
from client.site import run_class_names
from common.config import parse_class_names
from common.metrics import ScoreHistogram, histogram_metrics, learning_problems, selection_key
from common.models import STUDENT_CHECKPOINT, build_query_head, build_student, build_teacher, save_checkpoint
from common.privacy import MECHANISMS_PER_RELEASE
from common.progress import MetricsBoard
from common.records import (
    CLASS_PROTOTYPES, PROTOCOL_VERSION, Dims, Payload, PayloadError, empty_statistics, make, metadata_class_names, reply_kind, validate,
    weight_shapes,
)
from server import aggregation, trust
from common.files import atomic_write_json
from server.state import RunLock, StateError, check_run_folder, load_state, read_json, save_state, seal, state_key, unseal

log = logging.getLogger("fedpagkd.server")
LEDGER = "ledger.json"  # the run's traffic and releases, written after every exchange
# A site's SuperNode refusing a bundle (deploy/supernode.py, before any app code runs) answers with a
# Flower ClientApp error "<class '...UntrustedBundle'>:<'site 'NAME' REFUSES app bundle ...'>": its name.
SITE_REFUSAL_RE = re.compile(r":<'site '([^']+)' REFUSES app bundle ")


class FederationError(RuntimeError):
    """The run cannot go on (too few usable sites); the message says which and why."""


@dataclass
class SiteInfo:
    node_id: int
    name: str
    modality: str
    train_counts: list[int]
    test_counts: list[int]
    version: str
    val_counts: list[int] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)

    def declared(self) -> dict[str, list[int]]:
        """[C] class counts per split (``train``, ``test``...), as declared at discovery."""
        return {f.name.removesuffix("_counts"): getattr(self, f.name) for f in fields(self) if f.name.endswith("_counts")}


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
            atomic_write_json(self.path, seal(body, state_key(self.path.parent)))

    def load(self, saved_seq: int, saved_releases: dict[str, int]) -> None:
        """Restore from ``path``, which must be this run's (keyed digest), at least as recent as
        the state (``saved_seq`` writes) and count at least the state's releases per site."""
        assert self.path is not None
        if not self.path.is_file():
            raise StateError(f"{self.path} (the run's traffic, egress audit and DP releases) is missing; restore it from a "
                             "backup or start a new run with another fed.run_name: a run without it would undercount epsilon")
        saved = unseal(read_json(self.path), state_key(self.path.parent), self.path)
        short = {site: n for site, n in saved_releases.items() if saved["releases"].get(site, 0) < n}
        if saved["seq"] < saved_seq or short:
            raise StateError(f"{self.path} is older than the run's state (write {saved['seq']} < {saved_seq}"
                             + (f"; fewer DP releases for {sorted(short)}" if short else "")
                             + "): restore the latest ledger from a backup or use another fed.run_name")
        self.bytes, self.egress, self.timing, self.releases = saved["bytes"], saved["egress"], saved["timing"], saved["releases"]
        self.seq = saved["seq"]

    def add(self, phase: str, direction: str, site: str, payload: Payload) -> None:
        size = payload.num_bytes()
        entry = self.bytes.setdefault(phase, {"sent": 0, "received": 0, "messages": 0})
        entry["sent" if direction == "to_site" else "received"] += size
        entry["messages"] += 1
        self.egress.append({"phase": phase, "direction": direction, "site": site, **describe(payload)})  # a site logs the same

    def rename(self, names: dict[str, str]) -> None:
        """Entries logged under a placeholder (``node <id>`` before discovery) get the site's name."""
        for entry in self.egress:
            entry["site"] = names.get(entry["site"], entry["site"])


class Channel:
    """Sends validated payloads to sites and returns the valid replies, dropping the rest."""

    def __init__(self, grid: Grid, dims: Dims, timeout: float, ledger: Ledger):
        self.grid, self.dims, self.timeout, self.ledger = grid, dims, timeout, ledger
        self.names: dict[int, str] = {}

    def name(self, node_id: int) -> str:
        return self.names.get(node_id, f"node {node_id}")

    def exchange(
        self, phase: str, requests: dict[int, Payload], reference: dict[str, dict] | None = None
    ) -> tuple[dict[int, Payload], dict[int, str]]:
        """-> (valid replies by node, reason by node for each dropped site)."""
        messages = []
        for node_id, payload in requests.items():
            self.ledger.add(phase, "to_site", self.name(node_id), payload)
            messages.append(Message(to_recorddict(payload), dst_node_id=node_id, message_type=MESSAGE_TYPE[payload.kind]))
        self.ledger.write()  # before sending: a crash while waiting keeps what was asked of the sites
        started = time.perf_counter()
        replies = list(self.grid.send_and_receive(messages, timeout=self.timeout))
        first = next(iter(requests.values()), None)
        timing = {"phase": phase, "kind": first.kind if first else "", "round": first.config.get("round") if first else None,
                  "sites": len(requests), "wall_s": time.perf_counter() - started, "compute_s": {}}
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
        for reply in replies:
            sender = reply.metadata.src_node_id
            node_id = by_message_id.get(reply.metadata.reply_to_message_id) if by_message_id else sender
            if node_id not in requests:
                log.warning("[%s] ignored a reply from '%s' that answers no request of this round", phase, self.name(sender))
                continue
            site = self.name(node_id)
            if node_id in ok or node_id in dropped:  # one request, one answer: a second one is not this site's word
                ok.pop(node_id, None)
                dropped[node_id] = "sent more than one reply to one request"
                continue
            if not reply.has_error() and (seconds := compute_seconds(reply.content)) is not None:
                timing["compute_s"][site] = seconds
            if reply.has_error():
                if named := SITE_REFUSAL_RE.search(reply.error.reason):
                    self.names.setdefault(node_id, named.group(1))  # a refusal before discovery
                dropped[node_id] = f"ClientApp error: {reply.error.reason}"
                continue
            try:
                payload = from_recorddict(reply.content, f"site '{site}'")
                self.ledger.add(phase, "from_site", site, payload)
                if payload.kind == "error":
                    validate(payload, self.dims, sender=f"site '{site}'")
                    self.names.setdefault(node_id, str(payload.config.get("site-name") or site))  # a refusal before discovery
                    dropped[node_id] = payload.config["reason"]
                    continue
                expected = reply_kind(requests[node_id])
                if payload.kind != expected:
                    raise PayloadError(f"site '{site}': replied '{payload.kind}' to '{requests[node_id].kind}', expected '{expected}'")
                ok[node_id] = validate(payload, self.dims, reference, sender=f"site '{site}'")
            except (PayloadError, KeyError) as err:
                dropped[node_id] = str(err)
        for node_id in requests:
            if node_id not in ok and node_id not in dropped:
                dropped[node_id] = f"no reply within {self.timeout:.0f} s (fed.round_timeout)"
        for node_id, reason in dropped.items():
            log.warning("[%s] dropped site '%s': %s", phase, self.name(node_id), reason)
        self.ledger.write()
        return ok, dropped


@dataclass
class Progress:
    teacher_rounds: int = 0
    refreshes: int = 0
    student_rounds: int = 0


class Protocol:
    """One FedPaGKD run: global models, the bank, progress, metrics; resumable."""

    def __init__(self, grid: Grid, cfg: Config, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.dims = dims_of(cfg)
        self.ledger = Ledger(path=run_dir / LEDGER)
        self.channel = Channel(grid, self.dims, cfg.fed.round_timeout, self.ledger)
        self.grid = grid
        self.distil = cfg.pagkd.use_pro or cfg.pagkd.use_den
        self.needs_teacher = self.distil or cfg.fed.student_init == "teacher"
        torch.manual_seed(cfg.train.seed)
        c = cfg.data.num_classes
        self.teacher = state_to_numpy(build_teacher(cfg.model, c))
        self.student = state_to_numpy(build_student(cfg.model, c))
        self.head = state_to_numpy(build_query_head(cfg.model, c))
        self.bank = aggregation.empty_bank(self.dims)
        self.class_prototypes = empty_statistics(CLASS_PROTOTYPES, self.dims)
        self.centroids: dict[str, np.ndarray] = {}
        self.progress = Progress()
        # site_status: {site: {phase: "took part" | "dropped in <step>: <reason>"}}, every discovered site.
        self.metrics: dict[str, Any] = {"teacher": [], "knowledge": [], "student": [], "evaluation": [], "selection": {},
                                        "site_status": {}}
        self.sites: dict[int, SiteInfo] = {}
        # Model selection: per model ("teacher", "student") the global weights of the round with the
        # best pooled val AUC so far ({block: state}); metrics["selection"] says which round.
        self.best: dict[str, dict[str, dict[str, np.ndarray]]] = {}
        self.class_names = run_class_names(cfg)  # replaced by the sites' agreed names at discovery
        self.board = MetricsBoard(None)  # a real one once run() starts (TensorBoard, where installed)

    # ------------------------------------------------------------------ persistence

    def save(self) -> None:
        self.ledger.write()  # the state records the ledger write it goes with
        blocks = {"teacher": self.teacher, "student": self.student, "head": self.head, "bank": self.bank,
                  "prototypes": self.class_prototypes}
        if self.centroids:
            blocks["centroids"] = self.centroids
        for model, weights in self.best.items():
            blocks.update({f"best-{model}-{block}": state for block, state in weights.items()})
        meta = {
            "progress": self.progress.__dict__,
            "metrics": self.metrics,
            "bytes": self.ledger.bytes,
            "timing": self.ledger.timing,
            "config": config_to_flat(self.cfg),
            "sites": [s.__dict__ for s in self.sites.values()],
            "egress": self.ledger.egress,
            "releases": self.ledger.releases,
            "ledger_seq": self.ledger.seq,
        }
        save_state(self.run_dir, blocks, meta)

    def resume(self) -> bool:
        loaded = load_state(self.run_dir)
        if loaded is None:
            return False
        blocks, meta = loaded
        ignore = {"fed.teacher_rounds", "fed.student_rounds", "fed.round_timeout", "fed.run_dir", "fed.run_name", "fed.min_site_share"}
        mine = {k: v for k, v in config_to_flat(self.cfg).items() if k not in ignore}
        theirs = {k: v for k, v in meta["config"].items() if k not in ignore}
        if mine != theirs:
            changed = sorted(k for k in mine if mine[k] != theirs.get(k))
            raise StateError(f"run folder {self.run_dir} was started with another config (differs in {changed}); use a new fed.run_name")
        self.teacher, self.student, self.head, self.bank = blocks["teacher"], blocks["student"], blocks["head"], blocks["bank"]
        self.centroids = blocks.get("centroids", {})
        for name, state in blocks.items():
            if name.startswith("best-"):
                _, model, block = name.split("-", 2)
                self.best.setdefault(model, {})[block] = state
        self.class_prototypes = blocks.get("prototypes", self.class_prototypes)
        self.progress = Progress(**meta["progress"])
        self.metrics = meta["metrics"]
        self.metrics.setdefault("selection", {})
        self.ledger.load(meta["ledger_seq"], meta["releases"])
        log.info("resuming %s at %s", self.run_dir, self.progress)
        return True

    # ------------------------------------------------------------------ helpers

    def _exchange(
        self, phase: str, step: str, requests: dict[int, Payload], reference: dict[str, dict] | None = None
    ) -> tuple[dict[int, Payload], dict[int, str]]:
        """:meth:`Channel.exchange`, then the :mod:`server.trust` screens: a reply whose numbers
        contradict its site's discovery metadata is dropped with the reason. Each site's part
        in ``phase`` is recorded (``step`` names the round in a drop's reason)."""
        replies, dropped = self.channel.exchange(phase, requests, reference)
        for node_id in sorted(replies):
            try:
                trust.screen_reply(requests[node_id], replies[node_id], self.sites[node_id].declared(), self.channel.name(node_id))
            except trust.TrustError as err:
                dropped[node_id] = str(err)
                del replies[node_id]
                log.warning("[%s] dropped site '%s': %s", phase, self.channel.name(node_id), err)
        self._mark(phase, step, replies, dropped)
        return replies, dropped

    def _mark(self, phase: str, step: str, took_part: Iterable[int], dropped: dict[int, str]) -> None:
        """Record each site's part in ``phase``: the first drop stays (a later round taken
        part in does not erase it: that is what a degraded run must show)."""
        status = self.metrics.setdefault("site_status", {})
        for node_id in took_part:
            status.setdefault(self.channel.name(node_id), {}).setdefault(phase, "took part")
        for node_id, reason in dropped.items():
            entry = status.setdefault(self.channel.name(node_id), {})
            if not entry.get(phase, "").startswith("dropped"):
                entry[phase] = f"dropped in {step}: {reason}"

    def _seed(self, phase: int, round_: int) -> int:
        return self.cfg.train.seed * 100_000 + phase * 10_000 + round_

    def _sites_of(self, modality: str) -> list[int]:
        return [n for n, s in self.sites.items() if s.modality == modality]

    def _require(self, phase: str, modality: str, usable: int, dropped: dict[int, str]) -> None:
        minimum = self.cfg.fed.min_nbi_sites if modality == "nbi" else self.cfg.fed.min_wli_sites
        if usable < minimum:
            reasons = "; ".join(f"'{self.channel.name(n)}': {r}" for n, r in dropped.items()) or "none answered"
            raise FederationError(
                f"{phase}: only {usable} usable {modality.upper()} site(s), fed.min_{modality}_sites = {minimum}. Dropped: {reasons}"
            )

    def _sample(self, modality: str, round_seed: int) -> list[int]:
        nodes = sorted(self._sites_of(modality))
        minimum = self.cfg.fed.min_nbi_sites if modality == "nbi" else self.cfg.fed.min_wli_sites
        count = max(minimum, int(np.ceil(self.cfg.fed.fraction_train * len(nodes))))
        return sorted(random.Random(round_seed).sample(nodes, min(count, len(nodes))))

    def _fedavg(
        self, phase: str, modality: str, replies: dict[int, Payload], blocks: dict[str, dict[str, np.ndarray]]
    ) -> list[int]:
        """Average the named weight blocks over replies (FedAvg weighted by num-examples, or
        ``fed.aggregation``'s robust rule, after ``fed.clip_ratio`` clipping), after dropping
        updates whose norm is an outlier (and re-checking the minimum of sites).
        Returns the node ids used."""
        first = next(iter(blocks))
        norms = [aggregation.update_norm(p.weights[first], blocks[first]) for p in replies.values()]
        outliers = {list(replies)[i] for i in aggregation.norm_outliers(norms, self.cfg.fed.max_norm_ratio)}
        reasons = {n: f"update norm is over {self.cfg.fed.max_norm_ratio:.0f}x the median" for n in outliers}
        for node_id, reason in reasons.items():
            log.warning("[%s] dropped site '%s': %s", phase, self.channel.name(node_id), reason)
        self._mark(phase, f"{phase} aggregation", (), reasons)
        used = sorted((n for n in replies if n not in outliers), key=self.channel.name)  # order-independent sums
        self._require(phase, modality, sum(self.sites[n].modality == modality for n in used), reasons)
        weights = [float(replies[n].config["num-examples"]) for n in used]
        fed = self.cfg.fed
        for block in blocks:
            states = [replies[n].weights[block] for n in used]
            if fed.clip_ratio > 0:
                states, scales = aggregation.clip_updates(states, blocks[block], fed.clip_ratio)
                clipped = [self.channel.name(n) for n, scale in zip(used, scales) if scale < 1]
                if clipped:
                    log.info("[%s] clipped the '%s' update of %s to %.1fx the median norm", phase, block, ", ".join(clipped), fed.clip_ratio)
            blocks[block].update(aggregation.robust_average(states, weights, fed.aggregation, fed.trim_fraction))
        return used

    # ------------------------------------------------------------------ phases

    def discover(self) -> None:
        node_ids = list(self.grid.get_node_ids())
        requests = {n: make("discover", self.dims, config={"protocol": PROTOCOL_VERSION}) for n in node_ids}
        replies, dropped = self.channel.exchange("discover", requests)
        for node_id, reply in replies.items():
            info = SiteInfo(
                node_id=node_id,
                name=reply.config["site-name"],
                modality=reply.config["modality"],
                train_counts=reply.arrays["train_class_counts"].tolist(),
                test_counts=reply.arrays["test_class_counts"].tolist(),
                version=reply.config["version"],
                val_counts=reply.arrays["val_class_counts"].tolist(),
                class_names=list(metadata_class_names(reply)),
            )
            if reply.config["protocol"] != PROTOCOL_VERSION:
                dropped[node_id] = f"protocol {reply.config['protocol']}, server speaks {PROTOCOL_VERSION}; upgrade the site"
                log.warning("[discover] dropped site '%s': %s", info.name, dropped[node_id])
                continue
            if info.modality not in ("nbi", "wli"):
                dropped[node_id] = f"unknown modality '{info.modality}'"
                log.warning("[discover] dropped site '%s': %s", info.name, dropped[node_id])
                continue
            self.sites[node_id] = info
            self.channel.names[node_id] = info.name
        # The discovery exchange was logged before the names were known: name it after the replies.
        self.ledger.rename({f"node {n}": name for n, name in self.channel.names.items()})
        self.ledger.write()
        self._refuse_duplicate_names(dropped)
        self._mark("discover", "discovery", self.sites, dropped)
        names = [f"{s.name} ({s.modality}, {sum(s.train_counts)} train)" for s in self.sites.values()]
        log.info("discovered %d site(s): %s", len(self.sites), ", ".join(names))
        missing = []
        for modality, minimum in (("nbi", self.cfg.fed.min_nbi_sites), ("wli", self.cfg.fed.min_wli_sites)):
            if modality == "nbi" and not self.needs_teacher:
                continue
            have = len(self._sites_of(modality))
            if have < minimum:
                missing.append(f"{modality.upper()}: {have} of {minimum} needed")
        if missing:
            reasons = "; ".join(f"'{self.channel.name(n)}': {r}" for n, r in dropped.items())
            raise FederationError(
                f"not enough sites to start ({', '.join(missing)}). Found: {', '.join(names) or 'none'}."
                + (f" Refused: {reasons}" if reasons else "")
            )
        self.class_names = self.agreed_class_names()

    def agreed_class_names(self) -> tuple[str, ...]:
        """The class names every discovered site reported, checked against the run's.

        With ``data.class_names`` set, sites map their folders to those names (a site with
        other folders refuses with its own error); with it empty, each site discovers its
        names, so they must agree with each other and number ``data.num_classes``. Raises a
        :class:`FederationError` listing every site's names and the fix."""
        found = {s.name: tuple(s.class_names) for s in self.sites.values()}
        listing = "; ".join(f"'{name}': {list(names)}" for name, names in found.items())
        configured = parse_class_names(self.cfg.data.class_names)
        distinct = sorted(set(found.values()))
        if len(distinct) > 1:
            raise FederationError(
                f"the sites disagree on the class names ({listing}). Give every site the same class folders "
                "(or manifest labels): rename or remove the odd ones at the sites that differ, or set "
                "data.class_names='name1,name2,...' on the run so every site is checked against one list"
            )
        agreed = distinct[0] if distinct else run_class_names(self.cfg)
        expected = configured or run_class_names(self.cfg)
        if configured and agreed != configured:
            raise FederationError(f"the sites report class names {list(agreed)} but the run's data.class_names is "
                                  f"{list(configured)} ({listing}); make them the same (order included)")
        if not configured and len(agreed) != self.cfg.data.num_classes:
            raise FederationError(
                f"the sites have {len(agreed)} classes {list(agreed)} but the run expects data.num_classes="
                f"{self.cfg.data.num_classes} ({list(expected)}); run with data.class_names='{','.join(agreed)}' "
                "(data.num_classes then follows)"
            )
        if agreed != expected:
            log.info("[discover] class names from the sites: %s", list(agreed))
        return agreed

    def _span(self, round_: int, rounds: int) -> dict[str, float]:
        """Round ``round_`` of ``rounds`` covers [(r-1)/R, r/R] of the learning-rate schedule."""
        return {"schedule-start": (round_ - 1) / rounds, "schedule-end": round_ / rounds}

    def _select(self, model: str, round_: int, evaluation: dict[str, Any], weights: dict[str, dict[str, np.ndarray]]) -> None:
        """Keep round ``round_``'s global ``weights`` of ``model`` when they rank best so far by
        :func:`common.metrics.selection_key` on the pooled val split (a model that learned before
        one that did not, then the higher AUC; ties go to the later round: it trained longer)."""
        if not evaluation:
            return
        key = selection_key(evaluation)
        chosen = self.metrics["selection"].get(model)
        if chosen is None or key >= (not chosen["problems"], chosen["val_auc"]):
            problems = [] if key[0] else learning_problems(evaluation)  # key[0]: no problems
            self.metrics["selection"][model] = {"round": round_, "val_auc": key[1], "problems": problems}
            self.best[model] = {block: {k: a.copy() for k, a in state.items()} for block, state in weights.items()}

    def _evaluated(self, model: str, round_: int, split: str) -> bool:
        return any(e["model"] == model and e["round"] == round_ and e.get("split") == split for e in self.metrics["evaluation"])

    def _finish_selection(self, model: str, rounds: int, weights: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, np.ndarray]]:
        """After the last of ``rounds`` rounds: score the last global model on val too, and return
        the selected round's weights (the last ones when no site holds a val split). A selected
        model at chance or collapsed is logged as not learned (metrics["selection"])."""
        if not self._evaluated(model, rounds, "val"):
            self._select(model, rounds, self.evaluate(model, rounds, "val", weights[model]), weights)
        chosen = self.metrics["selection"].get(model)
        if chosen is None:
            log.warning("[selection] no site holds a val split: the %s of the last round (%d) is kept", model, rounds)
            return weights
        log.info("[selection] %s of round %d (pooled val AUC %.4f) of %d", model, chosen["round"], chosen["val_auc"], rounds)
        for problem in chosen["problems"]:
            log.warning("[selection] the %s did not learn: %s", model, problem)
        return self.best[model]

    def _refuse_duplicate_names(self, dropped: dict[int, str]) -> None:
        """Sites sharing a name are all dropped: their metrics, egress and DP releases would
        merge under one name, and none of them can be told apart from the others."""
        by_name: dict[str, list[int]] = {}
        for node_id, info in self.sites.items():
            by_name.setdefault(info.name, []).append(node_id)
        for name, nodes in by_name.items():
            if len(nodes) < 2:
                continue
            for node_id in nodes:
                dropped[node_id] = (f"{len(nodes)} SuperNodes (node ids {sorted(nodes)}) call themselves '{name}'; "
                                    "give each site a unique site-name (node config or sites.toml)")
                log.warning("[discover] dropped site '%s' (node %d): %s", name, node_id, dropped[node_id])
                del self.sites[node_id]
                self.channel.names[node_id] = f"{name} (node {node_id})"

    def teacher_round(self, round_: int) -> None:
        nodes = self._sample("nbi", self._seed(1, round_))
        config = {"round": round_, "seed": self._seed(1, round_), "local-epochs": self.cfg.train.local_epochs,
                  **self._span(round_, self.cfg.fed.teacher_rounds), "evaluate": "val" if round_ > 1 else ""}
        request = make("teacher.train", self.dims, config=config, weights={"teacher": self.teacher, "head": self.head})
        reference = {"teacher": weight_shapes(self.teacher), "head": weight_shapes(self.head)}
        replies, dropped = self._exchange("teacher", f"teacher round {round_}", {n: request for n in nodes}, reference)
        self._require(f"teacher round {round_}", "nbi", len(replies), dropped)
        if round_ > 1:  # the teacher sent is round_ - 1's global one
            evaluation = self._record_evaluation("teacher", round_ - 1, replies, "eval-examples", "val")
            self._select("teacher", round_ - 1, evaluation, {"teacher": self.teacher, "head": self.head})
        used = self._fedavg("teacher", "nbi", replies, {"teacher": self.teacher, "head": self.head})
        loss = float(np.mean([replies[n].config["loss"] for n in used]))
        self.metrics["teacher"].append({"round": round_, "loss": loss, "sites": [self.channel.name(n) for n in used]})
        self.board.scalars("teacher", {"loss": loss}, round_)
        log.info("[teacher %d/%d] loss %.4f from %d NBI site(s)", round_, self.cfg.fed.teacher_rounds, loss, len(used))

    def refresh_bank(self, refresh: int, evaluate_teacher: bool = False) -> None:
        """Seeds, then ``pagkd.kmeans_iters`` federated Lloyd steps; the last sums are the bank.

        With ``evaluate_teacher`` the seed replies also carry the teacher's test scores (the
        teacher the seeds come from), recorded as its evaluation."""
        nodes = sorted(self._sites_of("nbi"))
        seed = self._seed(2, refresh)
        config = {"round": refresh, "seed": seed, "evaluate": "test" if evaluate_teacher else ""}
        request = make("knowledge.seed", self.dims, config=config, weights={"teacher": self.teacher, "head": self.head})
        self._account_releases(nodes)
        replies, dropped = self._exchange("knowledge", f"knowledge refresh {refresh} (seeds)", {n: request for n in nodes})
        self._require(f"knowledge refresh {refresh} (seeds)", "nbi", len(replies), dropped)
        if evaluate_teacher:
            self._record_evaluation("teacher", self.cfg.fed.teacher_rounds, replies, "eval-examples", "test")
        # Sorted by site name, not arrival order: the seeded k-means must not depend on who answers first.
        in_order = sorted(replies, key=self.channel.name)
        self.centroids = aggregation.initial_centroids([replies[n].arrays for n in in_order], self.dims, seed)
        keys = self._public_keys(replies) if self.cfg.privacy.secure_aggregation else {}
        nodes = sorted(keys or replies)
        for iteration in range(1, self.cfg.pagkd.kmeans_iters + 1):
            self.bank, replies = self._lloyd_step(refresh, seed, iteration, nodes, keys)
            nodes = sorted(replies)
            if iteration < self.cfg.pagkd.kmeans_iters:
                self.centroids = aggregation.lloyd_centroids(self.bank, self.centroids, self.dims)
        groups = int(sum(r.config["groups"] for r in replies.values()))
        images = self.bank["image_count"].tolist()
        if groups == 0:  # distilling from an empty bank would silently turn PaGKD off
            p, t = self.cfg.pagkd, self.cfg.train
            raise FederationError(
                f"knowledge refresh {refresh}: the bank holds no group (NBI sites {[self.channel.name(n) for n in nodes]} "
                f"formed none of >= pagkd.min_group_size = {p.min_group_size} images). A class-balanced batch of "
                f"train.batch_size = {t.batch_size} holds ~{t.batch_size // self.cfg.data.num_classes} images per class: "
                "lower pagkd.min_group_size / pagkd.group_size or raise train.batch_size"
            )
        self.metrics["knowledge"].append(
            {"refresh": refresh, "groups": groups, "images_per_class": images, "sites": [self.channel.name(n) for n in nodes],
             "bank_bytes": int(sum(a.nbytes for a in self.bank.values()))}
        )
        log.info("[knowledge %d] bank from %d group(s) of %s images per class, %d NBI site(s)", refresh, groups, images, len(nodes))
        self.board.scalars("knowledge", {"groups": groups, "images": int(sum(images))}, refresh)

    def _lloyd_step(self, refresh: int, seed: int, iteration: int, nodes: list[int], keys: dict[int, str]):
        """One federated Lloyd step: the NBI sites' sums at the current centroids, aggregated
        (exact sums, or robustly). Under secure aggregation (``keys``: each site's public key)
        the replies are masked and only their sum decodes; a site that drops out leaves masks
        that do not cancel, so the step restarts without it under a new attempt number (fresh
        masks). Returns (bank, the replies used)."""
        fed = self.cfg.fed
        step = f"knowledge refresh {refresh} (Lloyd step {iteration})"
        for attempt in range(len(nodes)):
            peers = json.dumps({self.channel.name(n): keys[n] for n in nodes}) if keys else ""
            config = {"round": refresh, "seed": seed, "iteration": iteration, "peers": peers, "attempt": attempt}
            request = make("knowledge.stats", self.dims, arrays=self.centroids, config=config)
            self._account_releases(nodes)
            replies, dropped = self._exchange("knowledge", step, {n: request for n in nodes})
            self._require(step, "nbi", len(replies), dropped)
            in_order = [replies[n].arrays for n in sorted(replies, key=self.channel.name)]
            if not keys:
                return aggregation.robust_statistics(in_order, fed.aggregation, fed.trim_fraction, fed.clip_ratio), replies
            if not dropped:
                return aggregation.unmask_bank(in_order, self.dims, step), replies
            if len(replies) < 2:
                raise FederationError(f"{step}: secure aggregation needs >= 2 NBI sites, {len(replies)} left after dropping "
                                      + "; ".join(f"'{self.channel.name(n)}': {r}" for n, r in dropped.items()))
            log.warning("[%s] restarting the masked sum without %s (their masks would not cancel)", step,
                        ", ".join(f"'{self.channel.name(n)}'" for n in dropped))
            nodes = sorted(replies)
        raise FederationError(f"{step}: no masked sum completed")  # pragma: no cover (each attempt drops a site)

    def _public_keys(self, seed_replies: dict[int, Payload]) -> dict[int, str]:
        """Each NBI site's key for this refresh's masked sums; a site without a valid key is
        left out of the refresh (it could not take part in the sum)."""
        keys: dict[int, str] = {}
        for node_id, reply in seed_replies.items():
            try:
                secagg.parse_public_key(reply.config["public-key"], f"site '{self.channel.name(node_id)}'")
                keys[node_id] = reply.config["public-key"]
            except secagg.SecAggError as err:
                log.warning("[knowledge] dropped site '%s': %s (privacy.secure_aggregation must be on there too)",
                            self.channel.name(node_id), err)
                self._mark("knowledge", "secure aggregation set-up", (), {node_id: f"{err} (privacy.secure_aggregation must be on there too)"})
        if len(keys) < max(2, self.cfg.fed.min_nbi_sites):
            raise FederationError(f"secure aggregation needs >= {max(2, self.cfg.fed.min_nbi_sites)} NBI sites with a key; "
                                  f"{len(keys)} sent one (a lone site's sum would be its own statistics)")
        return keys

    def _account_releases(self, asked: list[int]) -> None:
        """Count each NBI site's statistics releases (what its DP budget is spent on): every
        site asked, before it is asked, whether or not its reply arrives or is used (it may have
        released it). The ledger is written before the request goes out."""
        releases = self.ledger.releases
        for node_id in asked:
            name = self.channel.name(node_id)
            releases[name] = releases.get(name, 0) + 1

    def privacy_spent(self) -> dict[str, Any]:
        """(epsilon, delta) each NBI site has spent on its knowledge statistics: every release
        is :data:`common.privacy.MECHANISMS_PER_RELEASE` Gaussian mechanisms of the configured
        noise multiplier, composed with Flower's RDP accountant (dp-accounting); add-or-remove
        one group, no sampling amplification. Epsilon is None without noise."""
        from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, RdpAccountant, SamplingMethod
        from flwr.serverapp import PrivacyConfig as AccountingConfig

        privacy = self.cfg.privacy
        releases = self.ledger.releases
        report: dict[str, Any] = {"noise_multiplier": privacy.noise_multiplier, "clip": privacy.clip, "delta": privacy.delta,
                                  "secure_aggregation": privacy.secure_aggregation, "releases": releases, "epsilon": {}}
        for site, count in releases.items():
            if privacy.noise_multiplier <= 0:
                report["epsilon"][site] = None  # no noise: no DP guarantee
                continue
            accountant = RdpAccountant(AccountingConfig(privacy.delta, 1, NeighboringRelation.ADD_OR_REMOVE_ONE,
                                                        SamplingMethod.NO_AMPLIFICATION))
            accountant.compose(GaussianPrivacyEvent(privacy.noise_multiplier, 1, 1), count=count * MECHANISMS_PER_RELEASE)
            report["epsilon"][site] = accountant.get_epsilon(privacy.delta)
        spent = [e for e in report["epsilon"].values() if e is not None]
        report["max_epsilon"] = max(spent) if spent and len(spent) == len(releases) else None
        return report

    def student_round(self, round_: int) -> None:
        fed = self.cfg.fed
        nodes = self._sample("wli", self._seed(3, round_))
        if fed.student_sites == "all":  # the joint cross-modal baseline: NBI sites train the student too
            nodes += self._sample("nbi", self._seed(3, round_))
        group_on = (round_ - 1) * self.cfg.train.local_epochs >= self.cfg.pagkd.warmup_epochs
        config = {
            "round": round_,
            "seed": self._seed(3, round_),
            "local-epochs": self.cfg.train.local_epochs,
            "group-losses": bool(group_on),
            "use-bank": bool(self.distil),
            **self._span(round_, fed.student_rounds),
        }
        weights = {"student": self.student, "head": self.head}
        arrays = {**self.bank, **self.class_prototypes}
        # The global student sent is round_ - 1's: its val evaluation (model selection) rides on
        # this round's replies, WLI sites only (the student is a WLI model).
        by_modality = {m: make("student.train", self.dims, arrays=arrays, weights=weights,
                               config={**config, "evaluate": "val" if round_ > 1 and m == "wli" else ""}) for m in ("wli", "nbi")}
        requests = {n: by_modality[self.sites[n].modality] for n in nodes}
        reference = {"student": weight_shapes(self.student), "head": weight_shapes(self.head)}
        replies, dropped = self._exchange("student", f"student round {round_}", requests, reference)
        wli_replies = {n: r for n, r in replies.items() if self.sites[n].modality == "wli"}
        self._require(f"student round {round_}", "wli", len(wli_replies), dropped)
        if round_ > 1:
            evaluation = self._record_evaluation("student", round_ - 1, wli_replies, "eval-examples", "val")
            self._select("student", round_ - 1, evaluation, {"student": self.student, "head": self.head})
        used = self._fedavg("student", "wli", replies, {"student": self.student, "head": self.head})
        if fed.proto_weight > 0:  # FedProto-style: the global class prototypes are summed class means
            self.class_prototypes = aggregation.sum_statistics([replies[n].arrays for n in used], [f.name for f in CLASS_PROTOTYPES])
        parts = {k: float(np.mean([replies[n].config[k] for n in used])) for k in ("loss", "ce", "den", "pro")}
        self.metrics["student"].append({"round": round_, **parts, "sites": [self.channel.name(n) for n in used]})
        self.board.scalars("student", parts, round_)
        log.info("[student %d/%d] loss %.4f (ce %.4f den %.4f pro %.4f) from %d site(s)", round_, fed.student_rounds,
                 parts["loss"], parts["ce"], parts["den"], parts["pro"], len(used))

    def evaluate(self, model: str, round_: int, split: str = "test", weights: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
        """An evaluation of its own: every site of the model's modality scores ``weights``
        (default: the current global model) on ``split``."""
        modality = "wli" if model == "student" else "nbi"
        if weights is None:
            weights = self.student if model == "student" else self.teacher
        nodes = sorted(self._sites_of(modality))
        request = make("evaluate", self.dims, config={"model": model, "split": split}, weights={"net": weights})
        step = f"{split} evaluation of the {model} (round {round_})"
        replies, dropped = self._exchange("evaluate", step, {n: request for n in nodes}, {"net": weight_shapes(weights)})
        self._require(step, modality, len(replies), dropped)
        return self._record_evaluation(model, round_, replies, "num-examples", split)

    def _record_evaluation(self, model: str, round_: int, replies: dict[int, Payload], examples_key: str, split: str) -> dict[str, Any]:
        """Pooled and per-site metrics on ``split`` from the score histograms the ``replies`` carry
        (those that scored no image are left out)."""
        replies = {n: r for n, r in replies.items() if r.config[examples_key] > 0}
        hists = {n: ScoreHistogram(r.arrays["score_positives"], r.arrays["score_negatives"], r.arrays["confusion"]) for n, r in replies.items()}
        if not hists:
            log.warning("[evaluate %s, round %d] no site scored a test image; nothing recorded", model, round_)
            return {}
        pooled = functools.reduce(operator.add, hists.values())
        result = {
            "model": model,
            "round": round_,
            "split": split,
            "pooled": histogram_metrics(pooled),
            "sites": {self.channel.name(n): histogram_metrics(h) for n, h in hists.items()},
            "histogram": {"positives": pooled.positives.tolist(), "negatives": pooled.negatives.tolist(), "confusion": pooled.confusion.tolist()},
        }
        self.metrics["evaluation"].append(result)
        self.board.scalars(f"evaluate_{model}", {"pooled": result["pooled"], "sites": result["sites"]}, round_)
        p = result["pooled"]
        log.info("[evaluate %s, round %d, %s] pooled AUC %.4f ACC %.4f SENS %.4f SPEC %.4f over %d site(s)", model, round_, split,
                 p["auc"], p["accuracy"], p["sensitivity"], p["specificity"], len(replies))
        return result

    # ------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        """The whole run, holding the run folder's lock (a second run with the same
        ``fed.run_name`` is refused while this one is alive)."""
        with RunLock(self.run_dir):
            return self._run()

    def _run(self) -> dict[str, Any]:
        started = time.time()
        self.board = MetricsBoard(self.run_dir)
        if not self.resume():
            check_run_folder(self.run_dir)
            self.save()  # the state exists before any exchange: a ledger is never left without one
        self.discover()
        self.save()
        fed = self.cfg.fed
        if self.needs_teacher:
            for round_ in range(self.progress.teacher_rounds + 1, fed.teacher_rounds + 1):
                self.teacher_round(round_)
                self.progress.teacher_rounds = round_
                self.save()
            if fed.teacher_rounds > 0 and self.progress.refreshes == 0 and self.progress.student_rounds == 0:
                selected = self._finish_selection("teacher", fed.teacher_rounds, {"teacher": self.teacher, "head": self.head})
                self.teacher, self.head = selected["teacher"], selected["head"]
                self.save()
            if not self.distil and fed.teacher_rounds > 0 and not self._evaluated("teacher", fed.teacher_rounds, "test"):
                self.evaluate("teacher", fed.teacher_rounds)  # no knowledge phase to carry it
                self.save()
        if fed.student_init == "teacher" and self.progress.student_rounds == 0:
            # Same backbone (checked by the config): the student's first global model is the teacher.
            self.student = {name: array.copy() for name, array in self.teacher.items()}
        if self.distil:
            if self.progress.refreshes == 0:
                self.refresh_bank(1, evaluate_teacher=fed.teacher_rounds > 0)
                self.progress.refreshes = 1
                self.save()
        for round_ in range(self.progress.student_rounds + 1, fed.student_rounds + 1):
            due = fed.bank_refresh_every > 0 and round_ > 1 and (round_ - 1) % fed.bank_refresh_every == 0
            if self.distil and due and self.progress.refreshes < 1 + (round_ - 1) // fed.bank_refresh_every:
                self.refresh_bank(self.progress.refreshes + 1)
                self.progress.refreshes += 1
            self.student_round(round_)
            self.progress.student_rounds = round_
            self.save()
        final = fed.student_rounds
        if final > 0 and not self._evaluated("student", final, "test"):
            selected = self._finish_selection("student", final, {"student": self.student, "head": self.head})
            self.student, self.head = selected["student"], selected["head"]
            self.evaluate("student", final)  # the test split, read once: the selected student's figure
            self.save()
        self.metrics["wall_time_s"] = self.metrics.get("wall_time_s", 0.0) + time.time() - started
        return self.finish()

    def _test_figure(self, model: str) -> dict[str, Any] | None:
        tests = [e for e in self.metrics["evaluation"] if e["model"] == model and e.get("split") == "test"]
        if not tests:
            return None
        figure = {**tests[-1]["pooled"], "round": tests[-1]["round"], "confusion": tests[-1]["histogram"]["confusion"]}
        figure["selected_round"] = self.metrics["selection"].get(model, {}).get("round", tests[-1]["round"])
        return figure

    def final_figures(self) -> dict[str, Any]:
        """``final``: the selected global student's test figures (None when no student round ran:
        a teacher's figure is never reported as the student's), with the rounds behind it;
        ``final_teacher``: the selected NBI teacher's test figures."""
        student = self._test_figure("student")
        return {"final": student,
                "final_student_round": student["selected_round"] if student else 0,
                "student_rounds": self.progress.student_rounds,
                "final_teacher": self._test_figure("teacher")}
    def outcome(self) -> dict[str, Any]:
        """``status``: completed (every discovered site took part in every phase it was asked
        to) or degraded; ``accepted``: the share of sites never dropped reaches
        ``fed.min_site_share`` (the launcher exits non-zero when it does not)."""
        status = self.metrics.get("site_status", {})
        lost = sorted(name for name, phases in status.items() if any(v.startswith("dropped") for v in phases.values()))
        share = 1.0 - len(lost) / len(status) if status else 0.0
        return {"status": "degraded" if lost else "completed", "sites_lost": lost, "site_share": share,
                "min_site_share": self.cfg.fed.min_site_share, "accepted": share >= self.cfg.fed.min_site_share}

    def finish(self) -> dict[str, Any]:
        """Final outputs: metrics.json, egress.json, config.json, the student checkpoint, plots."""
        from server.outputs import write_plots  # matplotlib only at the end

        student_bytes = int(sum(a.nbytes for a in self.student.values()))
        bank_bytes = int(sum(a.nbytes for a in self.bank.values()))
        summary = {
            **self.metrics,
            "bytes": self.ledger.bytes,
            "timing": self.ledger.timing,
            "student_weights_bytes": student_bytes,
            "bank_bytes": bank_bytes,
            "bank_share_of_student_upload": bank_bytes / student_bytes,
            "sites": [s.__dict__ for s in self.sites.values()],
            "class_names": list(self.class_names),
            **self.final_figures(),
            # Models that did not learn (val AUC at chance or a collapsed confusion matrix of the
            # selected round): a run says so rather than ending with a quiet number.
            "not_learned": {model: chosen["problems"] for model, chosen in self.metrics["selection"].items() if chosen["problems"]},
            **self.outcome(),
            "privacy": self.privacy_spent(),
        }
        atomic_write_json(self.run_dir / "metrics.json", summary)
        atomic_write_json(self.run_dir / "egress.json", self.ledger.egress)
        atomic_write_json(self.run_dir / "config.json", config_to_dict(self.cfg))
        save_checkpoint(self.run_dir / STUDENT_CHECKPOINT, self.student, self.cfg, self.class_names)
        write_plots(self.run_dir, summary)
        self.board.close()
        if summary["status"] == "degraded":
            log.warning("run DEGRADED (%.0f %% of the sites took part throughout, fed.min_site_share = %.0f %%): lost %s",
                        100 * summary["site_share"], 100 * summary["min_site_share"], ", ".join(summary["sites_lost"]))
        log.info("run finished: %s", self.run_dir)
        return summary


def run_federation(grid: Grid, cfg: Config, run_dir: Path) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    return Protocol(grid, cfg, run_dir).run()
