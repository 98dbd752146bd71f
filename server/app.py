"""FedPaGKD ServerApp: resolve the config and the run folder, then run the protocol."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import config_from_flat
from common.progress import configure_logging
from common.lifetime import exit_with_service
from server.workflow import run_federation

app = ServerApp()
STATE_DIR_ENV = "FEDPAGKD_STATE_DIR"  # the coordinator's one working/state folder


def run_folder(run_dir: str, run_name: str) -> Path:
    """``fed.run_dir`` / ``fed.run_name`` (a timestamp when empty). A relative run_dir is taken
    from the coordinator's state folder ``$FEDPAGKD_STATE_DIR`` when that is set (the systemd unit
    and the container set it), else from the ServerApp's working directory (the SuperLink's)."""
    name = run_name or time.strftime("%Y%m%d-%H%M%S")
    base = Path(os.environ.get(STATE_DIR_ENV) or ".")
    root = (base / Path(run_dir).expanduser()).resolve()
    folder = (root / name).resolve()
    if folder.parent != root:  # the config refuses such names; this keeps any other caller inside too
        raise ValueError(
            f"fed.run_name {run_name!r} would put the run folder outside fed.run_dir {root}; use one plain folder name"
        )
    return folder


@app.main()
def main(grid: Grid, context: Context) -> None:
    configure_logging()
    if Path(sys.argv[0]).name == "flwr-serverapp":  # a deployment ServerApp ends with its SuperLink
        exit_with_service("flwr-serverapp")
    cfg = config_from_flat(context.run_config)
    run_dir = run_folder(cfg.fed.run_dir, cfg.fed.run_name)
    logging.getLogger("fedpagkd.server").info("run folder: %s", run_dir)
    run_federation(grid, cfg, run_dir)
