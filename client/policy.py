"""What a site decides for itself, from its own node config, before and after every message.

* ``device`` (``cpu``, ``cuda``, ``cuda:1``, ``auto``): the site's own device, instead of the
  coordinator's ``train.device``.
* ``state-dir``: the site's own folder; its egress log is ``<state-dir>/egress.jsonl``
  (:mod:`client.egress`).

Deployment ClientApp processes also end with their SuperNode (:mod:`common.lifetime`). Which
bundle a site runs is not decided here, inside the bundle, but by the site's own SuperNode before
the bundle is installed (``deploy/supernode.py``, ``--app-digest``).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Mapping

from common.config import Config
from common.lifetime import exit_with_service

DEVICE_KEY = "device"


def site_config(cfg: Config, node_config: Mapping[str, Any], site: str) -> Config:
    """``cfg`` with the site's own ``device`` (node config) in place of ``train.device``."""
    device = str(node_config.get(DEVICE_KEY, "") or "")
    if not device:
        return cfg
    from common.device import pick_device

    try:
        pick_device(device)
    except (RuntimeError, ValueError) as err:
        raise ValueError(
            f"site '{site}': node config {DEVICE_KEY}='{device}' is unusable here ({err}); "
            f"set {DEVICE_KEY}='cpu' or 'auto' in this site's node config"
        ) from None
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=device))


def guard_process() -> None:
    """In a deployment ClientApp process: exit when the SuperNode (or its SuperExec) is gone."""
    if Path(sys.argv[0]).name == "flwr-clientapp":
        exit_with_service("flwr-clientapp")
