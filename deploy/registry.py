"""The operator's site registry: site name <-> SuperNode id <-> key fingerprint.

Flower 1.41 keeps no site name (``flwr supernode register --name`` is not shown by
``flwr supernode list``, whose rows carry ``owner-name: none``). Registering through this script
records each site in a small JSON file beside the certificates, so every later command can say
which hospital a node id is::

    python deploy/registry.py register deploy/certs/out/hospital-a-nbi.pub --name hospital-a-nbi \\
        --connection fedpagkd [--registry deploy/certs/out/registry.json]
    python deploy/registry.py status --connection fedpagkd [--format json]
    python deploy/registry.py unregister hospital-a-nbi --connection fedpagkd

``register`` is idempotent: a key the SuperLink already holds (e.g. after the plain
``flwr supernode register`` command, or a second run of this script) is looked up by its key and
recorded, not refused. ``status`` lists every site by name with its node id, status and last
contact, plus any node the SuperLink knows that the registry does not (it must not exist: find out
who registered it).
The registry is written atomically; the fingerprint is OpenSSH's (``ssh-keygen -lf KEY.pub``).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

try:  # `python deploy/registry.py` (this folder on sys.path) or `from deploy import registry`
    import tlscheck
except ImportError:  # pragma: no cover
    from deploy import tlscheck

DEFAULT_REGISTRY = Path(__file__).resolve().parent / "certs" / "out" / "registry.json"
FlwrJson = Callable[..., dict]
FlwrNodes = Callable[[str], list]  # connection -> the SuperLink's nodes, each with its public key
ALREADY_IN_USE = "already in use"  # Flower's refusal of a key it holds ("Public key already in use")


class RegistryError(RuntimeError):
    """A registry or ``flwr`` failure; the message names the file or the command and the fix."""


def fingerprint(public_key_file: Path) -> str:
    """``SHA256:<base64>`` of an OpenSSH public key, as ``ssh-keygen -lf`` prints it."""
    try:
        fields = Path(public_key_file).read_text().split()
        blob = base64.b64decode(fields[1], validate=True)
    except (OSError, IndexError, ValueError) as err:
        raise RegistryError(f"{public_key_file} is not an OpenSSH public key ({err}); give the site's <site>.pub") from None
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def load(path: Path) -> dict[str, dict[str, Any]]:
    if not Path(path).is_file():
        return {}
    try:
        return dict(json.loads(Path(path).read_text())["sites"])
    except (ValueError, KeyError) as err:
        raise RegistryError(f"{path} is not a site registry ({err}); restore it from backup or move it away") from None


def save(path: Path, sites: dict[str, dict[str, Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        json.dump({"sites": sites}, handle, indent=2, sort_keys=True)
    os.replace(tmp, path)


def cli_runner(connection_home: str | None = None) -> FlwrJson:
    """``flwr <args> --format json`` as a function (the operator's own ``flwr`` config)."""

    def run(*args: str) -> dict:
        env = dict(os.environ)
        if connection_home:
            env["FLWR_HOME"] = connection_home
        proc = subprocess.run(["flwr", *args, "--format", "json"], capture_output=True, text=True, env=env)
        try:
            return json.loads(proc.stdout)
        except json.JSONDecodeError:
            raise RegistryError(
                f"flwr {' '.join(args[:2])}: no JSON (exit {proc.returncode}): {proc.stderr or proc.stdout}"
            ) from None

    return run


def control_nodes(connection: str) -> list:
    """The SuperLink's nodes with their public keys (Flower's ``NodeInfo``: ``flwr supernode list``
    leaves the key out), through Flower's own Control API client and the operator's connection."""
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.proto.control_pb2 import ListNodesRequest  # pylint: disable=no-name-in-module

    client = init_http_client_from_connection(read_superlink_connection(connection))
    try:
        return list(client.ListNodes(ListNodesRequest()).nodes_info)
    finally:
        client.close()


def node_of_key(nodes: list, public_key: Path) -> Any | None:
    """The node (of ``nodes``, Flower ``NodeInfo``s) registered with ``public_key``, if any."""
    from cryptography.hazmat.primitives import serialization

    wanted = serialization.load_ssh_public_key(Path(public_key).read_bytes()).public_numbers()
    for node in nodes:
        if node.status != "unregistered" and serialization.load_pem_public_key(node.public_key).public_numbers() == wanted:
            return node
    return None


def register(
    flwr_json: FlwrJson,
    registry: Path,
    public_key: Path,
    name: str,
    connection: str,
    flwr_nodes: FlwrNodes = control_nodes,
) -> dict[str, Any]:
    """Register ``public_key`` for site ``name`` and record it; returns the registry entry. A key the
    SuperLink already holds for this site (same key; no other name) is recorded as it is."""
    sites = load(registry)
    print_ = fingerprint(public_key)
    for other, entry in sites.items():
        if entry["fingerprint"] == print_ and other != name:
            raise RegistryError(f"{public_key} is already registered as site '{other}' in {registry}")
    out = flwr_json("supernode", "register", str(public_key), connection, "--name", name)
    if not out.get("success") and ALREADY_IN_USE in str(out.get("error-message", "")).lower():
        node = node_of_key(flwr_nodes(connection), public_key)
        held = getattr(node, "name", "") if node is not None else ""
        if node is None or (held and held != name):
            owner = f"site '{held}' (node {node.node_id})" if node is not None else "a node this connection cannot list"
            raise RegistryError(
                f"key {print_} ({public_key}) is registered at the SuperLink for {owner}, not for '{name}': "
                f"check which site holds it; `python deploy/registry.py unregister` the wrong one, then register again"
            )
        out = {"success": True, "node-id": node.node_id, "already": True}
    if not out.get("success"):
        raise RegistryError(f"flwr supernode register {public_key} {connection} failed: {out.get('error-message', out)}")
    entry = {
        "node-id": str(out["node-id"]),
        "fingerprint": print_,
        "public-key": str(Path(public_key).resolve()),
        "registered-at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if out.get("already"):
        entry["already-registered"] = True
    sites[name] = entry
    save(registry, sites)
    return entry


def unregister(flwr_json: FlwrJson, registry: Path, name: str, connection: str) -> None:
    sites = load(registry)
    if name not in sites:
        raise RegistryError(f"no site '{name}' in {registry} (sites: {', '.join(sorted(sites)) or 'none'})")
    out = flwr_json("supernode", "unregister", sites[name]["node-id"], connection)
    if not out.get("success"):
        raise RegistryError(f"flwr supernode unregister {sites[name]['node-id']} failed: {out.get('error-message', out)}")
    sites[name]["unregistered-at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save(registry, sites)


def last_contact(node: dict[str, Any]) -> str:
    status = str(node.get("status", ""))
    if status == "online":
        return f"online since {node.get('online-at')}"
    if node.get("offline-at") not in (None, "", "N/A"):
        return f"last seen {node.get('offline-at')}"
    return "never connected"


def status(flwr_json: FlwrJson, registry: Path, connection: str) -> list[dict[str, Any]]:
    """One row per registered site (by name) and per node the registry does not know."""
    out = flwr_json("supernode", "list", connection)
    if not out.get("success"):
        raise RegistryError(f"flwr supernode list {connection} failed: {out.get('error-message', out)}")
    nodes = {str(n["node-id"]): n for n in out.get("nodes", [])}
    rows = []
    for name, entry in sorted(load(registry).items()):
        if "unregistered-at" in entry:
            continue
        node = nodes.pop(entry["node-id"], None)
        rows.append(
            {
                "site": name,
                "node-id": entry["node-id"],
                "fingerprint": entry["fingerprint"],
                "status": node.get("status") if node else "not known to the SuperLink",
                "last-contact": last_contact(node) if node else "-",
            }
        )
    for node_id, node in sorted(nodes.items()):
        if node.get("status") == "unregistered":
            continue
        rows.append(
            {
                "site": "(not in registry)",
                "node-id": node_id,
                "fingerprint": "?",
                "status": node.get("status"),
                "last-contact": last_contact(node),
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", type=Path, default=DEFAULT_REGISTRY, help="default: %(default)s")
    parser.add_argument("--connection", default="fedpagkd", help="the operator's flwr connection (control address)")
    sub = parser.add_subparsers(dest="command", required=True)
    reg = sub.add_parser("register")
    reg.add_argument("public_key", type=Path)
    reg.add_argument("--name", required=True)
    unreg = sub.add_parser("unregister")
    unreg.add_argument("name")
    st = sub.add_parser("status")
    st.add_argument("--format", choices=["table", "json"], default="table")
    args = parser.parse_args(argv)
    run = cli_runner()
    try:
        if args.command == "register":
            entry = register(run, args.registry, args.public_key, args.name, args.connection)
            print(f"registered site '{args.name}': node {entry['node-id']}, key {entry['fingerprint']} ({args.registry})")
            if entry.get("already-registered"):
                print("(the SuperLink held this key already, e.g. from `flwr supernode register`: recorded, nothing changed)")
        elif args.command == "unregister":
            unregister(run, args.registry, args.name, args.connection)
            print(f"unregistered site '{args.name}'")
        else:
            rows = status(run, args.registry, args.connection)
            if args.format == "json":
                print(json.dumps(rows, indent=2))
            else:
                cols = ["site", "node-id", "status", "last-contact", "fingerprint"]
                widths = {c: max([len(c), *(len(str(r[c])) for r in rows)]) for c in cols}
                print("  ".join(c.ljust(widths[c]) for c in cols))
                for row in rows:
                    print("  ".join(str(row[c]).ljust(widths[c]) for c in cols))
    except RegistryError as err:
        print(f"error: {tlscheck.explain(str(err), args.connection)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
