"""Fast checks of the deployment's audit and trust pieces (no Flower processes): egress log and its
comparison, bundle digest and contents, the site's pin (deploy/supernode.py) and device, health
probes, registry."""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from client import egress as site_egress
from client import policy
from common.egress import compare, describe
from common.records import Payload
from deploy import bundle, registry, supernode
from deploy.supernode import UntrustedBundle, check_fab, fab_digest, parse_pins

ROOT = Path(__file__).resolve().parents[1]
HEALTHCHECK = ROOT / "deploy" / "docker" / "healthcheck.py"


def _payload(groups: int = 3) -> Payload:
    return Payload(
        "knowledge.sums",
        arrays={"prototype_sum": np.zeros((3, 1, 4, 8), np.float32)},
        config={"groups": groups},
        weights={"student": {"w": np.zeros(5, np.float32)}},
    )


# ----------------------------------------------------------------- egress


def test_site_log_round_trip_and_compare(tmp_path: Path) -> None:
    node_config = {"state-dir": str(tmp_path / "state")}
    for groups in (3, 4):
        reply = site_egress.logged(
            _payload(groups), node_config, site="nbi-a", run_id=7, run_name="r1", request="knowledge.stats"
        )
        assert reply.kind == "knowledge.sums"
    lines = (tmp_path / "state" / "egress.jsonl").read_text().splitlines()
    assert len(lines) == 2
    entry = json.loads(lines[0])
    assert entry["arrays"] == {"prototype_sum": {"shape": [3, 1, 4, 8], "dtype": "float32"}}
    assert entry["config"] == {"groups": 3} and entry["run-id"] == 7 and entry["site"] == "nbi-a"
    coordinator = [{"phase": "knowledge", "direction": "from_site", "site": "nbi-a", **describe(_payload(g))} for g in (4, 3)]
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "egress.json").write_text(json.dumps(coordinator))
    assert (
        site_egress.main(
            ["compare", "--site-log", str(tmp_path / "state" / "egress.jsonl"), "--coordinator", str(run_dir / "egress.json")]
        )
        == 0
    )
    # The coordinator lists a message the site never sent, and misses one it did.
    (run_dir / "egress.json").write_text(json.dumps([coordinator[0], {**coordinator[1], "bytes": 1}]))
    assert (
        site_egress.main(
            ["compare", "--site-log", str(tmp_path / "state" / "egress.jsonl"), "--coordinator", str(run_dir / "egress.json")]
        )
        == 1
    )
    problems = compare("nbi-a", [json.loads(line) for line in lines], [coordinator[0], {**coordinator[1], "bytes": 1}])
    assert len(problems) == 2 and "does not list" in problems[0] and "did not send" in problems[1]


def test_unwritable_site_log_turns_the_reply_into_an_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    reply = site_egress.logged(_payload(), {"state-dir": str(blocker)}, site="nbi-a", run_id=1, run_name="", request="x")
    # Statistics are a DP release: their count is written first, so that is the file named.
    assert reply.kind == "error" and "count of DP releases" in reply.config["reason"] and "state-dir" in reply.config["reason"]
    metadata = Payload("error", config={"site-name": "nbi-a", "reason": "no data"})
    reply = site_egress.logged(metadata, {"state-dir": str(blocker)}, site="nbi-a", run_id=1, run_name="", request="x")
    assert reply.kind == "error" and "egress log" in reply.config["reason"] and "state-dir" in reply.config["reason"]
    assert site_egress.logged(_payload(), {}, site="s", run_id=1, run_name="", request="x").kind == "knowledge.sums"


# ----------------------------------------------------------------- bundle


@pytest.fixture(scope="module")
def fab() -> bytes:
    return bundle.build(ROOT)


def test_bundle_holds_the_app_code_only(fab: bytes) -> None:
    info = bundle.summary(fab)
    assert set(info["top-level"]) == {".info", "client", "common", "server", "pyproject.toml"}, info["top-level"]
    # Every file is app source: nothing but .py files of the three packages and the app's metadata.
    assert all(f.endswith(".py") for f in info["list"] if f.split("/")[0] in ("client", "common", "server")), info["list"]
    # No larger than the app's own sources plus the archive's per-file overhead (tests/ and
    # benchmarks/ would add ~460 KB of sources).
    sources = sum(p.stat().st_size for package in ("client", "common", "server") for p in (ROOT / package).rglob("*.py"))
    sources += (ROOT / "pyproject.toml").stat().st_size
    assert info["bytes"] < sources + 500 * info["files"], (info["bytes"], sources, info["files"])


def _rezip(fab: bytes, compression: int = zipfile.ZIP_DEFLATED, change: dict[str, bytes] | None = None) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(fab)) as src, zipfile.ZipFile(out, "w", compression) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, (change or {}).pop(info.filename, src.read(info)))
        for name, data in (change or {}).items():
            dst.writestr(name, data)
    return out.getvalue()


def test_fab_digest_counts_every_file_but_flowers_manifest(fab: bytes) -> None:
    digest = fab_digest(fab)
    assert digest.startswith("sha256:") and len(digest) == 71
    # The same files stored another way (another zlib, no compression) or with another manifest: same digest.
    assert fab_digest(_rezip(fab, zipfile.ZIP_STORED)) == digest
    assert fab_digest(_rezip(fab, change={".info/CONTENT": b"anything"})) == digest
    # One changed byte, or one more file anywhere (byte code included), is another bundle.
    app = zipfile.ZipFile(io.BytesIO(fab)).read("client/app.py")
    assert fab_digest(_rezip(fab, change={"client/app.py": app + b"\n"})) != digest
    assert fab_digest(_rezip(fab, change={"client/__pycache__/app.cpython-311.pyc": b"x"})) != digest
    assert fab_digest(_rezip(fab, change={".info/extra": b"x"})) != digest


def test_pin_accepts_the_pinned_bundle_and_refuses_another(fab: bytes) -> None:
    digest, other = fab_digest(fab), "sha256:" + "0" * 64
    assert parse_pins("any") is None
    assert parse_pins(f"{other}, {digest}") == {other, digest}
    for bad in ("", "sha256:abc", digest.upper(), f"{digest},any", "md5:" + "0" * 32):
        with pytest.raises(ValueError, match="python -m deploy.bundle"):
            parse_pins(bad)
    sha = hashlib.sha256(fab).hexdigest()
    assert check_fab(fab, parse_pins(digest), "wli-a", sha) == digest
    assert check_fab(fab, parse_pins(f"{other},{digest}"), "wli-a") == digest
    assert check_fab(fab, None, "wli-a") == digest  # any
    with pytest.raises(UntrustedBundle) as refused:
        check_fab(fab, parse_pins(other), "wli-a", sha)
    line = str(refused.value)
    assert line.startswith(f"site 'wli-a' REFUSES app bundle {digest}: it trusts only --app-digest {other}. Fix: ")
    assert "\n" not in line and "python -m deploy.bundle" in line and "FEDPAGKD_APP_DIGEST" in line
    # Bytes that are not what the SuperNode named the bundle by (Flower loads it by that name).
    with pytest.raises(UntrustedBundle, match="does not match its FAB hash"):
        check_fab(fab, parse_pins(digest), "wli-a", "f" * 64)


def test_the_coordinator_names_a_refusing_site() -> None:
    from deploy.supernode import refusal
    from server.channel import SITE_REFUSAL_RE

    err = UntrustedBundle(refusal("wli-a", "sha256:" + "1" * 64, {"sha256:" + "2" * 64}))
    reason = str(type(err)) + ":<'" + str(err) + "'>"  # how flwr-clientapp reports an exception to the ServerApp
    assert SITE_REFUSAL_RE.search(reason).group(1) == "wli-a"


def test_site_clientapp_checks_the_bundle_before_flower_installs_it(fab: bytes, monkeypatch) -> None:
    """The hook sits where Flower's flwr-clientapp pulls the task and then installs the FAB."""
    import inspect
    from types import SimpleNamespace

    import flwr.supercore
    import flwr.supernode.cli as flower_cli

    flower = importlib.import_module("flwr.supernode.runtime.run_clientapp")
    source = inspect.getsource(flower.run_clientapp)
    assert (
        0
        < source.index("pull_task_input(client)")
        < source.index("install_from_fab(fab.content")
        < source.index("load_client_app_fn(")
    )
    installed: list[bytes] = []
    pulled = SimpleNamespace(hash_str=hashlib.sha256(fab).hexdigest(), content=fab)
    context = SimpleNamespace(node_config={"site-name": "wli-a"}, node_id=7)
    monkeypatch.setattr(flower, "pull_task_input", lambda client: ("message", context, "run", pulled))
    monkeypatch.setattr(flower, "install_from_fab", lambda content, **kwargs: installed.append(content))
    monkeypatch.setattr(flower, "log", flower.log)  # restored after the test (the hook quietens it)
    flower_exit = importlib.import_module("flwr.supercore.exit.exit")
    monkeypatch.setattr(flower_exit, "FORCE_EXIT_TIMEOUT_SECONDS", flower_exit.FORCE_EXIT_TIMEOUT_SECONDS)  # restored

    def flwr_clientapp() -> None:  # Flower's order: pull the task, install its FAB
        _, _, _, task_fab = flower.pull_task_input(None)
        flower.install_from_fab(task_fab.content, skip_prompt=True)

    monkeypatch.setattr(flower_cli, "flwr_clientapp", flwr_clientapp)
    monkeypatch.setattr(sys, "argv", ["pytest"])
    logged: list[str] = []
    monkeypatch.setattr(flwr.supercore, "log", lambda level, msg, *args: logged.append(msg % args))
    supernode.main([supernode.CLIENTAPP, "--app-digest", fab_digest(fab), "--token", "t"])
    assert installed == [fab]
    with pytest.raises(UntrustedBundle):
        supernode.main([supernode.CLIENTAPP, "--app-digest", "sha256:" + "1" * 64])
    assert installed == [fab], "an untrusted bundle reached install_from_fab"
    assert len(logged) == 1 and logged[0].startswith(f"site 'wli-a' REFUSES app bundle {fab_digest(fab)}: "), logged
    assert flower_exit.FORCE_EXIT_TIMEOUT_SECONDS == supernode.CLIENTAPP_EXIT_GRACE_S


REPO = Path(__file__).resolve().parent.parent
SLOW_EXIT_PUSH = """
import sys, time
from pathlib import Path
from flwr.supercore.exit import add_exit_handler, flwr_exit
if sys.argv[1] == "given-time":
    from deploy import supernode
    supernode.give_exit_handlers_time()
def push_task_output():  # what the ClientApp's exit handler does: a push the loaded host makes slow
    time.sleep(7)
    Path(sys.argv[2]).write_text("pushed")
add_exit_handler(push_task_output)
flwr_exit(0)
"""


@pytest.mark.parametrize("mode, pushed", [("flower-default", False), ("given-time", True)])
def test_the_site_clientapp_finishes_its_exit_push(tmp_path: Path, mode: str, pushed: bool) -> None:
    """Flower forces a ClientApp's exit 5 s after it starts its exit handlers: a slower push of the
    task's output is cut off (the task never finishes; see supernode.CLIENTAPP_EXIT_GRACE_S). The
    site's ClientApp gives them the time."""
    out = tmp_path / "pushed"
    done = subprocess.run([sys.executable, "-c", SLOW_EXIT_PUSH, mode, str(out)], cwd=REPO, capture_output=True, timeout=60)
    assert out.is_file() == pushed, done.stderr.decode()[-2000:]


def test_the_site_supernode_stores_one_reply_per_message(monkeypatch) -> None:
    """Flower answered a message with its own error (an expired task); the ClientApp's real reply
    that comes after it is not stored as a second reply (Flower's own state stores both)."""
    from flwr.app import Error, Message, RecordDict
    from flwr.common.constant import ErrorCode
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    for name in ("run_id", "task_id", "node_id"):  # a message is made inside a task (as in server.inprocess)
        monkeypatch.setattr(TaskIdentity, f"_{name}", 1)

    class GuardedState(InMemoryNodeState):
        pass

    supernode.one_reply_per_message(GuardedState)

    def replies(state_class: type) -> list[Message]:
        state = state_class(ObjectStoreFactory().store())
        request = Message(RecordDict(), dst_node_id=1, message_type="query.x")
        request.metadata.__dict__["_message_id"] = "request-1"
        state.store_message(request)
        for reply in (
            Message(Error(ErrorCode.CLIENT_APP_CRASHED, "stopped responding"), reply_to=request),
            Message(RecordDict(), reply_to=request),
        ):
            reply.metadata.__dict__["_message_id"] = reply.object_id
            state.store_message(reply)
            if reply.has_error():  # Flower sends the error, then deletes it and its message
                sent = state.get_messages_legacy(is_reply=True)
                state.delete_messages(message_ids=[m.metadata.message_id for m in sent] + ["request-1"])
        return list(state.get_messages_legacy(is_reply=True))

    assert len(replies(InMemoryNodeState)) == 1  # Flower's: the late real reply is stored and sent
    assert replies(GuardedState) == []


def test_site_superexec_launches_only_guarded_clientapps(monkeypatch) -> None:
    import flwr.supercore.cli as flower_cli
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import ExecutionSpec

    flower = importlib.import_module("flwr.supercore.superexec.run_superexec")
    executors, started = [], []
    monkeypatch.setattr(flower_cli, "flower_superexec", lambda: executors.append(flower.get_executor("subprocess")))
    monkeypatch.setattr(sys, "argv", ["pytest"])
    monkeypatch.setattr(supernode.subprocess, "Popen", lambda args, **kwargs: started.append(args))
    pin = "sha256:" + "2" * 64
    supernode.main([supernode.SUPEREXEC, "--app-digest", pin, "--runtime-api-address", "127.0.0.1:1", "--insecure"])
    executor = executors[0]
    eligible, _ = executor.get_eligible_capacity({TaskType.CLIENT_APP, TaskType.SERVER_APP, TaskType.AGENT_APP})
    assert eligible == {TaskType.CLIENT_APP}

    def spec(task_type):
        return ExecutionSpec(
            task_type=task_type,
            runtime_api_address="127.0.0.1:1",
            token="tok",
            insecure=True,
            root_certificates_path=None,
            runtime_dependency_install=False,
            parent_pid=42,
            suppress_output=False,
            task_id=1,
        )

    assert str(executor.launch(spec(TaskType.SERVER_APP)).status) != "accepted" and not started
    assert str(executor.launch(spec(TaskType.CLIENT_APP)).status) == "accepted"
    assert started == [
        [
            sys.executable,
            supernode.SCRIPT,
            "flwr-clientapp",
            "--app-digest",
            pin,
            "--runtime-api-address",
            "127.0.0.1:1",
            "--token",
            "tok",
            "--insecure",
            "--parent-pid",
            "42",
        ]
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--app-digest is required"),
        (["--app-digest", "sha256:abc"], "expected sha256:<64"),
        (["--app-digest", "any", "--isolation", "subprocess"], "--isolation is set by"),
        (["--app-digest", "any", "--node-config", "site-name='a' app-digest='sha256:x'"], "not read any more"),
    ],
)
def test_site_supernode_refuses_a_wrong_start(args: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        supernode.main(args)


def test_site_device_replaces_train_device() -> None:
    from tests.conftest import tiny_config

    cfg = tiny_config(train__device="cuda:7")
    assert policy.site_config(cfg, {"device": "cpu"}, "s").train.device == "cpu"
    assert policy.site_config(cfg, {}, "s").train.device == "cuda:7"
    with pytest.raises(ValueError, match="node config device='nonsense'"):
        policy.site_config(cfg, {"device": "nonsense"}, "s")


# ----------------------------------------------------------------- health


def _health(*args: str) -> subprocess.CompletedProcess:
    # No health server listens on port 9 (discard): only the other checks decide the message.
    return subprocess.run([sys.executable, str(HEALTHCHECK), "127.0.0.1:9", *args], capture_output=True, text=True, timeout=60)


def test_certificate_expiry_is_unhealthy(tmp_path: Path) -> None:
    sys.path.insert(0, str(HEALTHCHECK.parent))
    import healthcheck
    from deploy.certs import make_certs

    assert make_certs.main(["--out", str(tmp_path / "short"), "--hours", "0.0005", "--san", "localhost"]) == 0
    assert make_certs.main(["--out", str(tmp_path / "day"), "--hours", "24", "--san", "localhost"]) == 0
    assert make_certs.main(["--out", str(tmp_path / "year"), "--san", "localhost"]) == 0
    time.sleep(2.5)
    assert "EXPIRED" in healthcheck.check_certificate(tmp_path / "short" / "server.pem", 0)
    assert "in 1.0 days" in healthcheck.check_certificate(tmp_path / "day" / "server.pem", 2)
    assert healthcheck.check_certificate(tmp_path / "day" / "server.pem", 0.5) is None
    assert healthcheck.check_certificate(tmp_path / "year" / "server.pem", 14) is None
    out = _health("--cert", str(tmp_path / "short" / "server.pem"))
    assert out.returncode == 1 and "EXPIRED" in out.stderr and "make_certs.py --reuse-ca" in out.stderr


def test_superexec_and_reach_checks(tmp_path: Path) -> None:
    sys.path.insert(0, str(HEALTHCHECK.parent))
    import healthcheck

    service = subprocess.Popen(["sleep", "60"])
    fake = tmp_path / "flower-superexec"
    fake.write_text("import time\ntime.sleep(60)\n")
    child = subprocess.Popen([sys.executable, str(fake), "--parent-pid", str(service.pid)])
    try:
        deadline = time.time() + 10
        while healthcheck.check_superexec(service.pid) is not None and time.time() < deadline:
            time.sleep(0.1)
        assert healthcheck.check_superexec(service.pid) is None
        child.kill()
        child.wait()
        assert "no flower-superexec child" in healthcheck.check_superexec(service.pid)
    finally:
        child.kill()
        service.kill()
        service.wait()
    assert "unreachable" in healthcheck.check_reach("127.0.0.1:9", None)


# ----------------------------------------------------------------- registry


def test_registry_register_and_status(tmp_path: Path) -> None:
    from deploy.certs import make_certs

    make_certs.generate(tmp_path, ["nbi-a", "wli-b"], [], force=True, tls=False)
    calls = []

    def flwr_json(*args: str) -> dict:
        calls.append(args)
        if args[:2] == ("supernode", "register"):
            return {"success": True, "node-id": 11 if "nbi-a" in args[2] else 22}
        return {
            "success": True,
            "nodes": [
                {"node-id": "11", "status": "online", "online-at": "2026-12-01 10:00:00Z", "offline-at": "N/A"},
                {"node-id": "22", "status": "offline", "online-at": "N/A", "offline-at": "2026-12-01 09:00:00Z"},
                {"node-id": "33", "status": "registered", "online-at": "N/A", "offline-at": "N/A"},
            ],
        }

    reg = tmp_path / "registry.json"
    registry.register(flwr_json, reg, tmp_path / "nbi-a.pub", "nbi-a", "c")
    registry.register(flwr_json, reg, tmp_path / "wli-b.pub", "wli-b", "c")
    with pytest.raises(registry.RegistryError, match="already registered as site 'nbi-a'"):
        registry.register(flwr_json, reg, tmp_path / "nbi-a.pub", "other", "c")
    rows = {r["site"]: r for r in registry.status(flwr_json, reg, "c")}
    assert rows["nbi-a"]["last-contact"] == "online since 2026-12-01 10:00:00Z"
    assert rows["wli-b"]["last-contact"] == "last seen 2026-12-01 09:00:00Z"
    assert rows["(not in registry)"]["node-id"] == "33"
    ssh_keygen = subprocess.run(["ssh-keygen", "-lf", str(tmp_path / "nbi-a.pub")], capture_output=True, text=True)
    if ssh_keygen.returncode == 0:
        assert ssh_keygen.stdout.split()[1] == rows["nbi-a"]["fingerprint"]


# ----------------------------------------------------------------- service files


def test_coordinator_keeps_the_control_api_apart() -> None:
    entry = (ROOT / "deploy" / "docker" / "coordinator-entrypoint.sh").read_text()
    assert "exec fedpagkd-superlink" in entry and "--control-api-address" in entry and "--fleet-api-address" in entry
    compose = (ROOT / "deploy" / "compose" / "coordinator.yaml").read_text()
    assert '"${FEDPAGKD_CONTROL_PUBLISH:-127.0.0.1:9093}:9093"' in compose
    assert "!deploy/superlink.py" in (ROOT / "deploy" / "docker" / "coordinator.Dockerfile.dockerignore").read_text()


def test_site_image_runs_the_checking_supernode() -> None:
    docker = ROOT / "deploy" / "docker"
    assert "COPY --chmod=0755 deploy/supernode.py /usr/local/bin/fedpagkd-supernode" in (docker / "site.Dockerfile").read_text()
    assert "!deploy/supernode.py" in (docker / "site.Dockerfile.dockerignore").read_text()
    script = ROOT / "deploy" / "supernode.py"
    assert script.read_text().startswith("#!/usr/bin/env python3\n") and script.stat().st_mode & 0o111


@pytest.mark.parametrize("unit", ["fedpagkd-coordinator.service", "fedpagkd-site.service"])
def test_systemd_units(unit: str) -> None:
    text = (ROOT / "deploy" / "systemd" / unit).read_text()
    for line in (
        "Restart=on-failure",
        "KillMode=control-group",
        "RestartSec=",
        "StateDirectory=",
        "WorkingDirectory=",
        "Environment=FLWR_HOME=",
        "StartLimitBurst=",
    ):
        assert line in text, (unit, line)
    assert "--insecure" not in text
    if unit == "fedpagkd-site.service":
        assert "state-dir=" in text and "device=" in text
        assert "--app-digest ${FEDPAGKD_APP_DIGEST}" in text and "app-digest=" not in text
        assert "/opt/fedpagkd/deploy/supernode.py --site-env /etc/fedpagkd/site.env" in text


def test_split_superlink_refuses_control_paths_on_the_fleet_port() -> None:
    import asyncio

    from deploy.superlink import ApiSplit

    seen, sent = [], []

    async def app(scope, receive, send):
        seen.append(scope["path"])

    async def send(message):
        sent.append(message)

    split = ApiSplit(app, fleet_port=8000)
    for path, port in (
        ("/v1/fleet/pull-messages", 8000),
        ("/health", 8000),
        ("/v1/control/list-runs", 9093),
        ("/v1/runtime/pull-messages", 9093),
        ("/v1/control/list-runs", 8000),
        ("/v1/runtime/x", 8000),
    ):
        asyncio.run(split({"type": "http", "path": path, "server": ("0.0.0.0", port)}, None, send))
    assert seen == ["/v1/fleet/pull-messages", "/health", "/v1/control/list-runs", "/v1/runtime/pull-messages"]
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [403, 403]


def test_lifetime_watches_the_superexec_and_its_service(tmp_path: Path) -> None:
    from common.lifetime import watched_pids

    service = subprocess.Popen(["sleep", "60"])
    fake = tmp_path / "flower-superexec"
    fake.write_text("import time\ntime.sleep(60)\n")
    child = subprocess.Popen([sys.executable, str(fake), "--parent-pid", str(service.pid)])
    try:
        time.sleep(0.5)
        assert watched_pids(child.pid) == {child.pid: "flower-superexec", service.pid: "sleep"}
    finally:
        child.kill()
        service.kill()
        child.wait()
        service.wait()


DEGRADED_LINE = "WARNING :   run DEGRADED, {} (50 % of the sites took part throughout, fed.min_site_share = {} %): lost wli-0"


@pytest.mark.parametrize(
    ("status", "log", "code", "last"),
    [
        ("finished:completed", "streaming", 0, "run 42: finished:completed (why)"),
        ("finished:failed", "streaming", 1, "run 42: finished:failed (why)"),
        (
            "finished:completed",
            DEGRADED_LINE.format("NOT accepted", 100),
            3,
            "run 42: finished:completed but DEGRADED, NOT accepted (50 % of the sites took part throughout, "
            "fed.min_site_share = 100 %): lost wli-0",
        ),
        (
            "finished:completed",
            DEGRADED_LINE.format("accepted", 50),
            0,
            "run 42: finished:completed but DEGRADED, accepted (50 % of the sites took part throughout, "
            "fed.min_site_share = 50 %): lost wli-0",
        ),
    ],
)
def test_follow_exits_with_the_run_outcome(
    tmp_path: Path, monkeypatch, capsys, status: str, log: str, code: int, last: str
) -> None:
    from deploy import follow

    fake = tmp_path / "flwr"
    fake.write_text(
        '#!/bin/sh\nif [ "$1" = list ]; then echo \'{"success": true, "runs": [{"status": "%s", '
        '"status-details": "why"}]}\'; else echo "%s"; fi\n' % (status, log)
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{__import__('os').environ['PATH']}")
    assert follow.main(["42", "conn"]) == code
    out = capsys.readouterr().out.splitlines()
    assert out[0] == log and out[-1] == last  # the log streamed, then the outcome


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_stop_signal_to_the_site_supernode_ends_its_superexec_and_secret(tmp_path: Path, signum: int) -> None:
    """SIGHUP (a closed terminal or SSH session) stops ``fedpagkd-supernode`` as SIGTERM does: its
    SuperExec child ends and its secret folder goes (the exit handlers ran), nothing left."""
    from server.processes import cmdline, descendants, free_port, process_state

    env = {**os.environ, "FLWR_HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    # No SuperLink listens there: the SuperNode keeps retrying, as one whose coordinator is down.
    cmd = [sys.executable, str(ROOT / "deploy" / "supernode.py"), "--app-digest", "any", "--insecure"]
    cmd += ["--superlink", f"127.0.0.1:{free_port()}", "--port", str(free_port())]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline, superexec = time.time() + 120, []
        while time.time() < deadline and not (superexec and list(tmp_path.glob(f"{supernode.SECRET_PREFIX}*"))):
            superexec = [p for p in descendants(proc.pid) if supernode.SUPEREXEC in cmdline(p)]
            time.sleep(0.5)
        assert superexec, "the SuperNode started no SuperExec"
        time.sleep(3.0)  # past Flower's start-up, into its connection retries
        os.kill(proc.pid, signum)
        proc.wait(timeout=60)
        deadline = time.time() + 30
        while time.time() < deadline and [p for p in superexec if process_state(p) not in ("", "Z")]:
            time.sleep(0.5)
        assert [p for p in superexec if process_state(p) not in ("", "Z")] == []
        assert list(tmp_path.glob(f"{supernode.SECRET_PREFIX}*")) == [], f"the exit handlers did not run: {proc.stderr.read()}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ----------------------------------------------------------------- TLS failures, named


@pytest.fixture()
def tls_server(tmp_path: Path):
    """``serve(certs folder)`` -> ``127.0.0.1:port`` of a TLS server presenting that folder's
    server.pem (it only completes handshakes), stopped at the end."""
    import socket
    import ssl
    import threading

    listeners = []

    def serve(folder: Path) -> str:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(folder / "server.pem", folder / "server.key")
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)

        def accept() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                try:
                    context.wrap_socket(conn, server_side=True).close()
                except (ssl.SSLError, OSError):
                    conn.close()

        threading.Thread(target=accept, daemon=True).start()
        return f"127.0.0.1:{listener.getsockname()[1]}"

    yield serve
    for listener in listeners:
        listener.close()


def test_an_expired_or_foreign_server_certificate_is_named_as_such(tmp_path: Path, tls_server, monkeypatch) -> None:
    from deploy import tlscheck
    from deploy.certs import make_certs

    san = ["--san", "localhost,127.0.0.1"]
    assert make_certs.main(["--out", str(tmp_path / "expired"), "--hours", "0.0005", *san]) == 0
    assert make_certs.main(["--out", str(tmp_path / "good"), *san]) == 0
    assert make_certs.main(["--out", str(tmp_path / "other"), *san]) == 0
    time.sleep(2.5)
    healthcheck = tlscheck._healthcheck()
    ca = tmp_path / "good" / "ca.crt"
    assert healthcheck.check_reach(tls_server(tmp_path / "good"), ca) is None
    foreign = healthcheck.check_reach(tls_server(tmp_path / "other"), ca)
    assert f"the SuperLink's certificate is not signed by {ca}" in foreign and "get the current ca.crt" in foreign
    address = tls_server(tmp_path / "expired")
    expired = healthcheck.check_reach(address, tmp_path / "expired" / "ca.crt")
    assert "the SuperLink's certificate EXPIRED on 20" in expired and "--reuse-ca" in expired, expired

    # The operator's view: the flwr config's connection, and flwr's "unavailable" explained.
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "fed"\n\n[superlink.fed]\naddress = "{address}"\n'
        f'root-certificates = "{tmp_path / "expired" / "ca.crt"}"\n'
    )
    monkeypatch.setenv("FLWR_HOME", str(home))
    assert tlscheck.diagnose("fed") == expired
    unavailable = "flwr list fed --run-id 7: Connection to the SuperLink is unavailable, check address"
    assert tlscheck.explain(unavailable, "fed") == f"{unavailable} -> {expired}"
    assert tlscheck.explain("flwr list fed: run 7 not found", "fed") == "flwr list fed: run 7 not found"
    assert tlscheck.main(["fed"]) == 1


def test_a_clientapp_watches_its_service_before_any_heavy_import() -> None:
    """The watchdog (common.lifetime) loads without the ``common`` package (torch): a ClientApp
    started just as its SuperNode dies must not live through seconds of imports; the app's own
    ``from common.lifetime import exit_with_service`` (client.policy) then finds the same module."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import supernode; m = supernode._lifetime(); "
        "print('torch' in sys.modules); from common.lifetime import exit_with_service; "
        "print(exit_with_service is m.exit_with_service)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "deploy")], capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stdout.split()) == (0, ["False", "True"]), out.stderr
