"""A real FedPaGKD deployment on loopback: one SuperLink, one SuperNode per site, TLS + SuperNode auth.

Everything the production deployment (``deploy/README.md``) does, on 127.0.0.1 in one work folder:

1. writes synthetic sites as ImageFolder trees (``common.data.write_image_folder``), by default
   exactly the specs the simulation uses (``common.data.synthetic_site_specs``), so a deployment
   run and a simulation of the same run config see the same images;
2. creates the CA, the SuperLink certificate (SANs localhost, 127.0.0.1, ::1) and one OpenSSH
   EC P-384 key pair per site with ``deploy/certs/make_certs.py``;
3. starts ``flower-superlink`` with TLS, ``--enable-supernode-auth`` and
   ``--disable-runtime-dependency-installation`` on a free port, writes the ``flwr`` CLI config,
   registers every site key with ``flwr supernode register``;
4. starts one SuperNode per site, as a site does: ``deploy/supernode.py --app-digest ...`` (Flower's
   SuperNode that runs only the pinned bundle; ``app_digest``, default ``any``) with
   ``--root-certificates``, ``--auth-supernode-private-key``, its own ``--port``,
   ``--node-config "site-name=.. modality=.. data-path=.."``;
5. submits the app with ``flwr run <repo> <connection> --format json``, follows ``flwr log`` into a
   file and polls ``flwr list --run-id ID --format json`` until the run is ``finished:*``.

Every process gets its own ``FLWR_HOME`` and its own session (process group); :meth:`Loopback.close`
(also on ``with`` exit) stops them all by process group, SIGTERM then SIGKILL. Every process logs to
``<work>/logs/<name>.log``. Processes, the ``flwr`` CLI and the environment are
:mod:`server.processes` (the launcher's too); the base run config is :data:`common.presets.LOOPBACK`.
A test harness (``tests/test_deployment*.py`` and their drills), not an operator's tool: what an
operator runs is in ``deploy/``.

CLI::

    python -m tests.harness.loopback --work /tmp/fedpagkd-loopback [key=value ...]

prints the run id, status, wall time and the metrics.json path (exit 1 unless finished:completed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from common.presets import LOOPBACK
from server import processes
from server.processes import (  # noqa: F401  (run_config_arg, still_running: part of this harness's API)
    BIN,
    FlowerCLI,
    FlowerProcessError,
    GroupProcess,
    free_port,
    process_env,
    run_config_arg,
    still_running,
)
from server.processes import cmdline as _cmdline
from server.processes import descendants as _descendants
from server.processes import group_members as _group_members
from server.processes import process_state as _state

REPO = Path(__file__).resolve().parents[2]
CONNECTION = "loopback"

# The smallest run that exercises every phase on real processes (common.presets.LOOPBACK), 32 px.
DEFAULT_RUN_CONFIG: dict[str, Any] = LOOPBACK

# Seen in the logs: the SuperNode is connected and activated / it gave up.
SUPERNODE_ID_RE = re.compile(r"SuperNode ID: (\d+)")


class LoopbackError(FlowerProcessError):
    """A step of the loopback deployment failed; the message names the step and the log to read."""


@dataclass
class Site:
    name: str
    modality: str
    data_path: Path
    key: Path  # OpenSSH private key (--auth-supernode-private-key)
    pub: Path  # OpenSSH public key (flwr supernode register)
    node_id: int | None = None


# A started process of the federation (its own session; stop() ends its whole process group).
Proc = GroupProcess


@contextlib.contextmanager
def checked_federation(work: Path, **kwargs: Any) -> Iterator["Loopback"]:
    """A started :class:`Loopback` (SuperLink + every site); on exit every process it started
    is stopped, and :class:`LoopbackError` names any process of its tree still running."""
    fed = Loopback(work, **kwargs)
    started: set[int] = set()
    try:
        t0 = time.time()
        fed.start()
        print(f"\nloopback federation up in {time.time() - t0:.0f} s (work folder {work})")
        yield fed
    finally:
        started = fed.process_tree()
        fed.close()
        left = still_running(started)
        if left:
            raise LoopbackError(f"processes left running: {left}")


@dataclass
class RunResult:
    run_id: str
    status: str
    details: str
    wall_s: float  # from `flwr run` to the status reading finished:*
    elapsed_s: float | None  # the SuperLink's own "elapsed" for the run
    run_dir: Path
    log: Path  # `flwr log` output (ServerApp + ClientApps)

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.json"

    def metrics(self) -> dict[str, Any]:
        return json.loads(self.metrics_path.read_text())


@dataclass
class Loopback:
    """The whole federation in ``work``. Use as a context manager; :meth:`close` stops everything.

    ``run_config`` is the base run config (``DEFAULT_RUN_CONFIG`` plus these overrides); the sites
    are written from ``common.data.synthetic_site_specs`` of that config unless ``specs`` is given
    as ``[(site name, SyntheticSiteSpec), ...]``.
    """

    work: Path
    run_config: Mapping[str, Any] = field(default_factory=dict)
    specs: Sequence[tuple[str, Any]] | None = None
    max_retries: int = 5  # SuperNode connection retries (backoff) before it gives up
    max_wait_time: float = 60.0  # seconds a SuperNode keeps retrying before it gives up
    verbose: bool = False
    # Extra environment of a site's own SuperNode (its ClientApps inherit it), e.g. a drill knob.
    site_env: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # Extra node config of every site (e.g. {"device": "cpu"}) and of one site (by name); each site
    # always gets its own state-dir (``<work>/site-state/<name>``: its egress log).
    node_config: Mapping[str, str] = field(default_factory=dict)
    site_node_config: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # The bundle(s) every site trusts (deploy/supernode.py --app-digest): sha256:..., or any.
    app_digest: str = "any"

    def __post_init__(self) -> None:
        self.work = Path(self.work).resolve()
        if self.work == REPO or REPO in self.work.parents:
            # `flwr run` packs every *.py/*.json/... under the app dir into the FAB.
            raise LoopbackError(f"work folder {self.work} is inside the app directory {REPO}; use one outside it")
        self.config: dict[str, Any] = {**DEFAULT_RUN_CONFIG, **dict(self.run_config)}
        self.logs = self.work / "logs"
        self.certs = self.work / "certs"
        self.homes = self.work / "homes"
        self.data = self.work / "data"
        self.runs = self.work / "runs"
        self.sites: dict[str, Site] = {}
        self.procs: list[Proc] = []
        self.supernodes: dict[str, Proc] = {}
        self.superlink: Proc | None = None
        self.port: int | None = None
        self.control_port: int | None = None
        self.health_port: int | None = None
        self._restarts: dict[str, int] = {}
        self.run_ids: list[str] = []  # every run submitted, in order

    # ------------------------------------------------------------------ context manager

    def __enter__(self) -> "Loopback":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> "Loopback":
        """Sites, certificates, SuperLink, registration, SuperNodes (all online)."""
        self.prepare()
        self.start_superlink()
        for site in self.sites.values():
            self.register(site)
        for name in self.sites:
            self.start_supernode(name)
        self.wait_online(list(self.sites))
        return self

    def close(self) -> None:
        """Stop every process this harness started, newest first, by process group."""
        for proc in reversed(self.procs):
            if proc.alive() or _group_members(proc.pid):
                proc.stop()
        self.procs.clear()
        self.supernodes.clear()
        self.superlink = None

    def process_tree(self) -> set[int]:
        """Every process of the federation: the started ones, their groups and all their
        descendants (the SuperLink starts flower-superexec in a session of its own)."""
        pids: set[int] = set()
        for proc in self.procs:
            if proc.alive():
                pids.add(proc.pid)
            pids.update(_group_members(proc.pid))
            pids.update(_descendants(proc.pid))
        return pids

    # ------------------------------------------------------------------ preparation

    def _say(self, text: str) -> None:
        if self.verbose:
            print(f"[loopback {time.strftime('%H:%M:%S')}] {text}", flush=True)

    def site_specs(self) -> list[tuple[str, Any]]:
        if self.specs is not None:
            return list(self.specs)
        import common  # noqa: F401  (torchvision shim before anything imports timm)
        from common.config import config_from_flat
        from common.data import synthetic_site_specs

        return synthetic_site_specs(config_from_flat(self.config))

    def prepare(self) -> None:
        """Write the sites' ImageFolder trees and the key material (idempotent per work folder)."""
        from common.data import write_image_folder
        from deploy.certs import make_certs

        for folder in (self.logs, self.certs, self.homes, self.data, self.runs):
            folder.mkdir(parents=True, exist_ok=True)
        specs = self.site_specs()
        classes = {spec.num_classes for _, spec in specs}
        if classes != {int(self.config["data.num_classes"])}:
            raise LoopbackError(
                f"the sites have {sorted(classes)} classes but data.num_classes = {self.config['data.num_classes']}"
            )
        for name, spec in specs:
            path = self.data / name
            if not (path / "site.json").is_file():
                write_image_folder(spec, path)
        names = [name for name, _ in specs]
        if not (self.certs / make_certs.CA_CERT).is_file():
            make_certs.generate(self.certs, names, ["localhost", "127.0.0.1", "::1"], force=True)
        missing = [n for n in names if not (self.certs / n).is_file()]
        if missing:
            make_certs.generate(self.certs, missing, [], force=True, tls=False)
        for name, spec in specs:
            self.sites[name] = Site(name, spec.modality, self.data / name, self.certs / name, self.certs / f"{name}.pub")
        self._say(f"{len(specs)} site(s) in {self.data}, certificates in {self.certs}")

    @property
    def ca_cert(self) -> Path:
        return self.certs / "ca.crt"

    @property
    def address(self) -> str:
        """The Fleet API listener: what the SuperNodes dial."""
        if self.port is None:
            raise LoopbackError("the SuperLink is not started")
        return f"127.0.0.1:{self.port}"

    @property
    def control_address(self) -> str:
        """The Control (+ Runtime) API listener: the operator's ``flwr`` CLI only."""
        if self.control_port is None:
            raise LoopbackError("the SuperLink is not started")
        return f"127.0.0.1:{self.control_port}"

    def env(self, home: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of one process: its own FLWR_HOME, no dependency installation, one
        thread; plus ``extra`` (e.g. a drill knob such as ``FEDPAGKD_DRILL_DELAY_S``)."""
        flwr_home = self.homes / home
        flwr_home.mkdir(parents=True, exist_ok=True)
        return process_env(flwr_home, {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, extra)

    def spawn(self, name: str, cmd: list[str], home: str, cwd: Path | None = None, env: Mapping[str, str] | None = None) -> Proc:
        """Start ``cmd`` in its own process group (:func:`server.processes.spawn`), logging to ``logs/<name>.log``."""
        proc = processes.spawn(name, cmd, self.logs / f"{name}.log", self.env(home, env), cwd or (self.homes / home))
        self.procs.append(proc)
        self._say(f"started {name} (pid {proc.pid}), log {proc.log}")
        return proc

    # ------------------------------------------------------------------ SuperLink and CLI

    def start_superlink(self, timeout: float = 90.0) -> Proc:
        self.port, self.control_port, self.health_port = free_port(), free_port(), free_port()
        cmd = [
            # flower-superlink with the Control API on its own listener (deploy/superlink.py)
            sys.executable,
            str(REPO / "deploy" / "superlink.py"),
            "--fleet-api-address",
            self.address,
            "--control-api-address",
            self.control_address,
            "--ssl-ca-certfile",
            str(self.ca_cert),
            "--ssl-certfile",
            str(self.certs / "server.pem"),
            "--ssl-keyfile",
            str(self.certs / "server.key"),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--database",
            str(self.work / "superlink-state.db"),
            "--health-server-address",
            f"127.0.0.1:{self.health_port}",
        ]
        # cwd = the ServerApp's cwd: the work folder (fed.run_dir is absolute anyway).
        self.superlink = self.spawn("superlink", cmd, "superlink", cwd=self.work)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.superlink.alive():
                raise LoopbackError(f"flower-superlink exited with {self.superlink.popen.returncode}: see {self.superlink.log}")
            if "Application startup complete" in self.superlink.text():
                break
            time.sleep(0.3)
        else:
            raise LoopbackError(f"flower-superlink did not start within {timeout:.0f} s: see {self.superlink.log}")
        self.write_cli_config()
        return self.superlink

    def write_cli_config(self, root_certificates: Path | None = None, home: str = "cli", address: str | None = None) -> Path:
        """The ``flwr`` CLI config of ``homes/<home>``: connection ``loopback`` to ``address``
        (default: the operator's control listener)."""
        folder = self.homes / home
        folder.mkdir(parents=True, exist_ok=True)
        ca = Path(root_certificates or self.ca_cert).resolve()
        text = (
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f"[superlink.{CONNECTION}]\n"
            f'address = "{address or self.control_address}"\n'
            f'root-certificates = "{ca}"\n'
        )
        (folder / "config.toml").write_text(text)
        return folder / "config.toml"

    def cli(self, home: str = "cli") -> FlowerCLI:
        """The ``flwr`` CLI with FLWR_HOME ``homes/<home>`` (connection ``loopback``), every call
        logged to ``logs/flwr-cli.log``; failures raise :class:`LoopbackError`."""
        return FlowerCLI(
            self.env(home),
            self.work,
            CONNECTION,
            error=LoopbackError,
            transcript=self.logs / "flwr-cli.log",
            executable=str(BIN / "flwr"),
        )

    def flwr(self, *args: str, timeout: float = 120.0, check: bool = True, home: str = "cli") -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI against this SuperLink (FLWR_HOME ``homes/<home>``); stdout captured."""
        return self.cli(home).call(*args, timeout=timeout, check=check)

    def flwr_json_raw(self, *args: str, timeout: float = 120.0, home: str = "cli") -> dict[str, Any]:
        """``flwr ... --format json`` parsed, whether it succeeded or not."""
        return self.cli(home).json(*args, timeout=timeout)

    def flwr_json(self, *args: str, timeout: float = 120.0, home: str = "cli") -> dict[str, Any]:
        """``flwr ... --format json``; :class:`LoopbackError` unless it succeeded."""
        return self.cli(home).ok(*args, timeout=timeout)

    @property
    def registry(self) -> Path:
        return self.work / "registry.json"

    def register(self, site: Site) -> int:
        """The operator's register script (``deploy/registry.py``: ``flwr supernode register`` +
        the site registry) -> the node id the SuperLink created."""
        from deploy import registry

        entry = registry.register(self.flwr_json, self.registry, site.pub, site.name, CONNECTION)
        site.node_id = int(entry["node-id"])
        self._say(f"registered {site.name}: node {site.node_id}")
        return site.node_id

    def supernode_list(self) -> list[dict[str, Any]]:
        out = self.flwr_json("supernode", "list", CONNECTION)
        return list(out.get("nodes", []))

    def node_status(self) -> dict[int, str]:
        return {int(n["node-id"]): str(n.get("status", "")) for n in self.supernode_list()}

    # ------------------------------------------------------------------ SuperNodes

    def supernode_cmd(
        self,
        site: Site,
        *,
        root_certificates: Path | None = None,
        key: Path | None = None,
        port: int | None = None,
        max_retries: int | None = None,
        max_wait_time: float | None = None,
    ) -> list[str]:
        """``root_certificates=""`` leaves ``--root-certificates`` out (TLS against the system CAs)."""
        extra = {"state-dir": str(self.site_state(site.name)), **self.node_config, **self.site_node_config.get(site.name, {})}
        node_config = f"site-name='{site.name}' modality='{site.modality}' data-path='{site.data_path}'"
        node_config += "".join(f" {key}='{value}'" for key, value in extra.items())
        ca = self.ca_cert if root_certificates is None else root_certificates
        return [
            sys.executable,
            str(REPO / "deploy" / "supernode.py"),
            "--app-digest",
            self.app_digest,
            "--superlink",
            self.address,
            *(["--root-certificates", str(ca)] if str(ca) else []),
            "--auth-supernode-private-key",
            str(key or site.key),
            "--port",
            str(port or free_port()),
            "--node-config",
            node_config,
            "--max-retries",
            str(self.max_retries if max_retries is None else max_retries),
            "--max-wait-time",
            str(self.max_wait_time if max_wait_time is None else max_wait_time),
        ]

    def start_supernode(
        self, name: str, *, log_name: str | None = None, env: Mapping[str, str] | None = None, **kwargs: Any
    ) -> Proc:
        """Start the SuperNode of site ``name`` (kwargs: see :meth:`supernode_cmd`) in its own session.

        With ``log_name`` it is an extra SuperNode (own log and FLWR_HOME), not the site's own.
        ``env``: extra environment variables (its ClientApps inherit them); the site's own
        SuperNode gets ``site_env[name]`` unless ``env`` is given."""
        site = self.sites[name]
        home = log_name or f"supernode-{name}"
        if env is None and log_name is None:
            env = self.site_env.get(name)
        proc = self.spawn(home, self.supernode_cmd(site, **kwargs), home, env=env)
        if log_name is None:
            self.supernodes[name] = proc
        return proc

    def wait_connected(self, proc: Proc, timeout: float = 120.0) -> int:
        """Wait until ``proc`` logs ``SuperNode ID: N``; raise if it exits first."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            match = SUPERNODE_ID_RE.search(proc.text())
            if match:
                return int(match.group(1))
            if not proc.alive():
                raise LoopbackError(f"{proc.name} exited with {proc.popen.returncode} before connecting: see {proc.log}")
            time.sleep(0.3)
        raise LoopbackError(f"{proc.name} did not connect within {timeout:.0f} s: see {proc.log}")

    def wait_online(self, names: Sequence[str], timeout: float = 180.0) -> None:
        """Wait until every named site's SuperNode logged its id and ``flwr supernode list`` says online."""
        deadline = time.time() + timeout
        for name in names:
            node_id = self.wait_connected(self.supernodes[name], max(1.0, deadline - time.time()))
            if self.sites[name].node_id not in (None, node_id):
                raise LoopbackError(f"{name} connected as node {node_id}, registered as {self.sites[name].node_id}")
        wanted = {self.sites[n].node_id for n in names}
        while time.time() < deadline:
            status = self.node_status()
            if all(status.get(n) == "online" for n in wanted):
                self._say(f"online: {', '.join(names)}")
                return
            time.sleep(1.0)
        raise LoopbackError(f"not all of {list(names)} online within {timeout:.0f} s: {self.node_status()}")

    def wait_exit(self, proc: Proc, timeout: float = 120.0) -> int | None:
        """Wait for ``proc`` to exit by itself; its exit code (None: still running)."""
        try:
            return proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def site_state(self, name: str) -> Path:
        """A site's own state folder (node config ``state-dir``): its ``egress.jsonl``."""
        return self.work / "site-state" / name

    def unregistered_key(self, name: str) -> Path:
        """A fresh OpenSSH EC P-384 key pair that was never registered (``certs/<name>``)."""
        from deploy.certs import make_certs

        make_certs.generate(self.certs, [name], [], force=True, tls=False)
        return self.certs / name

    def other_ca(self, name: str = "other-ca") -> Path:
        """A CA certificate that did not sign the SuperLink's certificate (``certs/<name>/ca.crt``)."""
        from deploy.certs import make_certs

        folder = self.certs / name
        if not (folder / make_certs.CA_CERT).is_file():
            make_certs.generate(folder, [], ["localhost", "127.0.0.1", "::1"], force=True)
        return folder / make_certs.CA_CERT

    def kill_supernode(self, name: str) -> int | None:
        """Crash a site: SIGKILL its SuperNode's whole process group (ClientApp processes included)."""
        proc = self.supernodes[name]
        self._say(f"killing {name} (pid {proc.pid})")
        return proc.kill()

    def restart_supernode(
        self,
        name: str,
        timeout: float = 180.0,
        pause_s: float = 3.0,
        not_before_s: float = 0.0,
        **kwargs: Any,
    ) -> Proc:
        """Start the site again with the same key until the SuperLink accepts it.

        A SIGKILLed SuperNode never deactivated itself, so the SuperLink keeps it ``online`` until
        its heartbeat deadline passes (2 x the 30 s heartbeat interval after its last heartbeat,
        which came every ~24 s: 33-60 s after the kill): until then activation is refused
        (``[code: 2004] Failed to activate SuperNode.``) and the new SuperNode exits; retry every
        ``pause_s``. ``not_before_s`` (seconds after the call) skips attempts that cannot succeed.
        ``kwargs`` go to :meth:`start_supernode` (e.g. ``env``).
        """
        deadline = time.time() + timeout
        time.sleep(max(0.0, not_before_s))
        while True:
            self._restarts[name] = self._restarts.get(name, 0) + 1
            proc = self.start_supernode(name, **kwargs)
            try:
                node_id = self.wait_connected(proc, max(1.0, deadline - time.time()))
            except LoopbackError:
                proc.stop(grace_s=2.0)
                if time.time() + pause_s >= deadline:
                    raise
                time.sleep(pause_s)
                continue
            self._say(f"{name} rejoined as node {node_id} (attempt {self._restarts[name]})")
            return proc

    # ------------------------------------------------------------------ runs

    def submit(self, run_config: Mapping[str, Any] | None = None, app_dir: Path = REPO) -> tuple[str, dict[str, Any]]:
        """``flwr run <app_dir> loopback --format json --run-config ...`` -> (run id, the full run config)."""
        config = {**self.config, **dict(run_config or {})}
        config["fed.run_dir"] = str(Path(config.get("fed.run_dir") or self.runs).resolve())
        config.setdefault("fed.run_name", time.strftime("run-%Y%m%d-%H%M%S"))
        out = self.cli().submit(app_dir, config, timeout=300)
        if not out.get("success", False):
            raise LoopbackError(f"flwr run {app_dir} failed: {out}")
        run_id = str(out["run-id"])
        self.run_ids.append(run_id)
        self._say(f"submitted run {run_id} ({config['fed.run_name']})")
        return run_id, config

    def follow_log(self, run_id: str) -> Proc:
        """``flwr log RUN_ID`` into ``logs/run-<id>.log`` (it streams until the run ends)."""
        return self.spawn(f"run-{run_id}", self.cli().log_command(run_id), "cli", cwd=self.work)

    def run_status(self, run_id: str) -> dict[str, Any]:
        return self.cli().status(run_id)

    def wait(
        self,
        run_id: str,
        timeout: float = 900.0,
        poll_s: float = 3.0,
        on_poll: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll ``flwr list`` until the run is ``finished:*`` (or ``timeout``); returns the last row."""
        return self.cli().wait(run_id, deadline=time.time() + timeout, poll_s=poll_s, on_poll=on_poll)

    def stop_run(self, run_id: str) -> None:
        self.cli().stop(run_id)

    def serverapp_pids(self) -> list[int]:
        """The ``flwr-serverapp`` processes the SuperLink started (via its ``flower-superexec``,
        which runs in a session of its own, hence found by parentage, not by process group)."""
        if self.superlink is None:
            return []
        return [pid for pid in _descendants(self.superlink.pid) if "flwr-serverapp" in _cmdline(pid)]

    def kill_serverapp(self, timeout: float = 10.0) -> list[int]:
        """A coordinator crash: SIGKILL every running ServerApp process (by pid); the pids killed."""
        pids = self.serverapp_pids()
        for pid in pids:
            self._say(f"killing flwr-serverapp (pid {pid})")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.time() + timeout
        while time.time() < deadline and any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in pids):
            time.sleep(0.1)
        return pids

    def run(
        self,
        run_config: Mapping[str, Any] | None = None,
        timeout: float = 900.0,
        on_poll: Callable[[dict[str, Any] | None, "Loopback", Path], None] | None = None,
        status_every_s: float = 20.0,
        app_dir: Path = REPO,
    ) -> RunResult:
        """Submit, follow and wait for one run.

        The end is noticed when ``flwr log`` (which streams until the run ends) exits; ``flwr
        list`` is asked every ``status_every_s`` as a fallback and then until the status reads
        ``finished:*`` (each ``flwr`` call costs ~2 s of CPU: polling it every few seconds
        competes with the ClientApps on a small machine). ``on_poll(last status row or None,
        self, log file)`` runs about every second.
        """
        started = time.time()
        run_id, config = self.submit(run_config, app_dir)
        follower = self.follow_log(run_id)
        deadline = started + timeout
        row: dict[str, Any] | None = None
        try:
            next_status = time.time() + status_every_s
            while True:
                now = time.time()
                streaming = follower.alive()
                if not streaming or now >= next_status:
                    row = self.run_status(run_id)
                    if str(row["status"]).startswith("finished:"):
                        break
                    next_status = now + (status_every_s if streaming else 3.0)
                if on_poll is not None:
                    on_poll(row, self, follower.log)
                if time.time() > deadline:
                    row = self.run_status(run_id)
                    break
                time.sleep(1.0)
            wall = time.time() - started
            if not str(row["status"]).startswith("finished:"):
                self.stop_run(run_id)
            # `flwr log` exits once the run has ended; give it a moment to flush the last lines.
            try:
                follower.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        finally:
            follower.stop(grace_s=2.0)
        elapsed = row.get("elapsed")
        result = RunResult(
            run_id=run_id,
            status=str(row["status"]),
            details=str(row.get("status-details", "")),
            wall_s=wall,
            elapsed_s=_seconds(elapsed),
            run_dir=Path(config["fed.run_dir"]) / str(config["fed.run_name"]),
            log=follower.log,
        )
        self._say(f"run {run_id}: {result.status} in {result.wall_s:.0f} s ({result.details})")
        return result


def _seconds(value: Any) -> float | None:
    """The SuperLink's ``elapsed`` (seconds, or "HH:MM:SS") as seconds."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        parts = [float(p) for p in str(value).split(":")]
    except ValueError:
        return None
    total = 0.0
    for part in parts:
        total = total * 60 + part
    return total


def run_loopback(
    work: Path, run_config: Mapping[str, Any] | None = None, timeout: float = 900.0, verbose: bool = True
) -> RunResult:
    """Start the federation in ``work``, run once, stop everything; returns the run's result."""
    with Loopback(Path(work), run_config=dict(run_config or {}), verbose=verbose) as fed:
        return fed.run(timeout=timeout)


def _parse_value(text: str) -> Any:
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="run-config overrides, e.g. fed.student_rounds=2 model.student=test_resnet")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a new temp folder)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the run (default: %(default)s)")
    args = parser.parse_args(argv)
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="fedpagkd-loopback-"))
    overrides = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"override {item!r} is not key=value")
        overrides[key] = _parse_value(value)
    try:
        result = run_loopback(work, overrides, timeout=args.timeout)
    except LoopbackError as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                "run-id": result.run_id,
                "status": result.status,
                "details": result.details,
                "wall-s": round(result.wall_s, 1),
                "elapsed-s": result.elapsed_s,
                "metrics": str(result.metrics_path),
                "logs": str(work / "logs"),
            },
            indent=2,
        )
    )
    if result.status == "finished:completed" and result.metrics_path.is_file():
        final = result.metrics().get("final") or {}
        print(
            f"final pooled WLI student: AUC {final.get('auc', float('nan')):.4f}  ACC {final.get('accuracy', float('nan')):.4f}"
        )
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
