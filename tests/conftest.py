"""Shared fixtures for the protocol tests (client handlers, aggregation, workflow, simulation).

``TINY`` is the smallest configuration the protocol runs with: 32 px images, a few dozen images
per site, the timm ``test_resnet`` backbone (0.37 M parameters; 1x1 last-stage map at 32 px) and
one round of each phase. Tests pass their own overrides on top with :func:`tiny_config`.
"""

from __future__ import annotations

from typing import Any

import common  # noqa: F401  (torchvision shim before timm/torchvision are imported)
import pytest
import torch

from common.config import Config, config_from_flat

TINY: dict[str, Any] = {
    "data.image_size": 32,
    "data.train_per_site": 24,
    "data.test_per_site": 15,  # 5 per class: no site size equals a declared dim (privacy audit)
    "data.val_per_site": 6,  # model selection reads it every round
    "train.batch_size": 12,
    "train.local_epochs": 1,
    "train.device": "cpu",
    "pagkd.group_size": 4,
    "pagkd.min_group_size": 2,
    "model.student": "test_resnet",
    "model.teacher": "test_resnet",
    "model.embed_dim": 32,
    "model.num_heads": 4,
    "model.num_queries": 4,
    "pagkd.codebook_size": 4,
    "fed.teacher_rounds": 1,
    "fed.student_rounds": 1,
    "fed.num_bins": 20,
    # Every phase of the protocol (teacher, knowledge refresh, distilling student), whatever the
    # shipped default run is.
    "pagkd.use_pro": True,
    "pagkd.use_den": True,
    "fed.student_init": "scratch",
}


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
