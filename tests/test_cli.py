"""The ``fedpagkd`` console entry point (server/cli.py, issue 13): one subcommand per tool, each
passing the rest of the line to that tool, ``--help`` on each, refusals with a fix."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from server import cli

REPO = Path(__file__).resolve().parent.parent
# Cheap --help checks (argparse tools); the Hydra ones are checked once below.
ARGPARSE_COMMANDS = ["simulate", "predict", "export", "check-site", "write-synthetic", "fetch-weights", "certs"]


def test_pyproject_declares_the_fedpagkd_script():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["fedpagkd"] == "server.cli:main"
    assert "tensorboard" in project["optional-dependencies"]


def test_every_user_command_is_a_subcommand():
    assert set(cli.COMMANDS) == {
        "simulate",
        "experiment",
        "centralised",
        "reference",
        "recipe",
        "study",
        "predict",
        "export",
        "check-site",
        "write-synthetic",
        "fetch-weights",
        "certs",
    }


@pytest.mark.parametrize("command", ARGPARSE_COMMANDS)
def test_help_of_each_command_is_the_tools_own(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fedpagkd")
    assert "usage: fedpagkd [-h] COMMAND" not in out  # not the top-level help


def test_hydra_commands_pass_through(capsys):
    assert cli.main(["centralised", "--help"]) == 0
    assert "centralised is powered by Hydra" in capsys.readouterr().out


def test_reference_runs_the_module_where_it_exists(capsys):
    if importlib.util.find_spec("benchmarks.reference") is None:
        assert cli.main(["reference"]) == 2
        assert "benchmarks.reference" in capsys.readouterr().err
    else:  # the other developer's module: its own --help
        assert cli.main(["reference", "--help"]) == 0


def test_top_level_help_lists_the_commands_and_an_unknown_one_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["simulat"])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_arguments_reach_the_tool(tmp_path, capsys):
    assert cli.main(["check-site", str(tmp_path / "nowhere"), "--modality", "nbi", "--no-decode"]) == 1
    assert str(tmp_path / "nowhere") in capsys.readouterr().out
    assert cli.main(["simulate", "fed.studnet_rounds=1"]) == 1  # refused before Ray, naming the key
    assert "fed.studnet_rounds" in capsys.readouterr().err


def test_fetch_weights_refuses_an_existing_file_before_any_download(tmp_path, capsys):
    out = tmp_path / "resnet50.safetensors"
    out.write_bytes(b"keep")
    assert cli.main(["fetch-weights", "resnet50", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"keep"


def test_certs_writes_through_make_certs(tmp_path, capsys):
    assert cli.main(["certs", "--out", str(tmp_path / "certs"), "--sites", "nbi-1"]) == 0
    assert (tmp_path / "certs" / "ca.crt").is_file()


def test_python_dash_m_runs_the_same_entry_point():
    proc = subprocess.run([sys.executable, "-m", "server.cli", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "write-synthetic" in proc.stdout


@pytest.mark.parametrize(
    "command, module", [("reference", "benchmarks.reference"), ("recipe", "benchmarks.recipe"), ("study", "benchmarks.study")]
)
def test_benchmark_commands_show_their_modules_help(command, module, capsys):
    assert cli.main([command, "--help"]) == 0
    assert "usage:" in capsys.readouterr().out
