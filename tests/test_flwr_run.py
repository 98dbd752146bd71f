"""``flwr run .`` as a new user types it: a fresh Flower home, Flower's default local federation.

No ``config.toml`` is written for it (``flwr`` writes its own default, the ``local`` SuperLink with
Flower's default simulation of 2 SuperNodes), no ``--federation-config``: only a short run config,
so the test runs in minutes. The embedded default then splits the two SuperNodes into one NBI and
one WLI site (:func:`client.site.embedded_federation`). The SuperLink ``flwr run`` leaves running on
its ports, and everything it started, are stopped afterwards (by port and by a launch id every
process inherits), so nothing outlives the test.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from server.launch import LAUNCH_ID_ENV, REPO, _cli, flower_env, launch_processes, stop_launch, stop_superlink
from server.processes import free_port, run_config_arg

# A short run: every phase once (teacher round, knowledge, distilling student round), small splits.
SHORT = {
    "fed.teacher_rounds": 1,
    "fed.student_rounds": 1,
    "train.local_epochs": 1,
    "data.train_per_site": 24,
    "data.val_per_site": 24,
    "data.test_per_site": 48,
}


@pytest.mark.slow
def test_flwr_run_dot_completes_from_a_fresh_flower_home(tmp_path):
    flwr_home = tmp_path / "flwr-home"  # fresh: not even created, as on a new machine
    ray_tmp = Path(tempfile.mkdtemp(prefix="fpr-"))  # short: Ray's unix socket paths are length-limited
    port, launch_id = free_port(), uuid.uuid4().hex
    env = flower_env(flwr_home, port, ray_tmp, {LAUNCH_ID_ENV: launch_id})
    run_config = {**SHORT, "fed.run_dir": str(tmp_path / "runs"), "fed.run_name": "fresh"}
    try:
        proc = subprocess.run(
            ["flwr", "run", ".", "--stream", "--run-config", run_config_arg(run_config)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=840,
        )
        log = proc.stdout + proc.stderr
        runs = _cli(env, tmp_path).ok("ls")["runs"]
        assert [r["status"] for r in runs] == ["finished:completed"], log[-3000:]
        metrics = json.loads((tmp_path / "runs" / "fresh" / "metrics.json").read_text())
        # Flower's default federation: 2 SuperNodes, split into one NBI and one WLI site.
        assert sorted(s["modality"] for s in metrics["sites"]) == ["nbi", "wli"]
        assert metrics["status"] == "completed" and metrics["final"]["auc"] is not None
    finally:
        stop_superlink(port)
        stop_launch(launch_id, folder=ray_tmp)
    assert launch_processes(launch_id, ray_tmp) == []
