"""Progress a person can watch: tqdm bars on long loops only when stderr is a terminal (a log
file or a Ray worker's captured stderr would fill with carriage returns), and the optional
TensorBoard writer for per-round metrics.

The per-round log lines themselves are plain ``logging`` calls where each loop ends.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger("fedpagkd.progress")
# Progress lines of a site's loops (local epochs, extraction, evaluation): under "fedpagkd" so
# configure_logging shows them in SuperNode / Ray worker output.
site_log = logging.getLogger("fedpagkd.site")
T = TypeVar("T")


class _CurrentStderrHandler(logging.StreamHandler):
    """A StreamHandler that writes to whatever ``sys.stderr`` is when a record is emitted (as
    logging's own last-resort handler does), not to the stream it found when it was made: code
    that swaps stderr for a while (a test's capture, a tool's redirection) would otherwise leave
    it writing to a closed file."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging(name: str = "fedpagkd") -> None:
    """INFO lines of our own logger ``name`` (and its children) on stderr; the root logger
    (httpx, grpc) is left alone. Idempotent. The ServerApp configures "fedpagkd", a ClientApp
    only "fedpagkd.site" (a process that runs both, the in-process runtime, then prints each
    line once, and the server's records still reach a test's log capture)."""
    logger = logging.getLogger(name)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if not any(getattr(h, "_fedpagkd", False) for h in logger.handlers):
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._fedpagkd = True  # ours: added once per process
        logger.addHandler(handler)
        logger.propagate = False


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T] | Iterable[T]:
    """``items`` wrapped in a tqdm bar when stderr is a TTY, else ``items`` unchanged."""
    if not sys.stderr.isatty():
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, leave=False, dynamic_ncols=True)


def _summary_writer_class() -> type | None:
    """TensorBoard's SummaryWriter when the optional ``tensorboard`` package is installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
    except ImportError:
        return None
    return SummaryWriter


class MetricsBoard:
    """Per-round scalars as TensorBoard event files in ``<run_dir>/tensorboard``, beside
    ``metrics.json``; a no-op (with one log line saying how to enable it) without the
    optional ``tensorboard`` package (``pip install 'fedpagkd[tensorboard]'``)."""

    SUBDIR = "tensorboard"

    def __init__(self, run_dir: str | Path | None, writer_class: type | None = None):
        """``run_dir`` None: a silent no-op (a protocol built but not run)."""
        self.writer: Any = None
        if run_dir is None:
            return
        cls = writer_class or _summary_writer_class()
        if cls is None:
            log.info(
                "TensorBoard event files skipped: the optional 'tensorboard' package is not installed "
                "(pip install 'fedpagkd[tensorboard]'); metrics.json has every round"
            )
            return
        self.writer = cls(log_dir=str(Path(run_dir) / self.SUBDIR))

    def scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        """Write each finite number of ``values`` (nested dicts flatten to ``a/b``) at ``step``."""
        if self.writer is None:
            return
        for key, value in _flatten(values):
            self.writer.add_scalar(f"{prefix}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _flatten(values: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, f"{name}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) != float("inf"):
            yield name, float(value)
