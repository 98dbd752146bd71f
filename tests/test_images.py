"""The container images, built and run by a real engine (slow): podman, on the air-gapped path of
deploy/README.md ("Air-gapped build"): a Debian 12 base made with debootstrap, every Python
package from a wheelhouse built on the host, ``--build-arg WHEELHOUSE=/wheelhouse``.

Skipped where podman, runc or debootstrap is missing (``apt-get install podman runc debootstrap``).
Facts of the machines this runs on: podman's default runtime crun fails ("cgroups in hybrid mode
not supported"), runc works with lowered ulimits; podman's default OCI format drops SHELL and
HEALTHCHECK, so the images are built with ``--format docker``. The base image and the wheelhouse
are kept between runs (``localhost/fedpagkd-base:bookworm``, ``deploy/docker/wheelhouse/``)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
WHEELHOUSE = ROOT / "deploy" / "docker" / "wheelhouse"
BASE = "localhost/fedpagkd-base:bookworm"
IMAGES = {"site": "localhost/fedpagkd-site:test", "coordinator": "localhost/fedpagkd-coordinator:test"}
PODMAN = ["podman", "--runtime", "/usr/sbin/runc"]
LIMITS = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=8192:8192"]
APP_UID = "10001"


def _missing() -> list[str]:
    return [tool for tool in ("podman", "debootstrap") if shutil.which(tool) is None] + (
        [] if Path("/usr/sbin/runc").exists() else ["runc"]
    )


def podman(*args: str, check: bool = True, timeout: float = 1800) -> subprocess.CompletedProcess:
    out = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args[:3])} ... exit {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        )
    return out


def _base_image(work: Path) -> None:
    if podman("image", "exists", BASE, check=False).returncode == 0:
        return
    rootfs = work / "rootfs"
    subprocess.run(
        ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm", str(rootfs)],
        check=True,
        capture_output=True,
        timeout=1800,
    )
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run([*PODMAN, "import", "-", BASE], stdin=tar.stdout, check=True, capture_output=True, timeout=600)
    tar.wait()


def _wheelhouse() -> None:
    if list(WHEELHOUSE.glob("torch-*.whl")) and list(WHEELHOUSE.glob("hatchling-*.whl")):
        return
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(WHEELHOUSE)]
    subprocess.run([*pip, "--no-deps", "-r", str(ROOT / "constraints-cpu.txt")], check=True, timeout=1800)
    subprocess.run([*pip, "hatchling", "setuptools>=77.0.3"], check=True, timeout=600)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, float]:
    """Both images built from the repository's Dockerfiles; the seconds each build took."""
    missing = _missing()
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install podman runc debootstrap)")
    # Opt-in: a cold build (debootstrap base, wheelhouse, two images) takes ~20 min on a 2-core
    # machine, more than CI's 30-minute budget leaves beside the rest of the suite (25 min).
    if os.environ.get("FEDPAGKD_IMAGE_TESTS") != "1":
        pytest.skip("set FEDPAGKD_IMAGE_TESTS=1 to build and run the images (~8 min cached, ~20 min cold)")
    _base_image(tmp_path_factory.mktemp("base"))
    _wheelhouse()
    seconds = {}
    for name, tag in IMAGES.items():
        start = time.monotonic()
        podman(
            "build",
            "--format",
            "docker",
            *LIMITS,
            "--network=host",
            "-f",
            f"deploy/docker/{name}.Dockerfile",
            "--ignorefile",
            f"deploy/docker/{name}.Dockerfile.dockerignore",
            "--build-arg",
            f"PYTHON_IMAGE={BASE}",
            "--build-arg",
            "WHEELHOUSE=/wheelhouse",
            "-t",
            tag,
            str(ROOT),
        )
        seconds[name] = time.monotonic() - start
    print(f"\nimage builds (s): {seconds}")
    return seconds


@pytest.mark.parametrize("name", list(IMAGES))
def test_image_runs_the_stack_as_the_app_user(images: dict[str, float], name: str) -> None:
    script = (
        'id -u; python -c "import client.app, server.app, torch, timm, flwr.supercore.version as v; print(v.package_version)"'
    )
    out = podman("run", "--rm", *LIMITS, "--entrypoint", "sh", IMAGES[name], "-c", script)
    assert out.stdout.split() == [APP_UID, "1.41.0"], out.stdout
    inspect = podman("image", "inspect", "--format", "{{.Config.User}} {{json .Config.Healthcheck}}", IMAGES[name]).stdout
    assert inspect.startswith(f"{APP_UID}:") and "fedpagkd-healthcheck" in inspect, inspect  # HEALTHCHECK kept
    # the wheels stayed in the build stage
    assert (
        podman("run", "--rm", *LIMITS, "--entrypoint", "sh", IMAGES[name], "-c", "test ! -e /wheelhouse", check=False).returncode
        == 0
    )


def test_site_image_refuses_bad_input_at_start(images: dict[str, float], tmp_path: Path) -> None:
    from deploy.certs import make_certs

    no_settings = podman("run", "--rm", *LIMITS, IMAGES["site"], check=False)
    assert no_settings.returncode == 64 and "FEDPAGKD_SITE_NAME is not set" in no_settings.stderr
    make_certs.generate(tmp_path / "certs", ["nbi-a"], ["localhost"], force=True)
    empty, state = tmp_path / "empty", tmp_path / "state"
    empty.mkdir()
    state.mkdir()
    shutil.chown(state, int(APP_UID))
    tmp_path.chmod(0o755)
    (tmp_path / "certs").chmod(0o755)
    run = [
        "run",
        "--rm",
        *LIMITS,
        *("-e", "FEDPAGKD_SITE_NAME=nbi-a", "-e", "FEDPAGKD_MODALITY=nbi", "-e", "FEDPAGKD_SUPERLINK=127.0.0.1:9"),
        *("-e", "FEDPAGKD_APP_DIGEST=any", "-v", f"{empty}:/data:ro", "-v", f"{state}:/var/lib/fedpagkd-site"),
        *("-v", f"{tmp_path / 'certs' / 'ca.crt'}:/run/secrets/ca.crt:ro"),
        *("-v", f"{tmp_path / 'certs' / 'nbi-a'}:/run/secrets/supernode_auth_key:ro"),
        IMAGES["site"],
    ]
    unreadable = podman(*run, check=False)  # the key as make_certs wrote it: 0600, root's
    assert unreadable.returncode == 78, unreadable.stderr
    assert "(FEDPAGKD_AUTH_KEY_FILE in the site env file)) is not readable by user fedpagkd (uid 10001)" in unreadable.stderr
    shutil.chown(tmp_path / "certs" / "nbi-a", int(APP_UID))  # guide, step 5
    not_mounted = podman(*run, check=False)
    assert not_mounted.returncode == 69, not_mounted.stderr
    assert "data folder /data (data-path (FEDPAGKD_DATA_DIR in the site env file)) is empty" in not_mounted.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_coordinator_image_starts_healthy_and_stops(images: dict[str, float], tmp_path: Path) -> None:
    """TLS, SuperNode auth, the split Control API, the image's own entrypoint and health check."""
    from deploy.certs import make_certs

    certs = tmp_path / "certs"
    make_certs.generate(certs, [], ["localhost", "127.0.0.1", "::1"], force=True)
    tmp_path.chmod(0o755)
    certs.chmod(0o755)
    shutil.chown(certs / "server.key", int(APP_UID))  # guide, step 3
    state = tmp_path / "state"
    state.mkdir()
    shutil.chown(state, int(APP_UID))
    fleet, control, health = _free_port(), _free_port(), _free_port()
    name = f"fedpagkd-coordinator-test-{fleet}"
    podman(
        "run",
        "-d",
        "--name",
        name,
        *LIMITS,
        "--network=host",
        "--read-only",
        "--tmpfs",
        "/tmp",
        *("-e", "FEDPAGKD_SUPERLINK_HOST=127.0.0.1", "-e", f"FEDPAGKD_SUPERLINK_PORT={fleet}"),
        *("-e", f"FEDPAGKD_CONTROL_ADDRESS=127.0.0.1:{control}", "-e", f"FLWR_HEALTH_ADDRESS=127.0.0.1:{health}"),
        *(arg for f in ("ca.crt", "server.pem", "server.key") for arg in ("-v", f"{certs / f}:/run/secrets/{f}:ro")),
        "-v",
        f"{state}:/var/lib/fedpagkd",
        IMAGES["coordinator"],
    )
    try:
        deadline, probe = time.monotonic() + 120, None
        while time.monotonic() < deadline:
            probe = podman(
                "exec",
                name,
                "python",
                "/usr/local/bin/fedpagkd-healthcheck",
                f"127.0.0.1:{health}",
                "--superexec",
                "--cert",
                "/run/secrets/server.pem",
                check=False,
            )
            if probe.returncode == 0:
                break
            time.sleep(3)
        logs = podman("logs", name, check=False)
        assert probe is not None and probe.returncode == 0, f"{probe.stderr}\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}"
        assert probe.stdout.startswith("healthy:")
        assert f"Fleet API on https://127.0.0.1:{fleet}" in logs.stdout + logs.stderr
        start = time.monotonic()
        podman("stop", "--time", "30", name)
        stopped_in = time.monotonic() - start
        print(f"\ncoordinator container stopped in {stopped_in:.1f} s")
        assert stopped_in < 30
    finally:
        podman("rm", "-f", name, check=False)
    assert podman("ps", "-a", "--filter", f"name={name}", "--format", "{{.Names}}").stdout.strip() == ""
