"""Bare-metal units (deploy/systemd/) as systemd 252 (Debian 12) reads them, and the site's start
checks (deploy/supernode.py): fast, no systemd running.

Each unit's ExecStart is built from the example env files the way systemd does it (EnvironmentFile=
parsing, ``${VAR}`` one argument, ``$VAR`` split at whitespace, ``%i``), independently of the
project's own env-file reader, and the resulting command is checked; ``systemd-analyze verify``
runs on every unit when the binary is there."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SYSTEMD = ROOT / "deploy" / "systemd"
SITE_ENV = ROOT / "deploy" / "sites" / "example-site.env"
COORDINATOR_ENV = SYSTEMD / "example-coordinator.env"
UNITS = sorted(p.name for p in SYSTEMD.iterdir() if p.suffix in (".service", ".timer"))
# Instances the units are documented with: template name -> instance name.
INSTANCES = {"fedpagkd-health@.service": "fedpagkd-site", "fedpagkd-health@.timer": "fedpagkd-site"}
# Settings of the site env file that the site unit does not pass: they build the Docker image, or
# the ClientApp reads them from the environment the unit gives it.
SITE_ENV_NOT_IN_UNIT = {"FEDPAGKD_SITE_IMAGE", "FEDPAGKD_TORCH_INDEX_URL", "FEDPAGKD_DRILL_DELAY_S"}
NAME = r"[A-Za-z_][A-Za-z0-9_]*"


# ------------------------------------------------------------- systemd, as far as these units need it


def systemd_env_file(path: Path) -> dict[str, str]:
    """EnvironmentFile=: ``KEY=value`` lines, ``#``/``;`` comments, one pair of quotes removed."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(NAME, key.strip()), f"{path.name}: {line!r} is not KEY=value"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def unit_settings(path: Path, instance: str = "") -> dict[str, list[str]]:
    """``Key -> [values]`` of a unit file: continuation lines joined, comments dropped, ``%i`` set."""
    text = re.sub(r"\\\n", " ", path.read_text())
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;" or line.startswith("["):
            continue
        key, _, value = line.partition("=")
        value = value.replace("%i", instance).replace("%%", "%")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def exec_argv(command: str, env: dict[str, str]) -> tuple[list[str], set[str], set[str]]:
    """ExecStart= -> (argv, variables referenced, referenced but not defined). Words are split first;
    then a word that is exactly ``$VAR`` becomes the value split at whitespace (zero or more
    arguments), ``${VAR}`` anywhere in a word becomes the value (one argument), ``$$`` is ``$``."""
    argv, used = [], set()
    for word in shlex.split(command):
        whole = re.fullmatch(r"\$(" + NAME + ")", word)
        if whole:
            used.add(whole.group(1))
            argv += env.get(whole.group(1), "").split()
            continue

        def value(match: re.Match) -> str:
            if match.group(0) == "$$":
                return "$"
            used.add(match.group(1))
            return env.get(match.group(1), "")

        argv.append(re.sub(r"\$\{(" + NAME + r")\}|\$\$", value, word))
    return argv, used, used - set(env)


def unit_env(settings: dict[str, list[str]], files: dict[str, Path]) -> dict[str, str]:
    """Environment= pairs, then each EnvironmentFile= (mapped to the example it is a copy of)."""
    env: dict[str, str] = {}
    for line in settings.get("Environment", []):
        env.update(pair.split("=", 1) for pair in shlex.split(line))
    for target in settings.get("EnvironmentFile", []):
        assert target in files, f"no example env file for {target}"
        env.update(systemd_env_file(files[target]))
    return env


def flag(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def node_config(argv: list[str]) -> dict[str, str]:
    return dict(re.findall(r"([\w.-]+)='([^']*)'", flag(argv, "--node-config")))


# ------------------------------------------------------------------------------ ExecStart


def site_command() -> tuple[list[str], set[str], set[str], dict[str, str]]:
    settings = unit_settings(SYSTEMD / "fedpagkd-site.service")
    env = unit_env(settings, {"/etc/fedpagkd/site.env": SITE_ENV})
    (command,) = settings["ExecStart"]
    return (*exec_argv(command, env), systemd_env_file(SITE_ENV))


def test_site_unit_reads_exactly_the_settings_of_the_example_env_file() -> None:
    _, used, undefined, example = site_command()
    assert undefined == set(), f"the site unit reads {sorted(undefined)}, which the example env file does not define"
    unused = set(example) - used
    assert unused == SITE_ENV_NOT_IN_UNIT, f"settings of the example env file the site unit ignores: {sorted(unused)}"


def test_site_unit_command_from_the_example_env_file() -> None:
    argv, _, _, example = site_command()
    assert argv[:2] == ["/opt/fedpagkd/.venv/bin/python", "/opt/fedpagkd/deploy/supernode.py"]
    assert flag(argv, "--site-env") == "/etc/fedpagkd/site.env"
    assert flag(argv, "--app-digest") == example["FEDPAGKD_APP_DIGEST"]
    assert flag(argv, "--superlink") == example["FEDPAGKD_SUPERLINK"]
    assert flag(argv, "--root-certificates") == example["FEDPAGKD_CA_CERT_FILE"] == "/etc/fedpagkd/ca.crt"
    assert flag(argv, "--auth-supernode-private-key") == example["FEDPAGKD_AUTH_KEY_FILE"]
    assert node_config(argv) == {
        "site-name": example["FEDPAGKD_SITE_NAME"],
        "modality": example["FEDPAGKD_MODALITY"],
        "data-path": example["FEDPAGKD_DATA_DIR"],
        "state-dir": "/var/lib/fedpagkd-site",
        "device": example["FEDPAGKD_DEVICE"],
    }
    assert flag(argv, "--health-server-address") == "127.0.0.1:9098"
    assert "--insecure" not in argv


def test_empty_optional_settings_leave_no_empty_option() -> None:
    """``--max-retries ${FEDPAGKD_MAX_RETRIES}`` with the setting empty is one empty argument, which
    flower-supernode would refuse; the site's start checks drop such a pair (empty: never give up)."""
    from deploy import supernode

    argv, _, _, example = site_command()
    assert example["FEDPAGKD_MAX_RETRIES"] == "" and flag(argv, "--max-retries") == ""
    rest = supernode.preflight(["--max-retries", "", "--max-wait-time", "", "--port", "9"])
    assert rest == ["--port", "9"]
    assert supernode.preflight(["--max-retries", "3", "--max-wait-time", ""]) == ["--max-retries", "3"]


def test_coordinator_unit_command_from_the_example_env_file() -> None:
    from deploy import superlink

    settings = unit_settings(SYSTEMD / "fedpagkd-coordinator.service")
    files = {"/etc/fedpagkd/coordinator.env": COORDINATOR_ENV}
    env = unit_env(settings, files)
    (command,) = settings["ExecStart"]
    argv, used, undefined = exec_argv(command, env)
    example = systemd_env_file(COORDINATOR_ENV)
    assert undefined == set() and set(example) <= used
    assert flag(argv, "--fleet-api-address") == example["FEDPAGKD_FLEET_ADDRESS"]
    assert flag(argv, "--control-api-address") == example["FEDPAGKD_CONTROL_ADDRESS"]
    certs = example["FEDPAGKD_CERTS_DIR"]
    assert [flag(argv, f) for f in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile")] == [
        f"{certs}/ca.crt",
        f"{certs}/server.pem",
        f"{certs}/server.key",
    ]
    assert "--enable-supernode-auth" in argv and "--insecure" not in argv
    # Every address is required: deploy/superlink.py refuses an empty one (no default applies, since
    # ${VAR} of an unset variable is one empty argument), and the unit's comment says so.
    for key, option in (("FEDPAGKD_FLEET_ADDRESS", "--fleet-api-address"), ("FEDPAGKD_CONTROL_ADDRESS", "--control-api-address")):
        without, _, _ = exec_argv(command, {k: v for k, v in env.items() if k != key})
        with pytest.raises(SystemExit, match=option):
            superlink.main(without[2:])
    comment = (SYSTEMD / "fedpagkd-coordinator.service").read_text()
    assert "all three required" in comment and not re.search(r"CONTROL_ADDRESS[^\n]*\n?[^\n]*default", comment)


@pytest.mark.parametrize("instance", ["fedpagkd-site", "fedpagkd-coordinator"])
def test_health_unit_command_from_the_example_env_file(instance: str, tmp_path: Path) -> None:
    """The probe's ExecStart is a ``/bin/sh -c`` line: run it with a real shell, a stand-in
    ``systemctl`` and a stand-in python that prints its arguments."""
    settings = unit_settings(SYSTEMD / "fedpagkd-health@.service", instance)
    example = SYSTEMD / f"example-health-{instance}.env"
    env = unit_env(settings, {f"/etc/fedpagkd/health-{instance}.env": example})
    (command,) = settings["ExecStart"]
    argv, _, undefined = exec_argv(command, env)
    assert undefined == set() and argv[:2] == ["/bin/sh", "-c"]
    python, systemctl = tmp_path / "python", tmp_path / "systemctl"
    python.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    systemctl.write_text('#!/bin/sh\n[ "$*" = "show -p MainPID --value ' + instance + '" ] && echo 4242\n')
    for script in (python, systemctl):
        script.chmod(0o755)
    shell = argv[2].replace("/opt/fedpagkd/.venv/bin/python", str(python))
    out = subprocess.run(
        ["/bin/sh", "-c", shell], env={**env, "PATH": f"{tmp_path}:/usr/bin:/bin"}, capture_output=True, text=True, check=True
    )
    args = out.stdout.splitlines()
    assert args[0] == "/opt/fedpagkd/deploy/docker/healthcheck.py"
    port = "9098" if instance == "fedpagkd-site" else "9099"
    assert args[1] == f"127.0.0.1:{port}"
    # --service-pid is read only with --superexec: without it the probe would not see a dead SuperExec.
    assert "--superexec" in args and flag(args, "--service-pid") == "4242"
    if instance == "fedpagkd-site":
        assert flag(args, "--reach").endswith(":9092") and flag(args, "--ca") == "/etc/fedpagkd/ca.crt"


# ------------------------------------------------------------------------ restart, logs, verify


@pytest.mark.parametrize("unit", ["fedpagkd-coordinator.service", "fedpagkd-site.service"])
def test_crash_loop_backoff_works_on_systemd_252(unit: str) -> None:
    """systemd 252 has no RestartSteps=/RestartMaxDelaySec= (254). With a fixed RestartSec, a crash
    loop must not reach StartLimitBurst within StartLimitIntervalSec, or the unit stays failed."""
    settings = unit_settings(SYSTEMD / unit)
    for key in ("RestartSteps", "RestartMaxDelaySec"):
        assert key not in settings, f"{unit}: {key} needs systemd >= 254"
    seconds = {"s": 1, "min": 60}

    def duration(key: str) -> float:
        number, suffix = re.fullmatch(r"(\d+)(s|min)?", settings[key][-1]).groups()
        return int(number) * seconds[suffix or "s"]

    burst, interval, delay = int(settings["StartLimitBurst"][-1]), duration("StartLimitIntervalSec"), duration("RestartSec")
    assert settings["Restart"] == ["on-failure"]
    assert (burst - 1) * delay > interval, (
        f"{unit}: {burst} starts {delay:g} s apart fit in {interval:g} s: a crash loop trips it"
    )


@pytest.mark.parametrize("unit", UNITS)
def test_units_log_to_the_journal(unit: str) -> None:
    settings = unit_settings(SYSTEMD / unit)
    for key in ("StandardOutput", "StandardError"):
        assert not any(v.startswith(("file:", "append:", "truncate:")) for v in settings.get(key, [])), (unit, key)


def test_site_unit_does_not_retry_a_configuration_error() -> None:
    from deploy import supernode

    settings = unit_settings(SYSTEMD / "fedpagkd-site.service")
    assert settings["RestartPreventExitStatus"] == [str(supernode.EX_CONFIG)]
    assert supernode.EX_UNAVAILABLE != supernode.EX_CONFIG  # a data folder not mounted yet is retried


def _systemd_units_dir() -> Path | None:
    for folder in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if (folder / "sysinit.target").is_file():
            return folder
    return None


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """On a root folder holding the distribution's units, ours, and a stand-in for every command
    they run (so that 'is not executable' is checked on the paths the units name)."""
    analyze, system = shutil.which("systemd-analyze"), _systemd_units_dir()
    if analyze is None or system is None:
        pytest.skip("systemd-analyze or the distribution's units are not installed")
    root = tmp_path / "root"
    shutil.copytree(system, root / "usr/lib/systemd/system", symlinks=True)
    ours = root / "etc/systemd/system"
    shutil.copytree(SYSTEMD, ours, ignore=shutil.ignore_patterns("*.env"))
    names = []
    for unit in UNITS:
        instance = INSTANCES.get(unit, "")
        name = unit.replace("@.", f"@{instance}.") if instance else unit
        names.append(name)
        for command in unit_settings(SYSTEMD / unit, instance).get("ExecStart", []):
            binary = root / shlex.split(command)[0].lstrip("/")
            binary.parent.mkdir(parents=True, exist_ok=True)
            binary.write_text("#!/bin/sh\n")
            binary.chmod(0o755)
    out = subprocess.run(
        [analyze, "verify", "--man=no", f"--root={root}", *names],
        capture_output=True,
        text=True,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )
    report = (out.stdout + out.stderr).strip()
    assert out.returncode == 0 and report == "", f"systemd-analyze verify {' '.join(names)}:\n{report}"


# ---------------------------------------------------------------- bad input refused at start


@pytest.fixture
def site_files(tmp_path: Path) -> dict[str, Path]:
    """A site's files as the guide places them: ca.crt, the key, an ImageFolder tree, the env file."""
    from deploy.certs import make_certs

    certs = tmp_path / "etc"
    make_certs.generate(certs, ["nbi-a"], ["localhost"], force=True)
    data = tmp_path / "data"
    (data / "train" / "adenoma").mkdir(parents=True)
    (data / "site.json").write_text('{"modality": "nbi"}')
    env = tmp_path / "site.env"
    text = SITE_ENV.read_text()
    for key, value in {
        "FEDPAGKD_DATA_DIR": data,
        "FEDPAGKD_CA_CERT_FILE": certs / "ca.crt",
        "FEDPAGKD_AUTH_KEY_FILE": certs / "nbi-a",
        "FEDPAGKD_APP_DIGEST": "any",
    }.items():
        text = re.sub(rf"^{key}=.*$", f"{key}={value}", text, flags=re.M)
    env.write_text(text)
    return {"ca": certs / "ca.crt", "key": certs / "nbi-a", "data": data, "env": env}


def site_args(files: dict[str, Path], **node: str) -> list[str]:
    pairs = {"site-name": "nbi-a", "modality": "nbi", "data-path": str(files["data"]), **node}
    return [
        "--superlink",
        "127.0.0.1:9",
        "--root-certificates",
        str(files["ca"]),
        "--auth-supernode-private-key",
        str(files["key"]),
        "--node-config",
        " ".join(f"{k}='{v}'" for k, v in pairs.items()),
    ]


def test_the_example_env_file_passes_once_the_digest_is_set(site_files: dict[str, Path]) -> None:
    from deploy import supernode

    with pytest.raises(supernode.StartRefused, match=r"FEDPAGKD_APP_DIGEST is not set \(the reviewed bundle's digest"):
        supernode.read_site_env(SITE_ENV)  # shipped empty on purpose: each site sets its own pin
    values = supernode.read_site_env(site_files["env"])
    assert set(values) == set(systemd_env_file(SITE_ENV)) and values["FEDPAGKD_APP_DIGEST"] == "any"
    assert set(supernode.SITE_SETTINGS) == set(systemd_env_file(SITE_ENV)), "SITE_SETTINGS and example-site.env disagree"
    assert supernode.preflight(site_args(site_files)) == site_args(site_files)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # misspelled: named, with the setting it was probably meant to be
        (
            ("FEDPAGKD_SITE_NAME=", "FEDPAGKD_SITE_NAM="),
            r"site.env:\d+: FEDPAGKD_SITE_NAM is not a site setting; did you mean FEDPAGKD_SITE_NAME\?",
        ),
        (
            ("FEDPAGKD_DATA_DIR=", "FEDPAGKD_HOST_DATA_DIR="),
            r"FEDPAGKD_HOST_DATA_DIR is not a site setting; did you mean FEDPAGKD_DATA_DIR\?",
        ),
        (("FEDPAGKD_DEVICE=", "FEDPAGKD_DEVISE="), r"did you mean FEDPAGKD_DEVICE\?"),
        # missing (the line gone) or empty: named, with what to put there
        (("FEDPAGKD_MODALITY=nbi\n", ""), r"FEDPAGKD_MODALITY is not set \(wli \(white light\) or nbi"),
        (("FEDPAGKD_SUPERLINK=coordinator.example.org:8000", "FEDPAGKD_SUPERLINK="), r"FEDPAGKD_SUPERLINK is not set"),
        (("FEDPAGKD_MODALITY=nbi", "FEDPAGKD_MODALITY = nbi"), r"is not KEY=value \(no spaces around '='\)"),
    ],
)
def test_a_bad_env_file_is_refused_with_the_setting_named(site_files: dict[str, Path], edit, message: str) -> None:
    from deploy import supernode

    old, new = edit
    env = site_files["env"]
    assert old in env.read_text()
    env.write_text(env.read_text().replace(old, new, 1))
    with pytest.raises(supernode.StartRefused, match=message) as refused:
        supernode.read_site_env(env)
    assert refused.value.code == supernode.EX_CONFIG


def test_a_bad_env_file_stops_the_unit_command_with_exit_78(site_files: dict[str, Path]) -> None:
    """What systemd runs: the site unit's command, the env file checked before anything starts."""
    env = site_files["env"]
    env.write_text(env.read_text().replace("FEDPAGKD_SITE_NAME=", "FEDPAGKD_SITENAME="))
    script = ROOT / "deploy" / "supernode.py"
    out = subprocess.run(
        [sys.executable, str(script), "--site-env", str(env), "--app-digest", "any", *site_args(site_files)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 78, out.stderr
    assert (
        out.stderr.strip().splitlines()[-1].startswith(f"fedpagkd-supernode: ERROR: {env}:")
        and "FEDPAGKD_SITENAME is not a site setting; did you mean FEDPAGKD_SITE_NAME?" in out.stderr
    )
    assert "Traceback" not in out.stderr
    checked = subprocess.run([sys.executable, str(script), "check-env", str(env)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 78 and "did you mean FEDPAGKD_SITE_NAME?" in checked.stderr


class _As:
    """Run a block as another user: root (the test machine) takes the service user's uid, anyone
    else loses read access to ``path``; either way the block reads ``path`` as a stranger would."""

    def __init__(self, path: Path):
        self.path, self.mode = path, path.stat().st_mode

    def __enter__(self) -> None:
        if os.geteuid() == 0:
            os.setegid(65534)
            os.seteuid(65534)
        else:
            self.path.chmod(0)

    def __exit__(self, *exc) -> None:
        if os.geteuid() != 0 and os.getuid() == 0:
            os.seteuid(0)
            os.setegid(0)
        self.path.chmod(self.mode)


def test_a_key_file_the_service_user_cannot_read_is_refused(site_files: dict[str, Path]) -> None:
    import tempfile

    from deploy import supernode

    # A folder every user may enter (pytest's own are root's only), as /etc/fedpagkd is.
    shared = Path(tempfile.mkdtemp(prefix="fedpagkd-etc-"))
    try:
        shared.chmod(0o755)
        files = dict(site_files)
        for name in ("ca", "key", "data"):
            files[name] = shared / site_files[name].name
            (shutil.copytree if name == "data" else shutil.copy2)(site_files[name], files[name])
        for path in [files["ca"], *files["data"].rglob("*"), files["data"]]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        key = files["key"]
        key.chmod(0o600)  # owner root, as copied by hand without the chown step
        with _As(key), pytest.raises(supernode.StartRefused) as refused:
            supernode.preflight(site_args(files))
    finally:
        shutil.rmtree(shared)
    message = str(refused.value)
    assert message.startswith(
        f"{key} (--auth-supernode-private-key (FEDPAGKD_AUTH_KEY_FILE in the site env file)) is not readable"
    )
    assert "the SuperNode's user" in message and "sudo chown" in message and "chmod 0400" in message
    assert refused.value.code == supernode.EX_CONFIG


@pytest.mark.parametrize(
    ("case", "message", "code"),
    [
        ("missing", r"data folder \S+ \(data-path \(FEDPAGKD_DATA_DIR in the site env file\)\) does not exist: mount", 69),
        ("empty", r"data folder \S+ \(data-path \(FEDPAGKD_DATA_DIR .*\)\) is empty: is the share mounted", 69),
        ("no-train", r"has no train/ folder and no manifest.csv: expected \S+/\{train,val,test\}", 78),
        (
            "wrong-modality",
            r"site.json declares modality 'wli' but the node config says modality='nbi' \(FEDPAGKD_MODALITY\)",
            78,
        ),
        ("unset", r"node config data-path \(FEDPAGKD_DATA_DIR in the site env file\) is empty", 78),
    ],
)
def test_a_data_folder_not_mounted_is_refused(
    site_files: dict[str, Path], tmp_path: Path, case: str, message: str, code: int
) -> None:
    from deploy import supernode

    data = site_files["data"]
    node = {}
    if case == "missing":
        node["data-path"] = str(tmp_path / "mnt" / "endoscopy")
    elif case == "empty":
        (tmp_path / "mnt").mkdir()
        node["data-path"] = str(tmp_path / "mnt")
    elif case == "no-train":
        shutil.rmtree(data / "train")
    elif case == "wrong-modality":
        (data / "site.json").write_text('{"modality": "WLI"}')
    else:
        node["data-path"] = ""  # data-path='${FEDPAGKD_DATA_DIR}' with the setting unset
    with pytest.raises(supernode.StartRefused, match=message) as refused:
        supernode.preflight(site_args(site_files, **node))
    assert refused.value.code == code


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--root-certificates", "", r"--root-certificates \(FEDPAGKD_CA_CERT_FILE in the site env file\) is empty"),
        (
            "--root-certificates",
            "/nonexistent/ca.crt",
            r"/nonexistent/ca.crt does not exist \(--root-certificates \(FEDPAGKD_CA_CERT_FILE",
        ),
        (
            "--auth-supernode-private-key",
            "PUB",
            r"is not an OpenSSH private key \(the file named after the site, not <site>.pub\)",
        ),
        ("--root-certificates", "KEY", r"is not a PEM certificate \(ca.crt from the coordinator\)"),
        ("--superlink", "", r"--superlink \(FEDPAGKD_SUPERLINK in the site env file\) is '': expected host:port"),
    ],
)
def test_a_wrong_file_or_address_is_refused(site_files: dict[str, Path], flag: str, value: str, message: str) -> None:
    from deploy import supernode

    value = {"PUB": str(site_files["key"]) + ".pub", "KEY": str(site_files["key"])}.get(value, value)
    args = site_args(site_files)
    args[args.index(flag) + 1] = value
    with pytest.raises(supernode.StartRefused, match=message):
        supernode.preflight(args)


def test_the_container_entrypoint_refuses_an_empty_data_mount(site_files: dict[str, Path], tmp_path: Path) -> None:
    """The image's entrypoint hands the files to fedpagkd-supernode, whose start checks name them."""
    bin_dir, empty = tmp_path / "bin", tmp_path / "empty"
    bin_dir.mkdir()
    empty.mkdir()
    shim = bin_dir / "fedpagkd-supernode"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} {ROOT / "deploy" / "supernode.py"} "$@"\n')
    shim.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "FEDPAGKD_SITE_NAME": "nbi-a",
        "FEDPAGKD_MODALITY": "nbi",
        "FEDPAGKD_SUPERLINK": "127.0.0.1:9",
        "FEDPAGKD_DATA_DIR": str(empty),
        "FEDPAGKD_CA_CERT_FILE": str(site_files["ca"]),
        "FEDPAGKD_AUTH_KEY_FILE": str(site_files["key"]),
        "FEDPAGKD_STATE_DIR": str(tmp_path / "state"),
        "FEDPAGKD_APP_DIGEST": "any",
    }
    out = subprocess.run(
        ["bash", str(ROOT / "deploy" / "docker" / "site-entrypoint.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 69, out.stderr
    assert (
        f"fedpagkd-supernode: ERROR: data folder {empty} (data-path (FEDPAGKD_DATA_DIR in the site env file)) is empty"
        in out.stderr
    )


# ------------------------------------------------------------------------------ registration


def _node(node_id: int, pub: Path | None, name: str = "", status: str = "registered"):
    """A Flower ``NodeInfo`` as the SuperLink's Control API returns it (the key as PEM)."""
    from cryptography.hazmat.primitives import serialization
    from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=no-name-in-module

    pem = (
        b""
        if pub is None
        else serialization.load_ssh_public_key(pub.read_bytes()).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    node = NodeInfo(node_id=node_id, public_key=pem, status=status)
    if name:
        node.name = name
    return node


@pytest.fixture
def site_keys(tmp_path: Path) -> Path:
    from deploy.certs import make_certs

    make_certs.generate(tmp_path, ["nbi-a", "wli-b"], [], force=True, tls=False)
    return tmp_path


def test_register_after_the_plain_flwr_command_records_the_key(site_keys: Path) -> None:
    """Step 4 done twice (the printed ``flwr supernode register``, then the registry script): Flower
    refuses the second registration; the script finds the node by its key and records it."""
    from deploy import registry

    already = {"success": False, "error-message": "Public key already in use."}
    nodes = [_node(7, site_keys / "wli-b.pub", "wli-b"), _node(11, site_keys / "nbi-a.pub", "nbi-a")]
    reg = site_keys / "registry.json"
    entry = registry.register(lambda *a: already, reg, site_keys / "nbi-a.pub", "nbi-a", "c", lambda c: nodes)
    assert entry["node-id"] == "11" and entry["already-registered"] is True
    assert registry.load(reg)["nbi-a"]["fingerprint"] == registry.fingerprint(site_keys / "nbi-a.pub")
    # and again: still one entry, same node
    registry.register(lambda *a: already, reg, site_keys / "nbi-a.pub", "nbi-a", "c", lambda c: nodes)
    assert list(registry.load(reg)) == ["nbi-a"]


def test_register_refuses_a_key_the_superlink_holds_for_another_site(site_keys: Path) -> None:
    from deploy import registry

    already = {"success": False, "error-message": "Public key already in use."}
    reg = site_keys / "registry.json"
    nodes = [_node(11, site_keys / "nbi-a.pub", "hospital-x")]
    with pytest.raises(
        registry.RegistryError, match=r"registered at the SuperLink for site 'hospital-x' \(node 11\), not for 'nbi-a'"
    ):
        registry.register(lambda *a: already, reg, site_keys / "nbi-a.pub", "nbi-a", "c", lambda c: nodes)
    with pytest.raises(registry.RegistryError, match="a node this connection cannot list"):
        registry.register(lambda *a: already, reg, site_keys / "nbi-a.pub", "nbi-a", "c", lambda c: [])
    other = {"success": False, "error-message": "Connection refused"}
    with pytest.raises(registry.RegistryError, match="failed: Connection refused"):
        registry.register(lambda *a: other, reg, site_keys / "nbi-a.pub", "nbi-a", "c", lambda c: nodes)
    assert not reg.exists()


class _State:
    """The part of Flower's LinkState that activation reads."""

    def __init__(self, nodes: list):
        self.nodes = nodes

    def get_node_id_by_public_key(self, public_key: bytes):
        ids = [n.node_id for n in self.nodes if n.public_key == public_key and n.status != "unregistered"]
        return ids[0] if ids else None

    def activate_node(self, node_id: int, heartbeat_interval: float) -> bool:
        return False  # still online: a crashed SuperNode before its heartbeat deadline

    def get_node_info(self, **filters):
        return self.nodes


@pytest.mark.parametrize("case", ["unknown", "online", "unregistered"])
def test_coordinator_names_the_key_it_refuses(site_keys: Path, case: str) -> None:
    """Flower's own activation handler, wrapped as deploy/superlink.py wraps it: the log line has
    the key's fingerprint (as ssh-keygen prints it) and the site name, never the PEM."""
    import types

    from flwr.proto.fleet_pb2 import ActivateNodeRequest  # pylint: disable=no-name-in-module
    from flwr.superlink.servicer.fleet import fleet_handlers
    from flwr.supercore.error import FlowerError

    from deploy import registry, superlink

    pub = site_keys / "nbi-a.pub"
    node = _node(11, pub, "nbi-a", {"unknown": "registered", "online": "online", "unregistered": "unregistered"}[case])
    nodes = [] if case == "unknown" else [node]
    if case == "unregistered":
        node.unregistered_at = "2026-12-01T10:00:00Z"
    module = types.SimpleNamespace(activate_node=fleet_handlers.activate_node)
    superlink.name_refused_keys(module)
    request = ActivateNodeRequest(public_key=_node(0, pub).public_key, heartbeat_interval=30)
    with pytest.raises(FlowerError) as refused:
        module.activate_node(request=request, state=_State(nodes))
    line = refused.value.message
    assert registry.fingerprint(pub) in line and "BEGIN PUBLIC KEY" not in line
    expected = {
        "unknown": "no site is registered with it. If a site should be: confirm the fingerprint",
        "online": "of site 'nbi-a' (node 11, online): SuperNode with node ID 11 could not be activated; a site that crashed",
        "unregistered": "it was site 'nbi-a''s, unregistered at 2026-12-01T10:00:00Z",
    }[case]
    assert expected in line, line
    assert refused.value.code == fleet_handlers.ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED


def test_certs_print_the_one_registration_path(tmp_path: Path, capsys) -> None:
    from deploy.certs import make_certs

    assert make_certs.main(["--out", str(tmp_path), "--sites", "nbi-a", "--connection", "prod"]) == 0
    out = capsys.readouterr().out
    assert (
        f"python deploy/registry.py --connection prod --registry {tmp_path / 'registry.json'} register {tmp_path / 'nbi-a.pub'} --name nbi-a"
        in out
    )
    assert "flwr supernode register" not in out


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
