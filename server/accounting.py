"""Privacy accounting of a run: the (epsilon, delta) each NBI site has spent on its knowledge
statistics, from the releases the ledger counted (:class:`server.channel.Ledger`).

The mechanism is :mod:`common.privacy`'s (what a site clips and noises, Flower-free); this is
its server-side budget. Every release is :data:`common.privacy.MECHANISMS_PER_RELEASE`
Gaussian mechanisms of the configured noise multiplier, composed with Flower's RDP accountant
(dp-accounting); neighbouring datasets add or remove one group, no sampling amplification.
"""

from __future__ import annotations

from typing import Any, Mapping

from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, RdpAccountant, SamplingMethod
from flwr.serverapp import PrivacyConfig as AccountingConfig

from common.config import PrivacyConfig
from common.privacy import MECHANISMS_PER_RELEASE


def site_epsilon(privacy: PrivacyConfig, releases: int) -> float | None:
    """Epsilon at ``privacy.delta`` after ``releases`` releases; None without noise (no DP guarantee)."""
    if privacy.noise_multiplier <= 0:
        return None
    accountant = RdpAccountant(
        AccountingConfig(privacy.delta, 1, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION)
    )
    accountant.compose(GaussianPrivacyEvent(privacy.noise_multiplier, 1, 1), count=releases * MECHANISMS_PER_RELEASE)
    return accountant.get_epsilon(privacy.delta)


def privacy_spent(privacy: PrivacyConfig, releases: Mapping[str, int]) -> dict[str, Any]:
    """The run's privacy report (``metrics.json["privacy"]``): the settings, each site's
    releases and epsilon, and ``max_epsilon`` (None unless every site has one)."""
    report: dict[str, Any] = {
        "noise_multiplier": privacy.noise_multiplier,
        "clip": privacy.clip,
        "delta": privacy.delta,
        "secure_aggregation": privacy.secure_aggregation,
        "releases": releases,
        "epsilon": {},
    }
    for site, count in releases.items():
        report["epsilon"][site] = site_epsilon(privacy, count)
    spent = [e for e in report["epsilon"].values() if e is not None]
    report["max_epsilon"] = max(spent) if spent and len(spent) == len(releases) else None
    return report
