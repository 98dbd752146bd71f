"""The multi-machine path: a federated run attached to an existing Ray cluster.

The test starts a local head node (``ray start --head``, its own port and temp folder), runs
``python -m server.experiment sim.ray_address=127.0.0.1:PORT`` (the documented Hydra entry) on a
tiny federation, checks from the cluster's own state API that the ClientApp actors ran there,
and stops every process of that head node by PID (never ``ray stop``: it would also end other
Ray sessions on the machine).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from server.launch import FLOWER_ENV, free_port
from tests.conftest import TINY

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def _cluster_pids(marker: str) -> list[int]:
    """Processes whose command line names the head node's temp folder (all of its processes do)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if marker.encode() in handle.read():
                    pids.append(int(pid))
        except OSError:
            continue
    return [p for p in pids if p != os.getpid()]


def _stop(marker: str, grace_s: float = 15.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _cluster_pids(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while time.time() < deadline and _cluster_pids(marker):
            time.sleep(0.5)


@pytest.fixture()
def ray_head():
    temp = tempfile.mkdtemp(prefix="frh-")  # short: Ray's unix socket paths are length-limited
    port = free_port()
    env = {**os.environ, **FLOWER_ENV, "RAY_TMPDIR": temp}
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        f"--port={port}",
        "--num-cpus=2",
        f"--temp-dir={temp}",
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]
    try:
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=180)
        yield f"127.0.0.1:{port}", temp
    finally:
        _stop(temp)
    assert not _cluster_pids(temp), "processes of the Ray head node are still running"


def test_a_run_attaches_to_an_existing_ray_cluster(ray_head, tmp_path):
    address, temp = ray_head
    overrides = [f"{k}={v}" for k, v in TINY.items() if k != "train.device"]
    out = tmp_path / "hydra"
    env = {**os.environ, **FLOWER_ENV}
    proc = subprocess.run(
        [sys.executable, "-m", "server.experiment", f"sim.ray_address={address}", f"hydra.run.dir={out}", *overrides],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(proc.stdout[-2000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "flower" / "metrics.json").is_file()

    # The cluster's own record (its GCS actor table): the ClientApp actors of this run lived there.
    probe = (
        "import json, ray; from ray._private import state; "
        f"ray.init(address='{address}', logging_level='ERROR'); "
        "print(json.dumps(sorted(a['ActorClassName'] for a in state.actors().values())))"
    )
    listed = subprocess.run(
        [sys.executable, "-c", probe], env={**env, "RAY_TMPDIR": temp}, capture_output=True, text=True, timeout=120
    )
    assert listed.returncode == 0, listed.stderr[-2000:]
    classes = json.loads(listed.stdout.strip().splitlines()[-1])
    print(f"actors on the cluster at {address}: {classes}")
    assert "ClientAppActor" in classes, f"no ClientAppActor ran on the cluster at {address}: the run started a Ray of its own"
