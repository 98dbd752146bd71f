"""The Flower process lifecycle: one implementation for the launcher and the test harnesses.

``server.launch`` (a local Ray simulation) and ``tests/harness/loopback.py`` (a real
SuperLink + SuperNodes on 127.0.0.1) both start Flower processes, talk to them with the
``flwr`` CLI and must stop all of them; this module holds what they share. Standard library
only (it never imports Flower: it drives Flower's command-line tools).

* **Environment.** :data:`FLOWER_ENV` (no runtime pip installs, no telemetry or update checks,
  unbuffered logs) and :func:`process_env`: a process's environment with its own
  ``FLWR_HOME`` and the project's interpreter folder (:data:`BIN`: ``flwr``,
  ``flower-superlink``, ``flower-supernode``) first on ``PATH``.
* **Ports and run configs.** :func:`free_port`; :func:`toml_value` / :func:`run_config_arg`
  write ``{dotted key: value}`` as ``flwr run --run-config`` wants it.
* **The ``flwr`` CLI.** :class:`FlowerCLI` (one connection, one environment): ``call`` /
  ``json`` / ``ok``, then the run lifecycle: :meth:`FlowerCLI.submit` (``flwr run --format
  json``), :meth:`FlowerCLI.log_command` (``flwr log``, which streams until the run ends),
  :meth:`FlowerCLI.status` / :meth:`FlowerCLI.wait` (poll ``flwr list --run-id``: ``flwr run
  --stream`` exits 0 on a failed run, the status row does not lie) and :meth:`FlowerCLI.stop`.
* **Processes.** :func:`spawn` starts a command in a session of its own (its process group),
  output appended to a log file, and returns a :class:`GroupProcess`, whose :meth:`~GroupProcess.stop`
  signals the whole group (SIGTERM, a grace period, then SIGKILL) so children that outlive the
  leader go too. :func:`stop_group` does the same for a group this process did not start (the
  SuperLink ``flwr run`` detaches). The ``/proc`` readers (:func:`living_processes`,
  :func:`group_members`, :func:`descendants`, :func:`processes_with_env`, :func:`cmdline`,
  :func:`process_state`, :func:`still_running`) find what a tree left behind: processes that
  detached into sessions of their own are found by parentage or by a marker in their environment.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

BIN = Path(sys.executable).parent  # flwr, flower-superlink and flower-supernode live next to the interpreter

# What every Flower process of ours runs with: no runtime pip installs (the SuperLink would try
# to build a venv from the network), no telemetry or update checks, unbuffered logs.
FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "PYTHONUNBUFFERED": "1",
}


class FlowerProcessError(RuntimeError):
    """A Flower process or ``flwr`` command failed; the message names the command and its output."""


# ------------------------------------------------------------------ environment, ports, run configs


def process_env(
    flwr_home: Path | str, settings: Mapping[str, str] | None = None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """This process's environment + :data:`FLOWER_ENV` + ``FLWR_HOME`` + ``settings``, with
    :data:`BIN` first on ``PATH``, then ``extra`` (a caller's own variables, applied last)."""
    env = dict(os.environ)
    env.update(FLOWER_ENV)
    env.update({"FLWR_HOME": str(flwr_home), **dict(settings or {})})
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


# Ports handed to the processes we start come from below Linux's default ephemeral range
# (32768-60999): a port the kernel hands out as port 0 is also what it gives the next outgoing
# connection, so with two federations starting side by side (two launches, two test workers) a
# gRPC client of one could take the port just picked for the other ("address already in use").
LISTEN_PORTS = range(20000, 32000)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, from :data:`LISTEN_PORTS` (random,
    so concurrent pickers rarely try the same one; the kernel's choice if none is free)."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.choice(LISTEN_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def toml_value(value: Any) -> str:
    """A run-config override value as a TOML literal (strings quoted, bools lower-case)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def run_config_arg(run_config: Mapping[str, Any]) -> str:
    """``{"train.lr": 0.1, "model.student": "x"}`` -> ``'train.lr=0.1 model.student="x"'`` (``--run-config``)."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())


# ------------------------------------------------------------------ the flwr CLI


@dataclass
class FlowerCLI:
    """The ``flwr`` CLI against one connection (a name in ``$FLWR_HOME/config.toml``).

    Failures raise ``error`` (each caller's own exception type). ``transcript``: a file every
    call and its output are appended to."""

    env: Mapping[str, str]
    cwd: Path
    connection: str
    error: type[Exception] = FlowerProcessError
    transcript: Path | None = None
    executable: str = "flwr"

    def call(self, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess:
        """``flwr ARGS``, stdout and stderr captured; with ``check`` a non-zero exit raises ``error``."""
        cmd = [self.executable, *args]
        proc = subprocess.run(cmd, env=dict(self.env), cwd=self.cwd, capture_output=True, text=True, timeout=timeout)
        if self.transcript is not None:
            with open(self.transcript, "a") as log:
                log.write(f"\n$ {shlex.join(cmd)}\n[exit {proc.returncode}]\n{proc.stdout}{proc.stderr}")
        if check and proc.returncode != 0:
            raise self.error(f"flwr {' '.join(args[:2])} failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()}")
        return proc

    def json(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        """``flwr ARGS --format json`` parsed, whether it succeeded or not."""
        proc = self.call(*args, "--format", "json", timeout=timeout, check=False)
        try:
            return json.loads(proc.stdout)
        except json.JSONDecodeError as err:
            raise self.error(f"flwr {' '.join(args[:2])}: no JSON (exit {proc.returncode}): {proc.stdout}{proc.stderr}") from err

    def ok(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        """:meth:`json`, raising ``error`` unless Flower answered ``"success": true``."""
        out = self.json(*args, timeout=timeout)
        if not out.get("success", False):
            raise self.error(f"flwr {' '.join(args[:2])} failed: {out}")
        return out

    def submit(
        self,
        app_dir: Path,
        run_config: Mapping[str, Any],
        federation_config: str | None = None,
        timeout: float = 300.0,
        check: bool = False,
    ) -> dict[str, Any]:
        """``flwr run APP_DIR CONNECTION --format json [--federation-config ...] --run-config ...``:
        Flower's answer (``run-id`` when ``success``), not checked; with ``check`` a non-zero
        exit raises ``error`` before the answer is read."""
        args = ["run", str(app_dir), self.connection, "--format", "json"]
        if federation_config is not None:
            args += ["--federation-config", federation_config]
        args += ["--run-config", run_config_arg(run_config)]
        if check:
            return json.loads(self.call(*args, timeout=timeout).stdout)
        proc = self.call(*args, timeout=timeout, check=False)
        try:
            return json.loads(proc.stdout)
        except json.JSONDecodeError as err:
            raise self.error(f"flwr run: no JSON (exit {proc.returncode}): {proc.stdout}{proc.stderr}") from err

    def log_command(self, run_id: str) -> list[str]:
        """``flwr log RUN_ID CONNECTION``: it streams the run's log until the run ends."""
        return [self.executable, "log", str(run_id), self.connection]

    def status(self, run_id: str) -> dict[str, Any]:
        """The run's row of ``flwr list --run-id`` (``status`` e.g. ``finished:completed``)."""
        return self.ok("list", self.connection, "--run-id", str(run_id))["runs"][0]

    def wait(
        self, run_id: str, deadline: float, poll_s: float = 1.0, on_poll: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, Any]:
        """Poll :meth:`status` until it reads ``finished:*`` or ``time.time()`` passes ``deadline``;
        the last row."""
        while True:
            row = self.status(run_id)
            if on_poll is not None:
                on_poll(row)
            if str(row["status"]).startswith("finished:") or time.time() > deadline:
                return row
            time.sleep(poll_s)

    def stop(self, run_id: str, timeout: float = 120.0) -> None:
        """``flwr stop RUN_ID`` (best effort: a run that already ended is not an error)."""
        self.call("stop", str(run_id), self.connection, timeout=timeout, check=False)


def finished(row: Mapping[str, Any] | None) -> bool:
    """Whether a ``flwr list`` row says the run ended (completed, failed or stopped)."""
    return row is not None and str(row.get("status", "")).startswith("finished:")


# ------------------------------------------------------------------ processes and their groups


@dataclass
class GroupProcess:
    """A started process in a session of its own (so its children share its process group) and its log."""

    name: str
    popen: subprocess.Popen
    log: Path
    cmd: list[str]
    offset: int = 0  # where this process's output starts in ``log`` (a restart appends to the same file)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def text(self) -> str:
        """This process's output so far (not that of an earlier process with the same log)."""
        try:
            with open(self.log, "rb") as handle:
                handle.seek(self.offset)
                return handle.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, grace_s: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        """Signal the whole process group, wait ``grace_s``, then SIGKILL the group."""
        signal_group(self.popen.pid, sig)
        try:
            self.popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        # Children (flower-superexec, flwr-clientapp/serverapp) may outlive the leader: kill the group.
        signal_group(self.popen.pid, signal.SIGKILL)
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        wait_group_gone(self.popen.pid, 5.0)
        return self.popen.returncode

    def kill(self) -> int | None:
        """A crash: SIGKILL to the whole group, no graceful deactivation."""
        return self.stop(grace_s=0.0, sig=signal.SIGKILL)


def spawn(name: str, cmd: list[str], log: Path, env: Mapping[str, str], cwd: Path) -> GroupProcess:
    """Start ``cmd`` in a new session (its own process group), stdin closed, stdout and stderr
    appended to ``log`` after a ``$ command`` line."""
    handle = open(log, "ab")  # noqa: SIM115 - owned by the child
    offset = handle.tell()
    handle.write(f"\n$ {shlex.join(cmd)}\n".encode())
    handle.flush()
    try:
        popen = subprocess.Popen(
            cmd, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=dict(env), cwd=cwd, start_new_session=True
        )
    finally:
        handle.close()
    return GroupProcess(name, popen, log, cmd, offset)


def signal_group(pgid: int, sig: int) -> None:
    """``killpg`` that ignores a group already gone (or not ours)."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_group_gone(pgid: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and group_members(pgid):
        time.sleep(0.1)


def stop_group(pgid: int, grace_s: float = 10.0) -> None:
    """Stop a process group this process did not start: SIGTERM, up to ``grace_s`` for it to
    end, then SIGKILL what is left of it."""
    signal_group(pgid, signal.SIGTERM)
    wait_group_gone(pgid, grace_s)
    if group_members(pgid):
        signal_group(pgid, signal.SIGKILL)
        wait_group_gone(pgid, 5.0)


# ------------------------------------------------------------------ /proc readers


def living_processes() -> Iterator[tuple[int, int, int]]:
    """(pid, parent pid, process group) of every process that is not a zombie, from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()  # [0] state, [1] ppid, [2] pgrp
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[0] != "Z":
            yield int(entry.name), int(fields[1]), int(fields[2])


def group_members(pgid: int) -> list[int]:
    return [pid for pid, _, group in living_processes() if group == pgid]


def process_state(pid: int) -> str:
    """The state letter of ``pid`` (``R``, ``S``, ``Z``...), ``""`` when it is gone."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def cmdline(pid: int) -> str:
    """The command line of ``pid``, arguments joined by spaces (``""`` when gone)."""
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid`` (by parent pid, whatever its session)."""
    children: dict[int, list[int]] = {}
    for child, parent, _ in living_processes():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _other_processes() -> Iterator[Path]:
    """``/proc/<pid>`` of every process but this one."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            yield proc


def processes_with_env(entry: str) -> list[int]:
    """PIDs of this user's processes whose environment holds ``entry`` (``NAME=value``), not this one."""
    marker = entry.encode()
    pids = []
    for proc in _other_processes():
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:  # another user's process, or one that just ended
            continue
    return pids


def processes_holding(folder: Path) -> list[int]:
    """PIDs of this user's processes (not this one) with a file open under ``folder``."""
    prefix = str(folder.resolve()) + os.sep
    pids = []
    for proc in _other_processes():
        try:
            if any(os.readlink(fd).startswith(prefix) for fd in (proc / "fd").iterdir()):
                pids.append(int(proc.name))
        except OSError:  # another user's process, or one that just ended (or closed that fd)
            continue
    return pids


def still_running(pids: set[int], grace_s: float = 15.0) -> dict[int, str]:
    """The processes of ``pids`` still alive after ``grace_s`` (flower-superexec notices that
    its parent is gone within a few seconds), with their command lines."""
    deadline = time.time() + grace_s
    alive = {pid for pid in pids if process_state(pid) not in ("", "Z")}
    while alive and time.time() < deadline:
        time.sleep(0.5)
        alive = {pid for pid in alive if process_state(pid) not in ("", "Z")}
    return {pid: cmdline(pid)[:120] for pid in alive}
