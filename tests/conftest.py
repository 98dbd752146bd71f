"""Shared fixtures for the protocol tests (client handlers, aggregation, workflow, simulation).

``TINY`` (:data:`common.presets.TINY`) is the smallest configuration the protocol runs with: 32 px
images, a few dozen images per site, the timm ``test_resnet`` backbone (0.37 M parameters; 1x1
last-stage map at 32 px) and one round of each phase. Tests pass their own overrides on top with
:func:`tiny_config`.
"""

from __future__ import annotations

import sys
from typing import Any

import absl.logging  # noqa: F401  (see below)
import common  # noqa: F401  (torchvision shim before timm/torchvision are imported)
import pytest
import torch

from common.config import Config, config_from_flat
from common.presets import TINY

# absl.logging (imported by dp_accounting on the first epsilon) makes a handler on the sys.stderr
# of that moment, pytest's capture stream, and closes that stream when logging's handlers are shut
# down (Hydra's logging set-up does): every later test of the process then loses stderr. Pointed
# at the real stderr, which absl never closes, it cannot.
absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__


def tiny_config(**overrides: Any) -> Config:
    """``TINY`` plus overrides given with ``__`` for the dot: ``tiny_config(fed__student_rounds=3)``."""
    values = dict(TINY)
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return config_from_flat(values)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread: on a shared 2-core machine the default (2 threads competing with
    other processes) made every conv step ~10x slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def task_identity():
    """Creating a Flower ``Message`` outside a running app needs the process's task identity
    (docs/flower-notes.md section 1); a real ServerApp/ClientApp process has one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 0
    yield TaskIdentity
