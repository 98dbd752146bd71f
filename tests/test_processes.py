"""server.processes: the Flower process lifecycle the launcher and the loopback harness share.

No Flower process is started here: stand-ins (``sleep`` under a chosen name) play the detached
SuperLink and its children, and a fake ``flwr`` script plays the CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from server import launch, processes
from server.processes import FlowerCLI, GroupProcess, process_state, run_config_arg, spawn, stop_group


def _alive(pid: int) -> bool:
    return process_state(pid) not in ("", "Z")


def _wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_run_config_arg_writes_toml_literals():
    assert run_config_arg({"train.lr": 0.5, "fed.student_rounds": 2, "pagkd.use_pro": True, "model.student": "x y"}) == (
        'train.lr=0.5 fed.student_rounds=2 pagkd.use_pro=true model.student="x y"'
    )


def test_process_env_puts_the_interpreter_folder_first_and_extra_last(tmp_path):
    env = processes.process_env(tmp_path, {"OMP_NUM_THREADS": "1"}, {"OMP_NUM_THREADS": "2", "X": "y"})
    assert env["FLWR_HOME"] == str(tmp_path) and env["PATH"].split(os.pathsep)[0] == str(processes.BIN)
    assert env["OMP_NUM_THREADS"] == "2" and env["X"] == "y"
    assert all(env[key] == value for key, value in processes.FLOWER_ENV.items())


def test_a_group_process_stop_ends_children_that_ignore_sigterm(tmp_path):
    proc = spawn(
        "tree", ["bash", "-c", "trap '' TERM; sleep 120 & sleep 120 & wait"], tmp_path / "tree.log", dict(os.environ), tmp_path
    )
    try:
        assert isinstance(proc, GroupProcess)
        assert _wait_for(lambda: len(processes.group_members(proc.pid)) == 3)
        members = processes.group_members(proc.pid)
        proc.stop(grace_s=0.5)
        assert not proc.alive() and not any(_alive(pid) for pid in members)
        assert "$ bash -c" in proc.text()
    finally:
        processes.signal_group(proc.pid, 9)


def test_stop_group_ends_a_detached_group_it_did_not_start(tmp_path):
    leader = subprocess.Popen(["bash", "-c", "trap '' TERM; sleep 120 & wait"], start_new_session=True)
    try:
        assert _wait_for(lambda: len(processes.group_members(leader.pid)) == 2)
        stop_group(leader.pid, grace_s=0.5)
        leader.wait(timeout=10)
        assert processes.group_members(leader.pid) == []
    finally:
        processes.signal_group(leader.pid, 9)


def test_the_launcher_finds_and_stops_its_superlink_by_port_without_pgrep():
    port = processes.free_port()
    # A stand-in for the SuperLink `flwr run` detaches: a session of its own, the name and port on its command line.
    fake = subprocess.Popen(
        ["bash", "-c", f'exec -a "flower-superlink --insecure --port {port}" sleep 120'], start_new_session=True
    )
    other = subprocess.Popen(
        ["bash", "-c", f'exec -a "flower-superlink --insecure --port {port}1" sleep 120'], start_new_session=True
    )
    try:
        assert _wait_for(lambda: launch._superlink_pids(port) == [fake.pid])
        launch.stop_superlink(port, grace_s=2.0)
        fake.wait(timeout=10)
        assert launch._superlink_pids(port) == []
        assert other.poll() is None, "a SuperLink on another port must be left alone"
    finally:
        for proc in (fake, other):
            proc.kill()
            proc.wait()


def test_the_flwr_cli_runs_the_lifecycle_and_raises_the_callers_error(tmp_path):
    calls = tmp_path / "calls.jsonl"
    fake = tmp_path / "flwr"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "if sys.argv[1] == 'run': print(json.dumps({'success': True, 'run-id': 7}))\n"
        "elif sys.argv[1] == 'list': print(json.dumps({'success': True, 'runs': [{'status': 'finished:completed'}]}))\n"
        "elif sys.argv[1] == 'boom': print('it broke', file=sys.stderr); sys.exit(2)\n"
    )
    fake.chmod(0o755)

    class MyError(RuntimeError):
        pass

    cli = FlowerCLI(dict(os.environ), tmp_path, "conn", error=MyError, transcript=tmp_path / "cli.log", executable=str(fake))
    assert cli.submit(tmp_path, {"fed.student_rounds": 1}, "num-supernodes=2")["run-id"] == 7
    assert cli.wait("7", deadline=time.time() + 5)["status"] == "finished:completed"
    assert cli.log_command("7") == [str(fake), "log", "7", "conn"]
    cli.stop("7")
    with pytest.raises(MyError, match="flwr boom failed \\(exit 2\\): it broke"):
        cli.call("boom")
    argv = [json.loads(line) for line in calls.read_text().splitlines()]
    assert argv[0] == [
        "run",
        str(tmp_path),
        "conn",
        "--format",
        "json",
        "--federation-config",
        "num-supernodes=2",
        "--run-config",
        "fed.student_rounds=1",
    ]
    assert argv[1] == ["list", "conn", "--run-id", "7", "--format", "json"] and argv[2] == ["stop", "7", "conn"]
    assert "[exit 2]" in (tmp_path / "cli.log").read_text()


def test_free_port_is_a_bindable_port_below_the_ephemeral_range():
    """Outgoing connections take ports from the kernel's ephemeral range; a listen port picked
    there could be taken by another federation's client before its server binds it."""
    import socket

    from server.processes import LISTEN_PORTS, free_port

    ports = {free_port() for _ in range(20)}
    assert all(port in LISTEN_PORTS for port in ports) and len(ports) > 1
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports.pop()))
