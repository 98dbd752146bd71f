"""End to end on a real deployment: ``flower-superlink`` + 4 ``flower-supernode`` on loopback, TLS and
SuperNode authentication on, through :mod:`tests.harness.loopback`.

One federation (SuperLink + 2 NBI + 2 WLI SuperNodes, sites written from the simulation's own
synthetic specs) and one run serve every test of this module:

* (a) the run completes, with its outputs;
* (d) a WLI site SIGKILLed once the run has started (right after discovery) and restarted with its
  key rejoins as the same node, and the run completes with it: nothing dropped;
* (e) that run's result equals the simulation of the same run config and sites (the WLI site was
  idle while it was down, so the crash must not change a single number);
* (b) a SuperNode with an unregistered key is refused;
* (c) a SuperNode that does not trust the federation's CA cannot connect.

Slow: each ClientApp message starts a fresh Python process (torch + timm), so a run takes minutes
on 2 cores; hence one run, and (b)/(c) start their SuperNodes together. Timings are printed
(``pytest -s``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from client.app import DRILL_DELAY_ENV
from tests.harness import loopback
from tests.harness.loopback import Loopback, RunResult

pytestmark = pytest.mark.slow

RUN_TIMEOUT_S = 900.0
SIM_TOLERANCE = 0.05
VICTIM = "wli-1"


# The victim rejoins 35-65 s after its kill (the SuperLink refuses it until its heartbeat
# deadline). On a quiet machine the teacher round is over well before that, so the NBI sites hold
# the knowledge phase back with the drill knob: the student round, the victim's first work, then
# starts >= 75 s after the teacher round, whatever the machine's load.
HOLD_BACK = {DRILL_DELAY_ENV: "knowledge.seed=75"}


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    with loopback.checked_federation(
        tmp_path_factory.mktemp("loopback"), verbose=True, site_env={"nbi-0": HOLD_BACK, "nbi-1": HOLD_BACK}
    ) as fed:
        yield fed


@pytest.fixture(scope="module")
def crash(federation) -> dict[str, Any]:
    """What happened to the victim during the run (filled by the run's poll hook)."""
    return {"registered": federation.sites[VICTIM].node_id}


@pytest.fixture(scope="module")
def deployment_run(federation, crash) -> RunResult:
    def on_poll(row: dict[str, Any] | None, fed: Loopback, log: Path) -> None:
        if "killed" in crash or not log.is_file():
            return
        # Discovery is over; the WLI sites have nothing to do until the bank is built (teacher
        # round, its evaluation and the knowledge phase come first).
        if "discovered" in log.read_text(errors="replace"):
            crash["killed"] = time.time()
            crash["kill_exit"] = fed.kill_supernode(VICTIM)
            # Activation is refused until the SuperLink's heartbeat deadline for the dead node
            # passes (>= 33 s after the kill): no point trying before 30 s.
            proc = fed.restart_supernode(VICTIM, timeout=240, not_before_s=30)
            crash["rejoined_s"] = time.time() - crash["killed"]
            crash["attempts"] = fed._restarts[VICTIM]
            crash["log"] = proc.log

    result = federation.run({"fed.run_name": "deployment"}, timeout=RUN_TIMEOUT_S, on_poll=on_poll)
    print(
        f"\ndeployment run {result.run_id}: {result.status} in {result.wall_s:.0f} s wall "
        f"(SuperLink elapsed {result.elapsed_s} s); killed {VICTIM} (exit {crash.get('kill_exit')}), "
        f"rejoined after {crash.get('rejoined_s', float('nan')):.0f} s in {crash.get('attempts')} start(s)"
    )
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


# --------------------------------------------------------------------------- (b), (c)

# Refused attempts (max 2 tries, 30 s apart at most) started together: they only wait.
INTRUDERS = {
    "unregistered": dict(site="wli-0", root_certificates=None, unregistered=True),
    "other-ca": dict(site="nbi-0", root_certificates="other", unregistered=False),
    "system-cas": dict(site="nbi-0", root_certificates="", unregistered=False),  # no --root-certificates
}


@pytest.fixture(scope="module")
def refused(federation, deployment_run) -> dict[str, tuple[int | None, str, dict[int, str], dict[int, str]]]:
    """name -> (exit code, SuperNode log, node status before, node status after)."""
    before = federation.node_status()
    procs = {}
    for name, spec in INTRUDERS.items():
        kwargs: dict[str, Any] = {"log_name": f"supernode-{name}", "max_retries": 2, "max_wait_time": 30}
        if spec["unregistered"]:
            kwargs["key"] = federation.unregistered_key("intruder")
        if spec["root_certificates"] is not None:
            kwargs["root_certificates"] = federation.other_ca() if spec["root_certificates"] == "other" else ""
        procs[name] = federation.start_supernode(spec["site"], **kwargs)
    outcome = {}
    for name, proc in procs.items():
        code = federation.wait_exit(proc, timeout=180)
        outcome[name] = (code, proc.text())
        print(f"\n{name} SuperNode: exit {code}; log tail:\n{proc.text()[-600:]}")
    after = federation.node_status()
    return {name: (code, text, before, after) for name, (code, text) in outcome.items()}


def test_b_unregistered_supernode_is_refused(federation, refused):
    code, text, before, after = refused["unregistered"]
    assert code is not None, "the SuperNode with an unregistered key is still running"
    assert code != 0
    assert "Failed to activate SuperNode" in text and "2004" in text, text[-2000:]
    assert "SuperNode ID" not in text
    # deploy/superlink.py names the refused key by fingerprint (ssh-keygen -lf), not as Flower's PEM
    from deploy.registry import fingerprint

    log = federation.superlink.text()
    intruder = fingerprint(federation.certs / "intruder.pub")
    assert f"refused SuperNode key {intruder}: no site is registered with it" in log, log[-2000:]
    assert "BEGIN PUBLIC KEY" not in log
    registered = {site.node_id for site in federation.sites.values()}
    assert set(after) == registered, f"a node appeared that was never registered: {after}"
    assert all(s == "online" for s in after.values()), after


@pytest.mark.parametrize("trust", ["other-ca", "system-cas"])
def test_c_supernode_without_the_federation_ca_cannot_connect(refused, trust):
    code, text, before, after = refused[trust]
    assert code is not None, f"the SuperNode trusting {trust} is still running"
    assert code != 0
    assert "CERTIFICATE_VERIFY_FAILED" in text, text[-2000:]
    assert "SuperNode ID" not in text
    assert after == before


# --------------------------------------------------------------------------- (e)


def test_e_deployment_equals_simulation(federation, deployment_run, tmp_path):
    from server import launch

    assert deployment_run.status == "finished:completed"
    config = {**federation.config, "fed.run_dir": str(tmp_path / "runs"), "fed.run_name": "simulation"}
    sim = launch.simulate(
        config, num_supernodes=4, cpus_per_client=1, work_dir=tmp_path / "sim", timeout_s=RUN_TIMEOUT_S, stream=False
    )
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


def test_d_killed_site_rejoins_and_the_run_completes(federation, deployment_run, crash):
    assert "killed" in crash, f"the run never got past discovery: {deployment_run.log}"
    assert crash["kill_exit"] == -9
    assert deployment_run.status == "finished:completed", f"{deployment_run.details}; see {deployment_run.log}"
    registered = crash["registered"]
    supernode_log = federation.supernodes[VICTIM].text()
    assert f"SuperNode ID: {registered}" in supernode_log  # same key, same node
    # It did work again after the restart (a ClientApp ran for this run).
    assert "Receiving:" in supernode_log.rsplit(f"SuperNode ID: {registered}", 1)[1]
    metrics = deployment_run.metrics()
    assert all(VICTIM in e["sites"] for e in metrics["student"]), metrics["student"]
    student_evals = [e for e in metrics["evaluation"] if e["model"] == "student"]
    assert VICTIM in student_evals[-1]["sites"], student_evals[-1]["sites"]
    assert "dropped site" not in deployment_run.log.read_text(errors="replace")
    assert federation.node_status()[registered] == "online"
