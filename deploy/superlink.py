#!/usr/bin/env python3
"""``flower-superlink`` with the Control API kept apart from the Fleet API (Flower 1.41/1.42).

Flower 1.41 serves every SuperLink API from ONE HTTPS listener (``--host``/``--port``): the Fleet
API (``/v1/fleet/*``, what SuperNodes use), the Control API (``/v1/control/*``, what ``flwr run``,
``flwr ls``, ``flwr supernode register/unregister`` use) and the Runtime API (``/v1/runtime/*``,
what the SuperLink's own SuperExec and ServerApps use). Its ``--fleet-api-address`` and
``--control-api-address`` flags are deprecated there: they only bind the legacy gRPC servers
(behind ``FLWR_INTERNAL_GRPC_*``), while the HTTP routes stay on the one port. The open-source
SuperLink has no Control API login (its authentication plugin is a no-op without Flower's OIDC
add-on), so anybody who can reach that port and holds ``ca.crt`` (every site) can list nodes and
runs, submit a run or unregister a site.

This wrapper runs the same SuperLink (Flower's own argument parsing, state, lifespan, SuperExec
and FastAPI app) on two listeners of one process:

* ``--fleet-api-address HOST:PORT`` (the one the sites dial, e.g. ``0.0.0.0:9092``): only
  ``/v1/fleet/*`` and ``/health``; anything else gets HTTP 403 naming the listener;
* ``--control-api-address HOST:PORT`` (operator only, default ``127.0.0.1:9093``): everything
  (Control + Runtime API). The SuperExec and its ServerApps connect here.

Every other argument goes to Flower unchanged (``--host``/``--port`` are set from the control
address). Usage::

    python -m deploy.superlink --fleet-api-address 0.0.0.0:9092 --control-api-address 127.0.0.1:9093 \\
        --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key \\
        --enable-supernode-auth --disable-runtime-dependency-installation --database state.db

The operator reaches the control listener on the coordinator itself, over an operator-only
interface (VPN, management VLAN), or through ``ssh -L 9093:127.0.0.1:9093 coordinator``; the
certificate's SANs must name the address used (``127.0.0.1`` is always in them).
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import sys
from typing import Any, Sequence

FLEET_PATHS = ("/v1/fleet/", "/health")  # what a SuperNode needs; everything else is the operator's
DEFAULT_CONTROL = "127.0.0.1:9093"
SUPPORTED_FLWR = ("1.41.", "1.42.")


class ApiSplit:
    """ASGI wrapper: requests that arrive on the fleet listener may only reach ``FLEET_PATHS``."""

    def __init__(self, app: Any, fleet_port: int):
        self.app, self.fleet_port = app, fleet_port

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            server = scope.get("server") or ("", 0)
            path = str(scope.get("path", ""))
            if server[1] == self.fleet_port and not path.startswith(FLEET_PATHS):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = json.dumps(
                    {
                        "detail": f"{path} is not served on the Fleet API listener (port {self.fleet_port}); "
                        "the Control and Runtime APIs listen on the operator-only --control-api-address",
                    }
                ).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 403,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def key_fingerprint(pem: bytes) -> str:
    """``SHA256:<base64>`` of a public key Flower holds as PEM: what ``ssh-keygen -lf <site>.pub`` and
    ``deploy/registry.py`` print for the same key (this file runs alone in the image: no import)."""
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_public_key(pem)
        blob = base64.b64decode(key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1])
    except (ValueError, TypeError, IndexError):
        return f"(not a public key: {len(pem)} bytes)"
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def describe_refusal(public_key: bytes, state: Any, reason: str) -> str:
    """One line for a refused SuperNode activation: the key's fingerprint, the site name Flower
    holds for it when there is one (``flwr supernode register --name``), and the fix."""
    fingerprint = key_fingerprint(public_key)
    try:
        nodes = [n for n in state.get_node_info() if bytes(n.public_key) == bytes(public_key)]
    except Exception:  # noqa: BLE001  the line must come out even if the state cannot be read
        nodes = []
    current = [n for n in nodes if n.status != "unregistered"]
    if current:
        node = current[0]
        site = f"site '{node.name}'" if node.HasField("name") and node.name else "a site registered without a name"
        return (
            f"refused SuperNode key {fingerprint} of {site} (node {node.node_id}, {node.status}): {reason}; a site that "
            "crashed is let in again once its heartbeat deadline passes (up to 60 s after the crash)"
        )
    if nodes:
        node = nodes[-1]
        site = f"site '{node.name}'" if node.HasField("name") and node.name else f"node {node.node_id}"
        return (
            f"refused SuperNode key {fingerprint}: it was {site}'s, unregistered at {node.unregistered_at}; "
            "register it again only if that site is trusted again (python deploy/registry.py register <site>.pub --name <site>)"
        )
    return (
        f"refused SuperNode key {fingerprint}: no site is registered with it. If a site should be: confirm the "
        "fingerprint with it (ssh-keygen -lf <site>.pub), then python deploy/registry.py register <site>.pub --name <site>"
    )


def name_refused_keys(handlers: Any) -> None:
    """Flower 1.41 logs a refused activation with the whole PEM key and no name; ``handlers`` (Flower's
    ``fleet_handlers`` module, whose function the Fleet router calls by name) logs it with the key's
    fingerprint and site name instead (:func:`describe_refusal`). The SuperNode's answer is unchanged."""
    from flwr.supercore.error import FlowerError

    activate = handlers.activate_node

    def activate_named(request: Any, state: Any) -> Any:
        try:
            return activate(request=request, state=state)
        except FlowerError as err:
            reason = str(err.message).rsplit("exception: ", 1)[-1].rstrip(".")
            raise FlowerError(err.code, describe_refusal(request.public_key, state, reason), err.public_details) from None

    handlers.activate_node = activate_named


def split_address(text: str, flag: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise SystemExit(f"fedpagkd-superlink: ERROR: {flag} {text!r} is not HOST:PORT (e.g. 0.0.0.0:9092)")
    return host, int(port)


def bind(host: str, port: int, flag: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        raise SystemExit(
            f"fedpagkd-superlink: ERROR: cannot listen on {host}:{port} ({flag}): {err}; "
            "is another SuperLink running, or is the address not on this machine?"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def take(argv: list[str], flag: str, default: str | None) -> tuple[str | None, list[str]]:
    """The value of ``flag`` (``--flag V`` or ``--flag=V``) and argv without it."""
    value, rest, i = default, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == flag and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
            continue
        if arg.startswith(flag + "="):
            value, i = arg.split("=", 1)[1], i + 1
            continue
        rest.append(arg)
        i += 1
    return value, rest


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    fleet, args = take(args, "--fleet-api-address", None)
    control, args = take(args, "--control-api-address", DEFAULT_CONTROL)
    for flag in ("--host", "--port"):
        if any(a == flag or a.startswith(flag + "=") for a in args):
            raise SystemExit(f"fedpagkd-superlink: ERROR: {flag} is set from --control-api-address; leave it out")
    if fleet is None:
        raise SystemExit("fedpagkd-superlink: ERROR: --fleet-api-address HOST:PORT is required (the address the sites dial)")
    fleet_host, fleet_port = split_address(fleet, "--fleet-api-address")
    control_host, control_port = split_address(str(control), "--control-api-address")
    if fleet_port == control_port:
        raise SystemExit("fedpagkd-superlink: ERROR: --fleet-api-address and --control-api-address need different ports")

    from flwr.supercore.version import package_version

    if not package_version.startswith(SUPPORTED_FLWR):
        raise SystemExit(
            f"fedpagkd-superlink: ERROR: written for flwr {'/'.join(v + 'x' for v in SUPPORTED_FLWR)}, "
            f"found {package_version}: check that the new release still serves every API on one port"
        )
    import uvicorn
    import importlib

    fs = importlib.import_module("flwr.superlink.cli.flower_superlink")  # the package exports a function of that name
    from flwr.superlink.main import create_app
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler

    name_refused_keys(importlib.import_module("flwr.superlink.servicer.fleet.fleet_handlers"))
    sys.argv = ["flower-superlink", *args, "--host", control_host, "--port", str(control_port)]
    config = fs._parse_superlink_lifespan_config()  # Flower's own parsing and checks (TLS, auth, ...)
    sockets = [bind(control_host, control_port, "--control-api-address"), bind(fleet_host, fleet_port, "--fleet-api-address")]
    app = ApiSplit(create_app(config, fs.SuperLinkLifespan), fleet_port)
    print(
        f"fedpagkd-superlink: Fleet API on https://{fleet_host}:{fleet_port} (sites), "
        f"Control + Runtime API on https://{control_host}:{control_port} (operator only)",
        flush=True,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            app=app,
            reload=False,
            access_log=True,
            log_config=get_uvicorn_log_config(console_handler.level),
            ssl_keyfile=config.ssl_keyfile,
            ssl_certfile=config.ssl_certfile,
            workers=1,
            lifespan="on",
        )
    )
    server.run(sockets=sockets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
