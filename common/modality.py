"""Typed names of the protocol: the two modalities and the run's phases.

Both are ``StrEnum``: a member *is* its wire string (``Modality.NBI == "nbi"``, JSON and
f-strings write ``nbi``), so messages, metrics.json and site configs keep their spelling while
the code names each value once.
"""

from __future__ import annotations

from enum import StrEnum


class Modality(StrEnum):
    """The imaging a site holds: NBI sites teach, WLI sites learn."""

    WLI = "wli"
    NBI = "nbi"

    @property
    def label(self) -> str:
        """How logs and errors write it (``NBI``)."""
        return self.value.upper()


class Phase(StrEnum):
    """A step of the protocol (docs/method.md, "The federated protocol"); the keys of metrics.json's per-phase lists
    and of each site's status."""

    DISCOVER = "discover"
    TEACHER = "teacher"
    KNOWLEDGE = "knowledge"
    STUDENT = "student"
    EVALUATE = "evaluate"


class Model(StrEnum):
    """A global model the run trains and selects."""

    TEACHER = "teacher"
    STUDENT = "student"

    @property
    def modality(self) -> Modality:
        """The sites that train and score it: the teacher is an NBI model, the student a WLI one."""
        return Modality.NBI if self is Model.TEACHER else Modality.WLI
