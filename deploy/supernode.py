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

Before anything starts it checks what a site gives it (:func:`preflight`): ``--root-certificates``
and ``--auth-supernode-private-key`` present, readable by this user and of the right kind, the
node config's ``data-path`` mounted and not empty, ``site-name`` and ``modality`` set; with
``--site-env FILE`` (the systemd unit) first that file: no unknown (misspelled) setting, every
required one set. A refusal is one line naming the setting of the site env file and the fix, exit
status 78 (a setting to fix) or 69 (a data folder not there yet). ``fedpagkd-supernode check-env
FILE`` checks an env file alone (before ``docker compose --env-file FILE up``).

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
CHECK_ENV = "check-env"
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


def _lifetime() -> Any:
    """:mod:`common.lifetime` (stdlib only) loaded without the ``common`` package, whose import
    pulls in torch (seconds on a loaded host), and registered under its name so that the app's
    own call (client.policy) finds the watchdog already running."""
    import importlib.util

    if "common.lifetime" in sys.modules:
        return sys.modules["common.lifetime"]
    package = importlib.util.find_spec("common")
    if package is None or not package.submodule_search_locations:
        raise ImportError("the fedpagkd package (common/) is not installed beside fedpagkd-supernode")
    path = Path(next(iter(package.submodule_search_locations))) / "lifetime.py"
    spec = importlib.util.spec_from_file_location("common.lifetime", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["common.lifetime"] = module
    spec.loader.exec_module(module)
    return module


def run_clientapp(argv: Sequence[str]) -> None:
    """Flower's ``flwr-clientapp`` with the bundle checked before it is installed."""
    # From the start, not only once the app runs (client.policy): a ClientApp started just as its
    # SuperNode died, or for a message it never gets (its run stopped), waits in Flower's loop; one
    # outlived a SIGKILLed SuperNode to knock on the restarted one with a dead token (HTTP 401).
    _lifetime().exit_with_service(CLIENTAPP)
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


# --------------------------------------------------------------------------- start checks

# sysexits.h codes, so that systemd can tell them apart (deploy/systemd/fedpagkd-site.service): a
# configuration error is not retried (RestartPreventExitStatus=78: the unit shows failed with the
# line that says what to fix), a data folder not there yet (a share mounted late) is retried.
EX_CONFIG, EX_UNAVAILABLE = 78, 69
EXAMPLE_ENV = "deploy/sites/example-site.env"

# The settings of a site env file (deploy/sites/example-site.env, read by systemd's EnvironmentFile=
# and by `docker compose --env-file`): name -> what to put there when it is required (None: optional).
SITE_SETTINGS: dict[str, str | None] = {
    "FEDPAGKD_SITE_NAME": "the site name the coordinator gave you, e.g. hospital-a-nbi",
    "FEDPAGKD_MODALITY": "wli (white light) or nbi (narrow band)",
    "FEDPAGKD_SUPERLINK": "the coordinator's host:port, e.g. coordinator.example.org:8000",
    "FEDPAGKD_DATA_DIR": "the site's image folder, e.g. /srv/fedpagkd/data",
    "FEDPAGKD_CA_CERT_FILE": "the path of ca.crt from the coordinator, e.g. /etc/fedpagkd/ca.crt",
    "FEDPAGKD_AUTH_KEY_FILE": "the path of this site's private key, e.g. /etc/fedpagkd/hospital-a-nbi",
    "FEDPAGKD_APP_DIGEST": "the reviewed bundle's digest (python -m deploy.bundle --digest), or 'any' for rehearsals",
    "FEDPAGKD_SITE_IMAGE": None,
    "FEDPAGKD_TORCH_INDEX_URL": None,
    "FEDPAGKD_MAX_RETRIES": None,
    "FEDPAGKD_MAX_WAIT_TIME": None,
    "FEDPAGKD_DEVICE": None,
    "FEDPAGKD_EXTRA_NODE_CONFIG": None,
    "FEDPAGKD_DRILL_DELAY_S": None,
}
# Where each checked SuperNode argument comes from in the site env file, for the error lines.
FLAG_SETTING = {
    "--superlink": "FEDPAGKD_SUPERLINK",
    "--root-certificates": "FEDPAGKD_CA_CERT_FILE",
    "--auth-supernode-private-key": "FEDPAGKD_AUTH_KEY_FILE",
    "site-name": "FEDPAGKD_SITE_NAME",
    "modality": "FEDPAGKD_MODALITY",
    "data-path": "FEDPAGKD_DATA_DIR",
}
SITE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
ENV_LINE_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
NODE_PAIR_RE = re.compile(r"([A-Za-z0-9_.-]+)\s*=\s*(?:'([^']*)'|\"([^\"]*)\"|(\S*))")


class StartRefused(SystemExit):
    """A start refused before anything runs; ``str()`` names the setting or path and the fix."""

    def __init__(self, message: str, code: int = EX_CONFIG):
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _user() -> str:
    try:
        import pwd

        return f"user {pwd.getpwuid(os.geteuid()).pw_name} (uid {os.geteuid()})"
    except (ImportError, KeyError):
        return f"uid {os.geteuid()}"


def read_site_env(path: Path) -> dict[str, str]:
    """The settings of a site env file, checked: every name known (a misspelled one is named with
    the closest known one), every required one set. Quotes around a value are removed, as systemd
    and compose do."""
    import difflib

    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise StartRefused(f"site env file {path} cannot be read ({err.strerror}): copy {EXAMPLE_ENV} there and edit it")
    values: dict[str, str] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        match = ENV_LINE_RE.match(line)
        if not match:
            raise StartRefused(f"{path}:{number}: {line!r} is not KEY=value (no spaces around '=')")
        key, value = match.group(1), match.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if key not in SITE_SETTINGS:
            close = difflib.get_close_matches(key, SITE_SETTINGS, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}? " if close else ""
            raise StartRefused(f"{path}:{number}: {key} is not a site setting; {hint}the settings are those of {EXAMPLE_ENV}")
        values[key] = value
    missing = [key for key, what in SITE_SETTINGS.items() if what is not None and not values.get(key)]
    if missing:
        raise StartRefused(
            f"{path}: " + "; ".join(f"{key} is not set ({SITE_SETTINGS[key]})" for key in missing) + f" (see {EXAMPLE_ENV})"
        )
    return values


def _named(flag: str) -> str:
    setting = FLAG_SETTING.get(flag)
    return f"{flag} ({setting} in the site env file)" if setting else flag


def _check_file(path: str, flag: str, marker: bytes, what: str) -> None:
    if not path:
        raise StartRefused(f"{_named(flag)} is empty: set it to {what}")
    try:
        head = Path(path).read_bytes()[:4096]
    except FileNotFoundError:
        raise StartRefused(f"{path} does not exist ({_named(flag)}): put {what} there, or fix the path") from None
    except PermissionError:
        raise StartRefused(
            f"{path} ({_named(flag)}) is not readable by {_user()}, the SuperNode's user: "
            f"sudo chown {os.geteuid()} {path} && sudo chmod 0400 {path}"
        ) from None
    except OSError as err:
        raise StartRefused(f"{path} ({_named(flag)}) cannot be read: {err.strerror}") from None
    if marker not in head:
        raise StartRefused(f"{path} ({_named(flag)}) is not {what}")


def _check_data(path: str, modality: str) -> None:
    flag = "data-path"
    if not path:
        raise StartRefused(f"node config {_named(flag)} is empty: set it to the site's image folder")
    folder = Path(path)
    if not folder.is_dir():
        raise StartRefused(
            f"data folder {path} ({_named(flag)}) does not exist: mount the site's images there "
            "(a network share not mounted yet?) or fix the path",
            EX_UNAVAILABLE,
        )
    try:
        entries = {entry.name for entry in folder.iterdir()}
    except PermissionError:
        raise StartRefused(
            f"data folder {path} ({_named(flag)}) is not readable by {_user()}, the SuperNode's user: "
            f"give that user read access (e.g. sudo chgrp -R <its group> {path} && sudo chmod -R g+rX {path})"
        ) from None
    if not entries:
        raise StartRefused(
            f"data folder {path} ({_named(flag)}) is empty: is the share mounted (mount | grep {path}), is the path right?",
            EX_UNAVAILABLE,
        )
    if "manifest.csv" not in entries and "train" not in entries:
        raise StartRefused(
            f"data folder {path} ({_named(flag)}) has no train/ folder and no manifest.csv: "
            f"expected {path}/{{train,val,test}}/<class>/*.png (fedpagkd check-site {path} says more)"
        )
    declared = ""
    if "site.json" in entries:
        try:
            import json

            declared = str(json.loads((folder / "site.json").read_text()).get("modality", "")).lower()
        except (OSError, ValueError, AttributeError):
            declared = ""
    if declared and modality and declared != modality.lower():
        raise StartRefused(
            f"{path}/site.json declares modality '{declared}' but the node config says modality='{modality}' "
            f"({FLAG_SETTING['modality']}): fix the setting or mount the right folder"
        )
    if os.access(path, os.W_OK):
        print(f"{PROG}: WARNING: data folder {path} is writable by {_user()}: mount it read-only", file=sys.stderr)


def preflight(argv: Sequence[str]) -> list[str]:
    """Check the SuperNode arguments a site gives before anything starts; returns them with the
    options an unset optional setting left empty (``--max-retries ''``, ``--max-wait-time ''``:
    never give up) removed. A refusal names the argument, its site env setting and the fix."""
    peek = argparse.ArgumentParser(add_help=False)
    for flag in ("--superlink", "--root-certificates", "--auth-supernode-private-key", "--node-config"):
        peek.add_argument(flag)
    peek.add_argument("--max-retries")
    peek.add_argument("--max-wait-time")
    given, _ = peek.parse_known_args(argv)
    if given.superlink is not None and not re.fullmatch(r".+:\d+", given.superlink):
        raise StartRefused(
            f"{_named('--superlink')} is {given.superlink!r}: expected host:port, e.g. coordinator.example.org:8000"
        )
    if given.root_certificates is not None:
        _check_file(
            given.root_certificates,
            "--root-certificates",
            b"BEGIN CERTIFICATE",
            "a PEM certificate (ca.crt from the coordinator)",
        )
    if given.auth_supernode_private_key is not None:
        _check_file(
            given.auth_supernode_private_key,
            "--auth-supernode-private-key",
            b"BEGIN OPENSSH PRIVATE KEY",
            "an OpenSSH private key (the file named after the site, not <site>.pub)",
        )
    if given.node_config is not None:
        pairs = {m.group(1): next(g for g in m.groups()[1:] if g is not None) for m in NODE_PAIR_RE.finditer(given.node_config)}
        for key in ("site-name", "modality"):
            if key in pairs and not pairs[key].strip():
                raise StartRefused(f"node config {_named(key)} is empty: set it to {SITE_SETTINGS[FLAG_SETTING[key]]}")
        if "site-name" in pairs and not SITE_NAME_RE.match(pairs["site-name"]):
            raise StartRefused(f"node config {_named('site-name')}={pairs['site-name']!r}: letters, digits, '.', '_' or '-' only")
        if "modality" in pairs and pairs["modality"].lower() not in ("wli", "nbi"):
            raise StartRefused(f"node config {_named('modality')}={pairs['modality']!r}: use 'wli' or 'nbi'")
        if "data-path" in pairs:
            _check_data(pairs["data-path"], pairs.get("modality", ""))
    kept, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg in ("--max-retries", "--max-wait-time") and i + 1 < len(argv) and argv[i + 1] == "":
            skip = True
        else:
            kept.append(arg)
    return kept


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


def hang_up_as_terminate() -> None:
    """SIGHUP (a closed terminal or SSH session) stops the SuperNode as SIGTERM does: Flower handles
    only SIGINT, SIGTERM and SIGQUIT, and Python's default for SIGHUP ends the process without its
    exit handlers, leaving its SuperExec behind. Until Flower installs its own SIGTERM handler (it
    imports for seconds on a loaded host), SIGTERM exits through the exit handlers too."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    signal.signal(signal.SIGHUP, lambda signum, frame: os.kill(os.getpid(), signal.SIGTERM))


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
    parser.add_argument("--site-env", type=Path, help="the site env file the arguments came from: checked first")
    ours, rest = parser.parse_known_args(argv)
    if ours.site_env is not None:
        read_site_env(ours.site_env)
    if not ours.app_digest:
        raise StartRefused(
            "--app-digest is required (FEDPAGKD_APP_DIGEST in the site env file): the digest of the app bundle this "
            f"site reviewed (`python -m deploy.bundle` on that release prints it), or '{ANY}' to run any bundle"
        )
    try:
        parse_pins(ours.app_digest)
    except ValueError as err:
        raise StartRefused(str(err)) from None
    for flag in ("--isolation", "--superexec-auth-secret-file"):
        if any(a == flag or a.startswith(flag + "=") for a in rest):
            raise StartRefused(f"{flag} is set by {PROG} itself (process isolation, its own SuperExec)")
    if any(re.search(r"(^|\s)app-digest\s*=", a) for a in rest):
        raise StartRefused("the node config key app-digest is not read any more: pin the bundle with --app-digest")
    rest = preflight(rest)

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
    hang_up_as_terminate()
    from flwr.supercore.exit import add_exit_handler

    # Flower's signal exit forces os._exit after a few seconds while its connection loop still
    # retries, before atexit handlers would run: the SuperExec and the secret go first.
    add_exit_handler(cleanup, run_before_force_exit=True)
    from flwr.supernode.cli import flower_supernode
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    one_reply_per_message(InMemoryNodeState)

    sys.argv = ["flower-supernode", *rest, "--isolation", "process", "--superexec-auth-secret-file", str(secret)]
    flower_supernode()


def check_env(argv: Sequence[str]) -> None:
    """``fedpagkd-supernode check-env FILE``: the site env file's settings, before ``docker compose up``
    (compose itself ignores a misspelled optional setting)."""
    parser = argparse.ArgumentParser(prog=f"{PROG} {CHECK_ENV}", description=check_env.__doc__)
    parser.add_argument("env_file", type=Path)
    values = read_site_env(parser.parse_args(argv).env_file)
    print(f"{PROG}: {len(values)} settings, every name known, the required ones set")


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    mode = args[0] if args else ""
    try:
        if mode == CLIENTAPP:
            run_clientapp(args[1:])
        elif mode == SUPEREXEC:
            run_superexec(args[1:])
        elif mode == CHECK_ENV:
            check_env(args[1:])
        else:
            run_supernode(args)
    except StartRefused as err:
        print(f"{PROG}: ERROR: {err}", file=sys.stderr)
        raise


if __name__ == "__main__":
    main()
