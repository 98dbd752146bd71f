"""Deployment assets: certificate tool, compose files, Dockerfiles (fast, no Docker engine)."""

from __future__ import annotations

import importlib.util
import ipaddress
import re
import stat
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE_FILES = sorted((DEPLOY / "compose").glob("*.yaml"))
DOCKERFILES = sorted((DEPLOY / "docker").glob("*.Dockerfile"))
SANS = ["localhost", "127.0.0.1", "::1", "coordinator.example.org"]
SITES = ["nbi-a", "wli-b"]


def _load_make_certs():
    spec = importlib.util.spec_from_file_location("make_certs", DEPLOY / "certs" / "make_certs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_certs", module)
    spec.loader.exec_module(module)
    return module


mc = _load_make_certs()


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    rc = mc.main(["--out", str(out), "--sites", ",".join(SITES), "--san", ",".join(SANS), "--days", "30"])
    assert rc == 0
    return out


# ----------------------------------------------------------------- make_certs


def test_ca_signs_server_cert(certs: Path) -> None:
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)  # raises on a bad signature / issuer mismatch
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    # the keys on disk belong to the certificates
    for key_file, cert in (("ca.key", ca), ("server.key", server)):
        key = serialization.load_pem_private_key((certs / key_file).read_bytes(), password=None)
        assert key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_server_sans_exact(certs: Path) -> None:
    server = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(san.get_values_for_type(x509.DNSName)) == ["coordinator.example.org", "localhost"]
    assert sorted(san.get_values_for_type(x509.IPAddress), key=str) == sorted(
        [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")], key=str
    )
    assert len(list(san)) == len(SANS)


def test_site_keys_openssh_p384(certs: Path) -> None:
    for site in SITES:
        private = serialization.load_ssh_private_key((certs / site).read_bytes(), password=None)
        public = serialization.load_ssh_public_key((certs / f"{site}.pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, ec.SECP384R1)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert private.public_key().public_numbers() == public.public_numbers()
        assert (certs / site).read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        assert (certs / f"{site}.pub").read_text().startswith("ecdsa-sha2-nistp384 ")


def test_private_keys_0600(certs: Path) -> None:
    for name in ["ca.key", "server.key", *SITES]:
        assert stat.S_IMODE((certs / name).stat().st_mode) == 0o600, name
    for name in ["ca.crt", "server.pem", *(f"{s}.pub" for s in SITES)]:
        assert stat.S_IMODE((certs / name).stat().st_mode) & 0o077 != 0o077


def test_refuses_overwrite_without_force(certs: Path, capsys) -> None:
    before = {p.name: p.read_bytes() for p in certs.iterdir()}
    assert mc.main(["--out", str(certs), "--sites", SITES[0], "--san", "localhost"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in certs.iterdir()} == before
    assert not [p for p in certs.iterdir() if p.name.endswith(".tmp")]


def test_force_overwrites_and_reuse_ca_renews(tmp_path: Path) -> None:
    assert mc.main(["--out", str(tmp_path), "--sites", "s1", "--san", "localhost,127.0.0.1"]) == 0
    old_key = (tmp_path / "s1").read_bytes()
    ca_pem = (tmp_path / "ca.crt").read_bytes()
    assert mc.main(["--out", str(tmp_path), "--sites", "s1", "--force"]) == 0
    assert (tmp_path / "s1").read_bytes() != old_key
    assert (tmp_path / "ca.crt").read_bytes() != ca_pem  # a new CA
    # renewal keeps the CA
    ca_pem = (tmp_path / "ca.crt").read_bytes()
    assert mc.main(["--out", str(tmp_path), "--reuse-ca", "--force", "--san", "localhost,10.1.2.3"]) == 0
    assert (tmp_path / "ca.crt").read_bytes() == ca_pem
    ca = x509.load_pem_x509_certificate(ca_pem)
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]


def test_register_commands_printed(tmp_path: Path, capsys) -> None:
    assert mc.main(["--out", str(tmp_path), "--sites", "nbi-a", "--connection", "prod"]) == 0
    out = capsys.readouterr().out
    assert f"register {tmp_path / 'nbi-a.pub'} --name nbi-a" in out and "--connection prod" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sites", "../evil"], "invalid site name"),
        (["--sites", "a,a"], "duplicate"),
        (["--san", "bad_host!"], "not an IP address"),
        (["--sites-only"], "nothing to do"),
    ],
)
def test_bad_arguments(tmp_path: Path, capsys, args, message) -> None:
    assert mc.main(["--out", str(tmp_path / "o"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_parse_sans_distinguishes_ip_and_dns() -> None:
    names = mc.parse_sans(["Host.Example.org", "[::1]", "10.0.0.1", "10.0.0.1"])
    assert names == [
        x509.DNSName("host.example.org"),
        x509.IPAddress(ipaddress.ip_address("::1")),
        x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
    ]


# -------------------------------------------------------------- compose files


def _compose(path: Path) -> dict:
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed (it normally comes with hydra-core/omegaconf)")
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict), path
    return doc


def test_compose_files_exist() -> None:
    assert {p.name for p in COMPOSE_FILES} >= {"coordinator.yaml", "site.yaml", "all-in-one.yaml"}


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_services_use_tls(path: Path) -> None:
    doc = _compose(path)
    text = path.read_text()
    assert "--insecure" not in text
    for name, svc in doc["services"].items():
        entry = " ".join(svc.get("entrypoint") or [])
        env = svc.get("environment") or {}
        secret_targets = {s["target"] if isinstance(s, dict) else s for s in svc.get("secrets") or []}
        assert "ca.crt" in secret_targets or name == "synthetic-data", f"{path.name}:{name} lacks the CA"
        if "fedpagkd-coordinator" in entry:
            # flower-superlink with --ssl-* files and --enable-supernode-auth (entrypoint)
            assert {"ca.crt", "server.pem", "server.key"} <= secret_targets
            assert env["FEDPAGKD_SERVER_KEY"] == "/run/secrets/server.key"
            assert "superlink-state" in " ".join(map(str, svc.get("volumes", [])))
        elif "fedpagkd-site" in entry:
            # flower-supernode with --root-certificates and --auth-supernode-private-key
            assert "supernode_auth_key" in secret_targets
            assert env["FEDPAGKD_CA_CERT_FILE"] == "/run/secrets/ca.crt"
            assert env["FEDPAGKD_AUTH_KEY_FILE"] == "/run/secrets/supernode_auth_key"
            assert "FEDPAGKD_APP_DIGEST" in env, f"{path.name}:{name} pins no app bundle"  # fedpagkd-supernode --app-digest
            assert str(env["FEDPAGKD_MODALITY"]).startswith(("nbi", "wli", "${FEDPAGKD_MODALITY"))
            mounts = [m for m in svc["volumes"] if isinstance(m, dict) and m["target"] == "/data"]
            assert mounts and all(m.get("read_only") for m in mounts), f"{path.name}:{name} data not read-only"
            assert str(svc.get("restart", "")).startswith("on-failure")
        for key in ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK"):
            if name != "synthetic-data":
                assert key in env, f"{path.name}:{name} lacks {key}"


def test_all_in_one_has_two_sites_per_modality() -> None:
    doc = _compose(DEPLOY / "compose" / "all-in-one.yaml")
    modalities = [
        svc["environment"]["FEDPAGKD_MODALITY"]
        for svc in doc["services"].values()
        if "fedpagkd-site" in " ".join(svc.get("entrypoint") or [])
    ]
    assert sorted(modalities) == ["nbi", "nbi", "wli", "wli"]


def test_entrypoints_pass_tls_flags() -> None:
    coord = (DEPLOY / "docker" / "coordinator-entrypoint.sh").read_text()
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth"):
        assert flag in coord
    site = (DEPLOY / "docker" / "site-entrypoint.sh").read_text()
    for flag in ("--root-certificates", "--auth-supernode-private-key", "--superlink", "--node-config", "--app-digest"):
        assert flag in site
    assert 'exec fedpagkd-supernode "${args[@]}"' in site and "app-digest=" not in site
    assert "--insecure" not in coord + site


# Compose interpolation (the Compose specification): ``$$`` is a literal ``$``; ``${VAR}`` / ``$VAR``
# and ``${VAR:?message}`` / ``${VAR?message}`` are required; ``${VAR:-default}`` / ``${VAR-default}``
# are not. Only YAML values are interpolated, so the parsed document is walked, not the text.
INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])((?:[^{}]|\{[^{}]*\})*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


class Unset(KeyError):
    """A required variable compose would refuse: its name and the file's own message."""


def interpolate(value, env: dict[str, str]):
    """``value`` (a parsed compose document or part of it) with every variable resolved as
    ``docker compose --env-file`` does; :class:`Unset` for a required one that is missing."""
    if isinstance(value, dict):
        return {interpolate(k, env): interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        op, arg = match.group(2), match.group(3) or ""
        present = name in env and (env[name] != "" or op in ("-", "?"))
        if op in (":-", "-"):
            return env[name] if present else interpolate(arg, env)
        if op in (":?", "?") and not present:
            raise Unset(f"{name}: {arg}")
        if op is None and name not in env:
            raise Unset(name)
        return env.get(name, "")

    return INTERPOLATION.sub(one, value)


def variables(value) -> dict[str, str | None]:
    """Every variable a compose document reads -> its operator (None: bare, required)."""
    found: dict[str, str | None] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            found.update(variables(k) | variables(v))
    elif isinstance(value, list):
        for v in value:
            found.update(variables(v))
    elif isinstance(value, str):
        for match in INTERPOLATION.finditer(value):
            if match.group(0) != "$$":
                found[match.group(1) or match.group(4)] = match.group(2)
                found.update(variables(match.group(3) or ""))
    return found


def required(value) -> set[str]:
    return {name for name, op in variables(value).items() if op in (None, ":?", "?")}


def _example_site_env(**changes: str) -> dict[str, str]:
    from tests.test_deploy_units import systemd_env_file  # compose reads these KEY=value files alike

    env = systemd_env_file(DEPLOY / "sites" / "example-site.env")
    env["FEDPAGKD_APP_DIGEST"] = "sha256:" + "a" * 64  # shipped empty: every site sets its own pin
    env.update(changes)
    return env


def test_site_compose_reads_only_settings_of_the_example_env_file() -> None:
    doc = _compose(DEPLOY / "compose" / "site.yaml")
    example = _example_site_env()
    assert required(doc) <= set(example), f"site.yaml requires {sorted(required(doc) - set(example))}, not in example-site.env"
    unknown = set(variables(doc)) - set(example)
    assert not unknown, f"site.yaml reads {sorted(unknown)}, which example-site.env does not document"


def test_site_compose_resolved_with_the_example_env_file() -> None:
    example = _example_site_env()
    doc = interpolate(_compose(DEPLOY / "compose" / "site.yaml"), example)
    svc = doc["services"]["supernode"]
    (data,) = [m for m in svc["volumes"] if isinstance(m, dict) and m["target"] == "/data"]
    assert data["source"] == example["FEDPAGKD_DATA_DIR"] and data["read_only"] and not data["bind"]["create_host_path"]
    assert doc["secrets"]["ca_crt"]["file"] == example["FEDPAGKD_CA_CERT_FILE"]
    assert doc["secrets"]["supernode_auth_key"]["file"] == example["FEDPAGKD_AUTH_KEY_FILE"]
    env = svc["environment"]
    for key in ("FEDPAGKD_SITE_NAME", "FEDPAGKD_MODALITY", "FEDPAGKD_SUPERLINK", "FEDPAGKD_APP_DIGEST", "FEDPAGKD_DEVICE"):
        assert env[key] == example[key], key
    # the same names inside the container, with the paths the container sees
    assert (env["FEDPAGKD_DATA_DIR"], env["FEDPAGKD_CA_CERT_FILE"], env["FEDPAGKD_AUTH_KEY_FILE"]) == (
        "/data",
        "/run/secrets/ca.crt",
        "/run/secrets/supernode_auth_key",
    )
    assert svc["image"] == example["FEDPAGKD_SITE_IMAGE"]
    assert svc["build"]["args"]["TORCH_INDEX_URL"] == example["FEDPAGKD_TORCH_INDEX_URL"]


@pytest.mark.parametrize(
    "missing", ["FEDPAGKD_DATA_DIR", "FEDPAGKD_CA_CERT_FILE", "FEDPAGKD_AUTH_KEY_FILE", "FEDPAGKD_APP_DIGEST"]
)
def test_site_compose_refuses_an_env_file_without_a_required_setting(missing: str) -> None:
    env = {k: v for k, v in _example_site_env().items() if k != missing}
    with pytest.raises(Unset, match=rf"{missing}: set {missing}\b"):
        interpolate(_compose(DEPLOY / "compose" / "site.yaml"), env)


@pytest.mark.parametrize("name", ["coordinator.yaml", "all-in-one.yaml"])
def test_coordinator_compose_files_need_no_env_file(name: str) -> None:
    """Every variable has a default there, and each is documented in the file's own header."""
    path = DEPLOY / "compose" / name
    doc = _compose(path)
    assert required(doc) == set(), f"{name} requires {sorted(required(doc))}"
    header = path.read_text().split("\nname:", 1)[0]
    undocumented = [v for v in variables(doc) if v not in header]
    assert not undocumented, f"{name}: {undocumented} not described in the header comment"
    interpolate(doc, {})  # resolves with nothing set


@pytest.mark.parametrize("where", ["first", "between", "last"])
def test_write_synthetic_takes_site_names_in_any_position(tmp_path: Path, where: str) -> None:
    """``fedpagkd write-synthetic`` (the all-in-one synthetic-data service, the rehearsal in the guide)."""
    from client.sitecheck import read_sites_file, write_synthetic_main

    small = ["data.nbi_sites=1", "data.wli_sites=1", "data.train_per_site=3", "data.val_per_site=0", "data.test_per_site=3"]
    names = ["--site-names", "n-1,w-1"]
    argv = {
        "first": [*names, str(tmp_path), *small],
        "between": [str(tmp_path), *small[:2], *names, *small[2:], "data.image_size=32"],
        "last": [str(tmp_path), *small, "data.image_size=32", *names],
    }[where]
    if "data.image_size=32" not in argv:
        argv.append("data.image_size=32")
    assert write_synthetic_main(argv) == 0
    assert [e["name"] for e in read_sites_file(tmp_path)] == ["n-1", "w-1"]


# ------------------------------------------------------------ secrets, images


def test_no_private_key_under_deploy() -> None:
    """No key material is committed: deploy/certs/out/ (gitignored) is the only place for it."""
    pem_key = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
    offenders = [
        p
        for p in DEPLOY.rglob("*")
        if p.is_file() and p.relative_to(DEPLOY).parts[:2] != ("certs", "out") and pem_key.search(p.read_bytes())
    ]
    assert offenders == []


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_non_root_and_pinned(path: Path) -> None:
    text = path.read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    users = [line.split(None, 1)[1] for line in lines if line.upper().startswith("USER ")]
    assert users, f"{path.name} has no USER line"
    assert users[-1].split(":")[0] not in {"root", "0"}
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, flags=re.M))
    froms = [line.split()[1] for line in lines if line.upper().startswith("FROM ")]
    assert froms
    for image in froms:
        match = re.fullmatch(r"\$\{(\w+)\}", image)
        if match:
            image = args[match.group(1)]
        if image in {"build", "runtime"}:  # earlier stage
            continue
        assert ":" in image, f"{path.name}: {image} has no tag"
        tag = image.rsplit(":", 1)[1]
        assert tag != "latest" and re.match(r"\d+\.\d+\.\d+", tag), f"{path.name}: {image} is not pinned"
    assert "HEALTHCHECK" in text
    assert not re.search(r"^\s*(COPY|ADD)\s.*\b(certs|\.key|\.pem)\b", text, flags=re.M), "secrets copied into image"
    ignore = path.with_name(path.name + ".dockerignore")
    assert ignore.is_file(), f"{ignore.name} missing"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_script_an_image_runs_by_name_has_a_shebang(path: Path) -> None:
    """A file copied executable onto the image's PATH is exec'd by name: without ``#!`` the
    kernel refuses it (ENOEXEC) and the container never starts (deploy/superlink.py had none)."""
    import re

    copied = re.findall(r"COPY --chmod=0?755 (\S+) /usr/local/bin/", path.read_text())
    assert copied, f"{path.name}: no executable copied (the pattern no longer matches the Dockerfile)"
    for source in copied:
        assert (ROOT / source).read_text().startswith("#!"), f"{source} is run by name in {path.name} but has no shebang"
