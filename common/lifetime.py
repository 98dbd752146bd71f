"""A Flower app process that ends with the service that started it (stdlib only, Linux /proc).

In a deployment each message runs in a fresh ``flwr-clientapp`` process (each run in a
``flwr-serverapp`` process), started by a ``flower-superexec`` that was itself started by the
SuperNode (SuperLink) with ``--parent-pid <its pid>``. When the SuperNode or SuperLink dies, the
SuperExec notices and exits, but the app process it started keeps running (re-parented), ignoring
SIGTERM while it trains: a ClientApp was seen to outlive its SuperNode by more than 6 minutes.

:func:`exit_with_service` starts a daemon thread that ends this process (``os._exit``) within
``poll_s`` once its parent (the SuperExec) or the service the SuperExec serves is gone.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)
EXIT_CODE = 75  # EX_TEMPFAIL: the service is gone, the work can be asked for again
_started: set[str] = set()


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _name(args: list[str], default: str) -> str:
    """The program of a command line: its script when the first word is a Python interpreter."""
    words = [Path(a).name for a in args if a]
    if words and words[0].startswith("python") and len(words) > 1:
        return words[1]
    return words[0] if words else default


def watched_pids(pid: int | None = None) -> dict[int, str]:
    """The processes whose end ends this one: the parent and, when the parent is a SuperExec,
    the service it names with ``--parent-pid``."""
    parent = os.getppid() if pid is None else pid
    args = _cmdline(parent)
    watched = {parent: _name(args, "parent")}
    if "--parent-pid" in args:
        index = args.index("--parent-pid")
        if index + 1 < len(args) and args[index + 1].isdigit():
            service = int(args[index + 1])
            watched[service] = _name(_cmdline(service), "service")
    return watched


def exit_with_service(what: str, poll_s: float = 2.0) -> dict[int, str]:
    """Start (once per process) the watchdog thread; returns the pids it watches. ``what``
    names this process in the log line it writes before exiting."""
    if what in _started:
        return {}
    _started.add(what)
    parent = os.getppid()
    watched = watched_pids(parent)

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            gone = [f"{name} (pid {pid})" for pid, name in watched.items() if not _alive(pid)]
            if os.getppid() != parent and not gone:
                gone = [f"parent pid {parent}"]
            if gone:
                log.error(
                    "%s: %s is gone; exiting (code %d) so that no work outlives its service", what, ", ".join(gone), EXIT_CODE
                )
                for handler in logging.getLogger().handlers:
                    try:
                        handler.flush()
                    except Exception:  # noqa: BLE001
                        pass
                os._exit(EXIT_CODE)

    threading.Thread(target=watch, name=f"{what}-watchdog", daemon=True).start()
    return watched
