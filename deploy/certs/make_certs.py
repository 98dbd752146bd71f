#!/usr/bin/env python3
"""Create the TLS certificates and SuperNode authentication keys for a FedPaGKD federation.

Outputs (into ``--out``, default ``deploy/certs/out/``):

* ``ca.crt`` / ``ca.key``          self-signed EC (P-384) certificate authority.
  ``ca.crt`` is public and goes to every site; ``ca.key`` never leaves the coordinator
  operator's machine (ideally it goes offline after this command).
* ``server.pem`` / ``server.key``  SuperLink TLS certificate signed by the CA, with the
  requested subject alternative names (IP literals become IP entries, everything else
  DNS entries). Both stay on the coordinator.
* ``<site>`` / ``<site>.pub``      one OpenSSH-format EC P-384 key pair per site for
  SuperNode authentication. The private key goes to that site only; the public key is
  registered with ``deploy/registry.py register`` (which runs ``flwr supernode register``).

Private keys are written atomically with mode 0600. Existing files are never
overwritten unless ``--force`` is given.

Only the ``cryptography`` package is used. Example::

    python deploy/certs/make_certs.py --out deploy/certs/out \\
        --sites nbi-a,nbi-b,wli-a,wli-b \\
        --san localhost,127.0.0.1,::1,coordinator.example.org
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import shlex
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_OUT = Path(__file__).resolve().parent / "out"
DEFAULT_SANS = ("localhost", "127.0.0.1", "::1")
CURVE = ec.SECP384R1
SITE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
DNS_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"


class CertError(Exception):
    """A user error (bad argument, file exists): reported without a traceback."""


@dataclass(frozen=True)
class SiteKeyPair:
    """An OpenSSH-format EC P-384 key pair (both as bytes, ready to write)."""

    private_openssh: bytes
    public_openssh: bytes


# --------------------------------------------------------------------------- helpers


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _name(common_name: str, org: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def parse_sans(sans: Iterable[str]) -> list[x509.GeneralName]:
    """Turn ``["localhost", "127.0.0.1", "::1"]`` into DNSName / IPAddress entries.

    IP literals (v4 or v6, brackets allowed) become ``x509.IPAddress``; every other entry
    must be a valid DNS name (wildcard allowed in the left-most label) and becomes
    ``x509.DNSName``. Duplicates are dropped, order kept.
    """
    out: list[x509.GeneralName] = []
    seen: set[x509.GeneralName] = set()
    for raw in sans:
        entry = raw.strip()
        if not entry:
            continue
        general: x509.GeneralName
        try:
            general = x509.IPAddress(ipaddress.ip_address(entry.strip("[]")))
        except ValueError:
            name = entry.rstrip(".").lower()
            labels = name.split(".")
            ok = len(name) <= 253 and all(
                DNS_LABEL_RE.match(label) or (i == 0 and label == "*") for i, label in enumerate(labels)
            )
            if not ok:
                raise CertError(f"not an IP address nor a valid DNS name: {entry!r}")
            general = x509.DNSName(name)
        if general not in seen:
            seen.add(general)
            out.append(general)
    if not out:
        raise CertError("at least one subject alternative name is required (--san)")
    return out


# ------------------------------------------------------------------ key material


def make_ca(
    common_name: str = "FedPaGKD federation CA",
    days: int = 3650,
    org: str = "FedPaGKD",
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Create a self-signed EC P-384 CA that may sign end-entity certificates only."""
    key = ec.generate_private_key(CURVE())
    subject = _name(common_name, org)
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            critical=False,
        )
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    sans: Sequence[str],
    days: int = 397,
    common_name: str | None = None,
    org: str = "FedPaGKD",
    hours: float | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Create the SuperLink server key and certificate, signed by ``ca_key``, valid ``days``
    (or ``hours`` when given: a short-lived certificate, e.g. for an expiry drill).

    ``sans`` are host names and/or IP literals; clients check the address they dial
    (``--superlink host:port`` on a SuperNode, ``address`` in the flwr CLI config, and
    the SuperLink's own internal SuperExec on 127.0.0.1) against these entries.
    """
    general_names = parse_sans(sans)
    if common_name is None:
        dns = [g.value for g in general_names if isinstance(g, x509.DNSName)]
        common_name = dns[0] if dns else str(general_names[0].value)
    key = ec.generate_private_key(CURVE())
    now = _now()
    lifetime = dt.timedelta(hours=hours) if hours is not None else dt.timedelta(days=days)
    not_after = min(now + lifetime, ca_cert.not_valid_after_utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, org))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(general_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_site_keypair(comment: str = "") -> SiteKeyPair:
    """Create an OpenSSH-format EC P-384 key pair for SuperNode authentication."""
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if comment:
        public += b" " + comment.encode("ascii")
    return SiteKeyPair(private_openssh=private, public_openssh=public + b"\n")


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted (the SuperLink reads it at start-up without a password)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# ------------------------------------------------------------------------ files


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder + ``os.replace``.

    The temp file gets ``mode`` before any byte is written, so a private key is never
    readable by others, not even for an instant.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    os.chmod(path, mode)  # os.replace keeps the temp file's mode; be explicit anyway


def parse_sites(value: str) -> list[str]:
    sites = [s.strip() for s in value.split(",") if s.strip()]
    for site in sites:
        if not SITE_NAME_RE.match(site):
            raise CertError(
                f"invalid site name {site!r}: use letters, digits, '.', '_' or '-' (max 63 characters, no leading punctuation)"
            )
        if site in {Path(CA_CERT).stem, Path(SERVER_CERT).stem}:
            raise CertError(f"site name {site!r} clashes with an output file name")
    if len(set(sites)) != len(sites):
        raise CertError(f"duplicate site names in {value!r}")
    return sites


def load_ca(out: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Load ``ca.key`` / ``ca.crt`` from ``out`` (to renew the server certificate)."""
    try:
        cert = x509.load_pem_x509_certificate((out / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((out / CA_KEY).read_bytes(), password=None)
    except FileNotFoundError as err:
        raise CertError(f"--reuse-ca: {err.filename} not found") from err
    except ValueError as err:
        raise CertError(f"--reuse-ca: cannot read the CA in {out}: {err}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey) or (
        key.public_key().public_numbers() != cert.public_key().public_numbers()  # type: ignore[union-attr]
    ):
        raise CertError(f"--reuse-ca: {out / CA_KEY} does not belong to {out / CA_CERT}")
    return key, cert


def planned_files(sites: Sequence[str], tls: bool, reuse_ca: bool = False) -> list[str]:
    names: list[str] = []
    if tls:
        names += [SERVER_CERT, SERVER_KEY] if reuse_ca else [CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY]
    for site in sites:
        names += [site, f"{site}.pub"]
    return names


def generate(
    out: Path,
    sites: Sequence[str],
    sans: Sequence[str],
    days: int = 397,
    ca_days: int = 3650,
    force: bool = False,
    tls: bool = True,
    reuse_ca: bool = False,
    hours: float | None = None,
) -> list[Path]:
    """Create every file; return the written paths. Raises CertError on refusal.

    ``reuse_ca=True`` keeps the existing CA in ``out`` and only (re)issues the server
    certificate (renewal, or new SANs) plus any requested site keys: sites keep their
    ``ca.crt``.
    """
    if not tls and not sites:
        raise CertError("nothing to do: --sites-only needs --sites")
    if tls:
        parse_sans(sans)  # validate before touching the disk
    ca = load_ca(out) if (tls and reuse_ca) else None
    existing = [out / n for n in planned_files(sites, tls, reuse_ca) if (out / n).exists()]
    if existing and not force:
        listing = ", ".join(str(p) for p in existing)
        raise CertError(
            f"refusing to overwrite existing files: {listing} "
            "(use --force to replace them; registered site keys then need re-registering)"
        )
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def _write(name: str, data: bytes, mode: int) -> None:
        write_atomic(out / name, data, mode)
        written.append(out / name)

    if tls:
        if ca is None:
            ca_key, ca_cert = make_ca(days=ca_days)
            _write(CA_KEY, key_to_pem(ca_key), 0o600)
            _write(CA_CERT, cert_to_pem(ca_cert), 0o644)
        else:
            ca_key, ca_cert = ca
        srv_key, srv_cert = make_server_cert(ca_key, ca_cert, sans, days=days, hours=hours)
        _write(SERVER_KEY, key_to_pem(srv_key), 0o600)
        _write(SERVER_CERT, cert_to_pem(srv_cert), 0o644)
    for site in sites:
        pair = make_site_keypair(comment=f"fedpagkd-{site}")
        _write(site, pair.private_openssh, 0o600)
        _write(f"{site}.pub", pair.public_openssh, 0o644)
    return written


def register_commands(out: Path, sites: Sequence[str], connection: str) -> list[str]:
    """The lines the coordinator operator runs to register the sites: ``deploy/registry.py``, which
    calls ``flwr supernode register`` and records site name, node id and key fingerprint beside
    the keys (the one registration path of deploy/README.md, step 4)."""
    registry = shlex.quote(str(out / "registry.json"))
    return [
        f"python deploy/registry.py --connection {shlex.quote(connection)} --registry {registry} "
        f"register {shlex.quote(str(out / (site + '.pub')))} --name {shlex.quote(site)}"
        for site in sites
    ]


# -------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedpagkd certs",  # = python deploy/certs/make_certs.py
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    p.add_argument(
        "--sites",
        default="",
        help="comma-separated site names; one SuperNode auth key pair each (e.g. nbi-a,wli-a)",
    )
    p.add_argument(
        "--san",
        default=",".join(DEFAULT_SANS),
        help="comma-separated subject alternative names of the SuperLink certificate: "
        "every host name / IP a SuperNode or the flwr CLI dials, plus localhost and "
        "127.0.0.1 (the SuperLink's internal SuperExec dials those). Default: %(default)s",
    )
    p.add_argument("--days", type=int, default=397, help="server certificate validity in days (default: %(default)s)")
    p.add_argument(
        "--hours",
        type=float,
        default=None,
        help="server certificate validity in hours instead of --days (a short-lived certificate, "
        "e.g. to rehearse expiry: the health check fails --min-days before it runs out)",
    )
    p.add_argument("--ca-days", type=int, default=3650, help="CA validity in days (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite existing keys and certificates")
    p.add_argument(
        "--sites-only",
        action="store_true",
        help="only create site key pairs (add a hospital to an existing federation; CA untouched)",
    )
    p.add_argument(
        "--reuse-ca",
        action="store_true",
        help="keep ca.crt/ca.key in --out and only re-issue server.pem/server.key "
        "(renewal or new --san; needs --force to replace the old server files)",
    )
    p.add_argument(
        "--connection",
        default="fedpagkd",
        help="name of the SuperLink connection in the operator's flwr config, used in the "
        "printed register commands (default: %(default)s)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.days <= 0 or args.ca_days <= 0 or (args.hours is not None and args.hours <= 0):
            raise CertError("--days, --hours and --ca-days must be positive")
        sites = parse_sites(args.sites)
        sans = [s for s in args.san.split(",") if s.strip()]
        tls = not args.sites_only
        if args.sites_only and args.reuse_ca:
            raise CertError("--sites-only and --reuse-ca exclude each other")
        if tls and not {"localhost", "127.0.0.1"} & {s.strip().lower() for s in sans}:
            print(
                "warning: neither 'localhost' nor '127.0.0.1' is in --san; the SuperLink's "
                "own SuperExec connects over 127.0.0.1 and will fail TLS verification",
                file=sys.stderr,
            )
        written = generate(
            args.out,
            sites,
            sans,
            days=args.days,
            ca_days=args.ca_days,
            force=args.force,
            tls=tls,
            reuse_ca=args.reuse_ca,
            hours=args.hours,
        )
    except CertError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path} ({oct(path.stat().st_mode & 0o777)})")
    if tls:
        print(
            "\nKeep ca.key offline (needed again only for --reuse-ca renewals).\n"
            "server.pem/server.key go to the coordinator; ca.crt goes to every site and "
            "to the flwr CLI config (root-certificates)."
        )
    if sites:
        print("\nRegister each site's public key with the SuperLink (coordinator operator):")
        for line in register_commands(args.out, sites, args.connection):
            print(f"  {line}")
        print("Then hand <site> (the private key) to that site only, over a secure channel.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
