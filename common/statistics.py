"""The knowledge statistics NBI sites release, as wire fields: one table and what follows from it.

:data:`KNOWLEDGE_STATISTICS` has a :class:`Statistic` per kind of point an NBI site clusters
(group prototype sets [M, D] in S slots per class, foreground and background tokens [D] in L
slots). The bank statistics, the k-means seeds, the centroids, the masked (secure-aggregation)
fields, the DP float/count split and the sum/count pairs are all derived from it, and
:func:`mean_of` is the one sum -> mean conversion. :class:`ArrayField` (one named, typed,
symbolically shaped array of a message) is defined here because the table is made of them;
:mod:`common.records` builds every message schema from these fields and re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

F32, I64 = "float32", "int64"  # the wire's two dtypes


@dataclass(frozen=True)
class ArrayField:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[str | int, ...]  # symbolic, resolved with Dims
    counts: bool = False  # a count: integer-valued and >= 0


class _Key:
    """A :class:`Statistic`'s wire key: ``<statistic name>_<attribute name>``."""

    def __set_name__(self, owner: type, attribute: str) -> None:
        self.suffix = attribute

    def __get__(self, stat: Any, owner: type | None = None) -> Any:
        return self if stat is None else f"{stat.name}_{self.suffix}"


@dataclass(frozen=True)
class Statistic:
    """One kind of point an NBI site clusters per class and summarises as sums and counts.

    Per class there are ``slots`` clusters (a symbolic dim: S sub-types or L codebook
    centroids); a point has shape ``point``. The wire carries, per class and slot, the sum of
    the points (``<name>_sum`` [C, slots, *point]) and their count (``<name>_count`` [C, slots]).
    (Sums of squares, the bank's spread, were sent until protocol 5 and read by nothing: they
    are no longer computed, noised or sent; docs/method.md, issue 12.) The k-means
    seeds carry the same sums and counts under ``<name>_seed_sum`` / ``<name>_seed_count``, and
    the server's Lloyd step sends the current ``<name>_centroids`` [C, slots, *point].
    """

    name: str
    slots: str  # symbolic dim of the clusters per class
    point: tuple[str, ...]  # symbolic shape of one point
    unit: str  # what a count counts

    # Its wire keys, "<name>_<attribute>": e.g. prototype_sum, foreground_seed_count.
    sum, count, seed_sum, seed_count, centroids = _Key(), _Key(), _Key(), _Key(), _Key()

    @property
    def shape(self) -> tuple[str, ...]:
        """[C, slots, *point]: a sum's (and the centroids') symbolic shape."""
        return ("C", self.slots) + self.point


# THE table of knowledge statistics: every schema, the DP split, the masked fields, the
# sum / count pairs and the bank's means below are derived from it. Adding a statistic is
# adding a row (and the site's points for it, client/knowledge.py).
KNOWLEDGE_STATISTICS = (
    Statistic("prototype", "S", ("M", "D"), "groups"),  # group prototype sets
    Statistic("foreground", "L", ("D",), "tokens"),  # foreground token codebook
    Statistic("background", "L", ("D",), "tokens"),  # background token codebook
)
STATISTICS = {s.name: s for s in KNOWLEDGE_STATISTICS}
IMAGE_COUNT = "image_count"  # [C]: images behind each class's sums


def _bank_fields() -> tuple[ArrayField, ...]:
    fields_: list[ArrayField] = []
    for stat in KNOWLEDGE_STATISTICS:
        fields_.append(ArrayField(stat.sum, F32, stat.shape))
        fields_.append(ArrayField(stat.count, I64, ("C", stat.slots), counts=True))
    return tuple(fields_) + (ArrayField(IMAGE_COUNT, I64, ("C",), counts=True),)


# Sufficient statistics of the NBI bank: sums and counts per class (and sub-type / centroid).
BANK_STATISTICS = _bank_fields()

# Seeds for the federated k-means: per-site cluster sums and counts, each cluster made of
# at least K_min images (enforced by the site, audited by the tests).
KNOWLEDGE_SEEDS_FIELDS = tuple(
    field_
    for s in KNOWLEDGE_STATISTICS
    for field_ in (ArrayField(s.seed_sum, F32, s.shape), ArrayField(s.seed_count, I64, ("C", s.slots), counts=True))
)

# Secure aggregation (common/secagg.py): the bank statistics in fixed point plus this site's
# pairwise masks, mod 2**64. One site's values are uniform noise; only the sum over sites decodes.
MASKED_BANK_STATISTICS = tuple(ArrayField(f.name, I64, f.shape) for f in BANK_STATISTICS)

# The server's current codebooks, sent with each federated Lloyd step.
CENTROIDS = tuple(ArrayField(s.centroids, F32, s.shape) for s in KNOWLEDGE_STATISTICS)

# Differential privacy (common/privacy.py): the float sums get noise scaled by the clip, the
# counts noise scaled by the count sensitivity.
DP_FLOAT_KEYS = tuple(f.name for f in BANK_STATISTICS if not f.counts)
DP_COUNT_KEYS = tuple(f.name for f in BANK_STATISTICS if f.counts)

# Each float sum of the bank and the count it is divided by to read it as a mean.
SUM_COUNT_PAIRS = tuple((s.sum, s.count) for s in KNOWLEDGE_STATISTICS)


def seeds_from_statistics(stats: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A site's local cluster statistics (bank keys) as the k-means seeds it sends."""
    return {key: stats[source] for s in KNOWLEDGE_STATISTICS for key, source in ((s.seed_sum, s.sum), (s.seed_count, s.count))}


def mean_of(total: np.ndarray, count: np.ndarray) -> np.ndarray:
    """A sum read as a mean: ``total`` [*slots, *point] / ``count`` [*slots] (at least 1, so a
    slot with no point stays 0), in ``total``'s dtype. The one sum -> mean conversion: the
    site's bank (:meth:`common.losses.KnowledgeBank.from_statistics`) and the server's robust
    aggregation (per site) both read it."""
    count = np.maximum(count, 1).astype(total.dtype)
    return total / count.reshape(count.shape + (1,) * (total.ndim - count.ndim))


def statistic_means(stats: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every float sum of a bank (:data:`BANK_STATISTICS`) as its mean (same keys and shapes)."""
    return {name: mean_of(stats[name], stats[count]) for name, count in SUM_COUNT_PAIRS}
