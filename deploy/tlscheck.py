"""Why the operator's ``flwr`` CLI cannot reach the SuperLink, said as such.

    python -m deploy.tlscheck [CONNECTION]       # CONNECTION: a name in the flwr config (default: its default)

Flower 1.41's CLI reports every failed TLS handshake as ``Connection to the SuperLink is unavailable,
check address``. This check makes the same handshake to the connection's ``address`` with its
``root-certificates`` and names the cause: the SuperLink's certificate expired (and when), is not
signed by that CA, does not carry that host name, or nothing answers there. ``deploy/follow.py`` and
``deploy/registry.py`` run it when ``flwr`` says unavailable. Exit 0 when the handshake succeeds.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

UNAVAILABLE = "unavailable"  # in the flwr CLI's message for any connection or TLS failure
HEALTHCHECK = Path(__file__).resolve().parent / "docker" / "healthcheck.py"


def _healthcheck() -> ModuleType:
    """deploy/docker/healthcheck.py, which the images copy alone (no package around it)."""
    spec = importlib.util.spec_from_file_location("fedpagkd_healthcheck", HEALTHCHECK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def diagnose(connection: str | None = None) -> str | None:
    """What stops a TLS connection to ``connection``'s SuperLink; None when the handshake succeeds."""
    from flwr.cli.flower_config import read_superlink_connection

    try:
        link = read_superlink_connection(connection)
    except Exception as err:  # noqa: BLE001  (click's error for a missing or broken config)
        return f"connection {connection or '(default)'}: {err}"
    if not link.address:
        return f"connection {link.name}: no address in the flwr config"
    if link.insecure:
        return None  # no TLS to check
    return _healthcheck().check_reach(link.address, Path(link.root_certificates) if link.root_certificates else None)


def explain(message: str, connection: str | None) -> str:
    """``message`` (a failed ``flwr`` call's), with the TLS cause when flwr said unavailable."""
    if UNAVAILABLE not in message.lower():
        return message
    return f"{message} -> {diagnose(connection) or 'the TLS handshake itself succeeds: is the SuperLink overloaded?'}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    problem = diagnose(args[0] if args else None)
    print(problem or "TLS handshake with the SuperLink verified", file=sys.stderr if problem else sys.stdout)
    return 1 if problem else 0


if __name__ == "__main__":
    sys.exit(main())
