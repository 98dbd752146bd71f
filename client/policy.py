"""What a site decides for itself, from its own node config, before and after every message.

* ``app-digest`` (e.g. ``'sha256:4d48...'``, printed by ``python -m deploy.bundle``): the only
  app bundle this site runs. Any other bundle is refused before a handler runs, with a log line
  ``site '<name>' REFUSES app bundle sha256:... ...`` and an error reply to the coordinator.
* ``device`` (``cpu``, ``cuda``, ``cuda:1``, ``auto``): the site's own device, instead of the
  coordinator's ``train.device``.
* ``state-dir``: the site's own folder; its egress log is ``<state-dir>/egress.jsonl``
  (:mod:`client.egress`).

Deployment ClientApp processes also end with their SuperNode (:mod:`common.lifetime`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from pathlib import Path
from typing import Any, Mapping

from common.bundle import tree_digest
from common.config import Config
from common.lifetime import exit_with_service

log = logging.getLogger(__name__)
APP_DIGEST_KEY, DEVICE_KEY = "app-digest", "device"
APP_DIR = Path(__file__).resolve().parents[1]  # the installed bundle (a FAB folder in FLWR_HOME/apps/)


class UntrustedBundle(PermissionError):
    """The bundle this ClientApp runs from is not the one the site pinned."""


@functools.lru_cache(maxsize=1)
def running_digest() -> str:
    return tree_digest(APP_DIR)


def check_bundle(node_config: Mapping[str, Any], site: str) -> None:
    pinned = str(node_config.get(APP_DIGEST_KEY, "") or "")
    if not pinned:
        return
    actual = running_digest()
    if actual != pinned:
        log.error("site '%s' REFUSES app bundle %s (%s): its node config trusts only %s='%s'", site, actual, APP_DIR, APP_DIGEST_KEY, pinned)
        raise UntrustedBundle(
            f"site '{site}' refuses app bundle {actual}: it trusts only {APP_DIGEST_KEY}='{pinned}' (its node config). "
            "Submit the release the sites pinned, or the site updates its pin after reviewing the new bundle "
            "(python -m deploy.bundle prints the digest)"
        )


def site_config(cfg: Config, node_config: Mapping[str, Any], site: str) -> Config:
    """``cfg`` with the site's own ``device`` (node config) in place of ``train.device``."""
    device = str(node_config.get(DEVICE_KEY, "") or "")
    if not device:
        return cfg
    from common.device import pick_device

    try:
        pick_device(device)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"site '{site}': node config {DEVICE_KEY}='{device}' is unusable here ({err}); "
                         f"set {DEVICE_KEY}='cpu' or 'auto' in this site's node config") from None
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=device))


def guard_process() -> None:
    """In a deployment ClientApp process: exit when the SuperNode (or its SuperExec) is gone."""
    if Path(sys.argv[0]).name == "flwr-clientapp":
        exit_with_service("flwr-clientapp")
