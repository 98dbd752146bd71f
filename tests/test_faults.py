"""Fault suite (issue #15): a run that cannot be fooled, silently degraded or left running.

One section per class of fault, each case a tester's reproduction turned into a check:
hostile replies (counts, histograms, replays), a property over arbitrary replies, state
tampering, concurrent runs, signals, degraded runs, config bounds, image decoding and
spreadsheet manifests. Protocol cases run the real ServerApp protocol against the real
ClientApp handlers in-process (:class:`tests.fakes.InProcessGrid`, hand-made replies through
its fault hooks, as ``tests/test_workflow.py`` does); no Ray, except the one slow launcher
case of the signals section.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Error, Message
from flwr.common.constant import ErrorCode
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from client.site import read_sites_file
from client.wire import MESSAGE_TYPE, from_recorddict, to_recorddict
from common.config import ConfigError, config_from_flat, config_to_flat
from common.data import DataError, FolderSiteDataset, discover_class_names, has_split, load_image
from common.records import CLASS_PROTOTYPES, Payload, PayloadError, empty_statistics, make, weight_shapes
from server import launch, processes, trust
from server.app import run_folder
from server.discovery import declaration_warnings
from server.state import META, RunLock, StateError
from server.workflow import LEDGER, FederationError, Protocol, run_federation
from tests.conftest import tiny_config
from tests.fakes import InProcessGrid, synthetic_node_configs

pytestmark = pytest.mark.usefixtures("single_thread")

NBI0, NBI1, WLI0, WLI1 = 101, 102, 103, 104
REPO = Path(__file__).resolve().parent.parent


def make_grid(cfg, faults=None) -> InProcessGrid:
    return InProcessGrid(synthetic_node_configs(cfg.data.nbi_sites + cfg.data.wli_sites), config_to_flat(cfg), faults)


def tampering(grid: InProcessGrid, kind: str, edit):
    """A fault hook passing everything through but the replies to ``kind`` requests, whose
    genuine payload ``edit(payload)`` changes in place."""

    def fault(node_id: int, message: Message) -> Message | None:
        reply = grid.deliver(node_id, message)
        if message.metadata.message_type != MESSAGE_TYPE[kind]:
            return reply
        payload = from_recorddict(reply.content)
        edit(payload)
        return Message(to_recorddict(payload), reply_to=message)

    return fault


def student_weights_of(grid: InProcessGrid, node_id: int) -> dict[str, np.ndarray]:
    """The student a node uploaded in its last student.update."""
    replies = [from_recorddict(m.content) for m in grid.received if m.has_content() and m.metadata.src_node_id == node_id]
    return [p for p in replies if p.kind == "student.update"][-1].weights["student"]


# ----------------------------------------------------------------------------- hostile replies


@pytest.mark.parametrize("claimed", [10**12, -24, 0])
def test_a_claimed_example_count_outside_the_declared_one_is_dropped(claimed, tmp_path, caplog):
    cfg = tiny_config()
    grid = make_grid(cfg)
    grid.faults[WLI0] = tampering(grid, "student.train", lambda p: p.config.update({"num-examples": claimed}))
    summary = run_federation(grid, cfg, tmp_path / "run")  # no "weights sum to 0" crash
    status = summary["site_status"]["wli-0"]["student"]
    assert status.startswith("dropped") and f"num-examples = {claimed}" in status and "declared 24" in status
    assert summary["student"][-1]["sites"] == ["wli-1"]
    assert summary["status"] == "degraded" and summary["sites_lost"] == ["wli-0"]
    # The global model is the honest site's, not the claimant's.
    hostile = student_weights_of(grid, WLI0)
    name = next(k for k, v in hostile.items() if v.dtype.kind == "f" and v.ndim >= 2)
    final = Protocol(grid, cfg, tmp_path / "run")
    final.resume()
    assert not np.array_equal(final.student[name], hostile[name])


def test_scaled_evaluation_histograms_are_dropped(tmp_path):
    cfg = tiny_config()
    grid = make_grid(cfg)

    def scale(payload: Payload) -> None:
        for key in ("score_positives", "score_negatives", "confusion"):
            payload.arrays[key] = payload.arrays[key] * 10**9
        payload.config["num-examples"] *= 10**9

    grid.faults[WLI0] = tampering(grid, "evaluate", scale)
    summary = run_federation(grid, cfg, tmp_path / "run")
    assert "evaluated the 'val' split" in summary["site_status"]["wli-0"]["evaluate"]
    assert summary["final"]["num_examples"] == cfg.data.test_per_site  # the honest site's images only
    assert list(summary["evaluation"][-1]["sites"]) == ["wli-1"]


def test_a_histogram_with_the_right_total_but_the_wrong_class_counts_is_dropped():
    reply = make("evaluation", _dims(), arrays=_honest_histograms([5, 5, 5]), config={"num-examples": 15, "loss": 0.1})
    request = Payload("evaluate", config={"model": "student", "split": "test"})
    trust.screen_reply(request, reply, {"train": [8, 8, 8], "test": [5, 5, 5]}, "wli-0")  # honest: passes
    shifted = make("evaluation", _dims(), arrays=_honest_histograms([7, 4, 4]), config={"num-examples": 15, "loss": 0.1})
    with pytest.raises(trust.TrustError, match=r"confusion rows sum to \[7, 4, 4\].*wli|wli.*confusion rows"):
        trust.screen_reply(request, shifted, {"train": [8, 8, 8], "test": [5, 5, 5]}, "wli-0")


def test_an_evaluation_not_asked_for_is_dropped():
    request = Payload("student.train", config={"evaluate": ""})
    reply = Payload("student.update", arrays=_honest_histograms([5, 5, 5]), config={"num-examples": 24, "eval-examples": 15})
    with pytest.raises(trust.TrustError, match="not asked for"):
        trust.screen_reply(request, reply, {"train": [8, 8, 8], "test": [5, 5, 5]}, "wli-0")


def test_the_evaluated_split_follows_the_request():
    assert trust.evaluated_split(Payload("evaluate", config={"split": "val"})) == "val"
    assert trust.evaluated_split(Payload("student.train", config={"evaluate": "val"})) == "val"
    assert trust.evaluated_split(Payload("knowledge.seed", config={"evaluate": "test"})) == "test"
    assert trust.evaluated_split(Payload("student.train", config={"evaluate": ""})) is None
    assert trust.evaluated_split(Payload("teacher.train", config={"evaluate": ""})) is None


def test_a_round_1_reply_replayed_in_round_2_is_ignored(tmp_path, caplog):
    cfg = tiny_config(**{"fed.student_rounds": 2})
    grid = make_grid(cfg)
    first: list[Message] = []

    def replay(node_id: int, message: Message) -> Message | None:
        reply = grid.deliver(node_id, message)
        if message.metadata.message_type != MESSAGE_TYPE["student.train"]:
            return reply
        if not first:
            first.append(reply)
            return reply
        return first[0]  # round 2 gets round 1's reply again

    grid.faults[WLI0] = replay
    with caplog.at_level("WARNING", logger="fedpagkd.server"):
        summary = run_federation(grid, cfg, tmp_path / "run")
    assert "answers no request of this round" in caplog.text
    assert summary["site_status"]["wli-0"]["student"].startswith("dropped in student round 2: no reply")
    assert summary["student"][1]["sites"] == ["wli-1"]


def test_two_replies_to_one_request_are_both_refused(tmp_path):
    cfg = tiny_config()

    class TwiceGrid(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = list(super().send_and_receive(messages, timeout=timeout))
            doubled = [
                r for r in replies if r.metadata.src_node_id == WLI0 and r.metadata.message_type == MESSAGE_TYPE["student.train"]
            ]
            return replies + doubled

    grid = TwiceGrid(synthetic_node_configs(4), config_to_flat(cfg))
    summary = run_federation(grid, cfg, tmp_path / "run")
    assert "more than one reply" in summary["site_status"]["wli-0"]["student"]


def test_two_sites_with_one_name_are_both_dropped_at_discovery(tmp_path):
    cfg = tiny_config()
    grid = make_grid(cfg)
    grid.faults[WLI1] = tampering(grid, "discover", lambda p: p.config.update({"site-name": "wli-0"}))
    with pytest.raises(FederationError, match=r"call themselves 'wli-0'.*unique site-name"):
        run_federation(grid, cfg, tmp_path / "run")


def test_duplicate_names_or_folders_in_sites_toml_are_refused(tmp_path):
    for body, match in [
        ('[[site]]\nname="a"\nmodality="nbi"\npath="x"\n[[site]]\nname="a"\nmodality="wli"\npath="y"\n', "reuses the name 'a'"),
        ('[[site]]\nname="a"\nmodality="nbi"\npath="x"\n[[site]]\nname="b"\nmodality="wli"\npath="./x"\n', "same folder"),
    ]:
        (tmp_path / "sites.toml").write_text(body)
        with pytest.raises(DataError, match=match):
            read_sites_file(tmp_path)
        with pytest.raises(launch.SimulationError, match=match):  # the launcher's preflight, before any process
            launch.preflight({"data.root": str(tmp_path)}, 2)


# ----------------------------------------------------------------------------- a property over replies


def _dims():
    from client.app import dims_of

    return dims_of(tiny_config())


def _honest_histograms(counts: list[int]) -> dict[str, np.ndarray]:
    """Histograms of sum(counts) images, counts[c] of class c, every one scored 0 for every class."""
    dims = _dims()
    c = np.asarray(counts, dtype=np.int64)
    positives = np.zeros((dims.C, dims.B), np.int64)
    negatives = np.zeros((dims.C, dims.B), np.int64)
    positives[:, 0], negatives[:, 0] = c, c.sum() - c
    confusion = np.diag(c).astype(np.int64)
    return {"score_positives": positives, "score_negatives": negatives, "confusion": confusion}


class ScriptedGrid(InProcessGrid):
    """A grid whose replies a test writes: ``script(message) -> list[Message]``."""

    def __init__(self, nodes):
        super().__init__({n: {} for n in nodes}, {})
        self.script = lambda message: []

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            out.extend(self.script(message))
        return out


@pytest.fixture(scope="module")
def scripted(single_thread, tmp_path_factory):
    """A Protocol over a scripted grid, with 4-parameter weights (the screens and FedAvg
    only see arrays) and sites as discovery would record them."""
    from server.workflow import SiteInfo

    grid = ScriptedGrid([WLI0, WLI1, 105])
    protocol = Protocol(grid, tiny_config(), tmp_path_factory.mktemp("prop") / "run")
    protocol.student, protocol.head = {"w": np.zeros(4, np.float32)}, {"h": np.zeros(2, np.float32)}
    return grid, protocol, SiteInfo


def _update(dims, weights, count, hist):
    return Payload(
        "student.update",
        arrays={**hist, **empty_statistics(CLASS_PROTOTYPES, dims)},
        config={
            "num-examples": int(count),
            "loss": 0.1,
            "ce": 0.1,
            "den": 0.0,
            "pro": 0.0,
            "eval-examples": int(hist["confusion"].sum()),
            "eval-loss": 0.0,
        },
        weights={"student": {"w": np.asarray(weights, np.float32)}, "head": {"h": np.zeros(2, np.float32)}},
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    declared=st.lists(st.integers(1, 500), min_size=2, max_size=2),
    lie=st.one_of(st.integers(1, 500), st.integers(1, 10**12)),
    claimed=st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-5, 600), st.just(None)),
    hostile=st.lists(st.floats(-1e3, 1e3), min_size=4, max_size=4),
    honest=st.lists(st.floats(-1, 1), min_size=4, max_size=4),
    test_counts=st.lists(st.integers(0, 9), min_size=3, max_size=3),
    hist_scale=st.sampled_from([1, 1, 1, 0, 2, 10**9]),
    replay=st.sampled_from([False, False, True]),
    nonce=st.sampled_from(["echoed", "echoed", "echoed", "missing", "stale", "foreign"]),
    cap=st.sampled_from([0.5, 0.34, 0.8, 1.0]),
)
# The case: a site that declares 10^6 images per class and claims them all.
@example(
    declared=[24, 24],
    lie=3 * 10**6,
    claimed=None,
    hostile=[9.0] * 4,
    honest=[0.0] * 4,
    test_counts=[1, 1, 1],
    hist_scale=1,
    replay=False,
    nonce="echoed",
    cap=0.5,
)
def test_no_reply_moves_the_aggregate_further_than_an_honest_site_could(
    scripted, declared, lie, claimed, hostile, honest, test_counts, hist_scale, replay, nonce, cap
):
    """Sites 103/104 honest (one model between them), 105 hostile: it declares any size at
    discovery (``lie``, up to 1e12 images), claims any count (None: the size it declared),
    scales its histograms or not, answers an older round's message or echoes another nonce.
    Whatever it sends, its share of FedAvg is at most what its declared count gives an honest
    site and at most fed.max_site_share (or 1/sites), and the pooled evaluation counts only
    declared images."""
    grid, protocol, SiteInfo = scripted
    dims = protocol.dims
    nodes = [WLI0, WLI1, 105]
    sizes = [*declared, lie]
    protocol.cfg.fed.max_site_share = cap
    # The evaluation riding on student.train scores the val split (model selection).
    protocol.sites = {
        n: SiteInfo(n, f"s{n}", "wli", [d, 0, 0], [5, 5, 5], "v", val_counts=test_counts) for n, d in zip(nodes, sizes)
    }
    protocol.channel.names = {n: f"s{n}" for n in nodes}
    protocol.metrics["evaluation"] = []
    request = make(
        "student.train",
        dims,
        arrays={**protocol.bank, **protocol.class_prototypes},
        weights={"student": protocol.student, "head": protocol.head},
        config={
            "round": 2,
            "seed": 1,
            "local-epochs": 1,
            "group-losses": False,
            "use-bank": False,
            "evaluate": "val",
            "schedule-start": 0.5,
            "schedule-end": 1.0,
        },
    )
    honest_hist = _honest_histograms(test_counts)
    stale = Message(to_recorddict(request), dst_node_id=105, message_type=MESSAGE_TYPE["student.train"])
    stale.metadata.__dict__["_message_id"] = "an-earlier-round"
    claim = lie if claimed is None else int(np.clip(claimed, -(2**62), 2**62))
    earlier = next(iter(protocol.channel.issued), None)  # a nonce of an earlier exchange (None in the first)
    nonce = "foreign" if nonce == "stale" and earlier is None else nonce

    def script(message):
        node = message.metadata.dst_node_id
        sent = from_recorddict(message.content).nonce
        if node == 105:
            hist = {k: v * hist_scale for k, v in honest_hist.items()}
            reply = _update(dims, hostile, claim, hist)
            reply.nonce = {"echoed": sent, "missing": "", "stale": earlier, "foreign": uuid.uuid4().hex}[nonce]
            return [Message(to_recorddict(reply), reply_to=stale if replay else message)]
        reply = _update(dims, honest, sizes[nodes.index(node)], honest_hist)
        reply.nonce = sent
        return [Message(to_recorddict(reply), reply_to=message)]

    grid.script = script
    replies, dropped = protocol._exchange(
        "student",
        "student round 2",
        {n: request for n in nodes},
        {"student": weight_shapes(protocol.student), "head": weight_shapes(protocol.head)},
    )
    accepted = 105 in replies
    honest_evaluation = hist_scale == 1 or sum(test_counts) == 0
    assert accepted == (not replay and nonce == "echoed" and 0 < claim <= lie and honest_evaluation)
    if not replay and nonce != "echoed":
        assert "nonce" in dropped[105] or "never sent" in dropped[105] or "not this request" in dropped[105]
    protocol._record_evaluation("student", 1, replies, "eval-examples", "val")
    if protocol.metrics["evaluation"]:
        assert protocol.metrics["evaluation"][-1]["pooled"]["num_examples"] == sum(test_counts) * len(replies)
    blocks = {"student": {"w": np.zeros(4, np.float32)}, "head": {"h": np.zeros(2, np.float32)}}
    _, blocks = protocol._fedavg("student", "wli", replies, blocks)
    moved = np.linalg.norm(blocks["student"]["w"].astype(np.float64) - np.asarray(honest))
    share = 0.0
    if accepted:
        share = max(cap, 1 / 3)
        if max(declared) / (sum(declared) + claim) <= share:  # no honest site capped: none hands the hostile its excess
            share = min(share, lie / sum(sizes))
    assert moved <= share * np.linalg.norm(np.asarray(hostile) - np.asarray(honest)) * (1 + 1e-5) + 1e-4
    # Discovery names a site whose declared size is over the cap, whatever the size.
    warned = any("'s105' declares" in line for line in declaration_warnings(protocol.sites, cap))
    assert warned == (lie / sum(sizes) > cap)


# ----------------------------------------------------------------------------- state tampering


@pytest.fixture()
def finished_run(tmp_path):
    cfg = tiny_config()
    run_dir = tmp_path / "run"
    run_federation(make_grid(cfg), cfg, run_dir)
    return cfg, run_dir


def _records(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}


@pytest.mark.parametrize("missing", [META, LEDGER])
def test_a_run_folder_missing_a_record_is_refused_not_restarted(finished_run, missing):
    cfg, run_dir = finished_run
    (run_dir / missing).unlink()
    before = _records(run_dir)
    grid = make_grid(cfg)
    with pytest.raises(StateError, match="another fed.run_name"):
        run_federation(grid, cfg, run_dir)
    assert not grid.sent, "nothing may be asked of the sites"
    assert _records(run_dir) == before, "metrics, ledger and checkpoint must stay as they were"


@pytest.mark.parametrize("edit", ["progress", "auc", "releases"])
def test_an_edited_state_is_refused(finished_run, edit):
    cfg, run_dir = finished_run
    meta = json.loads((run_dir / META).read_text())
    if edit == "progress":
        meta["progress"]["student_rounds"] = 0
    elif edit == "auc":
        meta["metrics"]["evaluation"][-1]["pooled"]["auc"] = 0.99
    else:
        meta["releases"] = {site: 0 for site in meta["releases"]}
    (run_dir / META).write_text(json.dumps(meta))
    with pytest.raises(StateError, match="edited"):
        run_federation(make_grid(cfg), cfg, run_dir)


def test_an_edited_or_older_ledger_is_refused(finished_run):
    cfg, run_dir = finished_run
    ledger = json.loads((run_dir / LEDGER).read_text())
    ledger["releases"] = {site: 1 for site in ledger["releases"]}
    (run_dir / LEDGER).write_text(json.dumps(ledger))
    with pytest.raises(StateError, match="edited"):
        run_federation(make_grid(cfg), cfg, run_dir)


def test_a_ledger_replaced_by_an_older_copy_is_refused(tmp_path):
    cfg = tiny_config(**{"fed.student_rounds": 2})
    run_dir = tmp_path / "run"
    grid = make_grid(cfg)
    copies: list[bytes] = []

    def snapshot(node_id: int, message: Message) -> Message | None:
        if message.metadata.message_type == MESSAGE_TYPE["student.train"] and not copies:
            copies.append((run_dir / LEDGER).read_bytes())  # the ledger as it was before the student rounds
        return grid.deliver(node_id, message)

    grid.faults[WLI0] = snapshot
    run_federation(grid, cfg, run_dir)
    (run_dir / LEDGER).write_bytes(copies[0])
    with pytest.raises(StateError, match="older than the run's state"):
        run_federation(make_grid(cfg), cfg, run_dir)


# ----------------------------------------------------------------------------- concurrent runs


def test_re_running_a_finished_run_adds_to_its_wall_time(finished_run):
    """Re-running a finished run overwrote its wall time with the re-run's few seconds."""
    cfg, run_dir = finished_run
    first = json.loads((run_dir / "metrics.json").read_text())["wall_time_s"]
    assert json.loads((run_dir / META).read_text())["metrics"]["wall_time_s"] == pytest.approx(first)
    started = time.time()
    run_federation(make_grid(cfg), cfg, run_dir)
    again = json.loads((run_dir / "metrics.json").read_text())["wall_time_s"]
    assert first < again <= first + time.time() - started + 0.01


class _Interrupted(RuntimeError):
    pass


def test_the_wall_time_of_an_interrupted_run_is_kept_when_it_resumes(tmp_path):
    """A resumed run reported only the time since its last start."""
    cfg = tiny_config(**{"fed.student_rounds": 2})
    grid, sent = make_grid(cfg), []

    def slow_then_crash(node_id: int, message: Message) -> Message | None:
        if message.metadata.message_type == MESSAGE_TYPE["student.train"]:
            sent.append(node_id)
            if len(sent) == 1:
                time.sleep(3.0)  # round 1 takes >= 3 s, and is saved
            if len(sent) == 3:
                raise _Interrupted("the server stopped in student round 2")
        return grid.deliver(node_id, message)

    grid.faults[WLI0] = grid.faults[WLI1] = slow_then_crash
    with pytest.raises(_Interrupted):
        run_federation(grid, cfg, tmp_path / "run")
    kept = json.loads((tmp_path / "run" / META).read_text())["metrics"]["wall_time_s"]
    assert kept >= 3.0
    started = time.time()
    run_federation(make_grid(cfg), cfg, tmp_path / "run")
    resumed_s = time.time() - started
    total = json.loads((tmp_path / "run" / "metrics.json").read_text())["wall_time_s"]
    assert kept < total <= kept + resumed_s + 0.01


def test_a_second_run_on_a_locked_run_folder_is_refused(tmp_path):
    cfg = tiny_config()
    run_dir = tmp_path / "run"
    grid = make_grid(cfg)
    with RunLock(run_dir):
        with pytest.raises(StateError, match="in use by another run"):
            run_federation(grid, cfg, run_dir)
    assert not grid.sent


def test_a_run_folder_locked_by_another_process_is_refused_until_it_ends(tmp_path):
    cfg = tiny_config()
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; sys.path.insert(0, sys.argv[1]);"
            "from pathlib import Path; from server.state import RunLock;"
            "lock = RunLock(Path(sys.argv[2])).__enter__(); print('held', flush=True); time.sleep(60)",
            str(REPO),
            str(run_dir),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StateError, match=rf"pid {holder.pid}"):
            run_federation(make_grid(cfg), cfg, run_dir)
    finally:
        holder.kill()
        holder.wait()
    run_federation(make_grid(cfg), cfg, run_dir)  # the kernel released the lock with the process
    assert (run_dir / "metrics.json").is_file()


# ----------------------------------------------------------------------------- signals


def _described(pid: int) -> str:
    """A leftover process: its command, state, parent and whether it carries a launch id (what
    :func:`server.launch.stop_launch` finds it by)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return "(gone)"
    launch_ids = [e.decode(errors="replace") for e in environ if e.startswith(launch.LAUNCH_ID_ENV.encode())]
    return f"{processes.cmdline(pid).strip()[:60]} state {stat[0]} ppid {stat[1]} sid {stat[4]} {launch_ids}"


def _marked(marker: str) -> list[int]:
    needle = f"FEDPAGKD_TEST_MARK={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_stop_launch_ends_every_process_of_the_launch_and_nothing_else():
    launch_id, marker = uuid.uuid4().hex, uuid.uuid4().hex
    env = {**os.environ, launch.LAUNCH_ID_ENV: launch_id, "FEDPAGKD_TEST_MARK": marker}
    # A detached tree, as flwr starts its SuperLink: its own session, a child ignoring SIGTERM.
    tree = subprocess.Popen(["bash", "-c", "trap '' TERM; sleep 120 & sleep 120 & wait"], env=env, start_new_session=True)
    bystander = subprocess.Popen(["sleep", "120"], env={**os.environ, launch.LAUNCH_ID_ENV: "another-launch"})
    try:
        deadline = time.time() + 10
        while len(_marked(marker)) < 3 and time.time() < deadline:
            time.sleep(0.1)
        assert len(_marked(marker)) == 3
        stopped = launch.stop_launch(launch_id, grace_s=1.0)
        assert set(stopped) >= {tree.pid}
        tree.wait(timeout=10)
        assert not launch.launch_processes(launch_id) and not _marked(marker)
        assert bystander.poll() is None, "a process of another launch must be left alone"
    finally:
        bystander.kill()
        bystander.wait()
        for pid in _marked(marker):
            os.kill(pid, signal.SIGKILL)


def test_stop_launch_also_ends_processes_forked_while_it_stops():
    """A launch process that keeps forking (as Ray's raylet starts its dashboard agent while it
    shuts down) leaves children the listing before each kill missed; none survives the stop."""
    launch_id, marker = uuid.uuid4().hex, uuid.uuid4().hex
    env = {**os.environ, launch.LAUNCH_ID_ENV: launch_id, "FEDPAGKD_TEST_MARK": marker}
    forker = subprocess.Popen(
        ["bash", "-c", "trap '' TERM; while :; do sleep 120 & sleep 0.005; done"], env=env, start_new_session=True
    )
    try:
        deadline = time.time() + 10
        while len(_marked(marker)) < 20 and time.time() < deadline:
            time.sleep(0.1)
        launch.stop_launch(launch_id, grace_s=0.5)
        forker.wait(timeout=10)
        left = {pid: _described(pid) for pid in _marked(marker)}
        assert not left, f"left running: {left}"
    finally:
        if forker.poll() is None:
            forker.kill()
        for pid in _marked(marker):
            os.kill(pid, signal.SIGKILL)


def test_stop_launch_ends_a_process_that_holds_a_file_in_the_launch_folder(tmp_path):
    """A process whose environment lost the launch id (Ray's agents retitle themselves over it)
    but that keeps a file open in the launch's Ray folder is the launch's; one holding a file
    elsewhere is not."""
    launch_id = uuid.uuid4().hex
    (tmp_path / "ray" / "session").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    holding = "import sys, time; log = open(sys.argv[1], 'w'); time.sleep(120)"
    agent, bystander = (
        subprocess.Popen([sys.executable, "-c", holding, str(tmp_path / folder / "agent.log")], start_new_session=True)
        for folder in ("ray/session", "elsewhere")
    )
    try:
        deadline = time.time() + 20
        while not (tmp_path / "elsewhere" / "agent.log").exists() or not (tmp_path / "ray/session/agent.log").exists():
            assert time.time() < deadline
            time.sleep(0.1)
        time.sleep(0.5)
        assert launch.launch_processes(launch_id) == [] and launch.launch_processes(launch_id, tmp_path / "ray") == [agent.pid]
        assert launch.stop_launch(launch_id, grace_s=1.0, folder=tmp_path / "ray") == [agent.pid]
        assert agent.wait(timeout=10) == -signal.SIGTERM
        assert bystander.poll() is None, "a process holding files elsewhere must be left alone"
    finally:
        for proc in (agent, bystander):
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_to_the_launcher_becomes_a_stop(signum):
    with pytest.raises(launch.Stopped) as info:
        with launch._StopOnSignal():
            os.kill(os.getpid(), signum)
            time.sleep(5)
    assert info.value.signum == signum


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_stop_signal_to_server_launch_stops_the_run_and_every_process_it_started(tmp_path, signum):
    """The real launcher on Ray: SIGTERM, or SIGHUP (a closed terminal or SSH session), once the
    run is training; every process carrying the test's mark (the launcher's environment,
    inherited by flwr, the SuperLink, SuperExec, flwr-simulation and Ray) is gone afterwards, no
    metrics.json calls the run completed, and the exit code says it was stopped."""
    marker = uuid.uuid4().hex
    env = {**os.environ, "FEDPAGKD_TEST_MARK": marker, "OMP_NUM_THREADS": "1"}
    overrides = [
        f"{k}={v}"
        for k, v in {
            **TINY_RUN,
            "fed.run_dir": str(tmp_path / "runs"),
            "fed.run_name": "stopped",
            "fed.student_rounds": 50,
        }.items()
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.launch", *overrides],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen = []
    try:
        deadline = time.time() + 240
        for line in proc.stdout:
            seen.append(line)
            if "[student 1/" in line or time.time() > deadline:
                break
        assert any("[student 1/" in line for line in seen), "".join(seen[-30:])
        proc.send_signal(signum)
        rest, _ = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signum, rest[-3000:]
        assert "STOPPED" in rest
        deadline = time.time() + 20
        while _marked(marker) and time.time() < deadline:
            time.sleep(0.5)
        left = {pid: _described(pid) for pid in _marked(marker)}
        assert not left, f"left running: {left}"
        time.sleep(5)  # a run left finishing in the background would write its metrics by now
        metrics = tmp_path / "runs" / "stopped" / "metrics.json"
        assert not metrics.exists() or json.loads(metrics.read_text()).get("status") != "completed"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in _marked(marker):
            os.kill(pid, signal.SIGKILL)


TINY_RUN = {
    "data.image_size": 32,
    "data.train_per_site": 24,
    "data.test_per_site": 15,
    "data.val_per_site": 0,
    "train.batch_size": 12,
    "train.local_epochs": 1,
    "train.device": "cpu",
    "pagkd.group_size": 4,
    "pagkd.min_group_size": 2,
    "model.student": "test_resnet",
    "model.teacher": "test_resnet",
    "model.embed_dim": 32,
    "model.num_heads": 4,
    "model.num_queries": 4,
    "pagkd.codebook_size": 4,
    "fed.teacher_rounds": 1,
    "fed.num_bins": 20,
}


# ----------------------------------------------------------------------------- degraded runs


def _failing(grid: InProcessGrid, kind: str):
    def fault(node_id: int, message: Message) -> Message | None:
        if message.metadata.message_type == MESSAGE_TYPE[kind]:
            return Message(
                to_recorddict(Payload("error", config={"site-name": "wli-0", "reason": "cannot read /data/x.png"})),
                reply_to=message,
            )
        return grid.deliver(node_id, message)

    return fault


def _crashing(grid: InProcessGrid, kind: str, times: int, code: int = ErrorCode.CLIENT_APP_CRASHED):
    """The first ``times`` ``kind`` requests get the error reply a SuperNode stores for a
    ClientApp that stopped responding (or another Flower error ``code``); the rest pass."""
    crashes = []

    def fault(node_id: int, message: Message) -> Message | None:
        if message.metadata.message_type == MESSAGE_TYPE[kind] and len(crashes) < times:
            crashes.append(message.metadata.message_id)
            return Message(Error(code, "ClientApp stopped responding."), reply_to=message)
        return grid.deliver(node_id, message)

    return fault


@pytest.mark.parametrize("resends, crashes, kept", [(1, 1, True), (2, 2, True), (1, 2, False), (0, 1, False)])
def test_a_site_whose_clientapp_crashed_is_asked_again(tmp_path, caplog, resends, crashes, kept):
    cfg = tiny_config(**{"fed.resend_crashed": resends})
    grid = make_grid(cfg)
    grid.faults[WLI0] = _crashing(grid, "student.train", crashes)
    with caplog.at_level("WARNING", logger="fedpagkd.server"):
        summary = run_federation(grid, cfg, tmp_path / "run")
    asked = [m for m in grid.sent if m.metadata.dst_node_id == WLI0 and m.metadata.message_type == MESSAGE_TYPE["student.train"]]
    assert len(asked) == 1 + min(crashes, resends)
    assert len({m.metadata.message_id for m in asked}) == len(asked)  # a new message each time
    assert caplog.text.count("asking again") == min(crashes, resends)
    status = summary["site_status"]["wli-0"]["student"]
    if kept:
        assert status == "took part" and summary["student"][0]["sites"] == ["wli-0", "wli-1"]
        assert "dropped site 'wli-0'" not in caplog.text
    else:
        assert status == "dropped in student round 1: ClientApp error: ClientApp stopped responding."
    student = json.loads((tmp_path / "run" / "ledger.json").read_text())["bytes"]["student"]
    assert student["messages"] == (2 + min(crashes, resends)) + (2 if kept else 1)  # every request, the payloads back


def test_a_clientapp_exception_is_not_asked_again(tmp_path):
    cfg = tiny_config()
    grid = make_grid(cfg)
    grid.faults[WLI0] = _crashing(grid, "student.train", 1, code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
    summary = run_federation(grid, cfg, tmp_path / "run")
    asked = [m for m in grid.sent if m.metadata.dst_node_id == WLI0 and m.metadata.message_type == MESSAGE_TYPE["student.train"]]
    assert len(asked) == 1 and summary["site_status"]["wli-0"]["student"].startswith("dropped in student round 1")


def test_a_statistics_request_asked_again_counts_as_another_release(tmp_path):
    cfg = tiny_config()
    plain = run_federation(make_grid(cfg), cfg, tmp_path / "plain")
    grid = make_grid(cfg)
    grid.faults[NBI0] = _crashing(grid, "knowledge.stats", 1)
    crashed = run_federation(grid, cfg, tmp_path / "crashed")
    releases = {name: json.loads((tmp_path / name / "ledger.json").read_text())["releases"] for name in ("plain", "crashed")}
    assert releases["crashed"] == {**releases["plain"], "nbi-0": releases["plain"]["nbi-0"] + 1}
    assert crashed["final"] == plain["final"]  # the same request, the same reply: the same run


@pytest.mark.parametrize("share, accepted", [(1.0, False), (0.5, True)])
def test_a_lost_site_makes_the_run_degraded_and_the_launcher_says_so(tmp_path, share, accepted):
    cfg = tiny_config(**{"fed.min_site_share": share})
    grid = make_grid(cfg)
    grid.faults[WLI0] = _failing(grid, "student.train")
    summary = run_federation(grid, cfg, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "degraded" and metrics["accepted"] is accepted
    assert set(metrics["site_status"]) == {"nbi-0", "nbi-1", "wli-0", "wli-1"}  # every discovered site
    assert metrics["site_status"]["wli-0"]["student"] == "dropped in student round 1: cannot read /data/x.png"
    assert metrics["site_status"]["wli-1"] == {"discover": "took part", "student": "took part", "evaluate": "took part"}
    assert metrics["site_status"]["nbi-0"]["teacher"] == "took part"
    assert launch.outcome_code(metrics) == (0 if accepted else launch.DEGRADED_EXIT)
    lines = "\n".join(launch.outcome_lines(metrics))
    assert "DEGRADED" in lines and "lost 'wli-0'" in lines and "cannot read /data/x.png" in lines
    assert summary["site_share"] == 0.75


def test_a_complete_run_is_completed_and_exits_0(finished_run):
    metrics = json.loads((finished_run[1] / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["sites_lost"] == [] and launch.outcome_code(metrics) == 0
    assert all(v == "took part" for phases in metrics["site_status"].values() for v in phases.values())
    assert "after 1 student round(s)" in launch.outcome_lines(metrics)[0]


def test_no_student_rounds_reports_no_student_figure(tmp_path):
    cfg = tiny_config(**{"fed.student_rounds": 0})
    summary = run_federation(make_grid(cfg), cfg, tmp_path / "run")
    assert summary["final"] is None and summary["final_teacher"] is not None
    lines = launch.outcome_lines(summary)
    assert lines[0].startswith("no WLI student figure: 0 student round(s)")
    assert not any("student after" in line for line in lines)


def test_a_bank_with_no_group_is_an_error(tmp_path):
    cfg = tiny_config(**{"data.train_per_site": 6, "pagkd.min_group_size": 4})  # 2 images per class: no group forms
    with pytest.raises(FederationError, match="the bank holds no group"):
        run_federation(make_grid(cfg), cfg, tmp_path / "run")


def test_a_group_size_above_a_class_share_of_a_batch_is_refused():
    with pytest.raises(ConfigError, match="'pagkd.min_group_size'.*train.batch_size // data.num_classes"):
        tiny_config(**{"train.batch_size": 12, "pagkd.group_size": 6, "pagkd.min_group_size": 5})


# ----------------------------------------------------------------------------- bounds


@pytest.mark.parametrize(
    "key, value",
    [
        ("fed.run_name", "../../x"),
        ("fed.run_name", "/tmp/abs"),
        ("fed.run_name", "a/b"),
        ("fed.run_name", ".hidden"),
        ("fed.num_bins", 10**9),
        ("pagkd.codebook_size", 10**7),
        ("pagkd.kmeans_iters", 10**6),
        ("data.num_workers", -1),
        ("data.image_size", 10**6),
        ("model.num_queries", 10**6),
        ("fed.student_rounds", 10**9),
        ("train.batch_size", 10**7),
        ("fed.round_timeout", 1e12),
        ("fed.min_site_share", 1.5),
        ("pagkd.subtypes", 10**5),
    ],
)
def test_every_config_value_is_bounded_and_named(key, value):
    with pytest.raises(ConfigError, match=rf"'{key}'"):
        config_from_flat({key: value})


def test_the_run_folder_never_leaves_run_dir(tmp_path):
    assert run_folder(str(tmp_path), "ok-name_1.2") == (tmp_path / "ok-name_1.2").resolve()
    for name in ("../x", "/abs", "a/../../b"):
        with pytest.raises(ValueError, match="outside fed.run_dir"):
            run_folder(str(tmp_path), name)


# ----------------------------------------------------------------------------- values a site acts on, names


def _site_reply(payload: Payload, node_config: dict, cfg=None) -> Payload:
    """One request through the real ClientApp (as Flower calls it), the reply parsed back."""
    from flwr.app import Context, RecordDict

    from client.app import app as client_app

    cfg = cfg or tiny_config()
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=config_to_flat(cfg))
    message = Message(to_recorddict(payload), dst_node_id=7, message_type=MESSAGE_TYPE[payload.kind])
    return from_recorddict(client_app(message, context).content, "site")


SPAN = {"schedule-start": 0.0, "schedule-end": 1.0}


@pytest.mark.parametrize(
    "key, value",
    [("local-epochs", 0), ("local-epochs", -1), ("local-epochs", 10**9), ("round", -1), ("round", 0), ("seed", -5)],
)
def test_a_request_value_outside_its_bounds_is_refused_by_the_site(key, value, task_identity):
    """Local epochs of 0, -1 or 10^9 and a negative round were acted on as asked."""
    config = {"round": 1, "seed": 1, "local-epochs": 1, **SPAN, "evaluate": "", key: value}
    # Weights are checked after the config: none are needed to reach the refusal.
    reply = _site_reply(Payload("teacher.train", config=config, weights={"teacher": {}, "head": {}}), {"partition-id": 0})
    assert reply.kind == "error"
    assert f"config '{key}' = {value} is out of range" in reply.config["reason"]


@pytest.mark.parametrize("raw", [-1, "-1", "abc", "1.5", 4, True, ""])
def test_a_partition_id_that_names_no_site_is_refused(raw, task_identity):
    """-1 silently became the last site (Python indexing); 'abc' was a bare ValueError."""
    reply = _site_reply(make("discover", _dims(), config={"protocol": 5}), {"partition-id": raw})
    assert reply.kind == "error"
    reason = reply.config["reason"]
    assert "DataError" in reason and ("partition-id" in reason or "partition 4 has no site" in reason), reason
    assert "0..3" in reason  # the fix: the partition ids there are


def _numeric_keys() -> list[str]:
    from common.config import Config, _field_types, config_keys

    sections = _field_types(Config)
    return [k for k in config_keys() if _field_types(sections[k.split(".")[0]])[k.split(".")[1]] in (int, float)]


@pytest.mark.parametrize("key", _numeric_keys())
def test_every_numeric_config_key_is_bounded_on_both_sides(key):
    """``pagkd.warmup_epochs=-5`` (and train.seed, train.teacher_epochs) were accepted."""
    for value in (-(10**13), 10**13):
        with pytest.raises(ConfigError, match=rf"'{key}'"):
            config_from_flat({key: value})


def test_a_model_name_timm_does_not_know_is_refused_at_the_config_check():
    for key in ("model.student", "model.teacher"):
        with pytest.raises(ConfigError, match=rf"'{key}' = 'resnet5O'.*timm"):
            config_from_flat({key: "resnet5O", "fed.student_init": "scratch"})
    with pytest.raises(launch.SimulationError, match="model.student"):  # so the launcher's preflight refuses it too
        launch.preflight({"model.student": "resnet5O", "fed.student_init": "scratch"}, 4)
    for name in ("pagkd_cnn_s", "pagkd_cnn_m", "test_resnet", "resnet50.a1_in1k"):  # ours (common/backbones.py) and timm's
        config_from_flat({"model.student": name, "model.teacher": name})


FORGED = "wli-1\n2026-01-01 12:00:00 INFO fedpagkd.server: run completed"


def test_a_site_name_with_a_newline_is_refused_in_sites_toml_and_node_config(tmp_path, task_identity):
    body = f'[[site]]\nname = {json.dumps(FORGED)}\nmodality = "wli"\npath = "x"\n'
    (tmp_path / "sites.toml").write_text(body)
    with pytest.raises(DataError, match=r"\[\[site\]\] number 1: site name .* is not allowed; use 1-63 letters"):
        read_sites_file(tmp_path)
    with pytest.raises(launch.SimulationError, match="is not allowed"):  # preflight
        launch.preflight({"data.root": str(tmp_path)}, 1)
    reply = _site_reply(
        make("discover", _dims(), config={"protocol": 5}), {"site-name": FORGED, "modality": "wli", "data-path": str(tmp_path)}
    )
    assert reply.kind == "error" and "node config site-name" in reply.config["reason"]


def test_a_site_name_with_a_newline_is_dropped_at_discovery_and_forges_no_log_line(tmp_path, caplog):
    cfg = tiny_config()
    grid = make_grid(cfg)
    grid.faults[WLI1] = tampering(grid, "discover", lambda p: p.config.update({"site-name": FORGED}))
    with caplog.at_level("INFO", logger="fedpagkd.server"):
        summary = run_federation(grid, cfg, tmp_path / "run")
    assert not any("\nforged" in r.getMessage() or "\n2026-01-01" in r.getMessage() for r in caplog.records)
    assert "site name 'wli-1\\n2026" in caplog.text  # named, escaped
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    names = set(metrics["site_status"]) | {s for r in metrics["student"] for s in r["sites"]}
    assert not any("\n" in name for name in names) and summary["student"][-1]["sites"] == ["wli-0"]


def test_an_unknown_record_in_a_reply_is_refused_like_an_unknown_array(tmp_path):
    from flwr.app import ConfigRecord

    cfg = tiny_config()
    grid = make_grid(cfg)

    def extra(node_id: int, message: Message) -> Message | None:
        reply = grid.deliver(node_id, message)
        if message.metadata.message_type == MESSAGE_TYPE["student.train"]:
            reply.content["smuggled"] = ConfigRecord({"note": "anything"})
        return reply

    grid.faults[WLI0] = extra
    summary = run_federation(grid, cfg, tmp_path / "run")
    status = summary["site_status"]["wli-0"]["student"]
    assert status.startswith("dropped") and "unexpected record(s) ['smuggled']" in status
    content = to_recorddict(Payload("discover", config={"protocol": 5}))
    content["smuggled"] = ConfigRecord({"note": "anything"})
    with pytest.raises(PayloadError, match="unexpected record"):  # and a site refuses it in a request
        from_recorddict(content, "server")


# ----------------------------------------------------------------------------- files that escape their site


def _folder_site(root: Path) -> Path:
    """An ImageFolder site: train/{x,y} with 2 images each, test/x with 1."""
    for split, cls, count in (("train", "x", 2), ("train", "y", 2), ("test", "x", 1)):
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(np.full((8, 8, 3), 50 * i, np.uint8)).save(root / split / cls / f"{cls}{i}.png")
    return root


@pytest.mark.parametrize("row", ["../other/o.png", "{other}/o.png", "sub/../../other/o.png"])
def test_a_manifest_row_leaving_the_site_folder_is_refused_naming_the_row(tmp_path, row):
    """Rows with an absolute path or '../' into another site's folder were read as this site's."""
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(other / "o.png")
    (tmp_path / "site").mkdir()
    root = _site(tmp_path / "site")
    row = row.format(other=other)
    (root / "manifest.csv").write_text(f"path,label,split\na.png,x,train\n{row},y,train\nc.png,x,test\n")
    with pytest.raises(
        DataError, match=rf"manifest.csv line 3: image path '{re.escape(row)}' resolves to .*outside the site folder"
    ):
        FolderSiteDataset(root, "train", CLASSES)


def test_a_link_out_of_the_site_folder_is_refused_naming_the_file(tmp_path):
    """A link in one site's folder to another site's image trained that image at both."""
    other = _folder_site(tmp_path / "other")
    root = _folder_site(tmp_path / "site")
    (root / "train" / "y" / "borrowed.png").symlink_to(other / "train" / "y" / "y0.png")
    with pytest.raises(DataError, match=r"image .*train/y/borrowed.png resolves to .*other/train/y/y0.png, outside the site"):
        FolderSiteDataset(root, "train", CLASSES)
    (root / "train" / "y" / "borrowed.png").unlink()
    (root / "manifest.csv").write_text("path,label,split\ntrain/x/x0.png,x,train\nlinked.png,y,train\ntest/x/x0.png,x,test\n")
    (root / "linked.png").symlink_to(other / "train" / "y" / "y1.png")
    with pytest.raises(DataError, match=r"line 3: image path 'linked.png' resolves to .*outside the site folder"):
        FolderSiteDataset(root, "train", CLASSES)


def test_files_that_are_not_read_are_counted_and_reported_by_reason(tmp_path, capsys):
    """Dangling links and .tif files were skipped without a word, changing the class counts."""
    from client.sitecheck import check_site, format_reports

    root = _folder_site(tmp_path / "site")
    (root / "train" / "x" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / "y" / "scan.tif")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / "y" / "scan2.TIF")
    train = FolderSiteDataset(root, "train", CLASSES)
    assert train.class_counts().tolist() == [2, 2]
    skipped = {reason: len(files) for reason, files in train.skipped.items()}
    assert skipped == {"dangling link": 1, "unsupported extension .tif (read: .png, .jpg, .jpeg)": 2}
    report = check_site(root, "nbi", tiny_config())
    assert report.skipped == {"dangling link": 1, "unsupported extension .tif (read: .png, .jpg, .jpeg)": 2}
    table = format_reports([report])
    assert "3 file(s) not read, by reason: unsupported extension .tif" in table and "dangling link: 1" in table
    assert any("1 file(s) in" in w and "gone.png" in w for w in report.warnings)


# ----------------------------------------------------------------------------- image decoding

GRAY16 = np.array([[0, 257, 32896, 65535]], np.uint16)  # -> 0, 1, 128, 255


def _modes(tmp_path: Path):
    """(file, expected RGB [1, W, 3]) for each PIL mode a medical export can produce."""
    cases = {}
    cases["i16.png"] = (Image.fromarray(GRAY16), np.repeat(np.array([0, 1, 128, 255])[:, None], 3, 1))
    cases["i32.tif"] = (Image.fromarray(GRAY16.astype(np.int32)), np.repeat(np.array([0, 1, 128, 255])[:, None], 3, 1))
    cases["float.tif"] = (
        Image.fromarray(np.array([[0.0, 0.25, 0.5, 1.0]], np.float32)),
        np.repeat(np.array([0, 64, 128, 255])[:, None], 3, 1),
    )
    rgba = np.array([[[255, 0, 0, 0], [255, 0, 0, 128], [0, 255, 0, 255], [9, 9, 9, 255]]], np.uint8)
    cases["rgba.png"] = (Image.fromarray(rgba), np.array([[0, 0, 0], [128, 0, 0], [0, 255, 0], [9, 9, 9]]))
    la = np.array([[[200, 0], [200, 255], [200, 128], [10, 255]]], np.uint8)
    cases["la.png"] = (Image.fromarray(la), np.array([[0] * 3, [200] * 3, [100] * 3, [10] * 3]))
    palette = Image.new("P", (4, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putdata([0, 1, 0, 1])
    palette.info["transparency"] = 1
    cases["p_transparent.png"] = (palette, np.array([[10, 20, 30], [0, 0, 0], [10, 20, 30], [0, 0, 0]]))
    cmyk = Image.new("CMYK", (4, 1))
    cmyk.putdata([(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255), (0, 255, 255, 0)])
    cases["cmyk.tif"] = (cmyk, np.array([[255, 255, 255], [0, 255, 255], [0, 0, 0], [255, 0, 0]]))
    binary = Image.new("1", (4, 1))
    binary.putdata([0, 255, 0, 255])
    cases["binary.png"] = (binary, np.array([[0] * 3, [255] * 3, [0] * 3, [255] * 3]))
    cases["gray.png"] = (
        Image.fromarray(np.array([[0, 77, 128, 255]], np.uint8)),
        np.repeat(np.array([0, 77, 128, 255])[:, None], 3, 1),
    )
    out = []
    for name, (image, expected) in cases.items():
        image.save(tmp_path / name)
        out.append((tmp_path / name, expected))
    return out


def test_every_pil_mode_decodes_to_its_known_pixel_values(tmp_path):
    for path, expected in _modes(tmp_path):
        with Image.open(path) as raw:
            mode = raw.mode
        got = np.asarray(load_image(path))
        assert got.dtype == np.uint8 and got.shape == (1, 4, 3), path
        np.testing.assert_array_equal(got[0], expected, err_msg=f"{path.name} (mode {mode})")


@pytest.mark.parametrize(
    "name, array, match",
    [
        ("float_range.tif", np.array([[0.0, 3.5]], np.float32), r"values in \[0, 3.5\]"),
        ("negative.tif", np.array([[-5, 10]], np.int32), r"values in \[-5, 10\]"),
    ],
)
def test_an_image_whose_value_range_is_unknown_is_refused_naming_the_file(tmp_path, name, array, match):
    Image.fromarray(array).save(tmp_path / name)
    with pytest.raises(DataError, match=rf"{name}.*{match}"):
        load_image(tmp_path / name)


@pytest.mark.parametrize("orientation, turn", [(1, 0), (3, 2), (6, -1), (8, 1)])
def test_the_exif_orientation_is_applied(tmp_path, orientation, turn):
    """An EXIF orientation tag was ignored: a frame stored sideways was trained sideways."""
    stored = (np.arange(6, dtype=np.uint8).reshape(2, 3) * 40)[..., None].repeat(3, 2)  # [H=2, W=3, 3]
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation: how to turn the stored pixels for display
    for name in ("frame.png", "frame.jpg"):
        Image.fromarray(stored).save(tmp_path / name, exif=exif, **({"quality": 100} if name.endswith("jpg") else {}))
    expected = np.rot90(stored, turn)  # np.rot90 turns counter-clockwise; -1: the 90 degrees clockwise tag 6 asks
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "frame.png")), expected)
    assert np.asarray(load_image(tmp_path / "frame.jpg")).shape == expected.shape


def _png16(path: Path, values: np.ndarray, colour: bool, sbit: int | None) -> Path:
    """A 16-bit PNG written chunk by chunk (PIL writes no 16-bit colour, nor ``sBIT`` as read):
    ``values`` [H, W] (grayscale) or [H, W, 3] (RGB), an ``sBIT`` chunk of ``sbit`` bits per channel."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = values.shape[:2]
    rows = b"".join(b"\0" + values[y].astype(">u2").tobytes() for y in range(height))
    body = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2 if colour else 0, 0, 0, 0))
    if sbit is not None:
        body += chunk(b"sBIT", bytes([sbit] * (3 if colour else 1)))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize(
    "values, sbit",
    [
        (np.array([[0, 1365, 2730, 4095]]), 12),  # raw 12-bit values, as exports write them
        (np.array([[0, 1365, 2730, 4095]]) << 4, 12),  # shifted to the full range, as PNG asks
        (np.array([[0, 21845, 43690, 65535]]), 12),  # scaled (bit replication), as PNG asks
        (np.array([[0, 21845, 43690, 65535]]), None),  # no sBIT: the full 16-bit range
        (np.array([[0, 341, 682, 1023]]), 10),
    ],
)
def test_a_16_bit_png_is_read_by_its_significant_bits(tmp_path, values, sbit):
    """A 16-bit PNG whose sBIT said 12 bits decoded to a 16th of its range without a word."""
    got = np.asarray(load_image(_png16(tmp_path / "gray16.png", values, colour=False, sbit=sbit)))
    np.testing.assert_array_equal(got[0, :, 0], [0, 85, 170, 255])


def test_a_16_bit_colour_png_with_raw_significant_bits_is_refused_with_the_fix(tmp_path):
    raw = np.array([[[0, 1365, 4095], [4095, 0, 7]]])
    with pytest.raises(DataError, match=r"rgb16.png: a 16-bit colour PNG whose sBIT says 12 .*v \* 65535 / 4095"):
        load_image(_png16(tmp_path / "rgb16.png", raw, colour=True, sbit=12))
    scaled = _png16(tmp_path / "rgb16_full.png", raw * 16, colour=True, sbit=12)  # the same image, shifted: read
    np.testing.assert_array_equal(np.asarray(load_image(scaled))[0, 0], [0, 85, 255])
    from client.sitecheck import check_site  # and check-site, which decodes as the loader does, says so

    root = _folder_site(tmp_path / "site")
    _png16(root / "train" / "x" / "rgb16.png", np.repeat(np.repeat(raw, 8, 0), 8, 1), colour=True, sbit=12)
    assert any("sBIT says 12" in p for p in check_site(root, "nbi", tiny_config(), decode=True).problems)


# ----------------------------------------------------------------------------- spreadsheet manifests


def _site(tmp_path: Path) -> Path:
    for i, name in enumerate(["a.png", "b.png", "c.png", "d.png"]):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / name)
    return tmp_path


CLASSES = ("x", "y")


@pytest.mark.parametrize(
    "text",
    [
        "\ufeffpath,label,split\na.png,x,train\nb.png,y,train\nc.png,x,test\n",  # UTF-8 BOM
        "path,label,split\r\na.png,x,train\r\nb.png,y,train\r\nc.png,x,test\r\n",  # CRLF
        "path;label;split\na.png;x;train\nb.png;y;train\nc.png;x;test\n",  # semicolons
        '"path","label","split"\n"a.png","x","train"\n"b.png","y","train"\n"c.png","x","test"\n',  # quoted cells
        "path,label,split,\na.png ,x , train,\nb.png,y,train,\nc.png,x,test,\n,,,\n\n",  # trailing blanks
        "Path\tLabel\tSplit\na.png\tx\tTrain\nb.png\ty\ttrain\nc.png\tx\ttest\n",  # tabs, capitals
        "path, label, split\na.png, x, train\nb.png, y, Train\nc.png, x, test\n",  # spaces after commas
        'path; label; split\na.png; "x"; train\nb.png; y; train\nc.png; x; test\n',  # semicolons, spaces, a quoted cell
    ],
)
def test_a_manifest_from_a_spreadsheet_tool_is_read_as_meant(tmp_path, text):
    """By the loader and by discovery alike (one reader): spaces after commas or ';' made
    discovery report that the sites disagree on the class names, though the loader read them."""
    root = _site(tmp_path)
    (root / "manifest.csv").write_bytes(text.encode())
    train = FolderSiteDataset(root, "train", CLASSES)
    test = FolderSiteDataset(root, "test", CLASSES)
    assert [p.name for p in train.paths] == ["a.png", "b.png"] and train.labels.tolist() == [0, 1]
    assert [p.name for p in test.paths] == ["c.png"] and test.labels.tolist() == [0]
    assert discover_class_names(root) == CLASSES
    assert has_split(root, "train") and has_split(root, "test") and not has_split(root, "val")


def test_a_manifest_with_another_separator_is_refused_naming_the_file_and_the_fix(tmp_path):
    root = _site(tmp_path)
    (root / "manifest.csv").write_text("path|label|split\na.png|x|train\nb.png|y|train\nc.png|x|test\n")
    with pytest.raises(DataError, match=r"manifest.csv line 1: missing column.*separated by ',' \(or ';' or a tab\)"):
        FolderSiteDataset(root, "train", CLASSES)
    assert discover_class_names(root) is None  # discovery names nothing; the loader's refusal above is the message


@pytest.mark.parametrize(
    "rows, match",
    [
        (
            "a.png,x,train\nb.png,y,train\na.png,x,train\nc.png,x,test\n",
            r"line 4: image .*a.png is listed twice in 'train' \(line 2",
        ),
        ("a.png,x,train\nb.png,y,train\nc.png,x,test\n./a.png,x,test\n", r"line 5: .*a.png is listed in both 'train' and 'test'"),
    ],
)
def test_duplicate_or_train_test_overlapping_rows_are_refused(tmp_path, rows, match):
    root = _site(tmp_path)
    (root / "manifest.csv").write_text("path,label,split\n" + rows)
    for split in ("train", "test"):
        with pytest.raises(DataError, match=match):
            FolderSiteDataset(root, split, CLASSES)


def test_a_student_that_did_not_learn_is_named_in_metrics_and_on_the_final_line(tmp_path):
    """Bad input of another kind: a run whose student does not learn says so. Every WLI site's
    update zeroes the classifier (all classes equally likely: AUC 0.5, one class predicted for
    every image), so the selected student is at chance and collapsed; metrics.json and the
    launcher's final lines say it, instead of ending with a quiet number."""
    cfg = tiny_config(**{"fed.student_rounds": 2, "pagkd.use_pro": False, "pagkd.use_den": False})
    grid = make_grid(cfg)

    def zero_classifier(payload: Payload) -> None:
        for name in ("classifier.weight", "classifier.bias"):
            payload.weights["student"][name] = np.zeros_like(payload.weights["student"][name])

    for node_id in (WLI0, WLI0 + 1):
        grid.faults[node_id] = tampering(grid, "student.train", zero_classifier)
    summary = run_federation(grid, cfg, tmp_path / "run")
    problems = summary["not_learned"]["student"]
    assert any("at chance" in p for p in problems) and any("collapsed" in p for p in problems), problems
    assert set(summary["selection"]["student"]["problems"]) <= set(problems)  # and the training CE's, if any
    lines = "\n".join(launch.outcome_lines(summary))
    assert "WARNING: the student did not learn" in lines and "at chance" in lines
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["not_learned"]["student"] == problems


# ----------------------------------------------------------------------------- replies bound to their request


def _replaying(grid: InProcessGrid, recorded: list, kind: str = "student.train", replay_from: int = 0):
    """A fault hook recording the content of every genuine reply to ``kind``, and answering the
    ``replay_from``-th request on (0: every one) with the first recorded content, addressed as
    this request's answer (only the content is old)."""
    asked: list[int] = []

    def fault(node_id: int, message: Message) -> Message | None:
        if message.metadata.message_type != MESSAGE_TYPE[kind]:
            return grid.deliver(node_id, message)
        asked.append(node_id)
        if recorded and len(asked) > replay_from:
            return Message(recorded[0], reply_to=message)
        reply = grid.deliver(node_id, message)
        recorded.append(reply.content)
        return reply

    return fault


def test_a_reply_recorded_in_another_run_is_dropped_with_the_reason(tmp_path, caplog):
    """A reply recorded in one run was accepted as the same site's reply in another run."""
    cfg = tiny_config()
    recorded: list = []
    first = make_grid(cfg)
    first.faults[WLI0] = _replaying(first, recorded)
    run_federation(first, cfg, tmp_path / "a")
    second = make_grid(cfg)
    second.faults[WLI0] = _replaying(second, recorded)  # replays run a's reply from the first request on
    with caplog.at_level("WARNING", logger="fedpagkd.server"):
        summary = run_federation(second, cfg, tmp_path / "b")
    assert "answers a request this run never sent" in summary["site_status"]["wli-0"]["student"]
    assert re.search(r"dropped site 'wli-0': its reply answers a request this run never sent", caplog.text)
    assert summary["student"][-1]["sites"] == ["wli-1"]


def test_a_round_1_reply_replayed_in_round_2_is_dropped_even_without_a_val_split(tmp_path, caplog):
    """Without a val split nothing in a round-1 reply told it from a round-2 one: it was accepted."""
    cfg = tiny_config(**{"fed.student_rounds": 2, "data.val_per_site": 0})
    grid = make_grid(cfg)
    grid.faults[WLI0] = _replaying(grid, [], replay_from=1)
    with caplog.at_level("WARNING", logger="fedpagkd.server"):
        summary = run_federation(grid, cfg, tmp_path / "run")
    status = summary["site_status"]["wli-0"]["student"]
    assert status.startswith("dropped in student round 2") and "'student.train' request of round 1 sent to 'wli-0'" in status
    assert "not this request (a stale or replayed reply)" in caplog.text
    assert [r["sites"] for r in summary["student"]] == [["wli-0", "wli-1"], ["wli-1"]]


def test_a_reply_without_the_nonce_is_dropped_but_a_refusal_without_one_still_counts():
    """A site that could not read the request's nonce still refuses with its own reason."""
    from server.channel import Channel, Ledger

    class Echo(InProcessGrid):
        def __init__(self, answer):
            super().__init__({WLI0: {}}, {})
            self.answer = answer

        def send_and_receive(self, messages, *, timeout=None):
            return [Message(to_recorddict(self.answer), reply_to=m) for m in messages]

    evaluation = Payload("evaluation", arrays=_honest_histograms([1, 1, 1]), config={"num-examples": 3, "loss": 0.1})
    refusal = Payload("error", config={"site-name": "wli-0", "reason": "cannot read /data/x.png"})
    request = make("evaluate", _dims(), config={"model": "student", "split": "test"}, weights={"net": {}})
    for answer, reason in [(evaluation, "echoes no nonce"), (refusal, "cannot read /data/x.png")]:
        channel = Channel(Echo(answer), _dims(), 1.0, Ledger())
        ok, dropped = channel.exchange("evaluate", {WLI0: request})
        assert not ok and reason in dropped[WLI0]


def test_the_site_echoes_the_nonce_of_the_request_it_answers_even_when_it_refuses(task_identity):
    import dataclasses

    from flwr.app import ConfigRecord

    request = dataclasses.replace(make("discover", _dims(), config={"protocol": 6}), nonce="ab12")
    reply = _site_reply(request, {"partition-id": 0, "num-partitions": 4})
    assert reply.kind == "metadata" and reply.nonce == "ab12"
    refused = _site_reply(request, {"partition-id": -1, "num-partitions": 4})
    assert refused.kind == "error" and refused.nonce == "ab12"
    content = to_recorddict(request)
    content["nonce"] = ConfigRecord({"nonce": "ab12", "other": "x"})
    with pytest.raises(PayloadError, match="'nonce' record must hold one string"):
        from_recorddict(content, "server")


# ----------------------------------------------------------------------------- lies at discovery


def test_a_site_that_lies_at_discovery_holds_at_most_its_capped_share_of_fedavg(tmp_path, caplog):
    """Declaring 10^6 training images per class and claiming 3x10^6 examples steered FedAvg to
    within 2e-6 of the liar's upload; capping the claim by the declaration did not stop it."""
    cfg = tiny_config()
    grid = make_grid(cfg)
    lie = 10**6

    def liar(node_id: int, message: Message) -> Message | None:
        reply = grid.deliver(node_id, message)
        payload = from_recorddict(reply.content)
        if payload.kind == "metadata":
            payload.arrays["train_class_counts"] = np.full_like(payload.arrays["train_class_counts"], lie)
        elif payload.kind == "student.update":
            payload.config["num-examples"] = lie * cfg.data.num_classes
        return Message(to_recorddict(payload), reply_to=message)

    grid.faults[WLI0] = liar
    with caplog.at_level("WARNING", logger="fedpagkd.server"):
        summary = run_federation(grid, cfg, tmp_path / "run")
    assert summary["student"][-1]["sites"] == ["wli-0", "wli-1"]  # accepted: it is its own word
    assert re.search(
        r"site 'wli-0' declares 3000000 training image\(s\), 100% of the WLI.*capped at fed.max_site_share = 50%", caplog.text
    )
    hostile, honest = student_weights_of(grid, WLI0), student_weights_of(grid, WLI1)
    final = Protocol(grid, cfg, tmp_path / "run")
    final.resume()
    name = next(k for k, v in hostile.items() if v.dtype.kind == "f" and v.ndim >= 2)
    spread = np.linalg.norm(honest[name] - hostile[name])
    assert np.linalg.norm(final.student[name] - hostile[name]) == pytest.approx(spread / 2, rel=1e-3)


def test_shares_under_the_cap_aggregate_as_without_one_and_the_cap_holds_otherwise():
    from server.aggregation import capped_shares, capped_weights

    assert capped_weights([24, 24], 0.5) == [24.0, 24.0]  # today's runs: exactly the same weights
    assert capped_weights([24, 24, 48], 0.5) == [24.0, 24.0, 48.0]  # at the cap is not over it
    assert capped_shares([3e6, 24, 48], 0.5).tolist() == pytest.approx([0.5, 1 / 6, 2 / 6])
    assert capped_shares([5, 1, 0], 0.1).tolist() == pytest.approx([0.5, 0.5, 0.0])  # never under 1/sites
    assert capped_shares([9, 1, 1, 1], 1.0).tolist() == pytest.approx([0.75, 1 / 12, 1 / 12, 1 / 12])  # 1 = off
    with pytest.raises(ValueError, match="must be >= 0"):
        capped_shares([3, -1], 0.5)


def test_a_site_that_claims_most_of_the_bank_holds_at_most_its_capped_share():
    from common.records import BANK_STATISTICS, mean_of
    from server.aggregation import bank_statistics, robust_statistics

    dims = _dims()
    sites = []
    for value, images in ((1.0, 20), (-1.0, 20), (9.0, 10**6)):  # two honest sites, one that claims 10^6 images
        stats = empty_statistics(BANK_STATISTICS, dims)
        stats["foreground_sum"][0, 0] = value * images
        stats["foreground_count"][0, 0] = images
        stats["image_count"][0] = images
        sites.append(stats)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(robust_statistics(sites[:2], "mean", 0.2, 0.0, 0.5).values(), bank_statistics(sites[:2]).values())
    )
    capped = robust_statistics(sites, "mean", 0.2, 0.0, 0.5)
    assert mean_of(capped["foreground_sum"], capped["foreground_count"])[0, 0] == pytest.approx(np.full(dims.D, 4.5))
    assert capped["foreground_count"][0, 0] == 10**6 + 40  # counts stay the exact sums
    uncapped = robust_statistics(sites, "mean", 0.2, 0.0, 1.0)
    assert mean_of(uncapped["foreground_sum"], uncapped["foreground_count"])[0, 0] == pytest.approx(
        np.full(dims.D, 9.0), abs=1e-3
    )


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5])
def test_the_share_cap_is_bounded_on_both_sides(value):
    with pytest.raises(ConfigError, match="fed.max_site_share"):
        tiny_config(**{"fed.max_site_share": value})


# ----------------------------------------------------------------------------- records rolled back


def test_a_run_folder_restored_from_an_older_copy_counts_the_releases_the_sites_made(tmp_path, caplog):
    """Restoring a copy of the run folder taken mid-run resumed silently and the privacy report
    counted fewer DP releases than the sites had made."""
    import shutil

    cfg = tiny_config(**{"fed.student_rounds": 2, "fed.bank_refresh_every": 1, "fed.run_name": "run"})
    nodes = {n: {**c, "state-dir": str(tmp_path / f"site-{n}")} for n, c in synthetic_node_configs(4).items()}
    run_dir, copy = tmp_path / "runs" / "run", tmp_path / "copy"
    grid = InProcessGrid(nodes, config_to_flat(cfg))

    def snapshot(node_id: int, message: Message) -> Message | None:
        if message.metadata.message_type == MESSAGE_TYPE["student.train"] and not copy.exists():
            shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns(".lock"))  # after the first refresh
        return grid.deliver(node_id, message)

    grid.faults[WLI0] = snapshot
    first = run_federation(grid, cfg, run_dir)["privacy"]["releases"]
    shutil.rmtree(run_dir)
    shutil.copytree(copy, run_dir)
    with caplog.at_level("WARNING", logger="fedpagkd.server"):
        summary = run_federation(InProcessGrid(nodes, config_to_flat(cfg)), cfg, run_dir)
    counted = {
        name: json.loads((tmp_path / f"site-{n}" / "releases.json").read_text())["run"]
        for n, name in ((NBI0, "nbi-0"), (NBI1, "nbi-1"))
    }
    assert summary["privacy"]["releases"] == counted  # every release the sites made, none lost with the old copy
    assert all(counted[site] > first[site] for site in counted)  # the re-run's refresh came on top
    assert set(summary["releases_reconciled"]) == {"nbi-0", "nbi-1"}
    assert all(r["ledger"] < r["site"] == first[s] for s, r in summary["releases_reconciled"].items())
    assert "site 'nbi-0' counts" in caplog.text and "restored from an older copy" in caplog.text


def test_a_site_that_cannot_count_a_release_sends_no_statistics(tmp_path):
    from client.egress import logged

    state = tmp_path / "state"
    state.mkdir()
    (state / "releases.json").write_text("{not json")
    reply = Payload("knowledge.sums", config={"groups": 1, "smallest-group": 2})
    out = logged(reply, {"state-dir": str(state)}, site="nbi-0", run_id=1, run_name="run", request="knowledge.stats")
    assert out.kind == "error" and "releases.json" in out.config["reason"] and "restore it from a backup" in out.config["reason"]


def test_a_run_folder_that_cannot_be_written_mid_run_names_the_folder_and_the_fix(tmp_path, monkeypatch):
    """A run folder made unwritable mid-run ended in a raw PermissionError with no fix."""
    import errno

    cfg = tiny_config()
    run_dir = tmp_path / "run"
    grid, full = make_grid(cfg), []
    real_replace = os.replace

    def replace(src, dst):
        if full and Path(dst).parent == run_dir:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    def fill_disk(node_id: int, message: Message) -> Message | None:
        if message.metadata.message_type == MESSAGE_TYPE["student.train"]:
            full.append(True)
        return grid.deliver(node_id, message)

    monkeypatch.setattr(os, "replace", replace)
    grid.faults[WLI0] = fill_disk
    with pytest.raises(StateError) as raised:
        run_federation(grid, cfg, run_dir)
    message = str(raised.value)
    assert message.startswith(f"run folder {run_dir}: No space left on device ({run_dir}/")
    assert f"df -h {run_dir}" in message and "resumes from its last saved round" in message
    full.clear()  # space freed: the same run resumes and finishes
    assert run_federation(make_grid(cfg), cfg, run_dir)["status"] == "completed"


def test_a_run_folder_that_cannot_be_created_names_the_folder_and_the_fix(tmp_path):
    (tmp_path / "runs").write_text("a file where the runs folder should be")
    grid = make_grid(tiny_config())
    with pytest.raises(StateError, match=rf"run folder {tmp_path}/runs/run: .*Make .* writable by this user"):
        run_federation(grid, tiny_config(), tmp_path / "runs" / "run")
    assert not grid.sent


# ----------------------------------------------------------------------------- unread files at discovery


def test_files_a_site_did_not_read_are_reported_at_discovery_by_reason(tmp_path, task_identity, caplog):
    """Check-site counted unread files; discovery did not: the server never heard of them."""
    from server.discovery import SiteInfo

    root = _folder_site(tmp_path / "site")
    (root / "train" / "x" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "test" / "x" / "scan.tif")
    (root / "train" / "notes.txt").write_text("not an image")
    cfg = tiny_config(**{"data.class_names": "x,y"})
    node = {"site-name": "site-a", "modality": "nbi", "data-path": str(root)}
    reply = _site_reply(make("discover", _dims(), config={"protocol": 6}), node, cfg)
    skipped = json.loads(reply.config["skipped-files"])
    assert skipped == {
        "dangling link": 1,
        "unsupported extension .tif (read: .png, .jpg, .jpeg)": 1,
        "not in a class folder (images belong in <data-path>/train/<class>/)": 1,
    }
    assert str(tmp_path) not in reply.config["skipped-files"]  # the site's folder stays at the site
    warnings = declaration_warnings({7: SiteInfo.from_metadata(7, reply)}, 0.5)
    assert warnings == [
        "site 'site-a' did not read 3 file(s): dangling link: 1; not in a class folder (images belong in "
        "<data-path>/train/<class>/): 1; unsupported extension .tif (read: .png, .jpg, .jpeg): 1"
    ]


def test_the_server_logs_the_unread_files_a_site_reports_by_its_name(tmp_path, caplog):
    cfg = tiny_config(**{"fed.min_wli_sites": 3})  # discovery then stops the run: no training needed
    grid = make_grid(cfg)
    grid.faults[WLI0] = tampering(grid, "discover", lambda p: p.config.update({"skipped-files": '{"dangling link": 2}'}))
    with caplog.at_level("WARNING", logger="fedpagkd.server"), pytest.raises(FederationError, match="WLI: 2 of 3"):
        run_federation(grid, cfg, tmp_path / "run")
    assert "[discover] site 'wli-0' did not read 2 file(s): dangling link: 2" in caplog.text
    assert "did not read" not in caplog.text.replace("site 'wli-0' did not read", "")
