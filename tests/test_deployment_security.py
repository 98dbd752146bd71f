"""What a hospital's security officer signs off, on a real deployment on loopback (TLS + SuperNode
auth, through :mod:`tests.harness.loopback`): one federation (1 NBI + 1 WLI site, the smallest run with a
student round, no distillation) serves every test, in this order:

1. (control) a site holding ``ca.crt`` and its own key, pointed at the Fleet API listener the sites
   dial, cannot list nodes or runs, submit a run or unregister a node; the operator, on the
   control listener, can;
2. (trusted) both sites pin the bundle digest (``deploy/supernode.py --app-digest``, the site's
   own SuperNode, outside the bundle): the repository's app runs to completion (with
   ``train.device`` set to a device the sites lack: each site's own node-config ``device`` wins);
   a bundle with one changed file, whose own code would run first at import, is refused by every
   site before Flower installs it, with one log line naming both digests, and the run fails;
3. (egress) each site's own ``egress.jsonl`` agrees with the coordinator's ``egress.json``;
   discovery entries carry site names; the registry's status lists the sites by name;
4. (lifetime) a SuperNode SIGKILLed while its ClientApp works leaves no ClientApp behind, and a
   SuperLink SIGKILLed while its ServerApp waits leaves no ServerApp behind.

Slow (each ClientApp message is a fresh Python process); timings are printed (``pytest -s``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from client.app import DRILL_DELAY_ENV
from deploy import bundle, registry
from tests.harness import loopback
from tests.harness.loopback import CONNECTION, REPO

pytestmark = pytest.mark.slow

RUN_TIMEOUT_S = 600.0
CONFIG: dict[str, Any] = {
    "model.student": "test_resnet",
    "model.teacher": "test_resnet",
    "data.nbi_sites": 1,
    "data.wli_sites": 1,
    "pagkd.use_pro": False,
    "pagkd.use_den": False,
    "fed.student_init": "scratch",
    "fed.teacher_rounds": 0,
    "fed.student_rounds": 1,
    "fed.round_timeout": 120.0,
    "train.device": "cuda:7",  # the coordinator's wish; every site's node config says device='cpu'
}
HEALTHCHECK = REPO / "deploy" / "docker" / "healthcheck.py"


@pytest.fixture(scope="module")
def digest() -> str:
    return bundle.summary(bundle.build(REPO))["digest"]


@pytest.fixture(scope="module")
def federation(tmp_path_factory, digest):
    with loopback.checked_federation(
        tmp_path_factory.mktemp("loopback-security"),
        run_config=CONFIG,
        verbose=True,
        node_config={"device": "cpu"},
        app_digest=digest,
    ) as fed:
        yield fed


@pytest.fixture(scope="module")
def trusted_run(federation):
    result = federation.run({"fed.run_name": "trusted"}, timeout=RUN_TIMEOUT_S)
    print(f"\ntrusted run {result.run_id}: {result.status} in {result.wall_s:.0f} s wall")
    return result


# --------------------------------------------------------------------------- 1. control


def test_site_cannot_use_the_control_api(federation, tmp_path):
    fed = federation
    # What a site has: ca.crt, its own key, the address it dials (the Fleet API listener).
    fed.write_cli_config(home="site-cli", address=fed.address)
    victim = str(fed.sites["wli-0"].node_id)
    attempts = {
        "list nodes": ("supernode", "list", CONNECTION),
        "list runs": ("ls", CONNECTION),
        "unregister": ("supernode", "unregister", victim, CONNECTION),
        "submit": ("run", str(REPO), CONNECTION),
    }
    for what, args in attempts.items():
        out = fed.flwr_json_raw(*args, home="site-cli")
        print(f"\nsite tries to {what}: {out}")
        assert out.get("success") is False, (what, out)
        assert "not served on the Fleet API listener" in str(out.get("error-message")), (what, out)
    # The operator, on the control listener, sees both sites still registered.
    status = fed.node_status()
    assert {str(k) for k in status} >= {str(s.node_id) for s in fed.sites.values()}
    assert fed.flwr_json("ls", CONNECTION)["success"]


# --------------------------------------------------------------------------- 2. trusted code, device


def test_pinned_bundle_runs_on_the_sites_own_device(federation, trusted_run):
    assert trusted_run.status == "finished:completed", f"{trusted_run.details}; see {trusted_run.log}"
    metrics = trusted_run.metrics()
    assert sorted(s["name"] for s in metrics["sites"]) == ["nbi-0", "wli-0"]
    assert metrics["final"] is not None


def test_modified_bundle_is_refused(federation, trusted_run, digest, tmp_path_factory):
    app = tmp_path_factory.mktemp("modified-app") / "app"
    shutil.copytree(REPO, app, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "__pycache__", "tests", "benchmarks"))
    # One changed file: code of its own that runs on import, before any check a bundle could carry
    # (a coordinator shipping whatever it likes); it leaves a mark in the FLWR_HOME of the process.
    with open(app / "client" / "app.py", "a") as handle:
        handle.write("\nimport os, pathlib; pathlib.Path(os.environ.get('FLWR_HOME', '.'), 'bundle-code-ran').touch()\n")
    changed = bundle.summary(bundle.build(app))["digest"]
    assert changed != digest
    result = federation.run({"fed.run_name": "modified"}, timeout=RUN_TIMEOUT_S, app_dir=app)
    print(f"\nmodified bundle run {result.run_id}: {result.status} in {result.wall_s:.0f} s wall ({result.details})")
    assert result.status != "finished:completed"
    for name, proc in federation.supernodes.items():
        lines = [ln for ln in proc.text().splitlines() if "REFUSES app bundle" in ln]
        assert lines, f"{name}: no refusal line in {proc.log}"
        assert f"site '{name}' REFUSES app bundle {changed}: it trusts only --app-digest {digest}. Fix: " in lines[0], lines[0]
        print(f"{name}: {lines[0].strip()[:300]}")
        # Never installed, never run: the site's FLWR_HOME holds the trusted bundle only, and no mark.
        home = federation.homes / f"supernode-{name}"
        assert len(list((home / "apps").iterdir())) == 1, list((home / "apps").iterdir())
        assert not (home / "bundle-code-ran").exists(), f"code of the refused bundle ran at site {name}"
    run_log = result.log.read_text(errors="replace")
    assert "UntrustedBundle" in run_log and "site 'wli-0' REFUSES app bundle" in run_log, run_log[-3000:]
    assert "'wli-0': ClientApp error: <class" in run_log, run_log[-3000:]  # named by site, not "node <id>"
    assert "no reply within" not in run_log, "a site did not answer its refusal at once"
    entries = json.loads((result.run_dir / "ledger.json").read_text())["egress"]
    assert {e["site"] for e in entries} == {"nbi-0", "wli-0"}, {e["site"] for e in entries}
    # No code of that bundle ran at a site: the sites' own egress logs have no entry for the run.
    for name in federation.sites:
        sent = [json.loads(ln) for ln in (federation.site_state(name) / "egress.jsonl").read_text().splitlines()]
        assert not [e for e in sent if e["run-name"] == "modified"], name


# --------------------------------------------------------------------------- 3. egress, names


def test_site_egress_logs_match_the_coordinator(federation, trusted_run):
    egress_json = trusted_run.run_dir / "egress.json"
    entries = json.loads(egress_json.read_text())
    assert not [e for e in entries if str(e["site"]).startswith("node ")], "an egress entry is not named by site"
    assert {e["site"] for e in entries if e["phase"] == "discover"} == {"nbi-0", "wli-0"}
    for name in federation.sites:
        site_log = federation.site_state(name) / "egress.jsonl"
        out = subprocess.run(
            [sys.executable, "-m", "client.egress", "compare", "--site-log", str(site_log), "--coordinator", str(egress_json)],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        print(f"\n{name}: {out.stdout.strip()} {out.stderr.strip()}")
        assert out.returncode == 0, out.stdout + out.stderr
    # One forged line in a site's log is reported.
    from common.egress import compare, read_site_log

    sent = [e for e in read_site_log(federation.site_state("wli-0") / "egress.jsonl") if e["run-name"] == "trusted"]
    forged = [*sent[:-1], {**sent[-1], "bytes": sent[-1]["bytes"] + 1}]
    assert len(compare("wli-0", forged, entries)) == 2


def test_registry_status_names_the_sites(federation, trusted_run):
    rows = registry.status(federation.flwr_json, federation.registry, CONNECTION)
    print("\n" + "\n".join(str(r) for r in rows))
    assert sorted(r["site"] for r in rows) == ["nbi-0", "wli-0"]
    for row in rows:
        assert row["node-id"] == str(federation.sites[row["site"]].node_id)
        assert row["status"] == "online" and row["last-contact"].startswith("online since")
        assert row["fingerprint"].startswith("SHA256:")


def _health(fed, service_pid: int, *extra: str) -> subprocess.CompletedProcess:
    """The image's health probe (deploy/docker/healthcheck.py) for the service ``service_pid``,
    with its SuperExec child checked and ``extra`` arguments."""
    command = [sys.executable, str(HEALTHCHECK), f"127.0.0.1:{fed.health_port}", "--superexec", "--service-pid", str(service_pid)]
    return subprocess.run([*command, *extra], capture_output=True, text=True)


def test_health_checks(federation):
    fed = federation
    ok = _health(fed, fed.superlink.pid, "--cert", str(fed.certs / "server.pem"), "--min-days", "30")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # A site: its SuperNode's checking SuperExec child (deploy/supernode.py) is alive, the coordinator reachable.
    site = _health(fed, fed.supernodes["wli-0"].pid, "--reach", fed.address, "--ca", str(fed.ca_cert))
    assert site.returncode == 0, site.stdout + site.stderr


# --------------------------------------------------------------------------- 4. lifetime (destroys the federation: last)


def _alive(pids: list[int]) -> list[int]:
    return [p for p in pids if loopback._state(p) not in ("", "Z")]


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.time() + timeout
    while _alive(pids) and time.time() < deadline:
        time.sleep(0.5)
    return _alive(pids)


def test_no_app_process_outlives_its_service(federation, trusted_run):
    fed = federation
    # The WLI site again, with a ClientApp that is busy for minutes on its student round.
    fed.supernodes["wli-0"].stop()
    proc = fed.restart_supernode("wli-0", env={DRILL_DELAY_ENV: "student.train=400"})
    run_id, _ = fed.submit({"fed.run_name": "lifetime", "fed.round_timeout": 500.0})
    deadline = time.time() + 240
    clientapps: list[int] = []
    while time.time() < deadline and not ("drill (" in proc.text() and clientapps):
        clientapps = [p for p in loopback._descendants(proc.pid) if "flwr-clientapp" in loopback._cmdline(p)]
        time.sleep(1.0)
    assert clientapps, f"no busy ClientApp under the WLI SuperNode: {proc.log}"
    helpers = [p for p in loopback._descendants(proc.pid) if p not in clientapps]
    started = time.time()
    os.kill(proc.pid, signal.SIGKILL)  # the SuperNode alone, as a crash or an OOM kill does
    proc.popen.wait(timeout=10)  # reaped, as systemd or init does (a zombie still "exists" for os.kill(pid, 0))
    left = _wait_gone(clientapps + helpers, 30.0)
    print(
        f"\nSuperNode killed: ClientApp(s) {clientapps} and helpers {helpers}; left after {time.time() - started:.0f} s: {left}"
    )
    assert not left, {p: loopback._cmdline(p) for p in left}

    serverapps = fed.serverapp_pids()
    assert serverapps, "no ServerApp is running for the lifetime run"
    helpers = [p for p in loopback._descendants(fed.superlink.pid) if p not in serverapps]
    started = time.time()
    os.kill(fed.superlink.pid, signal.SIGKILL)
    fed.superlink.popen.wait(timeout=10)
    left = _wait_gone(serverapps + helpers, 30.0)
    print(f"SuperLink killed: ServerApp(s) {serverapps} and helpers {helpers}; left after {time.time() - started:.0f} s: {left}")
    assert not left, {p: loopback._cmdline(p) for p in left}
    health = _health(fed, fed.superlink.pid)
    assert health.returncode == 1 and "unhealthy" in health.stderr
