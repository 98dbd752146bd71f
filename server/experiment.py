"""Hydra entry point for federated runs: one ``flwr run`` simulation per (multi)run job.

    python -m server.experiment experiment=wli_only train.seed=1
    python -m server.experiment --multirun train.seed=0,1,2 experiment=default,wli_only

The composed config (``conf/federated.yaml`` + experiment + preset, both read from the registry
:mod:`common.presets`) is validated by the same typed schema as Flower's run config
(:func:`common.config.config_from_mapping`): an unknown key or a bad value stops here, before Ray
starts. Each job's run folder is its Hydra output folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import common  # noqa: F401
from common.config import config_from_mapping, config_to_flat
from common.presets import register_hydra_schema
from server.launch import simulate

log = logging.getLogger("fedpagkd.experiment")


@dataclasses.dataclass
class SimSection:
    supernodes: int | None = None
    cpus_per_client: int = 1
    gpus_per_client: float = 0.0
    ray_address: str = ""


register_hydra_schema("federated", {"sim": SimSection()})


@hydra.main(version_base=None, config_path="../conf", config_name="federated")
def main(conf: DictConfig) -> float:
    tree = OmegaConf.to_container(conf, resolve=True)
    sim = tree.pop("sim")
    cfg = config_from_mapping(tree)
    out = Path(HydraConfig.get().runtime.output_dir)
    overrides = config_to_flat(cfg) | {"fed.run_dir": str(out), "fed.run_name": "flower"}
    supernodes = sim["supernodes"] or cfg.data.nbi_sites + cfg.data.wli_sites
    env = {"RAY_ADDRESS": sim["ray_address"]} if sim["ray_address"] else None
    result = simulate(
        overrides,
        supernodes,
        sim["cpus_per_client"],
        sim["gpus_per_client"],
        work_dir=out / "flower",
        extra_env=env,
        stream=False,
    )
    final = json.loads((result.run_dir / "metrics.json").read_text())["final"]
    log.info("run %s %s in %.0f s: pooled WLI AUC %.4f", result.run_id, result.status, result.wall_s, final["auc"])
    return float(final["auc"])


if __name__ == "__main__":
    main()
