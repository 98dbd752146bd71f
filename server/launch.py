"""Launch a FedPaGKD simulation with ``flwr run`` and report its real outcome.

``flwr run --stream`` exits 0 even when the run failed, and its local SuperLink outlives the
command on a machine-wide port. This launcher gives each call its own ``FLWR_HOME`` and a
free port, submits the run, streams its log (progress per round), reads the final status with
``flwr list``, stops the SuperLink it started by its process group, and raises when the run did
not complete. CLI: ``fedpagkd simulate [--supernodes N] [--experiment E] [--preset P] [key=value ...]``
(= ``python -m server.launch``; E and P are named configurations of the registry, :mod:`common.presets`).
The process lifecycle itself (environment, ports, the ``flwr`` CLI, process groups) is
:mod:`server.processes`, shared with the loopback deployment harness.

Clean stop: every process of a run (the SuperLink ``flwr run`` starts detached, its
SuperExec, ``flwr-simulation``, Ray's daemons and actors) inherits a launch id in its
environment (:data:`LAUNCH_ID_ENV`). SIGINT, SIGTERM or SIGHUP (a closed terminal or SSH
session) to the launcher asks Flower to stop the run (``flwr stop``), then ends every process carrying the id, by PID (TERM, then KILL
after a grace period); the same sweep runs after every run, so nothing of it keeps training.

Degraded is not success: the launcher exits 0 only when the run completed with every
discovered site (or with a share of them >= ``fed.min_site_share``); the final line names the
student's rounds, and a run without student rounds reports no student figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from server.processes import (  # stdlib only; FLOWER_ENV, free_port and toml_value are read from here too
    FLOWER_ENV,  # noqa: F401
    FlowerCLI,
    FlowerProcessError,
    cmdline,
    free_port,
    living_processes,
    process_env,
    processes_holding,
    processes_with_env,
    signal_group,
    stop_group,
    toml_value,  # noqa: F401
)

REPO = Path(__file__).resolve().parent.parent


class SimulationError(FlowerProcessError):
    """The run failed or could not be submitted; the message carries Flower's reason."""


class Stopped(SimulationError):
    """The launcher was stopped by a signal; the run and its processes were stopped too."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


# The signals that stop a launch: SIGHUP too, as a closed terminal or SSH session sends it and
# its default (exit 129 at once) would leave the SuperLink, SuperExec and Ray finishing the run.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# Marks every process of one launch (inherited through the environment), so a stop can end
# exactly those, by PID, however Flower and Ray detach them.
LAUNCH_ID_ENV = "FEDPAGKD_LAUNCH_ID"


@dataclass
class SimulationResult:
    run_id: str
    status: str
    details: str
    run_dir: Path
    wall_s: float
    log: str


def flower_env(flwr_home: Path, port: int, ray_tmp: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment every Flower process of this run needs (and inherits from the SuperLink):
    its own FLWR_HOME, Ray temp folder and local-SuperLink ports (``flwr run`` starts the SuperLink)."""
    return process_env(
        flwr_home,
        {
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_TMPDIR": str(ray_tmp),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        },
        extra,
    )


def _cli(env: Mapping[str, str], cwd: Path) -> FlowerCLI:
    """The ``flwr`` CLI on this launch's local SuperLink (connection ``local``)."""
    return FlowerCLI(env, cwd, "local", error=SimulationError)


def _superlink_pids(port: int) -> list[int]:
    """PIDs of flower-superlink processes serving this port (the one this launcher started), from /proc."""
    serving = re.compile(rf"flower-superlink .*--port {port}( |$)")
    return [pid for pid, _, _ in living_processes() if serving.search(cmdline(pid))]


def launch_processes(launch_id: str, folder: Path | None = None) -> list[int]:
    """PIDs of this user's processes (not this one) whose environment carries ``launch_id``, or
    that hold a file open under the launch's own ``folder`` (its Ray temp folder): Ray's agents
    retitle themselves (``ray::DashboardAgent``) over their environment, so CI found two without
    the launch id, but they keep their logs in the session folder open."""
    pids = set(processes_with_env(f"{LAUNCH_ID_ENV}={launch_id}"))
    if folder is not None:
        pids.update(processes_holding(folder))
    return sorted(pids)


def stop_launch(
    launch_id: str, grace_s: float = 10.0, kill_s: float = 10.0, settle_s: float = 2.0, folder: Path | None = None
) -> list[int]:
    """End every process of a launch (:func:`launch_processes`): SIGTERM, then after ``grace_s``
    SIGKILL what is left, again until none has been seen for ``settle_s`` (for at most ``kill_s``).
    Returns the PIDs it signalled."""
    signalled: set[int] = set()

    def signal_all(sig: signal.Signals) -> list[int]:
        pids = launch_processes(launch_id, folder)
        for pid in pids:
            try:
                os.kill(pid, sig)
                signalled.add(pid)
            except ProcessLookupError:
                pass
        return pids

    signal_all(signal.SIGTERM)
    deadline = time.time() + grace_s
    while time.time() < deadline and launch_processes(launch_id, folder):
        time.sleep(0.2)
    # Repeated, not once: a process forked after the listing it missed (Ray's raylet starts its
    # dashboard agent while shutting down) is only caught by the next one; and one empty listing
    # is not the end (CI left a dashboard agent after one): a process being started can be
    # missed by a listing, so the launch is gone only once none was seen for settle_s.
    deadline = time.time() + kill_s
    quiet_since = time.time()
    while time.time() < deadline:
        if signal_all(signal.SIGKILL):
            quiet_since = time.time()
        elif time.time() - quiet_since >= settle_s:
            break
        time.sleep(0.2)
    return sorted(signalled)


class _StopOnSignal:
    """While active, each of :data:`STOP_SIGNALS` raises :class:`Stopped` in the main thread (so
    the ``finally`` of :func:`simulate` stops the run and its processes)."""

    def __enter__(self) -> "_StopOnSignal":
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._raise)
        return self

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise Stopped(signum, f"stopped by {signal.Signals(signum).name}")

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _say(message: str) -> None:
    """``message`` on stderr, if there still is one: after SIGHUP the terminal may be gone, and
    the write's OSError must not cut the clean-up short or replace the exit code."""
    try:
        print(message, file=sys.stderr, flush=True)
    except OSError:
        pass


def stop_superlink(port: int, grace_s: float = 10.0) -> None:
    """Stop the local SuperLink serving ``port``: ``flwr run`` starts it detached, in a session
    of its own, so its process group is it and whatever it started there (SIGTERM, then SIGKILL)."""
    for pid in _superlink_pids(port):
        try:
            group = os.getpgid(pid)
        except ProcessLookupError:
            continue
        if group == pid and group != os.getpgrp():
            stop_group(group, grace_s)
        else:  # not a group leader (never seen): that process alone
            for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.time() + wait
                while time.time() < deadline and pid in _superlink_pids(port):
                    time.sleep(0.2)


def preflight(
    run_config: Mapping[str, Any], num_supernodes: int, cpus_per_client: int = 1, gpus_per_client: float = 0.0, report=print
) -> dict[str, Any]:
    """Refuse, before Ray starts, a run that cannot work here; the message lists every problem
    and its fix. Checks the run config, the sites (synthetic or ``sites.toml``) against the
    SuperNodes asked for, and the CPUs/GPUs asked for against this machine's. With
    ``data.root`` it also checks every site's folder (:func:`client.sitecheck.check_federation`:
    splits, class names, counts, modality declarations; no decoding) and passes one summary
    table to ``report``. Returns the run-config keys the sites settle: with ``data.class_names``
    empty, the class names they agree on (so every site and the server use that one list)."""
    import common  # noqa: F401  (torchvision shim)
    import torch
    from client.sitecheck import check_federation, format_reports
    from common.config import config_from_flat

    from common.config import ConfigError

    try:
        cfg = config_from_flat(run_config)  # names an unknown key or a bad value
    except ConfigError as err:
        raise SimulationError(f"the run cannot start: {err}") from err
    problems: list[str] = []
    settled: dict[str, Any] = {}
    if cfg.data.root:
        reports, problems = check_federation(cfg.data.root, cfg)
        if not reports:  # no readable sites.toml: nothing else can be checked
            raise SimulationError("the run cannot start:\n  - " + "\n  - ".join(problems))
        report(format_reports(reports, problems))
        problems += [f"site '{r.name}': {p}" for r in reports for p in r.problems]
        names = {r.class_names for r in reports if r.class_names}
        if not cfg.data.class_names and len(names) == 1:
            agreed = next(iter(names))
            settled = {"data.class_names": ",".join(agreed), "data.num_classes": len(agreed)}
        modalities = [r.modality for r in reports]
        where = f"{cfg.data.root}/sites.toml"
    else:
        modalities = ["nbi"] * cfg.data.nbi_sites + ["wli"] * cfg.data.wli_sites
        where = "data.nbi_sites + data.wli_sites"
    if num_supernodes != len(modalities):
        problems.append(
            f"{num_supernodes} SuperNode(s) asked for but {where} gives {len(modalities)} site(s): "
            f"one SuperNode per site (--supernodes {len(modalities)})"
        )
    distil = cfg.needs_nbi_sites
    for modality, minimum, needed in (("nbi", cfg.fed.min_nbi_sites, distil), ("wli", cfg.fed.min_wli_sites, True)):
        have = modalities.count(modality)
        if needed and have < max(1, minimum):
            fix = (
                "add NBI sites, or train a WLI-only student: fed.student_init=scratch pagkd.use_pro=false pagkd.use_den=false"
                if modality == "nbi"
                else "add WLI sites"
            )
            problems.append(f"{have} {modality.upper()} site(s) in {where}, the run needs at least {max(1, minimum)}: {fix}")
    if cfg.privacy.secure_aggregation and distil and modalities.count("nbi") < 2:
        problems.append(
            f"privacy.secure_aggregation needs >= 2 NBI sites ({where} gives {modalities.count('nbi')}): "
            "a lone site's masked sum would be its own statistics; add NBI sites or set it to false"
        )
    cores = os.cpu_count() or 1
    if cpus_per_client < 1 or cpus_per_client > cores:
        problems.append(f"client-resources-num-cpus = {cpus_per_client}, this machine has {cores} CPU core(s): use 1..{cores}")
    gpus = torch.cuda.device_count()
    if gpus_per_client > 0 and gpus == 0:
        problems.append(f"client-resources-num-gpus = {gpus_per_client} but no CUDA GPU is visible: use 0 (train.device=cpu)")
    elif gpus_per_client > max(gpus, 1):
        problems.append(f"client-resources-num-gpus = {gpus_per_client} > the {gpus} GPU(s) here: use a fraction such as 0.25")
    if cfg.train.device.startswith("cuda") and gpus == 0:
        problems.append(f"train.device = '{cfg.train.device}' but no CUDA GPU is visible: use train.device=auto or cpu")
    if problems:
        raise SimulationError("the run cannot start:\n  - " + "\n  - ".join(problems))
    return settled


def simulate(
    run_config: Mapping[str, Any],
    num_supernodes: int,
    cpus_per_client: int = 1,
    gpus_per_client: float = 0.0,
    app_dir: Path = REPO,
    work_dir: Path | None = None,
    timeout_s: float = 3600,
    stream: bool = True,
    extra_env: Mapping[str, str] | None = None,
    check: bool = True,
) -> SimulationResult:
    """Run one simulation to its end; raise :class:`SimulationError` unless it completed.

    With ``check`` (the default) :func:`preflight` refuses a run that cannot work before
    anything starts; ``check=False`` leaves the refusal to the ServerApp (tests of that path).

    ``run_config`` holds dotted overrides (``fed.student_rounds``...); ``fed.run_dir`` is
    made absolute (the ServerApp's cwd is the SuperLink's, not the app's). ``work_dir``
    (default: a temp dir) holds this run's FLWR_HOME, Ray temp files and the SuperLink log.
    """
    settled: dict[str, Any] = {}
    if check:
        settled = preflight(
            run_config, num_supernodes, cpus_per_client, gpus_per_client, report=print if stream else lambda _: None
        )
    work = Path(work_dir or tempfile.mkdtemp(prefix="fedpagkd-"))
    flwr_home = work / "flwr-home"
    ray_tmp = Path(tempfile.mkdtemp(prefix="fpr-"))  # short: Ray's unix socket paths are length-limited
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    overrides = dict(run_config) | settled
    overrides["fed.run_dir"] = str(Path(overrides.get("fed.run_dir", REPO / "runs")).resolve())
    overrides.setdefault("fed.run_name", time.strftime("%Y%m%d-%H%M%S"))
    port = free_port()
    launch_id = uuid.uuid4().hex
    env = flower_env(flwr_home, port, ray_tmp, {**(extra_env or {}), LAUNCH_ID_ENV: launch_id})
    federation = f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}"
    if gpus_per_client > 0:
        federation += f" client-resources-num-gpus={gpus_per_client}"
    started = time.time()
    submitted: dict[str, Any] = {}
    run_dir = Path(overrides["fed.run_dir"]) / overrides["fed.run_name"]
    try:
        with _StopOnSignal():
            result = _submit_and_follow(app_dir, federation, overrides, env, work, started, timeout_s, stream, run_dir, submitted)
    except Stopped as err:
        if submitted.get("run-id") is not None:  # ask Flower first, so the run is recorded as stopped
            try:
                _cli(env, work).call("stop", str(submitted["run-id"]), "local", timeout=30)
            except (SimulationError, subprocess.TimeoutExpired):
                pass
        raise Stopped(
            err.signum, f"{err}: run {submitted.get('run-id', '(not submitted)')} and its processes were stopped"
        ) from None
    finally:
        with _StopOnSignal():  # a second signal must not interrupt the clean-up
            stop_superlink(port)
            left = stop_launch(launch_id, folder=ray_tmp)
            shutil.rmtree(ray_tmp, ignore_errors=True)
            if left:
                _say(f"stopped {len(left)} process(es) the run left behind: PIDs {left}")
    if result.status != "finished:completed":
        raise SimulationError(f"run {result.run_id} ended '{result.status}': {result.details}")
    return result


def _submit_and_follow(
    app_dir: Path,
    federation: str,
    overrides: Mapping[str, Any],
    env: dict[str, str],
    work: Path,
    started: float,
    timeout_s: float,
    stream: bool,
    run_dir: Path,
    submitted: dict[str, Any],
) -> SimulationResult:
    """``flwr run``, stream ``flwr log`` (in its own process group), then poll ``flwr list``
    until the run finished. ``submitted`` receives Flower's answer (the run id) as soon as it
    comes, so a stop can name the run."""
    cli = _cli(env, work)
    for attempt in range(3):
        submitted.clear()
        submitted.update(cli.submit(app_dir, overrides, federation, timeout=120, check=True))
        # `flwr` gives the SuperLink it starts 15 s; a loaded machine can take longer. The
        # process keeps starting, so asking again reaches it (or starts one on this port).
        if submitted.get("success") or "Failed to start local SuperLink" not in str(submitted.get("error-message")):
            break
        time.sleep(5.0 * (attempt + 1))
    if not submitted.get("success"):
        raise SimulationError(f"flwr run refused the run: {submitted}")
    run_id = str(submitted["run-id"])
    log_proc = subprocess.Popen(
        cli.log_command(run_id),
        env=env,
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines = []
    try:
        assert log_proc.stdout is not None
        for line in log_proc.stdout:
            lines.append(line)
            if stream:
                sys.stdout.write(line)
                sys.stdout.flush()
            if time.time() - started > timeout_s:
                break
    finally:
        if log_proc.poll() is None:
            signal_group(log_proc.pid, signal.SIGKILL)
        log_proc.wait()
    status, details = "unknown", ""
    if time.time() - started <= timeout_s:
        row = cli.wait(run_id, deadline=started + timeout_s, poll_s=1.0)
        status, details = row["status"], row.get("status-details", "")
    return SimulationResult(run_id, status, details, run_dir, time.time() - started, "".join(lines))


def main(argv: list[str] | None = None) -> int:
    from common.presets import EXPERIMENTS, RECIPES, compose

    parser = argparse.ArgumentParser(prog="fedpagkd simulate", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="run-config overrides, e.g. fed.student_rounds=5 data.image_size=64")
    parser.add_argument("--experiment", default="default", choices=list(EXPERIMENTS), help="a method (common/presets.py)")
    parser.add_argument("--preset", default="cpu", choices=list(RECIPES), help="a recipe, applied after the experiment")
    parser.add_argument("--supernodes", type=int, default=None, help="default: data.nbi_sites + data.wli_sites (or sites.toml)")
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument("--gpus-per-client", type=float, default=0.0)
    parser.add_argument("--quiet", action="store_true", help="do not stream the run's log")
    args = parser.parse_args(argv)
    import common  # noqa: F401  (torchvision shim)
    from client.site import read_sites_file
    from common.config import ConfigError, config_from_flat
    from common.data import DataError

    try:
        bad = [item for item in args.overrides if "=" not in item]
        if bad:
            raise ConfigError(f"{bad} are not key=value run-config overrides (e.g. fed.student_rounds=5)")
        overrides = compose(args.preset, args.experiment, dict(item.split("=", 1) for item in args.overrides))
        cfg = config_from_flat(overrides)  # fail here, with a clear message, before Ray starts
        supernodes = args.supernodes or (
            len(read_sites_file(cfg.data.root)) if cfg.data.root else cfg.data.nbi_sites + cfg.data.wli_sites
        )
    except (ConfigError, DataError) as err:
        print(f"FAILED: the run cannot start: {err}", file=sys.stderr)
        return 1
    try:
        result = simulate(overrides, supernodes, args.cpus_per_client, args.gpus_per_client, stream=not args.quiet)
    except Stopped as err:
        _say(f"STOPPED: {err}")
        return 128 + err.signum
    except SimulationError as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    print(f"\nrun {result.run_id} {result.status} in {result.wall_s:.0f} s -> {result.run_dir}")
    for line in outcome_lines(metrics):
        print(line)
    return outcome_code(metrics)


DEGRADED_EXIT = 3  # the run ended, but lost more sites than fed.min_site_share allows


def outcome_lines(metrics: Mapping[str, Any]) -> list[str]:
    """The final lines: the selected student's test figure with its rounds (never a teacher's
    figure under the student's name) next to the NBI teacher's of the same run, any model that
    did not learn, the run's status and every lost site with its reasons."""
    lines = []
    final, teacher = metrics.get("final"), metrics.get("final_teacher")
    if final:
        lines.append(
            f"final pooled WLI student after {metrics.get('student_rounds', '?')} student round(s), round "
            f"{final['selected_round']} selected on val: AUC {final['auc']:.4f}  ACC {final['accuracy']:.4f}  "
            f"SENS {final['sensitivity']:.4f}  SPEC {final['specificity']:.4f}  (test split)"
        )
    else:
        lines.append(f"no WLI student figure: {metrics.get('student_rounds', 0)} student round(s) ran (fed.student_rounds)")
    if teacher:
        lines.append(
            f"NBI teacher of this run (on NBI sites, not the student), round {teacher['selected_round']} selected on val: "
            f"AUC {teacher['auc']:.4f}  ACC {teacher['accuracy']:.4f}"
        )
    if metrics.get("knowledge") and "bank_share_of_student_upload" in metrics:  # a run that built a bank
        lines.append(f"knowledge bank = {100 * metrics['bank_share_of_student_upload']:.3f} % of one student upload")
    for model, problems in (metrics.get("not_learned") or {}).items():
        lines.append(f"WARNING: the {model} did not learn: {'; '.join(problems)}")
    if metrics.get("not_learned"):
        lines.append(metrics.get("not_learned_fixes") or "")
    status = metrics.get("status", "completed")
    if status == "degraded":
        verdict = "accepted" if metrics.get("accepted") else "NOT accepted"
        lines.append(
            f"DEGRADED ({verdict}): {100 * metrics['site_share']:.0f} % of the discovered sites took part throughout, "
            f"fed.min_site_share = {100 * metrics['min_site_share']:.0f} %"
        )
        for site in metrics.get("sites_lost", []):
            reasons = "; ".join(f"{phase}: {v}" for phase, v in metrics["site_status"][site].items() if v.startswith("dropped"))
            lines.append(f"  lost '{site}': {reasons}")
    return lines


def outcome_code(metrics: Mapping[str, Any]) -> int:
    """0 for a completed run or an accepted degraded one, :data:`DEGRADED_EXIT` otherwise."""
    return 0 if metrics.get("status", "completed") == "completed" or metrics.get("accepted") else DEGRADED_EXIT


if __name__ == "__main__":
    sys.exit(main())
