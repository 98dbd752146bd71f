"""Training progress a person can watch (issue 13): a log line per local epoch, extraction and
request at a site, tqdm only on a terminal, per-round TensorBoard scalars where the optional
package is installed (a fake SummaryWriter here: this venv has no tensorboard)."""

from __future__ import annotations

import logging
import sys

import pytest

from common import progress as progress_module
from common.progress import MetricsBoard, progress, site_log
from server.workflow import run_federation
from tests.conftest import tiny_config
from tests.fakes import InProcessGrid, synthetic_node_configs
from common.config import config_to_flat

pytestmark = pytest.mark.usefixtures("single_thread")


class FakeWriter:
    """The part of torch.utils.tensorboard.SummaryWriter the board uses."""

    instances: list["FakeWriter"] = []

    def __init__(self, log_dir: str):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        FakeWriter.instances.append(self)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_no_bar_unless_stderr_is_a_terminal(monkeypatch):
    items = [1, 2, 3]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert progress(items, "x") is items
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = progress(items, "x", 3)
    assert list(bar) == items and bar is not items


def test_the_board_flattens_finite_numbers_and_skips_the_rest(tmp_path):
    board = MetricsBoard(tmp_path, writer_class=FakeWriter)
    board.scalars("evaluate", {"pooled": {"auc": 0.7, "auc_per_class": [0.1]}, "n": 3, "bad": float("nan"), "ok": True}, 2)
    assert board.writer.scalars == [("evaluate/pooled/auc", 0.7, 2), ("evaluate/n", 3.0, 2)]
    assert board.writer.log_dir == str(tmp_path / "tensorboard")
    board.close()
    assert board.writer.closed


def test_without_tensorboard_the_board_says_so_once_and_writes_nothing(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(progress_module, "_summary_writer_class", lambda: None)
    caplog.set_level(logging.INFO, logger="fedpagkd.progress")
    board = MetricsBoard(tmp_path)
    board.scalars("teacher", {"loss": 1.0}, 1)
    assert [r.getMessage() for r in caplog.records if "tensorboard" in r.getMessage()][0].count("pip install") == 1
    assert not (tmp_path / "tensorboard").exists()


def test_a_run_logs_every_site_loop_and_writes_per_round_scalars(tmp_path, monkeypatch, task_identity):
    FakeWriter.instances.clear()
    monkeypatch.setattr(progress_module, "_summary_writer_class", lambda: FakeWriter)
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    site_log.addHandler(handler)
    try:
        cfg = tiny_config()
        grid = InProcessGrid(synthetic_node_configs(4), config_to_flat(cfg))
        run_federation(grid, cfg, tmp_path / "run")
    finally:
        site_log.removeHandler(handler)
    assert any(line.startswith("local epoch 1/1:") for line in lines)
    assert any(line.startswith("knowledge extraction:") for line in lines)
    assert any("student.train (round 1) done in" in line and "loss" in line for line in lines)
    (writer,) = FakeWriter.instances
    tags = {tag for tag, _, _ in writer.scalars}
    assert {"teacher/loss", "student/loss", "evaluate_student/pooled/auc", "knowledge/groups"} <= tags
    assert any(tag.startswith("evaluate_student/sites/wli-0/") for tag in tags)
    assert writer.log_dir == str(tmp_path / "run" / "tensorboard") and writer.closed
