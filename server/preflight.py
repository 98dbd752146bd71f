"""Refuse, before anything starts, a simulation that cannot work on this machine
(:func:`preflight`): the run config, the sites against the SuperNodes asked for, the CPUs and
GPUs asked for; the message lists every problem with its fix. :mod:`server.launch` calls it.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from server.processes import FlowerProcessError

# What to do when a federation lacks sites of a modality (common.modality.Modality's values:
# the launcher imports no torch before it checks a run, and importing common would).
FIXES = {
    "nbi": "add NBI sites, or train a WLI-only student: fed.student_init=scratch pagkd.use_pro=false pagkd.use_den=false",
    "wli": "add WLI sites",
}


class SimulationError(FlowerProcessError):
    """The run failed or could not be submitted; the message carries Flower's reason."""


def preflight(
    run_config: Mapping[str, Any], num_supernodes: int, cpus_per_client: int = 1, gpus_per_client: float = 0.0, report=print
) -> dict[str, Any]:
    """Refuse, before Ray starts, a run that cannot work here; the message lists every problem
    and its fix. Checks the run config, the sites (synthetic or ``sites.toml``) against the
    SuperNodes asked for, and the CPUs/GPUs asked for against this machine's. With
    ``data.root`` it also checks every site's folder (:func:`client.sitecheck.check_federation`:
    splits, class names, counts, modality declarations; no decoding) and passes one summary
    table to ``report``. Returns the run-config keys the sites settle: with ``data.class_names``
    empty, the class names they agree on (so every site and the server use that one list)."""
    import common  # noqa: F401  (torchvision shim)
    import torch
    from client.sitecheck import check_federation, format_reports
    from common.config import config_from_flat

    from common.config import ConfigError
    from common.modality import Modality

    try:
        cfg = config_from_flat(run_config)  # names an unknown key or a bad value
    except ConfigError as err:
        raise SimulationError(f"the run cannot start: {err}") from err
    problems: list[str] = []
    settled: dict[str, Any] = {}
    if cfg.data.root:
        reports, problems = check_federation(cfg.data.root, cfg)
        if not reports:  # no readable sites.toml: nothing else can be checked
            raise SimulationError("the run cannot start:\n  - " + "\n  - ".join(problems))
        report(format_reports(reports, problems))
        problems += [f"site '{r.name}': {p}" for r in reports for p in r.problems]
        names = {r.class_names for r in reports if r.class_names}
        if not cfg.data.class_names and len(names) == 1:
            agreed = next(iter(names))
            settled = {"data.class_names": ",".join(agreed), "data.num_classes": len(agreed)}
        modalities = [r.modality for r in reports]
        where = f"{cfg.data.root}/sites.toml"
    else:
        modalities = [Modality.NBI] * cfg.data.nbi_sites + [Modality.WLI] * cfg.data.wli_sites
        where = "data.nbi_sites + data.wli_sites"
    if num_supernodes != len(modalities):
        problems.append(
            f"{num_supernodes} SuperNode(s) asked for but {where} gives {len(modalities)} site(s): "
            f"one SuperNode per site (--supernodes {len(modalities)})"
        )
    distil = cfg.needs_nbi_sites
    for modality, minimum, needed in ((Modality.NBI, cfg.fed.min_nbi_sites, distil), (Modality.WLI, cfg.fed.min_wli_sites, True)):
        have = modalities.count(modality)
        if needed and have < max(1, minimum):
            problems.append(
                f"{have} {modality.label} site(s) in {where}, the run needs at least {max(1, minimum)}: {FIXES[modality]}"
            )
    if cfg.privacy.secure_aggregation and distil and modalities.count(Modality.NBI) < 2:
        problems.append(
            f"privacy.secure_aggregation needs >= 2 NBI sites ({where} gives {modalities.count(Modality.NBI)}): "
            "a lone site's masked sum would be its own statistics; add NBI sites or set it to false"
        )
    cores = os.cpu_count() or 1
    if cpus_per_client < 1 or cpus_per_client > cores:
        problems.append(f"client-resources-num-cpus = {cpus_per_client}, this machine has {cores} CPU core(s): use 1..{cores}")
    gpus = torch.cuda.device_count()
    if gpus_per_client > 0 and gpus == 0:
        problems.append(f"client-resources-num-gpus = {gpus_per_client} but no CUDA GPU is visible: use 0 (train.device=cpu)")
    elif gpus_per_client > max(gpus, 1):
        problems.append(f"client-resources-num-gpus = {gpus_per_client} > the {gpus} GPU(s) here: use a fraction such as 0.25")
    if cfg.train.device.startswith("cuda") and gpus == 0:
        problems.append(f"train.device = '{cfg.train.device}' but no CUDA GPU is visible: use train.device=auto or cpu")
    if problems:
        raise SimulationError("the run cannot start:\n  - " + "\n  - ".join(problems))
    return settled
