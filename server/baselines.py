"""Baselines as plug-ins of the student rounds, the server's half (the site's half is
:mod:`client.baselines`).

A baseline changes the student rounds through hooks of :class:`StudentPlugin`, like a Flower
strategy variant overriding one hook of FedAvg: which sites train the student besides the WLI
ones (:meth:`~StudentPlugin.extra_sites`), and what the server keeps from the replies after
FedAvg (:meth:`~StudentPlugin.after_aggregation`). PaGKD itself and the WLI-only baseline need
none: they are the config's group terms on or off. :func:`student_plugins` picks those the
config turns on (:mod:`common.baselines`).
"""

from __future__ import annotations

import numpy as np

from common.baselines import enabled_baselines
from common.config import Config
from common.modality import Modality
from common.records import CLASS_PROTOTYPES, Payload
from server import aggregation
from server.rounds import Rounds


class StudentPlugin:
    """No change: every hook is a no-op."""

    def extra_sites(self, rounds: Rounds, round_seed: int) -> list[int]:
        """Node ids that train the student this round besides the sampled WLI sites."""
        return []

    def request_arrays(self, rounds: Rounds) -> dict[str, np.ndarray]:
        """What the student round's request carries for this baseline besides the bank."""
        return {}

    def after_aggregation(self, rounds: Rounds, used: list[Payload]) -> None:
        """Read what the ``used`` replies (the ones averaged, in site-name order) carry besides weights."""


class JointSites(StudentPlugin):
    """The joint cross-modal baseline (``fed.student_sites = all``): NBI sites train the student
    too, one model FedAvg'ed over both modalities."""

    def extra_sites(self, rounds: Rounds, round_seed: int) -> list[int]:
        return rounds.sample(Modality.NBI, round_seed)


class FedProto(StudentPlugin):
    """FedProto-style (``fed.fedproto_weight`` > 0): the global class prototypes are the summed
    class means of the embeddings the students send; they ride on the next round's request."""

    def request_arrays(self, rounds: Rounds) -> dict[str, np.ndarray]:
        return dict(rounds.state.class_prototypes)

    def after_aggregation(self, rounds: Rounds, used: list[Payload]) -> None:
        names = [f.name for f in CLASS_PROTOTYPES]
        rounds.state.class_prototypes = aggregation.sum_statistics([reply.arrays for reply in used], names)


# The server's half of each plug-in of common.baselines.ENABLED_BY.
PLUGINS: dict[str, type[StudentPlugin]] = {"joint": JointSites, "fedproto": FedProto}


def student_plugins(cfg: Config) -> list[StudentPlugin]:
    """The plug-ins ``cfg`` turns on (:func:`common.baselines.enabled_baselines`)."""
    return [PLUGINS[name]() for name in enabled_baselines(cfg)]
