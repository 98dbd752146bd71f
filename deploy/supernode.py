#!/usr/bin/env python3
"""``flower-supernode`` that runs only the app bundle the site pinned (Flower 1.41/1.42).

``flwr run`` ships an app bundle (FAB) to every site and each message runs its code. Flower's own
guard, ``flower-supernode --trusted-entities``, accepts only bundles signed through Flower Hub: in
1.41 a bundle submitted with ``flwr run .`` to a self-hosted SuperLink carries no verification
records and such a SuperNode refuses every run. A check written inside the bundle does not help
either: a coordinator that ships a bundle without it is not stopped. This wrapper is the site's
code (its reviewed release, installed on the site: ``/usr/local/bin/fedpagkd-supernode`` in the
site image), outside the bundle, and checks every bundle before Flower installs it:

* it runs Flower's SuperNode with ``--isolation process`` and starts, as its child (like Flower's
  default ``subprocess`` mode does), Flower's SuperExec with one change: a ClientApp is launched
  as ``fedpagkd-supernode flwr-clientapp ...`` (this file) instead of ``flwr-clientapp``, and
  nothing but ClientApps is launched;
* that ClientApp process is Flower's own ``flwr-clientapp`` with one hook before
  ``install_from_fab``: it computes the digest of the bundle it pulled from the SuperNode
  (:func:`fab_digest`, the one ``python -m deploy.bundle`` prints) and, unless it is one of the
  site's ``--app-digest`` values, logs ONE line and raises :class:`UntrustedBundle` before anything
  of the bundle is written to disk or imported. Flower turns that into an error reply to the
  coordinator (``ClientApp error: <class '...UntrustedBundle'>: site '...' refuses ...``), so the
  run's message to this site fails and the coordinator drops the site;
* the SuperExec authenticates to the SuperNode's Runtime API with a fresh random secret
  (``--superexec-auth-secret-file``, a 0600 file in a private temp folder, removed at exit), so
  no other local process can take the site's tasks and run them unchecked.

Usage (every other argument goes to ``flower-supernode`` unchanged)::

    fedpagkd-supernode --app-digest sha256:4d48... --superlink coordinator:8000 \\
        --root-certificates ca.crt --auth-supernode-private-key site-key --node-config "..."

``--app-digest`` is required: ``sha256:<64 hex>`` (several, comma-separated, e.g. the old and the
new release during an upgrade), or ``any`` (no check, for a rehearsal on synthetic data).

The digest is SHA-256 over the sorted ``<path> <sha256 of the file>`` lines of every file of the
bundle except Flower's generated manifest ``.info/CONTENT`` (derived from the others, and checked
against them by Flower when it installs): one number for one set of files, whatever zlib the
coordinator's ``flwr run`` compressed them with. Stdlib only, except the Flower entry points.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import importlib
import io
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterable, Sequence

DIGEST_PREFIX = "sha256:"
ANY = "any"
MANIFEST = ".info/CONTENT"  # Flower's own list of the bundle's files and their hashes
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
SCRIPT = str(Path(__file__).resolve())
SUPEREXEC, CLIENTAPP = "flower-superexec", "flwr-clientapp"  # the internal modes, named as Flower's processes
PROG = "fedpagkd-supernode"
FIX = (
    "Fix: the coordinator submits the release this site reviewed (`python -m deploy.bundle` on it prints "
    "its digest); or the site reviews this bundle and pins it: FEDPAGKD_APP_DIGEST / --app-digest, then restart"
)


# Flower 1.41's ClientApp process gives its exit handlers (the push of its final status and context,
# which carries the site's optimizer state, to the SuperNode) FORCE_EXIT_TIMEOUT_SECONDS = 5 s before
# os._exit. On a loaded host that push is cut off (the SuperNode logs ``[/v1/runtime/push-task-output]
# [UnexpectedError:ClientDisconnect]``), the task never finishes, and when its token expires (60 s)
# the SuperNode answers the message then in progress, another ClientApp's, with "ClientApp stopped
# responding" besides that ClientApp's real reply. CI lost a site to it twice. The push itself is
# bounded by its HTTP timeout (30 s, one try at exit), so this grace never hangs a process.
CLIENTAPP_EXIT_GRACE_S = 45.0


class UntrustedBundle(PermissionError):
    """The bundle a ClientApp was asked to run is not one the site pinned."""


# --------------------------------------------------------------------------- the digest


def digest_of(files: Iterable[tuple[str, bytes]]) -> str:
    """The digest of a bundle given as ``(relative path, content)`` pairs."""
    lines = sorted(f"{name} {hashlib.sha256(data).hexdigest()}" for name, data in files if name != MANIFEST)
    return DIGEST_PREFIX + hashlib.sha256("\n".join(lines).encode()).hexdigest()


def fab_digest(fab: bytes | Path) -> str:
    """The digest of a ``.fab`` (a zip archive): every file but the manifest."""
    data = fab if isinstance(fab, bytes) else Path(fab).read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return digest_of((i.filename, archive.read(i)) for i in archive.infolist() if not i.is_dir())


def parse_pins(text: str) -> frozenset[str] | None:
    """``--app-digest`` -> the trusted digests (``None``: ``any``); ValueError names the bad value."""
    values = [v.strip() for v in str(text).split(",") if v.strip()]
    if values == [ANY]:
        return None
    bad = [v for v in values if not DIGEST_RE.match(v)]
    if not values or bad:
        raise ValueError(
            f"--app-digest {text!r}: expected sha256:<64 lower-case hex digits> (comma-separated for "
            f"several) or '{ANY}'; `python -m deploy.bundle` on the reviewed release prints the digest"
        )
    return frozenset(values)


def refusal(site: str, received: str, pins: Iterable[str], why: str = "") -> str:
    """The one line a site logs (and sends as its error) when it refuses a bundle."""
    expected = " or ".join(sorted(pins))
    return f"site '{site}' REFUSES app bundle {received}{why}: it trusts only --app-digest {expected}. {FIX}"


def check_fab(fab: bytes, pins: frozenset[str] | None, site: str, claimed_hash: str | None = None) -> str:
    """The bundle's digest if the site trusts it; otherwise :class:`UntrustedBundle` (the refusal line).

    ``claimed_hash``: the SHA-256 of the ``.fab`` that the SuperNode named it by (Flower installs
    and loads the bundle under that name); a bundle whose bytes do not match it is refused too."""
    received = fab_digest(fab)
    if pins is None:
        return received
    if claimed_hash is not None and hashlib.sha256(fab).hexdigest() != claimed_hash:
        raise UntrustedBundle(refusal(site, received, pins, f" (its content does not match its FAB hash {claimed_hash[:16]}...)"))
    if received not in pins:
        raise UntrustedBundle(refusal(site, received, pins))
    return received


# --------------------------------------------------------------------------- the ClientApp process


def give_exit_handlers_time(seconds: float = CLIENTAPP_EXIT_GRACE_S) -> None:
    """Flower's ``flwr_exit`` in this process waits ``seconds`` (not 5) for its exit handlers
    before it forces the exit (see :data:`CLIENTAPP_EXIT_GRACE_S`)."""
    importlib.import_module("flwr.supercore.exit.exit").FORCE_EXIT_TIMEOUT_SECONDS = seconds


def run_clientapp(argv: Sequence[str]) -> None:
    """Flower's ``flwr-clientapp`` with the bundle checked before it is installed."""
    parser = argparse.ArgumentParser(prog=f"{PROG} {CLIENTAPP}", add_help=False)
    parser.add_argument("--app-digest", required=True)
    ours, rest = parser.parse_known_args(argv)
    pins = parse_pins(ours.app_digest)

    from logging import ERROR

    from flwr.supercore import log
    from flwr.supernode.cli import flwr_clientapp

    flower = importlib.import_module("flwr.supernode.runtime.run_clientapp")

    pulled: dict[str, Any] = {}
    pull_task_input, install_from_fab = flower.pull_task_input, flower.install_from_fab

    def pull(client: Any) -> Any:
        message, context, run, fab = pull_task_input(client)
        pulled.update(context=context, fab=fab)
        return message, context, run, fab

    def install(fab_file: Any, *args: Any, **kwargs: Any) -> Any:
        context, fab = pulled.get("context"), pulled.get("fab")
        node_config = dict(getattr(context, "node_config", None) or {})
        site = str(node_config.get("site-name") or f"node {getattr(context, 'node_id', '?')}")
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        try:
            check_fab(content, pins, site, getattr(fab, "hash_str", None))
        except UntrustedBundle as err:
            log(ERROR, "%s", err)
            raise
        return install_from_fab(fab_file, *args, **kwargs)

    def quiet_log(level: int, msg: str, *args: Any, **kwargs: Any) -> None:
        if isinstance(kwargs.get("exc_info"), UntrustedBundle):
            kwargs.pop("exc_info")  # the refusal line says it all: no traceback after it
        log(level, msg, *args, **kwargs)

    flower.pull_task_input, flower.install_from_fab, flower.log = pull, install, quiet_log
    give_exit_handlers_time()
    sys.argv = [CLIENTAPP, *rest]
    flwr_clientapp()


# --------------------------------------------------------------------------- the SuperExec process


def run_superexec(argv: Sequence[str]) -> None:
    """Flower's ``flower-superexec``, launching only guarded ClientApps."""
    parser = argparse.ArgumentParser(prog=f"{PROG} {SUPEREXEC}", add_help=False)
    parser.add_argument("--app-digest", required=True)
    ours, rest = parser.parse_known_args(argv)
    parse_pins(ours.app_digest)

    from flwr.supercore.cli import flower_superexec
    from flwr.supercore.constant import TaskType

    flower = importlib.import_module("flwr.supercore.superexec.run_superexec")
    from flwr.supercore.superexec.executor import LaunchResult
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

    class GuardedExecutor(SubprocessExecutor):
        """Flower's subprocess executor, for ClientApps only, each started through this file."""

        def get_eligible_capacity(self, supported_task_types: set, **kwargs: Any) -> tuple[set, set[str]]:
            eligible, hashes = super().get_eligible_capacity(supported_task_types, **kwargs)
            return {t for t in eligible if t == TaskType.CLIENT_APP}, hashes

        def launch(self, spec: Any) -> Any:
            if spec.task_type != TaskType.CLIENT_APP:
                return LaunchResult.failed(f"{PROG} runs ClientApps only, not {spec.task_type}")
            args = [
                sys.executable,
                SCRIPT,
                CLIENTAPP,
                "--app-digest",
                ours.app_digest,
                "--runtime-api-address",
                spec.runtime_api_address,
                "--token",
                spec.token,
            ]
            if spec.insecure:
                args.append("--insecure")
            elif spec.root_certificates_path is not None:
                args += ["--root-certificates", spec.root_certificates_path]
            if spec.parent_pid is not None:
                args += ["--parent-pid", str(spec.parent_pid)]
            if spec.runtime_dependency_install:
                args.append("--allow-runtime-dependency-installation")
            quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL} if spec.suppress_output else {}
            subprocess.Popen(args, **quiet)  # noqa: S603  pylint: disable=consider-using-with
            return LaunchResult.accepted()

    flower.get_executor = lambda *args, **kwargs: GuardedExecutor()
    sys.argv = [SUPEREXEC, *rest]
    flower_superexec()


# --------------------------------------------------------------------------- the SuperNode process


def one_reply_per_message(state_class: Any) -> None:
    """Make ``state_class`` (Flower's ``InMemoryNodeState``) store at most one reply per message.

    When Flower has answered a message with an error of its own (a ClientApp task's token expired,
    see :data:`CLIENTAPP_EXIT_GRACE_S`) and the ClientApp's real reply comes after it, Flower 1.41
    stores and sends both; its SuperNode loop sends what replies it holds each time it receives a
    message, so from then on every reply leaves one message late and the coordinator drops the
    site for the rest of the run. The later reply is refused here (the coordinator already holds
    an answer; ``fed.resend_crashed`` asks again). The replied message ids are kept, not looked up
    in the store: Flower deletes a reply and its message once it is sent."""
    from logging import WARNING

    from flwr.supercore import log

    store_message = state_class.store_message

    def store_once(self: Any, message: Any) -> str | None:
        reply_to = message.metadata.reply_to_message_id
        if not reply_to:
            return store_message(self, message)
        with self.lock_msg_store:
            replied = self.__dict__.setdefault("_replied_message_ids", set())
            if reply_to in replied:
                log(WARNING, "%s: a second reply to message %s is dropped: it was answered already", PROG, reply_to[:16])
                return None
            stored = store_message(self, message)
            if stored is not None:
                replied.add(reply_to)
            return stored

    state_class.store_message = store_once


def _runtime_address(host: str, port: int) -> str:
    """Where the SuperExec dials the SuperNode's Runtime API (a wildcard bind is dialled on loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1", "[::]": "::1"}.get(host, host).strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


SECRET_PREFIX = "fedpagkd-superexec-"


def _remove_stale_secrets() -> None:
    """Secret folders of this user's SuperNodes that were killed (no atexit): removed."""
    for entry in Path(tempfile.gettempdir()).glob(f"{SECRET_PREFIX}*"):
        pid = entry.name[len(SECRET_PREFIX) :].split("-")[0]
        try:
            mine = entry.is_dir() and entry.stat().st_uid == os.getuid()
        except OSError:
            continue
        if mine and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(entry, ignore_errors=True)


def run_supernode(argv: Sequence[str]) -> None:
    if any(a in ("-h", "--help") for a in argv):
        print(
            __doc__.split("\n\n")[0] + "\n\nusage: fedpagkd-supernode --app-digest sha256:...|any [flower-supernode arguments]\n"
        )
        from flwr.supernode.cli import flower_supernode

        sys.argv = ["flower-supernode", "--help"]
        flower_supernode()
        return
    parser = argparse.ArgumentParser(prog=PROG, add_help=False)
    parser.add_argument("--app-digest")
    ours, rest = parser.parse_known_args(argv)
    if ours.app_digest is None:
        raise SystemExit(
            f"{PROG}: ERROR: --app-digest is required: the digest of the app bundle this site reviewed "
            f"(`python -m deploy.bundle` on that release prints it), or '{ANY}' to run any bundle"
        )
    try:
        parse_pins(ours.app_digest)
    except ValueError as err:
        raise SystemExit(f"{PROG}: ERROR: {err}") from None
    for flag in ("--isolation", "--superexec-auth-secret-file"):
        if any(a == flag or a.startswith(flag + "=") for a in rest):
            raise SystemExit(f"{PROG}: ERROR: {flag} is set by {PROG} itself (process isolation, its own SuperExec)")
    if any(re.search(r"(^|\s)app-digest\s*=", a) for a in rest):
        raise SystemExit(f"{PROG}: ERROR: the node config key app-digest is not read any more: pin the bundle with --app-digest")

    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--host", default="127.0.0.1")
    peek.add_argument("--port", type=int, default=9094)
    peek.add_argument("--ssl-ca-certfile")
    peek.add_argument("--allow-runtime-dependency-installation", action="store_true")
    runtime, _ = peek.parse_known_args(rest)

    _remove_stale_secrets()
    folder = tempfile.mkdtemp(prefix=f"{SECRET_PREFIX}{os.getpid()}-")  # 0700
    secret = Path(folder) / "secret"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secrets.token_hex(32).encode())
    cmd = [
        sys.executable,
        SCRIPT,
        SUPEREXEC,
        "--app-digest",
        ours.app_digest,
        "--runtime-api-address",
        _runtime_address(runtime.host, runtime.port),
        *(["--root-certificates", runtime.ssl_ca_certfile] if runtime.ssl_ca_certfile else ["--insecure"]),
        "--superexec-auth-secret-file",
        str(secret),
        "--parent-pid",
        str(os.getpid()),
    ]
    if runtime.allow_runtime_dependency_installation:
        cmd.append("--allow-runtime-dependency-installation")
    child = subprocess.Popen(cmd)  # noqa: S603  pylint: disable=consider-using-with

    def cleanup() -> None:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                child.kill()
        shutil.rmtree(folder, ignore_errors=True)

    atexit.register(cleanup)
    from flwr.supernode.cli import flower_supernode
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    one_reply_per_message(InMemoryNodeState)

    sys.argv = ["flower-supernode", *rest, "--isolation", "process", "--superexec-auth-secret-file", str(secret)]
    flower_supernode()


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    mode = args[0] if args else ""
    if mode == CLIENTAPP:
        run_clientapp(args[1:])
    elif mode == SUPEREXEC:
        run_superexec(args[1:])
    else:
        run_supernode(args)


if __name__ == "__main__":
    main()
