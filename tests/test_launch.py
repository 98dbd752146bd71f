"""The launcher's preflight: a run that cannot work here is refused before Flower or Ray start,
with every problem and its fix in one message."""

from __future__ import annotations

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
    assert "0 NBI site(s)" in message and "pagkd.use_pro=false" in message
    assert "WLI" not in message.split("0 NBI", 1)[0]
    message = refusal({"data.nbi_sites": 2, "data.wli_sites": 0}, supernodes=2)
    assert "0 WLI site(s)" in message
    # WLI-only FedAvg needs no NBI site.
    preflight({"data.nbi_sites": 0, "data.wli_sites": 2, "pagkd.use_pro": False, "pagkd.use_den": False}, 2)


def test_more_supernodes_than_sites_is_refused():
    message = refusal(SITES, supernodes=6)
    assert "6 SuperNode(s)" in message and "4 site(s)" in message and "--supernodes 4" in message


def test_sites_file_decides_the_number_of_sites(tmp_path):
    (tmp_path / "sites.toml").write_text(
        '[[site]]\nname = "a"\nmodality = "nbi"\npath = "a"\n\n[[site]]\nname = "b"\nmodality = "wli"\npath = "b"\n'
    )
    preflight({"data.root": str(tmp_path)}, 2)
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
