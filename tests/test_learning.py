"""A run that did not learn says so on every kind of data (issue 21), and the family suite.

* the training-CE check (a CE that never leaves ln C) and the not-learned report without a val split;
* the family suite: deterministic, the layout the project reads, WLI fainter than NBI;
* the guard: a short federated run on a family that is not the embedded default must learn.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import common  # noqa: F401
from benchmarks.families import FAMILIES, render, write_family
from client.site import federation_sites
from common.config import config_from_flat
from common.metrics import CHANCE_CE_SHARE, training_problems
from common.results import RunResult
from server import launch
from server.outputs import not_learned


def _evaluation(auc: float, confusion: list[list[int]], model: str = "student", split: str = "test") -> dict:
    return {"model": model, "round": 3, "split": split, "pooled": {"auc": auc}, "histogram": {"confusion": confusion}}


def test_a_training_ce_near_ln_c_is_not_learning():
    assert training_problems(0.68, 2)  # issue 21's family: 0.68 for ln 2 = 0.693
    assert training_problems(float("nan"), 3)
    assert training_problems(CHANCE_CE_SHARE * math.log(3) + 1e-6, 3)
    assert training_problems(0.45, 2) == []
    assert "ln 5" in training_problems(1.6, 5)[0]


def test_without_a_val_split_the_test_figure_and_the_training_ce_say_it_did_not_learn():
    at_chance = {
        "selection": {},  # no site holds val: nothing was selected
        "evaluation": [_evaluation(0.51, [[40, 0], [38, 2]])],
        "student": [{"round": 1, "ce": 0.69}, {"round": 2, "ce": 0.68}],
    }
    problems = not_learned(at_chance, 2)["student"]
    assert any("chance" in p and "no site holds a val split" in p for p in problems), problems
    assert any("collapsed" in p for p in problems) and any("training CE 0.680 in student round 2" in p for p in problems)
    learned = {
        "selection": {},
        "evaluation": [_evaluation(0.88, [[35, 5], [6, 34]])],
        "student": [{"round": 2, "ce": 0.31}],
    }
    assert not_learned(learned, 2) == {}
    # A training CE at chance is reported even where the val-selected figure looked fine.
    lucky = {**learned, "student": [{"round": 2, "ce": 1.09}], "selection": {"student": {"round": 2, "problems": []}}}
    assert list(not_learned(lucky, 3)) == ["student"]


def test_the_launcher_prints_the_likely_fixes_of_a_run_that_did_not_learn():
    metrics = {"not_learned": {"student": ["training CE 0.68 ..."]}, "not_learned_fixes": "likely fixes: X"}
    lines = launch.outcome_lines(RunResult.from_json(metrics))
    assert any(line.startswith("WARNING: the student did not learn") for line in lines)
    assert "likely fixes: X" in lines


def test_every_family_is_deterministic_and_wli_hides_what_nbi_shows():
    for family in FAMILIES.values():
        a = render(family, np.random.default_rng([1, 2]), family.num_classes - 1, "wli")
        b = render(family, np.random.default_rng([1, 2]), family.num_classes - 1, "wli")
        assert a.shape == (family.native_size, family.native_size, 3) and a.dtype == np.uint8
        assert np.array_equal(a, b)
        # The evidence's share of the image's variation: large in NBI, small in WLI. Compare each
        # modality's lowest and highest class over the same nuisance draws (same seeds).
        spread = {}
        for modality in ("nbi", "wli"):
            low = [render(family, np.random.default_rng([7, k]), 0, modality).astype(float) for k in range(8)]
            high = [
                render(family, np.random.default_rng([7, k]), family.num_classes - 1, modality).astype(float) for k in range(8)
            ]
            spread[modality] = np.mean([np.abs(h - lo).mean() for h, lo in zip(high, low)])
        assert 0 < spread["wli"] < 0.5 * spread["nbi"], (family.name, spread)


def test_a_written_family_is_a_federation_the_project_reads(tmp_path):
    family = FAMILIES["spots"]
    small = type(family)(**{**family.__dict__, "nbi_train": 8, "wli_train": 8, "val": 4, "nbi_test": 8, "wli_test": 8})
    root = write_family(small, tmp_path)
    cfg = config_from_flat({"data.root": str(root), "data.num_classes": small.num_classes})
    sites = federation_sites(cfg)
    assert [(s.name, s.modality) for s in sites] == [("nbi-0", "nbi"), ("nbi-1", "nbi"), ("wli-0", "wli"), ("wli-1", "wli")]
    assert sites[0].class_names == small.names() and sites[2].val is not None
    image, label = sites[2].train[0]
    assert image.shape == (3, cfg.data.image_size, cfg.data.image_size)  # resized from the native 48 px
    again = write_family(small, tmp_path / "again")
    first = sorted(p.relative_to(root) for p in root.rglob("*.png"))
    assert first == sorted(p.relative_to(again) for p in again.rglob("*.png"))
    assert all((root / p).read_bytes() == (again / p).read_bytes() for p in first[:20])
    no_val = type(family)(**{**small.__dict__, "has_val": False})
    no_val_root = write_family(no_val, tmp_path / "nv")
    assert federation_sites(config_from_flat({"data.root": str(no_val_root), "data.num_classes": 4}))[2].val is None


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0])
def test_the_default_federated_run_learns_on_a_family_that_is_not_the_embedded_default(tmp_path, single_thread, seed):
    """The guard: the default run (student from the NBI teacher, its default rounds), on a small copy of
    the ``stripes`` family (2 classes, 96 px native, no val/: another renderer, size and layout
    than the embedded default) must learn: the student's training CE well below ln 2 and its test
    AUC clearly above chance. The copy shows WLI at half NBI's contrast (the suite's stripes, at
    0.14, is too faint for any learner in a short run: its plain-CNN AUC is 0.72 after 40 epochs
    on 240 images), so a failure here is the recipe's, not the data's: the plain CNN reaches 0.947
    on this copy (seed 0). Measured 2026-12-03, 1 thread, seed 0: student CE 0.170, test AUC
    0.927; with only 3 teacher + 4 student rounds the same run stayed at chance (AUC 0.49 / 0.48,
    CE 0.60 / 0.62 for seeds 0 / 1), so the default rounds are part of what is guarded."""
    from server.inprocess import InProcessGrid, synthetic_node_configs
    from server.workflow import run_federation
    from common.config import config_to_flat

    family = FAMILIES["stripes"]
    small = type(family)(
        **{**family.__dict__, "wli_contrast": 0.5, "nbi_train": 60, "wli_train": 60, "nbi_test": 40, "wli_test": 150}
    )
    root = write_family(small, tmp_path / "data")
    cfg = config_from_flat(
        {
            "data.root": str(root),
            "data.num_classes": 2,
            "train.seed": seed,
            "train.device": "cpu",
        }
    )
    grid = InProcessGrid(synthetic_node_configs(4), config_to_flat(cfg))
    summary = run_federation(grid, cfg, tmp_path / "run")
    ce, auc = summary.student[-1]["ce"], summary.final.auc
    print(f"seed {seed}: student CE {ce:.3f} (ln 2 = 0.693), test AUC {auc:.3f}, not learned: {summary.not_learned}")
    assert ce < 0.75 * math.log(2), summary.student
    assert auc > 0.7, summary.final
    assert "student" not in summary.not_learned
