"""The FedPaGKD protocol (DESIGN.md section 3), over a Flower ``Grid``: :class:`Protocol`.

:meth:`Protocol.run` reads like a strategy's ``start()``: discover -> teacher rounds (NBI
FedAvg) -> knowledge refresh (NBI seeds + federated Lloyd steps; the server sums exactly) ->
student rounds (WLI, CE + GKD-Pro + GKD-Den against the bank; refreshed every T rounds) ->
evaluation from score histograms -> the selected student. One short method per phase; the
rest lives where a newcomer looks for it:

* :mod:`server.channel`: sending requests, screening replies, the ledger of every exchange;
* :mod:`server.trust`: replies whose numbers contradict the site's discovery metadata;
* :mod:`server.discovery`: what a site declares and the rules a federation must meet;
* :mod:`server.aggregation`: FedAvg / robust rules, exact and masked sums, k-means centroids
  (each returns new arrays; the protocol rebinds its globals);
* :mod:`server.state`: the :class:`server.state.RunState` saved after every finished round and
  the rule for resuming it; :mod:`server.accounting`: the sites' DP budgets;
* :mod:`server.outputs`: metrics.json, egress.json, the checkpoint and plots of a finished run.

Every request and reply passes :func:`common.records.validate`. A reply that is an error,
malformed, non-finite, late, or an outlier in norm is dropped and logged with the site's name;
a round goes on while at least ``fed.min_<modality>_sites`` replies remain, and the run stops
with a :class:`FederationError` saying which sites failed and why when not. A restarted
ServerApp with the same ``fed.run_name`` resumes at the last finished round.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import operator
import random
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from flwr.serverapp import Grid

from client.site import run_class_names
from client.wire import state_to_numpy
from common import secagg
from common.config import Config, config_to_flat
from common.metrics import ScoreHistogram, histogram_metrics, learning_problems, selection_key
from common.models import build_query_head, build_student, build_teacher
from common.progress import MetricsBoard
from common.records import CLASS_PROTOTYPES, PROTOCOL_VERSION, Payload, dims_of, empty_statistics, make, weight_shapes
from server import aggregation, discovery, trust
from server.accounting import privacy_spent
from server.channel import LEDGER, Channel, Ledger
from server.discovery import FederationError, SiteInfo, agreed_class_names, duplicate_names, missing_sites, refusal
from server.outputs import run_summary, write_outputs
from server.state import RunLock, RunState, check_run_folder, ensure_run_folder, load_run, save_run

log = logging.getLogger("fedpagkd.server")

__all__ = ["LEDGER", "FederationError", "Protocol", "SiteInfo", "run_federation"]


def _run_field(name: str) -> property:
    """A field of the protocol's :class:`RunState`, read and set as an attribute of the protocol."""
    return property(lambda self: getattr(self.run_state, name), lambda self, value: setattr(self.run_state, name, value))


class Protocol:
    """One FedPaGKD run: global models, the bank, progress, metrics; resumable."""

    teacher, student, head = _run_field("teacher"), _run_field("student"), _run_field("head")
    bank, class_prototypes, centroids = _run_field("bank"), _run_field("class_prototypes"), _run_field("centroids")
    best, progress, metrics = _run_field("best"), _run_field("progress"), _run_field("metrics")

    def __init__(self, grid: Grid, cfg: Config, run_dir: Path, start: RunState | None = None):
        """``start``: a finished teacher phase the run starts from when its folder holds none (its
        teacher, student, query head, selections, progress, metrics; the bank, class prototypes
        and centroids start empty, shaped for this run): a study's shared teacher phase
        (benchmarks.federated.teacher_snapshot). Default: fresh models."""
        self.cfg, self.run_dir, self.grid = cfg, run_dir, grid
        self.dims = dims_of(cfg)
        self.ledger = Ledger(path=run_dir / LEDGER)
        self.channel = Channel(grid, self.dims, cfg.fed.round_timeout, self.ledger, cfg.fed.resend_crashed, cfg.fed.site_lost_s)
        self.distil, self.needs_teacher = cfg.distils, cfg.needs_nbi_sites
        torch.manual_seed(cfg.train.seed)
        c = cfg.data.num_classes
        self.run_state = RunState(
            teacher=state_to_numpy(build_teacher(cfg.model, c)),
            student=state_to_numpy(build_student(cfg.model, c)),
            head=state_to_numpy(build_query_head(cfg.model, c)),
            bank=aggregation.empty_bank(self.dims),
            class_prototypes=empty_statistics(CLASS_PROTOTYPES, self.dims),
            # site_status: {site: {phase: "took part" | "dropped in <step>: <reason>"}}, every discovered site.
            metrics={"teacher": [], "knowledge": [], "student": [], "evaluation": [], "selection": {}, "site_status": {}},
        )
        if start is not None:  # the teacher phase; the student phase's state stays this run's own (its dims)
            empty = self.run_state
            self.run_state = copy.deepcopy(start)
            self.run_state.bank, self.run_state.class_prototypes, self.run_state.centroids = (
                empty.bank,
                empty.class_prototypes,
                {},
            )
        self.sites: dict[int, SiteInfo] = {}
        self.class_names = run_class_names(cfg)  # replaced by the sites' agreed names at discovery
        self.board = MetricsBoard(None)  # a real one once run() starts (TensorBoard, where installed)
        self._clocked: float | None = None  # when the wall time was last added to the state (run() starts the clock)

    # ------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        """The whole run, holding the run folder's lock (a second run with the same
        ``fed.run_name`` is refused while this one is alive)."""
        with RunLock(self.run_dir):
            self._clocked = time.time()
            self.board = MetricsBoard(self.run_dir)
            self.start()
            if self.needs_teacher:
                self.teacher_phase()
            self.student_phase()
            self.save()  # the last of the wall time into the state, so a re-run adds to it
            return self.finish()

    def start(self) -> None:
        """Resume the run folder's state (or write a first one), then discover the sites."""
        if not self.resume():
            check_run_folder(self.run_dir)
            self.save()  # the state exists before any exchange: a ledger is never left without one
        self.discover()
        self.save()

    def teacher_phase(self) -> None:
        """The teacher rounds, then the selected teacher (and its test figure when no knowledge
        phase will carry it)."""
        fed = self.cfg.fed
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

    def student_phase(self) -> None:
        """The student's start, the first bank, the student rounds (refreshing the bank every
        ``fed.bank_refresh_every``), then the selected student's one test evaluation."""
        fed = self.cfg.fed
        if fed.student_init == "teacher" and self.progress.student_rounds == 0:
            # Same backbone (checked by the config): the student's first global model is the teacher.
            self.student = {name: array.copy() for name, array in self.teacher.items()}
        if self.distil and self.progress.refreshes == 0:
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

    # ------------------------------------------------------------------ phases

    def discover(self) -> None:
        """Ask every node for its metadata; keep the sites that speak this protocol with a known
        modality and a unique name; refuse to start without enough of them or without one
        list of class names."""
        node_ids = list(self.grid.get_node_ids())
        requests = {n: make("discover", self.dims, config={"protocol": PROTOCOL_VERSION}) for n in node_ids}
        replies, dropped = self.channel.exchange("discover", requests)
        for node_id, reply in replies.items():
            info = SiteInfo.from_metadata(node_id, reply)
            if (reason := refusal(reply, info)) is not None:
                dropped[node_id] = reason
                log.warning("[discover] dropped site %r (node %d): %s", info.name, node_id, reason)  # %r: it may be unsafe
                continue
            self.sites[node_id] = info
            self.channel.names[node_id] = info.name
        # The discovery exchange was logged before the names were known: name it after the replies.
        self.ledger.rename({f"node {n}": name for n, name in self.channel.names.items()})
        self.ledger.write()
        for node_id, reason in duplicate_names(self.sites).items():
            name = self.sites.pop(node_id).name
            dropped[node_id] = reason
            log.warning("[discover] dropped site '%s' (node %d): %s", name, node_id, reason)
            self.channel.names[node_id] = f"{name} (node {node_id})"
        self._mark("discover", "discovery", self.sites, dropped)
        names = [f"{s.name} ({s.modality}, {sum(s.train_counts)} train)" for s in self.sites.values()]
        log.info("discovered %d site(s): %s", len(self.sites), ", ".join(names))
        for warning in discovery.declaration_warnings(self.sites, self.cfg.fed.max_site_share):
            log.warning("[discover] %s", warning)
        reconciled = self.ledger.reconcile({s.name: s.releases for s in self.sites.values()})
        self.metrics["releases_reconciled"] = {**self.metrics.get("releases_reconciled", {}), **reconciled}
        if missing := missing_sites(self.sites, self.cfg, self.needs_teacher):
            reasons = "; ".join(f"'{self.channel.name(n)}': {r}" for n, r in dropped.items())
            raise FederationError(
                f"not enough sites to start ({', '.join(missing)}). Found: {', '.join(names) or 'none'}."
                + (f" Refused: {reasons}" if reasons else "")
            )
        self.class_names = agreed_class_names(self.sites, self.cfg)

    def teacher_round(self, round_: int) -> None:
        """NBI sites train the teacher (FedAvg); their replies carry the previous global
        teacher's val evaluation."""
        nodes = self._sample("nbi", self._seed(1, round_))
        config = {
            "round": round_,
            "seed": self._seed(1, round_),
            "local-epochs": self.cfg.train.local_epochs,
            **self._span(round_, self.cfg.fed.teacher_rounds),
            "evaluate": "val" if round_ > 1 else "",
        }
        request = make("teacher.train", self.dims, config=config, weights={"teacher": self.teacher, "head": self.head})
        reference = {"teacher": weight_shapes(self.teacher), "head": weight_shapes(self.head)}
        replies, dropped = self._exchange("teacher", f"teacher round {round_}", {n: request for n in nodes}, reference)
        self._require(f"teacher round {round_}", "nbi", len(replies), dropped)
        if round_ > 1:  # the teacher sent is round_ - 1's global one
            evaluation = self._record_evaluation("teacher", round_ - 1, replies, "eval-examples", "val")
            self._select("teacher", round_ - 1, evaluation, {"teacher": self.teacher, "head": self.head})
        used, new = self._fedavg("teacher", "nbi", replies, {"teacher": self.teacher, "head": self.head})
        self.teacher, self.head = new["teacher"], new["head"]
        loss = float(np.mean([replies[n].config["loss"] for n in used]))
        self.metrics["teacher"].append({"round": round_, "loss": loss, "sites": [self.channel.name(n) for n in used]})
        self.board.scalars("teacher", {"loss": loss}, round_)
        log.info("[teacher %d/%d] loss %.4f from %d NBI site(s)", round_, self.cfg.fed.teacher_rounds, loss, len(used))

    def refresh_bank(self, refresh: int, evaluate_teacher: bool = False) -> None:
        """Seeds, then ``pagkd.kmeans_iters`` federated Lloyd steps; the last sums are the bank.

        With ``evaluate_teacher`` the seed replies also carry the teacher's test scores (the
        teacher the seeds come from), recorded as its evaluation."""
        seed = self._seed(2, refresh)
        nodes, keys = self._seed_centroids(refresh, seed, evaluate_teacher)
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
            {
                "refresh": refresh,
                "groups": groups,
                "images_per_class": images,
                "sites": [self.channel.name(n) for n in nodes],
                "bank_bytes": int(sum(a.nbytes for a in self.bank.values())),
            }
        )
        log.info(
            "[knowledge %d] bank from %d group(s) of %s images per class, %d NBI site(s)", refresh, groups, images, len(nodes)
        )
        self.board.scalars("knowledge", {"groups": groups, "images": int(sum(images))}, refresh)

    def student_round(self, round_: int) -> None:
        """WLI sites (and NBI sites in the joint baseline) train the student against the bank
        (FedAvg); WLI replies carry the previous global student's val evaluation."""
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
        by_modality = {
            m: make(
                "student.train",
                self.dims,
                arrays=arrays,
                weights=weights,
                config={**config, "evaluate": "val" if round_ > 1 and m == "wli" else ""},
            )
            for m in ("wli", "nbi")
        }
        requests = {n: by_modality[self.sites[n].modality] for n in nodes}
        reference = {"student": weight_shapes(self.student), "head": weight_shapes(self.head)}
        replies, dropped = self._exchange("student", f"student round {round_}", requests, reference)
        wli_replies = {n: r for n, r in replies.items() if self.sites[n].modality == "wli"}
        self._require(f"student round {round_}", "wli", len(wli_replies), dropped)
        if round_ > 1:
            evaluation = self._record_evaluation("student", round_ - 1, wli_replies, "eval-examples", "val")
            self._select("student", round_ - 1, evaluation, {"student": self.student, "head": self.head})
        used, new = self._fedavg("student", "wli", replies, {"student": self.student, "head": self.head})
        self.student, self.head = new["student"], new["head"]
        if fed.fedproto_weight > 0:  # FedProto-style: the global class prototypes are summed class means
            self.class_prototypes = aggregation.sum_statistics(
                [replies[n].arrays for n in used], [f.name for f in CLASS_PROTOTYPES]
            )
        parts = {k: float(np.mean([replies[n].config[k] for n in used])) for k in ("loss", "ce", "den", "pro")}
        self.metrics["student"].append({"round": round_, **parts, "sites": [self.channel.name(n) for n in used]})
        self.board.scalars("student", parts, round_)
        log.info(
            "[student %d/%d] loss %.4f (ce %.4f den %.4f pro %.4f) from %d site(s)",
            round_,
            fed.student_rounds,
            parts["loss"],
            parts["ce"],
            parts["den"],
            parts["pro"],
            len(used),
        )

    def evaluate(
        self, model: str, round_: int, split: str = "test", weights: dict[str, np.ndarray] | None = None
    ) -> dict[str, Any]:
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

    def finish(self) -> dict[str, Any]:
        """Final outputs (:mod:`server.outputs`): metrics.json, egress.json, config.json, the
        student checkpoint, plots."""
        summary = run_summary(
            self.metrics,
            self.ledger.snapshot(),
            self.student,
            self.bank,
            [s.__dict__ for s in self.sites.values()],
            self.class_names,
            self.progress.student_rounds,
            self.cfg.fed.min_site_share,
            self.privacy_spent(),
            self.cfg.data.root,
        )
        write_outputs(self.run_dir, summary, self.ledger.egress, self.cfg, self.student, self.class_names)
        self.board.close()
        for model, problems in summary["not_learned"].items():
            log.warning("the %s did not learn: %s; %s", model, "; ".join(problems), summary["not_learned_fixes"])
        if summary["status"] == "degraded":
            log.warning(  # deploy/follow.py reads this line: the operator's exit status
                "run DEGRADED, %s (%.0f %% of the sites took part throughout, fed.min_site_share = %.0f %%): lost %s",
                "accepted" if summary["accepted"] else "NOT accepted",
                100 * summary["site_share"],
                100 * summary["min_site_share"],
                ", ".join(summary["sites_lost"]),
            )
        log.info("run finished: %s", self.run_dir)
        return summary

    # ------------------------------------------------------------------ persistence

    def save(self) -> None:
        # The run's wall time accumulates in the state at every save: a resumed run adds to what
        # the runs before it spent (an interrupted one's rounds included), a re-run of a finished
        # run adds its few seconds instead of overwriting the total with them.
        now = time.time()
        if self._clocked is not None:
            self.metrics["wall_time_s"] = self.metrics.get("wall_time_s", 0.0) + now - self._clocked
        self._clocked = now
        self.ledger.write()  # the state records the ledger write it goes with
        save_run(
            self.run_dir,
            self.run_state,
            {**self.ledger.snapshot(), "config": config_to_flat(self.cfg), "sites": [s.__dict__ for s in self.sites.values()]},
        )

    def resume(self) -> bool:
        loaded = load_run(self.run_dir, config_to_flat(self.cfg))
        if loaded is None:
            return False
        blocks, meta = loaded
        self.run_state.restore(blocks, meta)
        self.ledger.load(meta["ledger_seq"], meta["releases"])
        log.info("resuming %s at %s", self.run_dir, self.progress)
        return True

    def privacy_spent(self) -> dict[str, Any]:
        """(epsilon, delta) each NBI site has spent on its knowledge statistics (:mod:`server.accounting`)."""
        return privacy_spent(self.cfg.privacy, self.ledger.releases)

    # ------------------------------------------------------------------ the knowledge refresh's steps

    def _seed_centroids(self, refresh: int, seed: int, evaluate_teacher: bool) -> tuple[list[int], dict[int, str]]:
        """Ask the NBI sites for k-means seeds, start the centroids from them -> (the sites of
        the Lloyd steps, their public keys under secure aggregation, else {})."""
        nodes = sorted(self._sites_of("nbi"))
        config = {"round": refresh, "seed": seed, "evaluate": "test" if evaluate_teacher else ""}
        request = make("knowledge.seed", self.dims, config=config, weights={"teacher": self.teacher, "head": self.head})
        replies, dropped = self._exchange(
            "knowledge", f"knowledge refresh {refresh} (seeds)", {n: request for n in nodes}, releases=True
        )
        self._require(f"knowledge refresh {refresh} (seeds)", "nbi", len(replies), dropped)
        if evaluate_teacher:
            self._record_evaluation("teacher", self.cfg.fed.teacher_rounds, replies, "eval-examples", "test")
        # Sorted by site name, not arrival order: the seeded k-means must not depend on who answers first.
        in_order = sorted(replies, key=self.channel.name)
        self.centroids = aggregation.initial_centroids([replies[n].arrays for n in in_order], self.dims, seed)
        keys = self._public_keys(replies) if self.cfg.privacy.secure_aggregation else {}
        return sorted(keys or replies), keys

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
            replies, dropped = self._exchange("knowledge", step, {n: request for n in nodes}, releases=True)
            self._require(step, "nbi", len(replies), dropped)
            in_order = [replies[n].arrays for n in sorted(replies, key=self.channel.name)]
            if not keys:
                return aggregation.robust_statistics(
                    in_order, fed.aggregation, fed.trim_fraction, fed.clip_ratio, fed.max_site_share
                ), replies
            if not dropped:
                return aggregation.unmask_bank(in_order, self.dims, step), replies
            if len(replies) < 2:
                raise FederationError(
                    f"{step}: secure aggregation needs >= 2 NBI sites, {len(replies)} left after dropping "
                    + "; ".join(f"'{self.channel.name(n)}': {r}" for n, r in dropped.items())
                )
            log.warning(
                "[%s] restarting the masked sum without %s (their masks would not cancel)",
                step,
                ", ".join(f"'{self.channel.name(n)}'" for n in dropped),
            )
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
                log.warning(
                    "[knowledge] dropped site '%s': %s (privacy.secure_aggregation must be on there too)",
                    self.channel.name(node_id),
                    err,
                )
                self._mark(
                    "knowledge",
                    "secure aggregation set-up",
                    (),
                    {node_id: f"{err} (privacy.secure_aggregation must be on there too)"},
                )
        if len(keys) < max(2, self.cfg.fed.min_nbi_sites):
            raise FederationError(
                f"secure aggregation needs >= {max(2, self.cfg.fed.min_nbi_sites)} NBI sites with a key; "
                f"{len(keys)} sent one (a lone site's sum would be its own statistics)"
            )
        return keys

    # ------------------------------------------------------------------ exchanges and aggregation

    def _exchange(
        self,
        phase: str,
        step: str,
        requests: dict[int, Payload],
        reference: dict[str, dict] | None = None,
        releases: bool = False,
    ) -> tuple[dict[int, Payload], dict[int, str]]:
        """:meth:`Channel.exchange`, then the :mod:`server.trust` screens: a reply whose numbers
        contradict its site's discovery metadata is dropped with the reason. Each site's part
        in ``phase`` is recorded (``step`` names the round in a drop's reason)."""
        replies, dropped = self.channel.exchange(phase, requests, reference, releases)
        for node_id in sorted(replies):
            try:
                trust.screen_reply(
                    requests[node_id], replies[node_id], self.sites[node_id].declared(), self.channel.name(node_id)
                )
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

    def _fedavg(
        self, phase: str, modality: str, replies: dict[int, Payload], blocks: dict[str, dict[str, np.ndarray]]
    ) -> tuple[list[int], dict[str, dict[str, np.ndarray]]]:
        """The new global weight blocks from the replies (FedAvg weighted by num-examples, or
        ``fed.aggregation``'s robust rule, after ``fed.clip_ratio`` clipping against the current
        ``blocks``), after dropping updates whose norm is an outlier (and re-checking the
        minimum of sites). Returns (the node ids used, {block: new weights}); ``blocks`` is
        left unchanged."""
        fed = self.cfg.fed
        first = next(iter(blocks))
        norms = [aggregation.update_norm(p.weights[first], blocks[first]) for p in replies.values()]
        outliers = {list(replies)[i] for i in aggregation.norm_outliers(norms, fed.max_norm_ratio)}
        reasons = {n: f"update norm is over {fed.max_norm_ratio:.0f}x the median" for n in outliers}
        for node_id, reason in reasons.items():
            log.warning("[%s] dropped site '%s': %s", phase, self.channel.name(node_id), reason)
        self._mark(phase, f"{phase} aggregation", (), reasons)
        used = sorted((n for n in replies if n not in outliers), key=self.channel.name)  # order-independent sums
        self._require(phase, modality, sum(self.sites[n].modality == modality for n in used), reasons)
        states = {block: [replies[n].weights[block] for n in used] for block in blocks}
        weights = aggregation.capped_weights([replies[n].config["num-examples"] for n in used], fed.max_site_share)
        new, scales = aggregation.aggregate_weights(states, weights, blocks, fed.aggregation, fed.trim_fraction, fed.clip_ratio)
        for block, block_scales in scales.items():
            if clipped := [self.channel.name(n) for n, scale in zip(used, block_scales) if scale < 1]:
                log.info(
                    "[%s] clipped the '%s' update of %s to %.1fx the median norm",
                    phase,
                    block,
                    ", ".join(clipped),
                    fed.clip_ratio,
                )
        return used, new

    def _seed(self, phase: int, round_: int) -> int:
        return self.cfg.train.seed * 100_000 + phase * 10_000 + round_

    def _span(self, round_: int, rounds: int) -> dict[str, float]:
        """Round ``round_`` of ``rounds`` covers [(r-1)/R, r/R] of the learning-rate schedule."""
        return {"schedule-start": (round_ - 1) / rounds, "schedule-end": round_ / rounds}

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

    # ------------------------------------------------------------------ evaluation and model selection

    def _record_evaluation(
        self, model: str, round_: int, replies: dict[int, Payload], examples_key: str, split: str
    ) -> dict[str, Any]:
        """Pooled and per-site metrics on ``split`` from the score histograms the ``replies`` carry
        (those that scored no image are left out)."""
        replies = {n: r for n, r in replies.items() if r.config[examples_key] > 0}
        hists = {
            n: ScoreHistogram(r.arrays["score_positives"], r.arrays["score_negatives"], r.arrays["confusion"])
            for n, r in replies.items()
        }
        if not hists:
            log.warning("[evaluate %s, round %d] no site scored a %s image; nothing recorded", model, round_, split)
            return {}
        pooled = functools.reduce(operator.add, hists.values())
        result = {
            "model": model,
            "round": round_,
            "split": split,
            "pooled": histogram_metrics(pooled),
            "sites": {self.channel.name(n): histogram_metrics(h) for n, h in hists.items()},
            "histogram": {
                "positives": pooled.positives.tolist(),
                "negatives": pooled.negatives.tolist(),
                "confusion": pooled.confusion.tolist(),
            },
        }
        self.metrics["evaluation"].append(result)
        self.board.scalars(f"evaluate_{model}", {"pooled": result["pooled"], "sites": result["sites"]}, round_)
        p = result["pooled"]
        log.info(
            "[evaluate %s, round %d, %s] pooled AUC %.4f ACC %.4f SENS %.4f SPEC %.4f over %d site(s)",
            model,
            round_,
            split,
            p["auc"],
            p["accuracy"],
            p["sensitivity"],
            p["specificity"],
            len(replies),
        )
        return result

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

    def _finish_selection(
        self, model: str, rounds: int, weights: dict[str, dict[str, np.ndarray]]
    ) -> dict[str, dict[str, np.ndarray]]:
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


def run_federation(grid: Grid, cfg: Config, run_dir: Path, start: RunState | None = None) -> dict[str, Any]:
    ensure_run_folder(run_dir)
    return Protocol(grid, cfg, run_dir, start).run()
