"""FedPaGKD ServerApp: resolve the config and the run folder, then run the protocol."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import config_from_flat
from server.workflow import run_federation

app = ServerApp()


def configure_logging() -> None:
    """Progress lines of our own loggers only; the root logger (httpx, grpc) is left alone."""
    logger = logging.getLogger("fedpagkd")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def run_folder(run_dir: str, run_name: str) -> Path:
    """``fed.run_dir`` / ``fed.run_name`` (a timestamp when empty). A relative run_dir is
    taken from the ServerApp's working directory; give an absolute one to be sure where."""
    name = run_name or time.strftime("%Y%m%d-%H%M%S")
    root = Path(run_dir).expanduser().resolve()
    folder = (root / name).resolve()
    if folder.parent != root:  # the config refuses such names; this keeps any other caller inside too
        raise ValueError(f"fed.run_name {run_name!r} would put the run folder outside fed.run_dir {root}; use one plain folder name")
    return folder


@app.main()
def main(grid: Grid, context: Context) -> None:
    configure_logging()
    cfg = config_from_flat(context.run_config)
    run_dir = run_folder(cfg.fed.run_dir, cfg.fed.run_name)
    logging.getLogger("fedpagkd.server").info("run folder: %s", run_dir)
    run_federation(grid, cfg, run_dir)
