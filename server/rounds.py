"""What every round of the protocol does with the sites: sample them, exchange messages,
screen and record each site's part, require enough replies, and average their weights.

:class:`Rounds` holds the discovered sites and the :class:`server.channel.Channel`; the phases
(:mod:`server.workflow`, :mod:`server.knowledge`, :mod:`server.selection`) call it. It records
each site's part in ``metrics["site_status"]`` of the run's :class:`server.state.RunState`:
``{site: {phase: "took part" | "dropped in <step>: <reason>"}}``, every discovered site.
"""

from __future__ import annotations

import logging
import random
from typing import Iterable

import numpy as np

from common.config import Config
from common.modality import Modality, Phase
from common.progress import MetricsBoard
from common.records import Payload
from server import aggregation, trust
from server.channel import Channel
from server.discovery import FederationError, SiteInfo
from server.state import RunState

log = logging.getLogger("fedpagkd.server")

Blocks = dict[str, dict[str, np.ndarray]]  # {block ("student", "head", ...): state dict}

# The phases whose rounds draw seeds, numbered in the seeds (Rounds.seed).
SEEDED_PHASES = {Phase.TEACHER: 1, Phase.KNOWLEDGE: 2, Phase.STUDENT: 3}


class Rounds:
    """The sites of one run and the exchanges with them."""

    def __init__(self, cfg: Config, channel: Channel, state: RunState):
        self.cfg, self.channel, self.state = cfg, channel, state
        self.sites: dict[int, SiteInfo] = {}  # node id -> what it declared at discovery
        self.board = MetricsBoard(None)  # a real one once the run starts (TensorBoard, where installed)

    def name(self, node_id: int) -> str:
        return self.channel.name(node_id)

    def seed(self, phase: Phase, round_: int) -> int:
        """The seed of round (or refresh) ``round_`` of ``phase``: distinct per run seed, phase and round."""
        return self.cfg.train.seed * 100_000 + SEEDED_PHASES[phase] * 10_000 + round_

    @staticmethod
    def span(round_: int, rounds: int) -> dict[str, float]:
        """Round ``round_`` of ``rounds`` covers [(r-1)/R, r/R] of the learning-rate schedule."""
        return {"schedule-start": (round_ - 1) / rounds, "schedule-end": round_ / rounds}

    def sites_of(self, modality: Modality) -> list[int]:
        return [n for n, s in self.sites.items() if s.modality == modality]

    def minimum(self, modality: Modality) -> int:
        return self.cfg.fed.min_nbi_sites if modality == Modality.NBI else self.cfg.fed.min_wli_sites

    def sample(self, modality: Modality, round_seed: int) -> list[int]:
        """``fed.fraction_train`` of the ``modality`` sites (at least its minimum), drawn by ``round_seed``."""
        nodes = sorted(self.sites_of(modality))
        count = max(self.minimum(modality), int(np.ceil(self.cfg.fed.fraction_train * len(nodes))))
        return sorted(random.Random(round_seed).sample(nodes, min(count, len(nodes))))

    def require(self, step: str, modality: Modality, usable: int, dropped: dict[int, str]) -> None:
        """Stop the run (:class:`FederationError` naming each dropped site and why) when fewer
        than ``fed.min_<modality>_sites`` replies are usable."""
        modality, minimum = Modality(modality), self.minimum(modality)
        if usable < minimum:
            reasons = "; ".join(f"'{self.name(n)}': {r}" for n, r in dropped.items()) or "none answered"
            raise FederationError(
                f"{step}: only {usable} usable {modality.label} site(s), fed.min_{modality}_sites = {minimum}. Dropped: {reasons}"
            )

    def exchange(
        self,
        phase: Phase,
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
                trust.screen_reply(requests[node_id], replies[node_id], self.sites[node_id].declared(), self.name(node_id))
            except trust.TrustError as err:
                dropped[node_id] = str(err)
                del replies[node_id]
                log.warning("[%s] dropped site '%s': %s", phase, self.name(node_id), err)
        self.mark(phase, step, replies, dropped)
        return replies, dropped

    def mark(self, phase: Phase, step: str, took_part: Iterable[int], dropped: dict[int, str]) -> None:
        """Record each site's part in ``phase``: the first drop stays (a later round taken
        part in does not erase it: that is what a degraded run must show)."""
        phase = str(phase)  # the state's keys stay plain strings
        status = self.state.metrics.setdefault("site_status", {})
        for node_id in took_part:
            status.setdefault(self.name(node_id), {}).setdefault(phase, "took part")
        for node_id, reason in dropped.items():
            entry = status.setdefault(self.name(node_id), {})
            if not entry.get(phase, "").startswith("dropped"):
                entry[phase] = f"dropped in {step}: {reason}"

    def fedavg(self, phase: Phase, modality: Modality, replies: dict[int, Payload], blocks: Blocks) -> tuple[list[int], Blocks]:
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
            log.warning("[%s] dropped site '%s': %s", phase, self.name(node_id), reason)
        self.mark(phase, f"{phase} aggregation", (), reasons)
        used = sorted((n for n in replies if n not in outliers), key=self.name)  # order-independent sums
        self.require(phase, modality, sum(self.sites[n].modality == modality for n in used), reasons)
        states = {block: [replies[n].weights[block] for n in used] for block in blocks}
        weights = aggregation.capped_weights([replies[n].config["num-examples"] for n in used], fed.max_site_share)
        new, scales = aggregation.aggregate_weights(states, weights, blocks, fed.aggregation, fed.trim_fraction, fed.clip_ratio)
        for block, block_scales in scales.items():
            if clipped := [self.name(n) for n, scale in zip(used, block_scales) if scale < 1]:
                log.info(
                    "[%s] clipped the '%s' update of %s to %.1fx the median norm",
                    phase,
                    block,
                    ", ".join(clipped),
                    fed.clip_ratio,
                )
        return used, new
