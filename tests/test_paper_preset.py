"""The paper's setting end to end, as GPU users run it, shrunk to a CPU smoke test (issue 21 item 6):
``preset=paper`` with GKD-Pro and GKD-Den on (ResNet-50 teacher and student, 448 px, 14 x 14 tokens of 128,
16 heads, 12 queries, rotation augmentation, ImageNet-style initialisation from a local weights
file) through the federated protocol: one teacher round, a knowledge refresh and one distilling
student round, with a handful of images per site. What it shows: the preset composes onto the
typed Config, and every phase runs at the paper's shapes. It says nothing about accuracy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import common  # noqa: F401  (torchvision shim before timm)
import server.experiment  # noqa: F401  (registers federated_schema)
import timm
from common.config import config_from_mapping, config_to_flat
from common.models import build_student
from server.inprocess import InProcessGrid, synthetic_node_configs
from server.workflow import run_federation

CONF = str(Path(__file__).resolve().parent.parent / "conf")
# Shrunk sizes only: the networks, token grid, head, losses and optimiser stay the paper's.
SMOKE = [
    "data.train_per_site=6",  # 2 per class: one group per class (K_min 2: a smoke test's group)
    "data.val_per_site=3",
    "data.test_per_site=3",
    "pagkd.group_size=2",
    "pagkd.min_group_size=2",
    "train.batch_size=6",
    "train.local_epochs=1",
    "train.device=cpu",
    "pagkd.warmup_epochs=0",  # the group terms from the first student step
    "pagkd.kmeans_iters=1",
    "fed.teacher_rounds=1",
    "fed.student_rounds=1",
    "fed.num_bins=20",
]


@pytest.mark.slow
def test_the_paper_preset_runs_every_federated_phase_at_its_shapes(tmp_path, single_thread):
    from safetensors.torch import save_file

    # What `fedpagkd fetch-weights resnet50` writes on a connected machine (random here: no hub).
    weights = tmp_path / "resnet50.safetensors"
    backbone = timm.create_model("resnet50", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(weights))
    # The paper's method under the paper's recipe: the recipe keeps its own group weights.
    overrides = [
        "preset=paper",
        "experiment=pagkd",
        *SMOKE,
        f"model.teacher_weights={weights}",
        f"model.student_weights={weights}",
    ]
    with initialize_config_dir(config_dir=CONF, version_base=None):
        tree = OmegaConf.to_container(compose(config_name="federated", overrides=overrides), resolve=True)
    tree.pop("sim")
    cfg = config_from_mapping(tree)
    assert (cfg.model.student, cfg.model.teacher, cfg.data.image_size, cfg.model.num_heads) == ("resnet50", "resnet50", 448, 16)
    assert (cfg.train.augment, cfg.pagkd.pro_weight, cfg.pagkd.den_weight, cfg.train.lr) == ("rotate", 0.001, 1.0, 1e-4)
    assert cfg.pagkd.use_pro and cfg.pagkd.use_den and cfg.fed.student_init == "scratch"

    net = build_student(cfg.model, cfg.data.num_classes).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 448, 448))
    assert out.tokens.shape == (1, 14 * 14, 128)  # 196 tokens of D = 128, as the paper

    grid = InProcessGrid(synthetic_node_configs(cfg.data.nbi_sites + cfg.data.wli_sites), config_to_flat(cfg))
    summary = run_federation(grid, cfg, tmp_path / "run")
    assert summary["status"] == "completed" and summary["final"] is not None
    assert [entry["round"] for entry in summary["teacher"]] == [1] and len(summary["student"]) == 1
    assert summary["knowledge"], "no knowledge round ran"
    last = summary["student"][-1]
    assert last["den"] > 0 and last["pro"] > 0, last  # both group terms computed at 448 px
    assert (tmp_path / "run" / "metrics.json").is_file()
