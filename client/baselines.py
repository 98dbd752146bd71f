"""Baselines as plug-ins of the student rounds, the site's half (the server's half is
:mod:`server.baselines`; :mod:`common.baselines` says which a config turns on).

A :class:`SitePlugin` says which sites train the student (:attr:`~SitePlugin.modalities`) and
adds a term to the student's loss (:meth:`~SitePlugin.loss_term`); the term sees every step's
tokens and says what the reply carries (:meth:`LossTerm.reply_arrays`). :func:`train_student`
(:mod:`client.train`) calls the terms; it knows no baseline by name.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from common.baselines import enabled_baselines
from common.config import Config
from common.losses import prototype_regulariser
from common.modality import Modality


class LossTerm:
    """A baseline's term in the student's loss."""

    def __call__(self, tokens: torch.Tensor, labels: torch.Tensor, last_epoch: bool) -> tuple[torch.Tensor | None, dict]:
        """tokens [B, N, D] (the student's embedded tokens), labels [B] -> (the weighted term to
        add to the loss, or None for none this step; its logged parts)."""
        raise NotImplementedError

    def reply_arrays(self) -> dict[str, np.ndarray]:
        """What the site's reply carries for this term."""
        return {}


class FedProtoTerm(LossTerm):
    """``weight`` x the MSE of each image's mean embedded token to its class's global prototype
    (:func:`common.losses.prototype_regulariser`); over the last local epoch it sums those
    embeddings per class, the statistics the server turns into the next global prototypes."""

    def __init__(self, weight: float, arrays: Mapping[str, np.ndarray]):
        """``arrays``: the request's ``class_prototype_sum`` [C, D] and ``class_prototype_count`` [C]
        (all zero before the first aggregation: no regulariser yet)."""
        counts = torch.from_numpy(arrays["class_prototype_count"])
        means = torch.from_numpy(arrays["class_prototype_sum"]) / counts.clamp_min(1)[:, None]
        self.weight = weight
        self.prototypes = (means, counts > 0) if counts.sum() > 0 else None
        self.sum = torch.zeros(means.shape, dtype=torch.float64)
        self.count = torch.zeros(counts.shape, dtype=torch.long)

    def __call__(self, tokens: torch.Tensor, labels: torch.Tensor, last_epoch: bool) -> tuple[torch.Tensor | None, dict]:
        embeddings = tokens.float().mean(dim=1)  # [B, D]
        term, parts = None, {}
        if self.prototypes is not None:
            reg = prototype_regulariser(embeddings, labels, *(t.to(embeddings.device) for t in self.prototypes))
            term, parts = self.weight * reg, {"proto_reg": reg.item()}
        if last_epoch:
            self.sum.index_add_(0, labels.cpu(), embeddings.detach().cpu().double())
            self.count += torch.bincount(labels.cpu(), minlength=len(self.count))
        return term, parts

    def reply_arrays(self) -> dict[str, np.ndarray]:
        return {"class_prototype_sum": self.sum.float().numpy(), "class_prototype_count": self.count.numpy()}


class SitePlugin:
    """No change: WLI sites train the student with the PaGKD loss alone."""

    modalities: tuple[Modality, ...] = (Modality.WLI,)

    def loss_term(self, cfg: Config, arrays: Mapping[str, np.ndarray]) -> LossTerm | None:
        """The term this baseline adds to a student round's loss (``arrays``: the request's)."""
        return None


class JointSites(SitePlugin):
    """NBI sites train the student too (``fed.student_sites = all``)."""

    modalities = (Modality.WLI, Modality.NBI)


class FedProto(SitePlugin):
    """The FedProto-style regulariser (``fed.fedproto_weight`` > 0)."""

    def loss_term(self, cfg: Config, arrays: Mapping[str, np.ndarray]) -> LossTerm | None:
        return FedProtoTerm(cfg.fed.fedproto_weight, arrays)


# The site's half of each plug-in of common.baselines.ENABLED_BY.
PLUGINS: dict[str, type[SitePlugin]] = {"joint": JointSites, "fedproto": FedProto}


def site_plugins(cfg: Config) -> list[SitePlugin]:
    return [PLUGINS[name]() for name in enabled_baselines(cfg)]


def student_modalities(cfg: Config) -> tuple[Modality, ...]:
    """The sites that train the student: WLI ones, and those a plug-in adds."""
    return tuple(dict.fromkeys(m for plugin in [SitePlugin(), *site_plugins(cfg)] for m in plugin.modalities))


def loss_terms(cfg: Config, arrays: Mapping[str, np.ndarray]) -> list[LossTerm]:
    """The loss terms of the plug-ins ``cfg`` turns on, for one student round."""
    return [term for plugin in site_plugins(cfg) if (term := plugin.loss_term(cfg, arrays)) is not None]
