"""The study's shared teacher phase and the tuning table: a run started from a teacher snapshot
is the run its own teacher rounds would have given; candidates are chosen on val only."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from benchmarks.federated import METHODS, run_once, teacher_key, teacher_snapshot
from benchmarks.tune import summarise
from common.presets import TINY

BASE = {**TINY, "fed.teacher_rounds": 2, "fed.student_rounds": 2, "train.seed": 3}


@pytest.mark.parametrize("method", ["fedavg_teacher_init", "fedpagkd_teacher_init", "fedpagkd"])
def test_a_run_from_the_teacher_snapshot_is_the_run_with_its_own_teacher_rounds(tmp_path, method):
    overrides = {**BASE, **METHODS[method]}
    full = run_once(overrides, "inprocess", tmp_path, "full")
    snapshot = teacher_snapshot(overrides, tmp_path, "teacher")
    assert snapshot.progress.teacher_rounds == 2 and snapshot.progress.student_rounds == 0
    shared = run_once(overrides, "inprocess", tmp_path, "shared", start=snapshot)
    assert shared["final"] == full["final"] and shared["final_teacher"] == full["final_teacher"]
    assert shared["selection"] == full["selection"] and shared["auc_per_round"] == full["auc_per_round"]
    a, b = load_file(tmp_path / "full" / "student.safetensors"), load_file(tmp_path / "shared" / "student.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # The student phase's messages are the same; the teacher rounds' bytes belong to the snapshot's run.
    assert shared["bytes"]["student"] == full["bytes"]["student"]
    assert "teacher" in full["bytes"] and shared["bytes"].get("teacher", {}).get("messages", 0) == 0


def test_the_teacher_key_ignores_student_phase_keys_only():
    plain, pagkd = {**BASE, **METHODS["fedavg_teacher_init"]}, {**BASE, **METHODS["fedpagkd_teacher_init"]}
    assert teacher_key(plain) == teacher_key(pagkd) == teacher_key({**pagkd, "pagkd.den_weight": 3.0})
    assert teacher_key(plain) == teacher_key({**plain, "fed.resend_crashed": 3})  # recovery only: same numbers
    assert teacher_key(pagkd) != teacher_key({**pagkd, "train.lr": 1e-3})
    # The teacher's own group CE reads the group size: another size is another teacher.
    assert teacher_key(pagkd) != teacher_key({**pagkd, "pagkd.group_size": 6})
    json.loads(teacher_key(plain))


def test_tuning_chooses_on_val_and_never_on_test():
    runs = {
        "arm": {
            "a": {"0": {"val_auc": 0.80, "auc": 0.99}, "1": {"val_auc": 0.82, "auc": 0.99}},
            "b": {"0": {"val_auc": 0.85, "auc": 0.50}, "1": {"val_auc": 0.83, "auc": 0.50}},
            "c": {"0": {"val_auc": 0.99, "auc": 0.99}},  # not yet run on every seed: not chosen
        }
    }
    table = summarise(runs)["arm"]
    assert table["chosen"] == "b"
    assert table["candidates"]["b"]["val_auc_mean"] == pytest.approx(0.84)


def _tiny_study(tmp_path, out, arms, seeds, extra=()):
    from benchmarks.study import main

    overrides = [f"{k}={v}" for k, v in BASE.items() if k != "train.seed"]
    return main(
        [*overrides, "--arms", *arms, "--seeds", *map(str, seeds), "--val-per-site", "6", "--test-per-site", "15"]
        + ["--run-dir", str(tmp_path / "runs"), "--out", str(out), *extra]
    )


def test_the_study_writes_the_issue_layout_resumes_and_merges(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    _tiny_study(tmp_path, a, ["fedavg_wli_only", "fedavg_teacher_init"], [0, 1])
    study = json.loads(a.read_text())
    assert set(study["arms"]) == {"fedavg_wli_only", "fedavg_teacher_init"} and study["default_arm"] == "fedavg_teacher_init"
    assert study["test_images"] == 2 * 15 and len(study["arms"]["fedavg_wli_only"]["auc"]) == 2
    pair = study["paired"]["fedavg_teacher_init_vs_fedavg_wli_only"]
    assert pair["seeds"] == 2 and pair["ci95"][0] <= pair["mean"] <= pair["ci95"][1]
    # Finished folders of exactly an arm's config are found again (benchmarks.tune's runs, --reuse).
    from benchmarks.study import reusable_runs

    folders = sorted((tmp_path / "runs" / "default").glob("*"))
    found = reusable_runs(folders, ["fedavg_wli_only", "fedavg_teacher_init"], study["overrides"], [0, 1])
    assert {s: {a: r["auc"] for a, r in runs.items()} for s, runs in found.items()} == {
        s: {a: r["auc"] for a, r in runs.items()} for s, runs in study["per_seed"].items()
    }
    assert reusable_runs(folders, ["fedavg_wli_only"], {**study["overrides"], "train.lr": 0.1}, [0, 1]) == {}
    # Resumed: nothing runs again (the runs recorded stay as they were).
    _tiny_study(tmp_path, a, ["fedavg_wli_only", "fedavg_teacher_init"], [0, 1])
    assert json.loads(a.read_text())["per_seed"] == study["per_seed"]
    # Another process's arms merge in; a file of other overrides is refused.
    _tiny_study(tmp_path, b, ["fedpagkd_teacher_init"], [0, 1])
    _tiny_study(tmp_path, a, [], [], ["--merge", str(b)])
    merged = json.loads(a.read_text())
    assert (
        "fedpagkd_teacher_init_vs_fedavg_wli_only" in merged["paired"]
        and "fedavg_teacher_init_vs_fedpagkd_teacher_init" in merged["paired"]
    )
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**json.loads(b.read_text()), "overrides": {"data.test_per_site": 1}}))
    with pytest.raises(SystemExit, match="not merged"):
        _tiny_study(tmp_path, a, [], [], ["--merge", str(other)])


def test_the_regime_plot_reads_the_study_files_that_exist(tmp_path, monkeypatch):
    from benchmarks.study import plot_regimes, regime_table

    monkeypatch.chdir(tmp_path)
    (tmp_path / "benchmarks/results").mkdir(parents=True)
    pair = {"mean": 0.01, "ci95": [0.0, 0.02], "p": 0.1, "seeds": 3}
    baseline = {"auc": [0.80, 0.82, 0.84], "mean": 0.82, "std": 0.02}
    for name in ("study.json", "study_scarce.json"):
        (tmp_path / "benchmarks/results" / name).write_text(
            json.dumps({"arms": {"fedavg_wli_only": baseline}, "paired": {"fedavg_teacher_init_vs_fedavg_wli_only": pair}})
        )
    assert plot_regimes(tmp_path / "regimes.png") == ["scarce", "default"]  # WLI training size ascending
    assert (tmp_path / "regimes.png").stat().st_size > 1000
    rows = regime_table().splitlines()
    assert len(rows) == 4 and rows[2].startswith("| scarce | data.train_per_site=48 | 0.8200 +/- 0.0200 (n = 3) |")
    assert "| +0.0100 [+0.0000, +0.0200], p = 0.100 (n = 3) |  |  |" in rows[3]  # the arms not run: empty cells


def test_a_recorded_run_stands_only_while_its_arm_is_unchanged():
    from benchmarks.study import current

    assert current("fedavg_wli_only", {"auc": 0.8, "method": dict(METHODS["fedavg_wli_only"])})
    assert not current("fedavg_wli_only", {"auc": 0.8, "method": {**METHODS["fedavg_wli_only"], "train.lr": 1.0}})
    assert not current("fedavg_wli_only", {"auc": 0.8}) and not current("fedavg_wli_only", None)
    assert current("central_wli_only", {"auc": 0.8})


def test_the_share_of_the_centralised_gain_is_a_ratio_only_to_a_gain_that_is_there():
    from benchmarks.study import gain_kept

    def seeds(central_gains):
        per_seed = {}
        for seed, central_gain in enumerate(central_gains):
            runs = {
                "fedavg_wli_only": 0.80 + 0.01 * seed,
                "fedavg_teacher_init": 0.82 + 0.01 * seed + 0.001 * (seed % 2),
                "central_wli_only": 0.85 + 0.01 * seed,
                "central_teacher_init": 0.85 + 0.01 * seed + central_gain,
            }
            per_seed[str(seed)] = {
                arm: {"auc": auc, **({"method": dict(METHODS[arm])} if arm in METHODS else {})} for arm, auc in runs.items()
            }
        return per_seed

    there = gain_kept(seeds([0.040, 0.041, 0.039, 0.040]))["fedavg_teacher_init"]
    assert there["seeds"] == 4 and there["why_undefined"] is None
    assert there["federated_gain"]["mean"] == pytest.approx(0.0205)
    assert there["centralised_gain"]["ci95"][0] > 0
    assert there["kept"] == pytest.approx(0.0205 / 0.040)
    # A centralised "gain" whose CI straddles zero: no share of it can be kept or lost.
    nothing = gain_kept(seeds([0.002, -0.003, 0.001, -0.001]))["fedavg_teacher_init"]
    assert nothing["kept"] is None and "does not exclude zero" in nothing["why_undefined"]
    assert nothing["federated_gain"]["mean"] == pytest.approx(0.0205)
    # The federated arm's run of earlier settings does not count: one seed left is no comparison.
    stale = seeds([0.040, 0.041])
    stale["1"]["fedavg_teacher_init"]["method"] = {"train.lr": 1.0}
    assert gain_kept(stale) == {}
