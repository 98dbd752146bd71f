"""Which baseline plug-ins a run config turns on: one table that the server's half
(:mod:`server.baselines`: site selection, what the server keeps from the replies) and the
site's half (:mod:`client.baselines`: who trains, the loss term, what a reply carries) both read.

A baseline is a plug-in of the student rounds, not a branch inside them: PaGKD and the
WLI-only baseline need none (the config's group terms on or off).
"""

from __future__ import annotations

from typing import Callable

from common.config import Config

# Each baseline plug-in with the config that turns it on.
ENABLED_BY: dict[str, Callable[[Config], bool]] = {
    # The joint cross-modal baseline: NBI sites train the student too (one model over both modalities).
    "joint": lambda cfg: cfg.fed.student_sites == "all",
    # FedProto-style: a regulariser to the global class prototypes (the summed class means of
    # the students' embeddings).
    "fedproto": lambda cfg: cfg.fed.fedproto_weight > 0,
}


def enabled_baselines(cfg: Config) -> list[str]:
    """The names of the plug-ins ``cfg`` turns on, in :data:`ENABLED_BY` order."""
    return [name for name, enabled in ENABLED_BY.items() if enabled(cfg)]
