"""The server side of a knowledge refresh (docs/method.md, "The federated protocol"); the site side is
:mod:`client.knowledge`.

:meth:`KnowledgeRefresh.run`: the NBI sites send k-means seeds (their own cluster statistics),
the server starts the codebooks from them, then ``pagkd.kmeans_iters`` federated Lloyd steps:
each site sums its points at the current centroids, the server adds the sums up exactly (or
robustly, ``fed.aggregation``) and moves the centroids (:mod:`server.aggregation`). The last
step's sums are the bank the students distil from. Under secure aggregation each site masks its
sums with pairwise masks (:mod:`common.secagg`); only the sum over the sites decodes.
"""

from __future__ import annotations

import json
import logging

from common import secagg
from common.modality import Modality, Model, Phase
from common.records import Payload, make
from server import aggregation
from server.discovery import FederationError
from server.rounds import Rounds
from server.selection import ModelSelection

log = logging.getLogger("fedpagkd.server")


class KnowledgeRefresh:
    """Rebuilds the run state's ``centroids`` and ``bank`` from the NBI sites."""

    def __init__(self, rounds: Rounds, selection: ModelSelection):
        self.rounds, self.selection = rounds, selection
        self.cfg, self.state = rounds.cfg, rounds.state

    def run(self, refresh: int, evaluate_teacher: bool = False) -> None:
        """Seeds, then ``pagkd.kmeans_iters`` federated Lloyd steps; the last sums are the bank.

        With ``evaluate_teacher`` the seed replies also carry the teacher's test scores (the
        teacher the seeds come from), recorded as its evaluation."""
        seed = self.rounds.seed(Phase.KNOWLEDGE, refresh)
        nodes, keys = self.seed_centroids(refresh, seed, evaluate_teacher)
        dims = self.rounds.channel.dims
        for iteration in range(1, self.cfg.pagkd.kmeans_iters + 1):
            self.state.bank, replies = self.lloyd_step(refresh, seed, iteration, nodes, keys)
            nodes = sorted(replies)
            if iteration < self.cfg.pagkd.kmeans_iters:
                self.state.centroids = aggregation.lloyd_centroids(self.state.bank, self.state.centroids, dims)
        groups = int(sum(r.config["groups"] for r in replies.values()))
        if groups == 0:  # distilling from an empty bank would silently turn PaGKD off
            raise FederationError(self._empty_bank(refresh, nodes))
        self._record(refresh, groups, nodes)

    def _empty_bank(self, refresh: int, nodes: list[int]) -> str:
        p, t = self.cfg.pagkd, self.cfg.train
        return (
            f"knowledge refresh {refresh}: the bank holds no group (NBI sites {[self.rounds.name(n) for n in nodes]} "
            f"formed none of >= pagkd.min_group_size = {p.min_group_size} images). A class-balanced batch of "
            f"train.batch_size = {t.batch_size} holds ~{t.batch_size // self.cfg.data.num_classes} images per class: "
            "lower pagkd.min_group_size / pagkd.group_size or raise train.batch_size"
        )

    def _record(self, refresh: int, groups: int, nodes: list[int]) -> None:
        images = self.state.bank["image_count"].tolist()
        self.state.metrics["knowledge"].append(
            {
                "refresh": refresh,
                "groups": groups,
                "images_per_class": images,
                "sites": [self.rounds.name(n) for n in nodes],
                "bank_bytes": int(sum(a.nbytes for a in self.state.bank.values())),
            }
        )
        log.info(
            "[knowledge %d] bank from %d group(s) of %s images per class, %d NBI site(s)", refresh, groups, images, len(nodes)
        )
        self.rounds.board.scalars("knowledge", {"groups": groups, "images": int(sum(images))}, refresh)

    def seed_centroids(self, refresh: int, seed: int, evaluate_teacher: bool) -> tuple[list[int], dict[int, str]]:
        """Ask the NBI sites for k-means seeds, start the centroids from them -> (the sites of
        the Lloyd steps, their public keys under secure aggregation, else {})."""
        nodes = sorted(self.rounds.sites_of(Modality.NBI))
        config = {"round": refresh, "seed": seed, "evaluate": "test" if evaluate_teacher else ""}
        weights = {"teacher": self.state.teacher, "head": self.state.head}
        request = make("knowledge.seed", self.rounds.channel.dims, config=config, weights=weights)
        step = f"knowledge refresh {refresh} (seeds)"
        replies, dropped = self.rounds.exchange(Phase.KNOWLEDGE, step, {n: request for n in nodes}, releases=True)
        self.rounds.require(step, Modality.NBI, len(replies), dropped)
        if evaluate_teacher:
            self.selection.record(Model.TEACHER, self.cfg.fed.teacher_rounds, replies, "eval-examples", "test")
        # Sorted by site name, not arrival order: the seeded k-means must not depend on who answers first.
        in_order = sorted(replies, key=self.rounds.name)
        self.state.centroids = aggregation.initial_centroids(
            [replies[n].arrays for n in in_order], self.rounds.channel.dims, seed
        )
        keys = self.public_keys(replies) if self.cfg.privacy.secure_aggregation else {}
        return sorted(keys or replies), keys

    def lloyd_step(self, refresh: int, seed: int, iteration: int, nodes: list[int], keys: dict[int, str]):
        """One federated Lloyd step: the NBI sites' sums at the current centroids, aggregated
        (exact sums, or robustly). Under secure aggregation (``keys``: each site's public key)
        the replies are masked and only their sum decodes; a site that drops out leaves masks
        that do not cancel, so the step restarts without it under a new attempt number (fresh
        masks). Returns (bank, the replies used)."""
        fed, name = self.cfg.fed, self.rounds.name
        step = f"knowledge refresh {refresh} (Lloyd step {iteration})"
        for attempt in range(len(nodes)):
            peers = json.dumps({name(n): keys[n] for n in nodes}) if keys else ""
            config = {"round": refresh, "seed": seed, "iteration": iteration, "peers": peers, "attempt": attempt}
            request = make("knowledge.stats", self.rounds.channel.dims, arrays=self.state.centroids, config=config)
            replies, dropped = self.rounds.exchange(Phase.KNOWLEDGE, step, {n: request for n in nodes}, releases=True)
            self.rounds.require(step, Modality.NBI, len(replies), dropped)
            in_order = [replies[n].arrays for n in sorted(replies, key=name)]
            if not keys:
                return aggregation.robust_statistics(
                    in_order, fed.aggregation, fed.trim_fraction, fed.clip_ratio, fed.max_site_share
                ), replies
            if not dropped:
                return aggregation.unmask_bank(in_order, self.rounds.channel.dims, step), replies
            if len(replies) < 2:
                raise FederationError(
                    f"{step}: secure aggregation needs >= 2 NBI sites, {len(replies)} left after dropping "
                    + "; ".join(f"'{name(n)}': {r}" for n, r in dropped.items())
                )
            log.warning(
                "[%s] restarting the masked sum without %s (their masks would not cancel)",
                step,
                ", ".join(f"'{name(n)}'" for n in dropped),
            )
            nodes = sorted(replies)
        raise FederationError(f"{step}: no masked sum completed")  # pragma: no cover (each attempt drops a site)

    def public_keys(self, seed_replies: dict[int, Payload]) -> dict[int, str]:
        """Each NBI site's key for this refresh's masked sums; a site without a valid key is
        left out of the refresh (it could not take part in the sum)."""
        keys: dict[int, str] = {}
        for node_id, reply in seed_replies.items():
            try:
                secagg.parse_public_key(reply.config["public-key"], f"site '{self.rounds.name(node_id)}'")
                keys[node_id] = reply.config["public-key"]
            except secagg.SecAggError as err:
                reason = f"{err} (privacy.secure_aggregation must be on there too)"
                log.warning("[knowledge] dropped site '%s': %s", self.rounds.name(node_id), reason)
                self.rounds.mark(Phase.KNOWLEDGE, "secure aggregation set-up", (), {node_id: reason})
        needed = max(2, self.cfg.fed.min_nbi_sites)
        if len(keys) < needed:
            raise FederationError(
                f"secure aggregation needs >= {needed} NBI sites with a key; "
                f"{len(keys)} sent one (a lone site's sum would be its own statistics)"
            )
        return keys
