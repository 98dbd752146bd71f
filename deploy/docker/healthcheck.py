#!/usr/bin/env python3
"""Health probe of a FedPaGKD coordinator or site: exit 0 only when it can really work.

Checks, each only when asked for (the image's HEALTHCHECK and the systemd units ask for all
that apply):

1. ``HOST:PORT`` (default ``$FLWR_HEALTH_ADDRESS`` or ``127.0.0.1:9098``): the Flower process's
   gRPC health server (``--health-server-address``) says SERVING.
2. ``--superexec``: a ``flower-superexec`` runs whose ``--parent-pid`` is a living process, i.e.
   the SuperLink (SuperNode) can still start its ServerApps (ClientApps). The SuperLink's health
   server keeps answering SERVING after that child died.
3. ``--cert PEM`` (repeatable) with ``--min-days N`` (default ``$FEDPAGKD_CERT_MIN_DAYS`` or 14):
   the certificate is valid now and for at least N more days (0: only "not expired"). The
   SuperLink keeps serving an expired certificate; every site then fails its TLS handshake.
4. ``--reach HOST:PORT --ca CA`` (a site): a TLS handshake with the coordinator's Fleet API,
   verified against the federation's CA and host name, succeeds within 5 s.

Prints ``healthy: ...`` or ``unhealthy: <what> (<fix>)`` per failed check; exit 0 or 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import socket
import ssl
import sys
from pathlib import Path
from typing import Any


def check_health_server(address: str) -> str | None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    except grpc.RpcError as err:
        return (
            f"health server {address}: {err.code().name} (is the Flower process running with --health-server-address {address}?)"
        )
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"health server {address}: status {reply.status}"
    return None


def _cmdline(pid: str) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _alive(pid: str) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def check_superexec(service_pid: int | None = None) -> str | None:
    """A living flower-superexec whose --parent-pid is alive (and is ``service_pid`` when given:
    on a host with several Flower services, the one this probe is about)."""
    if service_pid is not None and not _alive(str(service_pid)):
        return f"the service process {service_pid} is gone (restart the service)"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or not _alive(entry.name):
            continue
        args = _cmdline(entry.name)
        # flower-superexec, python .../flower-superexec, or a site's python .../supernode.py flower-superexec
        if not any(Path(a).name == "flower-superexec" for a in args[:3]) or "--parent-pid" not in args:
            continue
        parent = args[args.index("--parent-pid") + 1] if args.index("--parent-pid") + 1 < len(args) else ""
        if _alive(parent) and (service_pid is None or parent == str(service_pid)):
            return None
    of = f" of process {service_pid}" if service_pid is not None else ""
    return (
        f"no flower-superexec child{of} is running: runs cannot start (restart the service; see its log for why the child died)"
    )


def check_certificate(path: Path, min_days: float) -> str | None:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as err:
        return f"certificate {path} cannot be read ({err})"
    now = dt.datetime.now(dt.timezone.utc)
    end, start = cert.not_valid_after_utc, cert.not_valid_before_utc
    renew = "renew it: python deploy/certs/make_certs.py --reuse-ca --force --san ... (deploy/README.md, Upgrade)"
    if now < start:
        return f"certificate {path} is not valid before {start:%Y-%m-%d %H:%M} UTC (clock?)"
    if now >= end:
        return f"certificate {path} EXPIRED on {end:%Y-%m-%d %H:%M} UTC: every TLS handshake fails; {renew}"
    left = (end - now).total_seconds() / 86400
    if left < min_days:
        return f"certificate {path} expires on {end:%Y-%m-%d %H:%M} UTC, in {left:.1f} days (< --min-days {min_days:g}); {renew}"
    return None


# OpenSSL verify codes (X509_V_ERR_*) a person can act on, each with what it means here.
EXPIRED, NOT_YET_VALID = 10, 9
UNKNOWN_ISSUER = (2, 18, 19, 20, 21)  # unable to get (local) issuer, self-signed (in chain), cannot verify leaf
NAME_MISMATCH = (62, 64)  # hostname mismatch, IP address mismatch


def _peer_certificate(host: str, port: int) -> Any:
    """The server's certificate, fetched without verifying it (only to name what is wrong with it)."""
    from cryptography import x509

    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection((host, port), timeout=5) as raw, context.wrap_socket(raw, server_hostname=host) as tls:
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def verify_failure(err: ssl.SSLCertVerificationError, host: str, port: int, ca: Path | None) -> str:
    """What a failed verification of the server's certificate means and what fixes it."""
    code, renew = err.verify_code, "renew it with the same CA: make_certs.py --reuse-ca --force --san ..., restart the SuperLink"
    if code in (EXPIRED, NOT_YET_VALID):
        try:
            cert = _peer_certificate(host, port)
            when = (
                f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M}" if code == EXPIRED else f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M}"
            )
        except (OSError, ValueError):
            when = "?"
        if code == EXPIRED:
            return f"the SuperLink's certificate EXPIRED on {when} UTC: {renew}"
        return f"the SuperLink's certificate is not valid before {when} UTC: check this machine's clock"
    if code in UNKNOWN_ISSUER:
        return (
            f"the SuperLink's certificate is not signed by {ca or 'a CA this machine trusts'} (a wrong or old ca.crt, or "
            "the coordinator's certificates were regenerated): get the current ca.crt from the coordinator"
        )
    if code in NAME_MISMATCH:
        return f"'{host}' is not a name in the SuperLink's certificate: use a name of its --san, or re-issue it with this one"
    return err.verify_message


def check_reach(address: str, ca: Path | None) -> str | None:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    try:
        with socket.create_connection((host, int(port)), timeout=5) as raw, context.wrap_socket(raw, server_hostname=host):
            return None
    except ssl.SSLCertVerificationError as err:
        why = verify_failure(err, host, int(port), ca)
        return (
            f"coordinator {address}: TLS verification failed ({err.verify_message}): {why}; see deploy/README.md, Troubleshooting"
        )
    except (OSError, ValueError) as err:
        return f"coordinator {address} unreachable ({err}); check the coordinator is up, the address, DNS and the firewall"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("address", nargs="?", default=os.environ.get("FLWR_HEALTH_ADDRESS", "127.0.0.1:9098"))
    parser.add_argument("--superexec", action="store_true", help="require a living flower-superexec child")
    parser.add_argument("--service-pid", type=int, help="with --superexec: the SuperLink/SuperNode process it must belong to")
    parser.add_argument("--cert", type=Path, action="append", default=[], help="PEM certificate that must be valid (repeatable)")
    parser.add_argument(
        "--min-days",
        type=float,
        default=float(os.environ.get("FEDPAGKD_CERT_MIN_DAYS", "14")),
        help="fail this many days before a --cert expires (default $FEDPAGKD_CERT_MIN_DAYS or 14)",
    )
    parser.add_argument("--reach", help="coordinator HOST:PORT a site must reach over TLS")
    parser.add_argument("--ca", type=Path, help="CA certificate for --reach")
    args = parser.parse_args(argv)
    problems = [check_health_server(args.address)]
    if args.superexec:
        problems.append(check_superexec(args.service_pid))
    problems += [check_certificate(cert, args.min_days) for cert in args.cert]
    if args.reach:
        problems.append(check_reach(args.reach, args.ca))
    problems = [p for p in problems if p]
    for problem in problems:
        print(f"unhealthy: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(
        f"healthy: {args.address}"
        + (" + superexec" if args.superexec else "")
        + "".join(f" + {c}" for c in args.cert)
        + (f" + reaches {args.reach}" if args.reach else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
