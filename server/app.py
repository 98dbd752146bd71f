"""FedPaGKD ServerApp: resolve the config and the run folder, then run the protocol."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import config_from_flat
from common.progress import configure_logging
from server.workflow import run_federation

app = ServerApp()


def run_folder(run_dir: str, run_name: str) -> Path:
    """``fed.run_dir`` / ``fed.run_name`` (a timestamp when empty). A relative run_dir is
    taken from the ServerApp's working directory; give an absolute one to be sure where."""
    name = run_name or time.strftime("%Y%m%d-%H%M%S")
    return Path(run_dir).expanduser().resolve() / name


@app.main()
def main(grid: Grid, context: Context) -> None:
    configure_logging()
    cfg = config_from_flat(context.run_config)
    run_dir = run_folder(cfg.fed.run_dir, cfg.fed.run_name)
    logging.getLogger("fedpagkd.server").info("run folder: %s", run_dir)
    run_federation(grid, cfg, run_dir)
