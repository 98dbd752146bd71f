"""The training recipe: the small backbone in timm's registry, the learning-rate schedule over
rounds, the not-learned check, and a regression guard that a short centralised run learns."""

from __future__ import annotations

import os

import math

import numpy as np
import pytest
import timm
import torch
from torch.utils.data import ConcatDataset

import common  # noqa: F401
from client.site import federation_sites
from client.train import ValidationSelector, balanced_loader, eval_loader, predict, train_student
from common.config import TrainConfig, config_from_flat
from common.metrics import classification_metrics, learning_problems, selection_key
from common.models import build_query_head, build_student
from common.optim import END_FRACTION, START_FRACTION, ProgressSchedule, build_optimizer, lr_factor


def test_the_cpu_backbone_is_a_timm_model_with_8x8_tokens_at_64px():
    import common.backbones  # noqa: F401  (registers)

    assert {"pagkd_cnn_s", "pagkd_cnn_m"} <= set(timm.list_models("pagkd_cnn*"))
    features = timm.create_model("pagkd_cnn_s", features_only=True, out_indices=(-1,))
    (last,) = features(torch.randn(2, 3, 64, 64))
    assert last.shape == (2, 128, 8, 8)
    classifier = timm.create_model("pagkd_cnn_s", num_classes=3)
    assert classifier(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    assert 2e5 < sum(p.numel() for p in classifier.parameters()) < 4e5
    with pytest.raises(ValueError, match="output stride"):
        timm.create_model("pagkd_cnn_s", features_only=True, output_stride=16)
    # Other timm names keep working through the same PaGKD network.
    cfg = config_from_flat({"model.student": "test_resnet", "model.teacher": "test_resnet"})
    assert build_student(cfg.model, 3).eval()(torch.randn(1, 3, 32, 32)).logits.shape == (1, 3)


def test_the_schedule_warms_up_then_decays_to_near_zero():
    progress = np.linspace(0, 1, 101)
    factors = np.array([lr_factor(p, "cosine", 0.2) for p in progress])
    assert factors[0] == pytest.approx(START_FRACTION)
    assert factors[20] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(END_FRACTION)
    assert np.all(np.diff(factors[:21]) > 0) and np.all(np.diff(factors[20:]) < 0)
    assert lr_factor(0.7, "constant", 0.2) == 1.0


def test_consecutive_round_spans_follow_the_one_curve_of_the_run():
    """Three rounds of 4 steps each, spans [0, 1/3], [1/3, 2/3], [2/3, 1], set the same rates as
    one schedule of 12 steps: a federated run follows the centralised curve across rounds."""
    cfg = TrainConfig()
    param = torch.nn.Parameter(torch.zeros(1))

    def rates(spans, steps):
        out = []
        for start, end in spans:
            schedule = ProgressSchedule(build_optimizer([param], cfg), cfg, steps, start, end)
            out += [schedule.step() for _ in range(steps)]
        return out

    np.testing.assert_allclose(rates([(0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 1)], 4), rates([(0, 1)], 12), rtol=1e-12)
    assert isinstance(build_optimizer([param], cfg), torch.optim.AdamW)


def _evaluation(auc: float, confusion) -> dict:
    return {"pooled": {"auc": auc}, "histogram": {"confusion": confusion}}


def test_selection_never_prefers_a_collapsed_model_to_one_that_learned():
    """On a small val split an early, collapsed model can score the higher AUC (seen: a federated
    teacher of round 2, val AUC 0.961, recall 0 for one class, chosen over later rounds): the
    selection key ranks learning first, AUC second."""
    collapsed = _evaluation(0.96, [[10, 0, 0], [8, 0, 2], [0, 0, 10]])
    learned = _evaluation(0.90, [[8, 2, 0], [2, 6, 2], [0, 2, 8]])
    assert selection_key(learned) > selection_key(collapsed)
    assert selection_key(_evaluation(0.91, [[8, 2, 0], [2, 6, 2], [0, 2, 8]])) > selection_key(learned)
    assert selection_key(_evaluation(float("nan"), [[0, 0], [0, 0]])) < selection_key(collapsed)


def test_learning_problems_name_chance_and_collapse_and_pass_a_learned_model():
    assert learning_problems(_evaluation(0.86, [[8, 1, 1], [2, 7, 1], [1, 2, 7]])) == []
    chance = learning_problems(_evaluation(0.51, [[4, 3, 3], [3, 4, 3], [3, 3, 4]]))
    assert len(chance) == 1 and "chance" in chance[0]
    collapsed = learning_problems(_evaluation(0.62, [[9, 0, 1], [10, 0, 0], [9, 0, 1]]))
    assert any("collapsed" in p and "class 0" in p for p in collapsed)
    assert any("[1]" in p and "recall 0" in p for p in collapsed)
    assert learning_problems(_evaluation(float("nan"), [[0, 0], [0, 0]]))  # NaN is not learned


# Seed 1 too with FEDPAGKD_ALL_SEEDS=1: CI runs seed 0 only, its 30-minute budget is spent (docs/development.md).
GUARD_SEEDS = [0, 1] if os.environ.get("FEDPAGKD_ALL_SEEDS") == "1" else [0]


@pytest.mark.slow
@pytest.mark.parametrize("seed", GUARD_SEEDS)
def test_a_short_centralised_wli_run_learns(single_thread, seed):
    """Regression guard of the recipe: 20 epochs on the embedded default's 192 WLI training
    images (2 sites x 96, 64 px) must beat chance by a clear margin on 300 test images and drive
    the training CE well below ln 3. Measured on this machine (1 thread, 2026-12-01), seeds 0 / 1:
    test AUC 0.861 / 0.823, training CE averaged over all 20 epochs 0.76 / 0.86, test CE 0.64 /
    0.81 (ln 3 = 1.10); the bounds leave room for seeds and thread counts."""
    cfg = config_from_flat(
        {
            "train.seed": seed,
            "train.epochs": 20,
            "data.test_per_site": 150,
            "data.val_per_site": 30,
            "pagkd.use_pro": False,
            "pagkd.use_den": False,
            "train.device": "cpu",
        }
    )
    sites = [s for s in federation_sites(cfg) if s.modality == "wli"]

    def pool(split):
        data = ConcatDataset([s.split(split) for s in sites])
        data.labels = np.concatenate([s.split(split).labels for s in sites])
        return data

    torch.manual_seed(seed)
    student, head = build_student(cfg.model, 3), build_query_head(cfg.model, 3)
    device = torch.device("cpu")
    selector = ValidationSelector(student, eval_loader(pool("val"), 64), device, False)
    result = train_student(
        student,
        head,
        balanced_loader(pool("train"), cfg.train.batch_size, seed),
        lambda: None,
        cfg,
        device,
        cfg.train.epochs,
        seed,
        on_epoch_end=selector,
    )
    selector.restore()
    probs, labels, test_ce = predict(student, eval_loader(pool("test"), 64), device, False)
    metrics = classification_metrics(probs, labels)
    print(f"seed {seed}: test AUC {metrics['auc']:.3f}, train CE (mean) {result.losses['ce']:.3f}, test CE {test_ce:.3f}")
    assert len(labels) == 300
    assert metrics["auc"] > 0.72, metrics
    assert result.losses["ce"] < 0.85 * math.log(3), result.losses  # mean over all epochs, warm-up included
    assert test_ce < 0.9 * math.log(3)
    assert len(selector.history) == cfg.train.epochs and selector.best_auc in selector.history
