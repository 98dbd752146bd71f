"""The launcher's preflight: a run that cannot work here is refused before Flower or Ray start,
with every problem and its fix in one message."""

from __future__ import annotations

import json
import os

import pytest
import torch

from server import launch
from server.launch import SimulationError, preflight

SITES = {"data.nbi_sites": 2, "data.wli_sites": 2}


def refusal(run_config, supernodes=4, cpus=1, gpus=0.0) -> str:
    with pytest.raises(SimulationError) as err:
        preflight(run_config, supernodes, cpus, gpus)
    return str(err.value)


def test_the_default_federation_passes():
    preflight(SITES, 4, 1, 0.0)


def test_an_unknown_key_or_a_bad_value_is_named():
    assert "fed.studnet_rounds" in refusal({**SITES, "fed.studnet_rounds": 3})
    assert "train.lr" in refusal({**SITES, "train.lr": -1.0})


def test_zero_sites_of_a_modality_say_which_and_how_to_fix():
    message = refusal({"data.nbi_sites": 0, "data.wli_sites": 2}, supernodes=2)
    assert "0 NBI site(s)" in message and "fed.student_init=scratch pagkd.use_pro=false" in message
    assert "WLI" not in message.split("0 NBI", 1)[0]
    message = refusal({"data.nbi_sites": 2, "data.wli_sites": 0}, supernodes=2)
    assert "0 WLI site(s)" in message
    # WLI-only FedAvg needs no NBI site.
    preflight(
        {"data.nbi_sites": 0, "data.wli_sites": 2, "pagkd.use_pro": False, "pagkd.use_den": False, "fed.student_init": "scratch"},
        2,
    )


def test_secure_aggregation_with_one_nbi_site_is_refused():
    message = refusal({"data.nbi_sites": 1, "data.wli_sites": 2, "privacy.secure_aggregation": True}, 3)
    assert "privacy.secure_aggregation needs >= 2 NBI sites" in message and "gives 1" in message
    preflight({"data.nbi_sites": 2, "data.wli_sites": 2, "privacy.secure_aggregation": True}, 4)


def test_more_supernodes_than_sites_is_refused():
    message = refusal(SITES, supernodes=6)
    assert "6 SuperNode(s)" in message and "4 site(s)" in message and "--supernodes 4" in message


def test_sites_file_decides_the_number_of_sites(tmp_path):
    from tests.test_class_names import write_tree

    (tmp_path / "sites.toml").write_text(
        '[[site]]\nname = "a"\nmodality = "nbi"\npath = "a"\n\n[[site]]\nname = "b"\nmodality = "wli"\npath = "b"\n'
    )
    for name in ("a", "b"):
        write_tree(tmp_path / name, {"adenoma": 1, "hyperplastic": 1})
    assert preflight({"data.root": str(tmp_path)}, 2, report=lambda _: None) == {
        "data.class_names": "adenoma,hyperplastic",
        "data.num_classes": 2,
    }
    assert "sites.toml gives 2 site(s)" in refusal({"data.root": str(tmp_path)}, supernodes=3)
    assert "no sites.toml" in refusal({"data.root": str(tmp_path / "missing")}, supernodes=2)


def test_resources_the_machine_lacks_are_refused():
    cores = os.cpu_count() or 1
    assert f"this machine has {cores} CPU core(s)" in refusal(SITES, cpus=cores + 1)
    if torch.cuda.device_count() == 0:
        assert "no CUDA GPU is visible" in refusal(SITES, gpus=0.5)
        assert "train.device = 'cuda'" in refusal({**SITES, "train.device": "cuda"})


def test_every_problem_is_listed_at_once():
    message = refusal({"data.nbi_sites": 0, "data.wli_sites": 1}, supernodes=5, cpus=(os.cpu_count() or 1) + 1)
    assert message.count("\n  - ") == 3, message


def test_simulate_refuses_before_starting_anything(monkeypatch, tmp_path):
    def no_port():
        raise AssertionError("a SuperLink port was picked: something started")

    monkeypatch.setattr(launch, "free_port", no_port)
    with pytest.raises(SimulationError, match="0 NBI site"):
        launch.simulate({"data.nbi_sites": 0, "data.wli_sites": 2}, num_supernodes=2, work_dir=tmp_path / "w", stream=False)
    assert not (tmp_path / "w").exists()


def test_round_overheads_of_the_scale_benchmark():
    from benchmarks.scale import round_overheads

    metrics = {
        "timing": [
            {"phase": "discover", "round": None, "sites": 4, "wall_s": 1.0, "compute_s": {"a": 0.1}},
            {"phase": "student", "round": 1, "sites": 4, "wall_s": 10.0, "compute_s": {"a": 4.0, "b": 6.0, "c": 2.0, "d": 4.0}},
            {"phase": "teacher", "round": 1, "sites": 2, "wall_s": 5.0, "compute_s": {}},  # no declared compute: skipped
        ]
    }
    (row,) = round_overheads(metrics["timing"], slots=2)
    assert (row["phase"], row["round"], row["slowest_site_s"], row["sum_compute_s"]) == ("student", 1, 6.0, 16.0)
    assert row["overhead_vs_slowest"] == pytest.approx(0.4)  # (10 - 6) / 10
    assert row["overhead_vs_packed"] == pytest.approx(0.2)  # (10 - 16 / 2) / 10


@pytest.mark.parametrize(
    "value, expected", [(1.5, 1.5), (0.0, 0.0), (-1.0, None), (float("nan"), None), (float("inf"), None), (None, None)]
)
def test_a_reply_declares_its_compute_time_or_nothing(value, expected):
    from flwr.app import MetricRecord, RecordDict

    from client.wire import compute_seconds

    content = RecordDict()
    if value is not None:
        content["timing"] = MetricRecord({"compute-s": value})
    assert compute_seconds(content) == expected


def test_the_app_bundle_holds_every_module_of_the_app():
    """What ``flwr run`` ships (Flower's own build: ``.gitignore`` plus ``fab-include``) carries
    every tracked module of common/, client/ and server/: a ``data/`` ignore rule once dropped
    the common/data package, and every site failed at import."""
    import subprocess

    from deploy.bundle import REPO, build, summary

    tracked = subprocess.run(
        ["git", "ls-files", "common", "client", "server"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    shipped = set(summary(build(REPO))["list"])
    missing = sorted(path for path in tracked if path.endswith(".py") and path not in shipped)
    assert not missing, f"not in the bundle: {missing} (check .gitignore and fab-include in pyproject.toml)"


def test_the_launcher_reports_the_run_result_it_reads_back(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    figure = {
        "auc": 0.81,
        "accuracy": 0.7,
        "sensitivity": 0.6,
        "specificity": 0.9,
        "round": 2,
        "confusion": [],
        "selected_round": 1,
    }
    lost = {"wli-0": {"student": "dropped in student round 2: gone"}}
    metrics = {"final": figure, "student_rounds": 2, "status": "degraded", "accepted": False, "site_share": 0.75,
               "min_site_share": 1.0, "sites_lost": ["wli-0"], "site_status": lost}  # fmt: skip
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    monkeypatch.setattr(
        launch, "simulate", lambda *a, **k: launch.SimulationResult("7", "finished:completed", "", run_dir, 1.0, "")
    )
    assert launch.main(["--quiet", "fed.student_rounds=2"]) == launch.DEGRADED_EXIT
    out = capsys.readouterr().out
    assert "after 2 student round(s), round 1 selected on val: AUC 0.8100  ACC 0.7000" in out
    assert "DEGRADED (NOT accepted): 75 %" in out and "lost 'wli-0': student: dropped in student round 2: gone" in out
