"""End to end on a real deployment: ``flower-superlink`` + 4 ``flower-supernode`` on loopback, TLS and
SuperNode authentication on, through :mod:`deploy.loopback`.

One federation (SuperLink + 2 NBI + 2 WLI SuperNodes, sites written from the simulation's own
synthetic specs) serves every test of this module:

* (a) a full run completes, with its outputs;
* (b) a SuperNode with an unregistered key is refused;
* (c) a SuperNode that does not trust the federation's CA cannot connect;
* (e) the deployment result equals the simulation of the same run config and sites;
* (d) a WLI site killed after the teacher phase and restarted with its key rejoins, and the run completes.

Slow: each ClientApp message starts a fresh Python process (torch + timm), so a run takes minutes
on 2 cores. Timings are printed (``pytest -s``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from deploy import loopback
from deploy.loopback import Loopback, RunResult

pytestmark = pytest.mark.slow

RUN_TIMEOUT_S = 800.0
SIM_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    work = tmp_path_factory.mktemp("loopback")
    fed = Loopback(work, verbose=True)
    started: list[loopback.Proc] = []
    try:
        t0 = time.time()
        fed.start()
        print(f"\nloopback federation up in {time.time() - t0:.0f} s (work folder {work})")
        yield fed
    finally:
        started = list(fed.procs)
        fed.close()
    leftovers = {p.name: loopback._group_members(p.pid) for p in started}
    assert not any(leftovers.values()), f"processes left running: {leftovers}"


@pytest.fixture(scope="module")
def deployment_run(federation) -> RunResult:
    result = federation.run({"fed.run_name": "deployment"}, timeout=RUN_TIMEOUT_S)
    print(f"\ndeployment run {result.run_id}: {result.status} in {result.wall_s:.0f} s wall "
          f"(SuperLink elapsed {result.elapsed_s} s)")
    return result


def _pooled(metrics: dict[str, Any], model: str) -> dict[str, Any]:
    return [e for e in metrics["evaluation"] if e["model"] == model][-1]["pooled"]


# --------------------------------------------------------------------------- (a)


def test_a_full_deployment_run_completes(federation, deployment_run):
    result = deployment_run
    assert result.status == "finished:completed", f"{result.details}; see {result.log}"
    assert result.metrics_path.is_file()
    assert (result.run_dir / "student.safetensors").is_file()
    metrics = result.metrics()
    assert sorted(s["name"] for s in metrics["sites"]) == ["nbi-0", "nbi-1", "wli-0", "wli-1"]
    assert {s["node_id"] for s in metrics["sites"]} == {site.node_id for site in federation.sites.values()}
    final = metrics["final"]
    assert final is not None
    assert 0.0 <= final["auc"] <= 1.0 and 0.0 <= final["accuracy"] <= 1.0
    assert final["num_examples"] == 2 * federation.config["data.test_per_site"]
    assert [e["round"] for e in metrics["student"]] == [1]
    assert sorted(metrics["student"][0]["sites"]) == ["wli-0", "wli-1"]
    assert sorted(metrics["teacher"][0]["sites"]) == ["nbi-0", "nbi-1"]
    log = result.log.read_text(errors="replace")
    assert "run finished" in log and "dropped site" not in log


# --------------------------------------------------------------------------- (b)


def test_b_unregistered_supernode_is_refused(federation):
    registered = {site.node_id for site in federation.sites.values()}
    key = federation.unregistered_key("intruder")
    proc = federation.start_supernode("wli-0", log_name="supernode-intruder", key=key, max_retries=2, max_wait_time=30)
    code = federation.wait_exit(proc, timeout=120)
    text = proc.text()
    print(f"\nunregistered SuperNode: exit {code}; log tail:\n{text[-800:]}")
    assert code is not None, f"the SuperNode with an unregistered key is still running: {proc.log}"
    assert code != 0
    assert "Failed to activate SuperNode" in text and "2004" in text, text[-2000:]
    assert "SuperNode ID" not in text
    superlink_log = federation.superlink.text()
    assert "No SuperNode found with the given public key" in superlink_log
    status = federation.node_status()
    assert set(status) == registered, f"a node appeared that was never registered: {status}"
    assert all(s == "online" for s in status.values()), status


# --------------------------------------------------------------------------- (c)


@pytest.mark.parametrize("trust", ["other-ca", "system-cas"])
def test_c_supernode_without_the_federation_ca_cannot_connect(federation, trust):
    ca = federation.other_ca() if trust == "other-ca" else ""  # "": no --root-certificates at all
    before = federation.node_status()
    proc = federation.start_supernode("nbi-0", log_name=f"supernode-{trust}", root_certificates=ca, max_retries=2, max_wait_time=30)
    code = federation.wait_exit(proc, timeout=120)
    text = proc.text()
    print(f"\nSuperNode trusting {trust}: exit {code}; log tail:\n{text[-800:]}")
    assert code is not None, f"the SuperNode is still running: {proc.log}"
    assert code != 0
    assert "CERTIFICATE_VERIFY_FAILED" in text, text[-2000:]
    assert "SuperNode ID" not in text
    assert federation.node_status() == before


# --------------------------------------------------------------------------- (e)


def test_e_deployment_equals_simulation(federation, deployment_run, tmp_path):
    from server import launch

    assert deployment_run.status == "finished:completed"
    config = {**federation.config, "fed.run_dir": str(tmp_path / "runs"), "fed.run_name": "simulation"}
    sim = launch.simulate(config, num_supernodes=4, cpus_per_client=1, work_dir=tmp_path / "sim", timeout_s=RUN_TIMEOUT_S, stream=False)
    assert sim.status == "finished:completed", sim.details
    dep_metrics = deployment_run.metrics()
    sim_metrics = json.loads((sim.run_dir / "metrics.json").read_text())
    rows = []
    for model in ("teacher", "student"):
        d, s = _pooled(dep_metrics, model), _pooled(sim_metrics, model)
        rows.append((model, d["auc"], s["auc"], d["accuracy"], s["accuracy"]))
    print(f"\ndeployment {deployment_run.wall_s:.0f} s wall vs simulation {sim.wall_s:.0f} s wall (same run config)")
    for model, dauc, sauc, dacc, sacc in rows:
        print(f"  {model}: AUC deployment {dauc:.6f} simulation {sauc:.6f} | ACC deployment {dacc:.6f} simulation {sacc:.6f}")
    d_ce = [e["ce"] for e in dep_metrics["student"]]
    s_ce = [e["ce"] for e in sim_metrics["student"]]
    print(f"  student CE per round: deployment {d_ce} simulation {s_ce}")
    # Same sites (the ImageFolders were written from the simulation's specs, PNG is lossless).
    key = lambda m: sorted((s["name"], s["train_counts"], s["test_counts"]) for s in m["sites"])  # noqa: E731
    assert key(dep_metrics) == key(sim_metrics)
    for model, dauc, sauc, dacc, sacc in rows:
        assert abs(dauc - sauc) <= SIM_TOLERANCE, (model, dauc, sauc)
        assert abs(dacc - sacc) <= SIM_TOLERANCE, (model, dacc, sacc)
    assert dep_metrics["final"]["num_examples"] == sim_metrics["final"]["num_examples"]


# --------------------------------------------------------------------------- (d)


def test_d_killed_site_rejoins_and_the_run_completes(federation):
    victim = "wli-1"
    registered = federation.sites[victim].node_id
    events: dict[str, Any] = {}

    def on_poll(row: dict[str, Any], fed: Loopback, log: Path) -> None:
        if "killed" in events or not log.is_file():
            return
        # The bank is built: the teacher phase is over and the WLI student round comes next.
        if "[knowledge 1]" in log.read_text(errors="replace"):
            events["killed"] = time.time()
            events["kill_exit"] = fed.kill_supernode(victim)
            # Activation is refused until the SuperLink's heartbeat deadline for the dead node
            # passes (>= 33 s after the kill): no point trying before 30 s.
            proc = fed.restart_supernode(victim, timeout=240, not_before_s=30)
            events["rejoined_s"] = time.time() - events["killed"]
            events["attempts"] = fed._restarts[victim]
            events["log"] = proc.log

    result = federation.run(
        {"fed.run_name": "restart", "fed.student_rounds": 2, "fed.round_timeout": 120.0, "pagkd.kmeans_iters": 1},
        timeout=RUN_TIMEOUT_S, on_poll=on_poll,
    )
    log = result.log.read_text(errors="replace")
    dropped = [line for line in log.splitlines() if "dropped site" in line]
    print(f"\nrestart run {result.run_id}: {result.status} in {result.wall_s:.0f} s; killed {victim} "
          f"(exit {events.get('kill_exit')}), rejoined after {events.get('rejoined_s', float('nan')):.0f} s "
          f"in {events.get('attempts')} start(s)")
    print("  dropped:\n    " + "\n    ".join(dropped))
    assert "killed" in events, f"the run never reached the student phase: {result.log}"
    assert result.status == "finished:completed", f"{result.details}; see {result.log}"
    supernode_log = federation.supernodes[victim].text()
    assert f"SuperNode ID: {registered}" in supernode_log  # same key, same node
    # It did work again after the restart (a ClientApp ran for this run).
    assert "Receiving:" in supernode_log.split(f"SuperNode ID: {registered}", 1)[1]
    metrics = result.metrics()
    rounds = {e["round"]: e["sites"] for e in metrics["student"]}
    student_evals = [e for e in metrics["evaluation"] if e["model"] == "student"]
    print(f"  student rounds: {rounds}; evaluated sites: {[sorted(e['sites']) for e in student_evals]}")
    assert sorted(rounds) == [1, 2]
    assert victim in student_evals[-1]["sites"], student_evals[-1]["sites"]
    assert metrics["final"]["num_examples"] == 2 * federation.config["data.test_per_site"]
    assert federation.node_status()[registered] == "online"
