"""The FedPaGKD protocol (docs/method.md, "The federated protocol"), over a Flower ``Grid``: :class:`Protocol`.

:meth:`Protocol.run` reads like a strategy's ``start()``: discover -> teacher phase (NBI
FedAvg, then the selected teacher) -> student phase (the first bank, student rounds against it
refreshed every T rounds, then the selected student's test figure) -> outputs. One short method
per phase or round; each concern lives in a module of its own:

* :mod:`server.rounds`: sampling the sites, exchanging messages, recording each site's part,
  requiring enough replies, FedAvg; :mod:`server.channel` (sending, screening, the ledger) and
  :mod:`server.trust` (replies contradicting their site's metadata) below it;
* :mod:`server.knowledge`: the knowledge refresh (k-means seeds, federated Lloyd steps, the
  bank, secure-aggregation restarts); its site side is :mod:`client.knowledge`;
* :mod:`server.selection`: evaluations and model selection (the rule of :mod:`common.selection`,
  shared with centralised training);
* :mod:`server.baselines`: the baselines' hooks into the student rounds;
* :mod:`server.discovery`: what a site declares and the rules a federation must meet;
* :mod:`server.state`: the :class:`server.state.RunState` saved after every finished round and
  the rule for resuming it; :mod:`server.accounting`: the sites' DP budgets;
* :mod:`server.outputs`: metrics.json (:class:`common.results.RunResult`), egress.json, the
  checkpoint and plots of a finished run.

Every request and reply passes :func:`common.records.validate`. A reply that is an error,
malformed, non-finite, late, or an outlier in norm is dropped and logged with the site's name;
a round goes on while at least ``fed.min_<modality>_sites`` replies remain, and the run stops
with a :class:`FederationError` saying which sites failed and why when not. A restarted
ServerApp with the same ``fed.run_name`` resumes at the last finished round.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.serverapp import Grid

from client.site import run_class_names
from client.wire import state_to_numpy
from common.config import Config, config_to_flat
from common.modality import Modality, Model, Phase
from common.models import build_query_head, build_student, build_teacher
from common.progress import MetricsBoard
from common.results import RunResult
from common.records import CLASS_PROTOTYPES, PROTOCOL_VERSION, dims_of, empty_statistics, make, weight_shapes
from server import aggregation, discovery
from server.accounting import privacy_spent
from server.baselines import student_plugins
from server.channel import LEDGER, Channel, Ledger
from server.discovery import FederationError, SiteInfo, agreed_class_names, duplicate_names, missing_sites, refusal
from server.knowledge import KnowledgeRefresh
from server.outputs import run_summary, write_outputs
from server.rounds import Rounds
from server.selection import ModelSelection
from server.state import RunLock, RunState, check_run_folder, ensure_run_folder, load_run, save_run

log = logging.getLogger("fedpagkd.server")

__all__ = ["LEDGER", "FederationError", "Protocol", "SiteInfo", "run_federation"]


class Protocol:
    """One FedPaGKD run: its :class:`RunState` (global models, the bank, progress, metrics;
    resumable) and the pieces that work on it."""

    def __init__(self, grid: Grid, cfg: Config, run_dir: Path, start: RunState | None = None):
        """``start``: a finished teacher phase the run starts from when its folder holds none (its
        teacher, student, query head, selections, progress, metrics; the bank, class prototypes
        and centroids start empty, shaped for this run): a study's shared teacher phase
        (benchmarks.federated.teacher_snapshot). Default: fresh models."""
        self.cfg, self.run_dir = cfg, run_dir
        self.dims = dims_of(cfg)
        self.ledger = Ledger(path=run_dir / LEDGER)
        self.channel = Channel(grid, self.dims, cfg.fed.round_timeout, self.ledger, cfg.fed.resend_crashed, cfg.fed.site_lost_s)
        self.distil, self.needs_teacher = cfg.distils, cfg.needs_nbi_sites
        self.run_state = self._first_state(start)
        self.rounds = Rounds(cfg, self.channel, self.run_state)
        self.selection = ModelSelection(self.rounds)
        self.knowledge = KnowledgeRefresh(self.rounds, self.selection)
        self.plugins = student_plugins(cfg)
        self.class_names = run_class_names(cfg)  # replaced by the sites' agreed names at discovery
        self._clocked: float | None = None  # when the wall time was last added to the state (run() starts the clock)

    def _first_state(self, start: RunState | None) -> RunState:
        torch.manual_seed(self.cfg.train.seed)
        c = self.cfg.data.num_classes
        state = RunState(
            teacher=state_to_numpy(build_teacher(self.cfg.model, c)),
            student=state_to_numpy(build_student(self.cfg.model, c)),
            head=state_to_numpy(build_query_head(self.cfg.model, c)),
            bank=aggregation.empty_bank(self.dims),
            class_prototypes=empty_statistics(CLASS_PROTOTYPES, self.dims),
            metrics={str(p): [] for p in (Phase.TEACHER, Phase.KNOWLEDGE, Phase.STUDENT)}
            | {"evaluation": [], "selection": {}, "site_status": {}},
        )
        if start is None:
            return state
        # The teacher phase; the student phase's state stays this run's own (its dims).
        started = copy.deepcopy(start)
        started.bank, started.class_prototypes, started.centroids = state.bank, state.class_prototypes, {}
        return started

    @property
    def sites(self) -> dict[int, SiteInfo]:
        return self.rounds.sites

    @property
    def metrics(self) -> dict[str, Any]:
        return self.run_state.metrics

    # ------------------------------------------------------------------ the run

    def run(self) -> RunResult:
        """The whole run, holding the run folder's lock (a second run with the same
        ``fed.run_name`` is refused while this one is alive)."""
        with RunLock(self.run_dir):
            self._clocked = time.time()
            self.rounds.board = MetricsBoard(self.run_dir)
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
        fed, state = self.cfg.fed, self.run_state
        for round_ in range(state.progress.teacher_rounds + 1, fed.teacher_rounds + 1):
            self.teacher_round(round_)
            state.progress.teacher_rounds = round_
            self.save()
        if fed.teacher_rounds > 0 and state.progress.refreshes == 0 and state.progress.student_rounds == 0:
            weights = {"teacher": state.teacher, "head": state.head}
            selected = self.selection.finish(Model.TEACHER, fed.teacher_rounds, weights)
            state.teacher, state.head = selected["teacher"], selected["head"]
            self.save()
        if not self.distil and fed.teacher_rounds > 0 and not self.selection.evaluated(Model.TEACHER, fed.teacher_rounds, "test"):
            self.selection.evaluate(Model.TEACHER, fed.teacher_rounds, state.teacher)  # no knowledge phase to carry it
            self.save()

    def student_phase(self) -> None:
        """The student's start, the first bank, the student rounds (refreshing the bank every
        ``fed.bank_refresh_every``), then the selected student's one test evaluation."""
        fed, state = self.cfg.fed, self.run_state
        if fed.student_init == "teacher" and state.progress.student_rounds == 0:
            # Same backbone (checked by the config): the student's first global model is the teacher.
            state.student = {name: array.copy() for name, array in state.teacher.items()}
        if self.distil and state.progress.refreshes == 0:
            self.knowledge.run(1, evaluate_teacher=fed.teacher_rounds > 0)
            state.progress.refreshes = 1
            self.save()
        for round_ in range(state.progress.student_rounds + 1, fed.student_rounds + 1):
            if self.distil and state.progress.refreshes < self._refreshes_due(round_):
                self.knowledge.run(state.progress.refreshes + 1)
                state.progress.refreshes += 1
            self.student_round(round_)
            state.progress.student_rounds = round_
            self.save()
        final = fed.student_rounds
        if final > 0 and not self.selection.evaluated(Model.STUDENT, final, "test"):
            selected = self.selection.finish(Model.STUDENT, final, {"student": state.student, "head": state.head})
            state.student, state.head = selected["student"], selected["head"]
            self.selection.evaluate(
                Model.STUDENT, final, state.student
            )  # the test split, read once: the selected student's figure
            self.save()

    def _refreshes_due(self, round_: int) -> int:
        """Bank refreshes that should be done before student round ``round_``: the first, then
        one every ``fed.bank_refresh_every`` rounds (0: never again)."""
        every = self.cfg.fed.bank_refresh_every
        return 1 + (round_ - 1) // every if every > 0 else 1

    # ------------------------------------------------------------------ phases

    def discover(self) -> None:
        """Ask every node for its metadata; keep the sites that speak this protocol with a known
        modality and a unique name; refuse to start without enough of them or without one
        list of class names."""
        node_ids = list(self.channel.grid.get_node_ids())
        requests = {n: make("discover", self.dims, config={"protocol": PROTOCOL_VERSION}) for n in node_ids}
        replies, dropped = self.channel.exchange(Phase.DISCOVER, requests)
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
        self.rounds.mark(Phase.DISCOVER, "discovery", self.sites, dropped)
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
        state, seed = self.run_state, self.rounds.seed(Phase.TEACHER, round_)
        nodes = self.rounds.sample(Modality.NBI, seed)
        config = {
            "round": round_,
            "seed": seed,
            "local-epochs": self.cfg.train.local_epochs,
            **self.rounds.span(round_, self.cfg.fed.teacher_rounds),
            "evaluate": "val" if round_ > 1 else "",
        }
        weights = {"teacher": state.teacher, "head": state.head}
        request = make("teacher.train", self.dims, config=config, weights=weights)
        reference = {block: weight_shapes(w) for block, w in weights.items()}
        step = f"teacher round {round_}"
        replies, dropped = self.rounds.exchange(Phase.TEACHER, step, {n: request for n in nodes}, reference)
        self.rounds.require(step, Modality.NBI, len(replies), dropped)
        if round_ > 1:  # the teacher sent is round_ - 1's global one
            evaluation = self.selection.record(Model.TEACHER, round_ - 1, replies, "eval-examples", "val")
            self.selection.offer(Model.TEACHER, round_ - 1, evaluation, weights)
        used, new = self.rounds.fedavg(Phase.TEACHER, Modality.NBI, replies, weights)
        state.teacher, state.head = new["teacher"], new["head"]
        loss = float(np.mean([replies[n].config["loss"] for n in used]))
        state.metrics["teacher"].append({"round": round_, "loss": loss, "sites": [self.channel.name(n) for n in used]})
        self.rounds.board.scalars("teacher", {"loss": loss}, round_)
        log.info("[teacher %d/%d] loss %.4f from %d NBI site(s)", round_, self.cfg.fed.teacher_rounds, loss, len(used))

    def student_round(self, round_: int) -> None:
        """WLI sites (and those a baseline plug-in adds) train the student against the bank
        (FedAvg); WLI replies carry the previous global student's val evaluation."""
        state, seed = self.run_state, self.rounds.seed(Phase.STUDENT, round_)
        nodes = self.rounds.sample(Modality.WLI, seed)
        for plugin in self.plugins:
            nodes += plugin.extra_sites(self.rounds, seed)
        weights = {"student": state.student, "head": state.head}
        by_modality = {m: self._student_request(round_, seed, m) for m in {self.sites[n].modality for n in nodes}}
        requests = {n: by_modality[self.sites[n].modality] for n in nodes}
        reference = {block: weight_shapes(w) for block, w in weights.items()}
        replies, dropped = self.rounds.exchange(Phase.STUDENT, f"student round {round_}", requests, reference)
        wli_replies = {n: r for n, r in replies.items() if self.sites[n].modality == Modality.WLI}
        self.rounds.require(f"student round {round_}", Modality.WLI, len(wli_replies), dropped)
        if round_ > 1:  # the student sent is round_ - 1's global one
            evaluation = self.selection.record(Model.STUDENT, round_ - 1, wli_replies, "eval-examples", "val")
            self.selection.offer(Model.STUDENT, round_ - 1, evaluation, weights)
        used, new = self.rounds.fedavg(Phase.STUDENT, Modality.WLI, replies, weights)
        state.student, state.head = new["student"], new["head"]
        for plugin in self.plugins:
            plugin.after_aggregation(self.rounds, [replies[n] for n in used])
        self._record_student_round(round_, replies, used)

    def _student_request(self, round_: int, seed: int, modality: str):
        """The student round's request to a site of ``modality``: the global student and query
        head, the bank and what the baseline plug-ins add; the student sent is round_ - 1's, so WLI sites
        score it on val (model selection; the student is a WLI model)."""
        state = self.run_state
        config = {
            "round": round_,
            "seed": seed,
            "local-epochs": self.cfg.train.local_epochs,
            "group-losses": (round_ - 1) * self.cfg.train.local_epochs >= self.cfg.pagkd.warmup_epochs,
            "use-bank": bool(self.distil),
            **self.rounds.span(round_, self.cfg.fed.student_rounds),
            "evaluate": "val" if round_ > 1 and modality == Modality.WLI else "",
        }
        arrays = dict(state.bank) if self.distil else {}  # the bank goes only to a student that distils from it
        for plugin in self.plugins:
            arrays.update(plugin.request_arrays(self.rounds))
        return make(
            "student.train", self.dims, arrays=arrays, weights={"student": state.student, "head": state.head}, config=config
        )

    def _record_student_round(self, round_: int, replies: dict, used: list[int]) -> None:
        parts = {k: float(np.mean([replies[n].config[k] for n in used])) for k in ("loss", "ce", "den", "pro")}
        self.metrics["student"].append({"round": round_, **parts, "sites": [self.channel.name(n) for n in used]})
        self.rounds.board.scalars("student", parts, round_)
        log.info(
            "[student %d/%d] loss %.4f (ce %.4f den %.4f pro %.4f) from %d site(s)",
            round_,
            self.cfg.fed.student_rounds,
            parts["loss"],
            parts["ce"],
            parts["den"],
            parts["pro"],
            len(used),
        )

    def finish(self) -> RunResult:
        """Final outputs (:mod:`server.outputs`): metrics.json, egress.json, config.json, the
        student checkpoint, plots."""
        state = self.run_state
        result = run_summary(
            state.metrics,
            self.ledger.snapshot(),
            state.student,
            state.bank,
            [s.__dict__ for s in self.sites.values()],
            self.class_names,
            state.progress.student_rounds,
            self.cfg.fed.min_site_share,
            self.privacy_spent(),
            self.cfg.data.root,
        )
        write_outputs(self.run_dir, result, self.ledger.egress, self.cfg, state.student, self.class_names)
        self.rounds.board.close()
        for model, problems in result.not_learned.items():
            log.warning("the %s did not learn: %s; %s", model, "; ".join(problems), result.not_learned_fixes)
        if result.status == "degraded":
            log.warning(  # deploy/follow.py reads this line: the operator's exit status
                "run DEGRADED, %s (%.0f %% of the sites took part throughout, fed.min_site_share = %.0f %%): lost %s",
                "accepted" if result.accepted else "NOT accepted",
                100 * result.site_share,
                100 * result.min_site_share,
                ", ".join(result.sites_lost),
            )
        log.info("run finished: %s", self.run_dir)
        return result

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
        log.info("resuming %s at %s", self.run_dir, self.run_state.progress)
        return True

    def privacy_spent(self) -> dict[str, Any]:
        """(epsilon, delta) each NBI site has spent on its knowledge statistics (:mod:`server.accounting`)."""
        return privacy_spent(self.cfg.privacy, self.ledger.releases)


def run_federation(grid: Grid, cfg: Config, run_dir: Path, start: RunState | None = None) -> RunResult:
    ensure_run_folder(run_dir)
    return Protocol(grid, cfg, run_dir, start).run()
