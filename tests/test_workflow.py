"""The FedPaGKD protocol (server/workflow.py) against the real ClientApp handlers, in-process.

:class:`tests.fakes.InProcessGrid` delivers every message to ``client.app.app`` with a per-node
Context, records both directions, and lets a test replace one node's replies (fault hooks).
Nodes 101-102 are NBI partitions (nbi-0, nbi-1), 103.. WLI (wli-0, wli-1, ...).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import Counter
from typing import Callable

import numpy as np
import pytest
from flwr.app import Error, Message

from client.app import dims_of
from client.site import resolve_site
from client.wire import MESSAGE_TYPE, from_recorddict, to_recorddict
from common.config import ConfigError, config_to_dict, config_to_flat
from common.metrics import selection_key
from common.checkpoint import STUDENT_CHECKPOINT, load_checkpoint
from common.models import build_query_head, build_student, build_teacher
from common.records import SCHEMAS, Payload, validate, weight_shapes
from server.state import META, TENSORS, StateError
from server.workflow import FederationError, run_federation
from tests.conftest import tiny_config
from tests.fakes import InProcessGrid, synthetic_node_configs

pytestmark = pytest.mark.usefixtures("single_thread")

NBI0, NBI1, WLI0, WLI1, WLI2 = 101, 102, 103, 104, 105
LOGGER = "fedpagkd.server"


def make_grid(cfg, faults=None) -> InProcessGrid:
    return InProcessGrid(synthetic_node_configs(cfg.data.nbi_sites + cfg.data.wli_sites), config_to_flat(cfg), faults)


def parsed(messages: list[Message]) -> list[Payload]:
    return [from_recorddict(m.content) for m in messages if m.has_content()]


def kinds_sent(grid: InProcessGrid) -> Counter:
    return Counter(m.metadata.message_type for m in grid.sent)


def reply_as(message: Message, payload: Payload) -> Message:
    return Message(to_recorddict(payload), reply_to=message)


def on_student(grid: InProcessGrid, tamper: Callable[[Message, Message], Message | None]):
    """A fault hook that passes everything through except student.train, whose genuine reply
    ``tamper(request, reply)`` replaces."""

    def fault(node_id: int, message: Message) -> Message | None:
        reply = grid.deliver(node_id, message)
        if message.metadata.message_type != MESSAGE_TYPE["student.train"]:
            return reply
        return tamper(message, reply)

    return fault


def _first_float(block: dict[str, np.ndarray]) -> str:
    return next(k for k, v in block.items() if v.dtype.kind == "f" and v.ndim >= 2)


def _edit_student(edit: Callable[[dict[str, np.ndarray], str], None]):
    def tamper(request: Message, reply: Message) -> Message:
        payload = from_recorddict(reply.content)
        assert payload.kind == "student.update"
        student = {k: v.copy() for k, v in payload.weights["student"].items()}
        edit(student, _first_float(student))
        payload.weights["student"] = student
        return reply_as(request, payload)

    return tamper


def _nan(student, name):
    student[name].flat[0] = np.nan


def _drop(student, name):
    del student[name]


def _reshape(student, name):
    student[name] = np.zeros(student[name].shape[:-1] + (student[name].shape[-1] + 1,), student[name].dtype)


FAULTS: dict[str, tuple[Callable, str]] = {
    "nan-weights": (_edit_student(_nan), "NaN"),
    "missing-array": (_edit_student(_drop), "missing"),
    "wrong-shape": (_edit_student(_reshape), "expected"),
    "error-payload": (
        lambda request, reply: reply_as(request, Payload("error", config={"site-name": "wli-0", "reason": "disk on fire"})),
        "disk on fire",
    ),
    "no-reply": (lambda request, reply: None, "no reply"),
    "flower-error": (lambda request, reply: Message(Error(code=2, reason="ClientAppException: boom"), reply_to=request), "boom"),
    "wrong-kind": (lambda request, reply: reply_as(request, Payload("error-free", config={})), "error-free"),
}
FAST_FAULTS = {"nan-weights", "no-reply", "error-payload"}


def fault_params():
    return [pytest.param(name, marks=() if name in FAST_FAULTS else pytest.mark.slow) for name in FAULTS]


# ------------------------------------------------------------------------------------ a full run


@pytest.fixture(scope="module")
def full_run(single_thread, tmp_path_factory):
    cfg = tiny_config()
    grid = make_grid(cfg)
    run_dir = tmp_path_factory.mktemp("full") / "run"
    summary = run_federation(grid, cfg, run_dir)
    return {"cfg": cfg, "grid": grid, "run_dir": run_dir, "summary": summary}


def test_full_run_writes_every_output(full_run):
    run_dir, cfg = full_run["run_dir"], full_run["cfg"]
    for name in ("metrics.json", "egress.json", "config.json", STUDENT_CHECKPOINT, "auc.png", "roc.png", META, TENSORS):
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0, name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    last = metrics["evaluation"][-1]
    assert (last["model"], last["split"]) == ("student", "test")  # the test split, read once, at the end
    assert {k: metrics["final"][k] for k in last["pooled"]} == last["pooled"]
    assert metrics["final"]["selected_round"] == metrics["selection"]["student"]["round"]
    assert [e for e in metrics["evaluation"] if e["split"] == "test" and e["model"] == "student"] == [last]
    assert 0.0 <= metrics["final"]["auc"] <= 1.0
    assert metrics["final"]["num_examples"] == cfg.data.wli_sites * cfg.data.test_per_site
    assert [e["round"] for e in metrics["student"]] == [1]
    # Each model's last round is scored on val (model selection), then the selected one on test once.
    assert [(e["model"], e["round"], e["split"]) for e in metrics["evaluation"]] == SELECTED_ONE_ROUND
    assert sorted(metrics["student"][0]["sites"]) == ["wli-0", "wli-1"]
    assert sorted(metrics["teacher"][0]["sites"]) == ["nbi-0", "nbi-1"]
    assert sorted(s["name"] for s in metrics["sites"]) == ["nbi-0", "nbi-1", "wli-0", "wli-1"]
    assert json.loads((run_dir / "config.json").read_text()) == json.loads(json.dumps(config_to_dict(cfg)))
    state = json.loads((run_dir / META).read_text())
    assert state["progress"] == {"teacher_rounds": 1, "refreshes": 1, "student_rounds": 1}
    # The checkpoint is the global student that was last evaluated.
    net, meta = load_checkpoint(run_dir / STUDENT_CHECKPOINT)
    last_eval = [p for p in parsed(full_run["grid"].sent) if p.kind == "evaluate" and p.config["model"] == "student"][-1]
    for name, tensor in net.state_dict().items():
        np.testing.assert_allclose(
            tensor.numpy().reshape(-1), last_eval.weights["net"][name].reshape(-1), rtol=1e-6, err_msg=name
        )


SELECTED_ONE_ROUND = [("teacher", 1, "val"), ("teacher", 1, "test"), ("student", 1, "val"), ("student", 1, "test")]


def test_full_run_records_bytes_per_phase(full_run):
    summary, grid = full_run["summary"], full_run["grid"]
    # evaluate: the last teacher and the last student on val, the selected student on test.
    phases = {"discover": 4, "teacher": 2, "knowledge": 2 * (1 + full_run["cfg"].pagkd.kmeans_iters), "student": 2, "evaluate": 6}
    assert set(summary.bytes) == set(phases)
    for phase, requests in phases.items():
        entry = summary.bytes[phase]
        assert entry["messages"] == 2 * requests, phase  # every request answered
        assert entry["sent"] > 0 and entry["received"] > 0, phase
    student_bytes = summary.student_weights_bytes
    assert summary.bytes["student"]["received"] >= 2 * student_bytes
    assert summary.bytes["student"]["sent"] >= 2 * (student_bytes + summary.bank_bytes)
    assert 0 < summary.bank_share_of_student_upload < 1
    assert sum(e["messages"] for e in summary.bytes.values()) == len(grid.sent) + len(grid.received)


def test_full_run_times_every_exchange_with_each_sites_compute(full_run):
    summary, cfg = full_run["summary"], full_run["cfg"]
    timing = summary.timing
    assert [(t["phase"], t["round"]) for t in timing if t["phase"] in ("teacher", "student")] == [("teacher", 1), ("student", 1)]
    # knowledge: seeds + Lloyd steps; evaluate: teacher val, student val, student test
    assert len(timing) == sum(1 for e in summary.bytes.values()) + cfg.pagkd.kmeans_iters + 2
    for entry in timing:
        assert entry["wall_s"] > 0
        assert len(entry["compute_s"]) == entry["sites"], entry  # every site declared its handler's time
        assert all(0 <= s <= entry["wall_s"] for s in entry["compute_s"].values()), entry  # in-process: compute within wall


def test_discover_without_nbi_sites_names_the_missing_modality(tmp_path):
    cfg = tiny_config(**{"data.nbi_sites": 0, "data.wli_sites": 2})
    grid = make_grid(cfg)
    with pytest.raises(FederationError, match=r"NBI: 0 of 1 needed") as err:
        run_federation(grid, cfg, tmp_path / "run")
    assert "wli-0" in str(err.value) and "wli-1" in str(err.value)  # what was found
    assert "WLI:" not in str(err.value)  # WLI is not what is missing
    assert kinds_sent(grid) == Counter({MESSAGE_TYPE["discover"]: 2})  # nothing but discovery was sent


def test_discover_without_wli_sites_names_the_missing_modality(tmp_path):
    cfg = tiny_config(**{"data.nbi_sites": 2, "data.wli_sites": 0})
    with pytest.raises(FederationError, match=r"WLI: 0 of 1 needed"):
        run_federation(make_grid(cfg), cfg, tmp_path / "run")


# ------------------------------------------------------------------------------------ faults

FAULT_CFG = {"fed.teacher_rounds": 0, "pagkd.kmeans_iters": 1}


@pytest.mark.parametrize("fault", fault_params())
def test_one_faulty_wli_site_is_dropped_and_the_run_completes(fault, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    cfg = tiny_config(**FAULT_CFG)
    grid = make_grid(cfg)
    tamper, reason = FAULTS[fault]
    grid.faults[WLI0] = on_student(grid, tamper)
    summary = run_federation(grid, cfg, tmp_path / "run")
    assert summary.student[0]["sites"] == ["wli-1"]
    assert summary.final is not None
    assert (tmp_path / "run" / "metrics.json").is_file()
    dropped = [r.getMessage() for r in caplog.records if "dropped site 'wli-0'" in r.getMessage()]
    assert dropped, [r.getMessage() for r in caplog.records]
    assert any(reason in m and "[student]" in m for m in dropped), dropped
    assert not [r for r in caplog.records if "dropped site 'wli-1'" in r.getMessage()]


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param("error-payload"),
        pytest.param("nan-weights", marks=pytest.mark.slow),
        pytest.param("no-reply", marks=pytest.mark.slow),
    ],
)
def test_the_same_fault_on_every_wli_site_stops_the_run_naming_sites_and_reasons(fault, tmp_path):
    cfg = tiny_config(**FAULT_CFG)
    grid = make_grid(cfg)
    tamper, reason = FAULTS[fault]
    grid.faults[WLI0] = grid.faults[WLI1] = on_student(grid, tamper)
    with pytest.raises(FederationError) as err:
        run_federation(grid, cfg, tmp_path / "run")
    message = str(err.value)
    assert "student round 1" in message and "0 usable WLI" in message
    assert "'wli-0'" in message and "'wli-1'" in message
    assert message.count(reason) >= 2, message
    # The last finished state is on disk: the bank refresh, not the failed round.
    state = json.loads((tmp_path / "run" / META).read_text())
    assert state["progress"] == {"teacher_rounds": 0, "refreshes": 1, "student_rounds": 0}


def test_a_poisoned_update_is_dropped_as_a_norm_outlier(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    cfg = tiny_config(**FAULT_CFG, **{"data.wli_sites": 3})
    grid = make_grid(cfg)

    def scale(request: Message, reply: Message) -> Message:
        payload = from_recorddict(reply.content)
        for block in ("student", "head"):
            payload.weights[block] = {k: v * 1000 if v.dtype.kind == "f" else v for k, v in payload.weights[block].items()}
        return reply_as(request, payload)

    grid.faults[WLI2] = on_student(grid, scale)
    summary = run_federation(grid, cfg, tmp_path / "run")
    assert sorted(summary.student[0]["sites"]) == ["wli-0", "wli-1"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("dropped site 'wli-2'" in m and "norm" in m for m in messages), messages
    # The global model sent for evaluation is the average of the honest updates, not blown up.
    sent = parsed(grid.sent)
    before = next(p for p in sent if p.kind == "student.train").weights["student"]
    after = next(p for p in sent if p.kind == "evaluate" and p.config["model"] == "student").weights["net"]
    norm = lambda s: np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in s.values() if v.dtype.kind == "f"))  # noqa: E731
    assert norm(after) < 2 * norm(before)


def _run_with_newer_protocol_site(tmp_path):
    cfg = tiny_config(**FAULT_CFG)
    grid = make_grid(cfg)

    def newer(node_id: int, message: Message) -> Message:
        reply = grid.deliver(node_id, message)
        if message.metadata.message_type != MESSAGE_TYPE["discover"]:
            return reply
        payload = from_recorddict(reply.content)
        payload.config["protocol"] += 1
        return reply_as(message, payload)

    grid.faults[WLI1] = newer
    return grid, run_federation(grid, cfg, tmp_path / "run")


def test_a_site_speaking_another_protocol_is_dropped_at_discovery(tmp_path):
    grid, summary = _run_with_newer_protocol_site(tmp_path)
    assert sorted(s["name"] for s in summary.sites) == ["nbi-0", "nbi-1", "wli-0"]
    assert summary.student[0]["sites"] == ["wli-0"]
    assert not [m for m in grid.sent if m.metadata.dst_node_id == WLI1 and m.metadata.message_type != MESSAGE_TYPE["discover"]]


def test_a_site_speaking_another_protocol_is_logged(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    _run_with_newer_protocol_site(tmp_path)
    named = ("wli-1", f"node {WLI1}")
    assert any(any(n in r.getMessage() for n in named) and "protocol" in r.getMessage() for r in caplog.records)


def test_dropping_an_outlier_below_the_minimum_of_sites_stops_the_run(tmp_path):
    cfg = tiny_config(**FAULT_CFG, **{"data.wli_sites": 3, "fed.min_wli_sites": 3})
    grid = make_grid(cfg)

    def scale(request: Message, reply: Message) -> Message:
        payload = from_recorddict(reply.content)
        payload.weights["student"] = {k: v * 1000 if v.dtype.kind == "f" else v for k, v in payload.weights["student"].items()}
        return reply_as(request, payload)

    grid.faults[WLI2] = on_student(grid, scale)
    with pytest.raises(FederationError, match="wli-2"):
        run_federation(grid, cfg, tmp_path / "run")


class LateGrid(InProcessGrid):
    """A late reply as Flower's grids meet it: pushing stamps every request with a message id (as
    InMemoryGrid and HttpGrid do), and a reply a fault hook holds back (``self.late``) misses its own
    exchange (the server stops waiting: fed.round_timeout) and comes back with the next exchange's
    replies (a grid that does not filter replies by message id)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.late: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        held, self.late = self.late, []
        return list(super().send_and_receive(messages, timeout=timeout)) + held


def late_in_student_round(grid: LateGrid, round_: int):
    def fault(node_id: int, message: Message) -> Message | None:
        reply = grid.deliver(node_id, message)
        if (
            message.metadata.message_type == MESSAGE_TYPE["student.train"]
            and from_recorddict(message.content).config["round"] == round_
        ):
            grid.late.append(reply)
            return None
        return reply

    return fault


def test_a_late_reply_is_dropped_from_its_round_and_ignored_when_it_arrives(tmp_path, caplog):
    """wli-0's round-1 update comes after the round timed out, together with the round-2 replies
    (same kind, same sender): round 1 goes on without it, and round 2 uses wli-0's round-2 update,
    never the stale one."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    cfg = tiny_config(**FAULT_CFG, **{"fed.student_rounds": 2, "fed.round_timeout": 30.0})
    grid = LateGrid(synthetic_node_configs(cfg.data.nbi_sites + cfg.data.wli_sites), config_to_flat(cfg))
    grid.faults[WLI0] = late_in_student_round(grid, 1)
    summary = run_federation(grid, cfg, tmp_path / "run")
    assert [(e["round"], e["sites"]) for e in summary.student] == [(1, ["wli-1"]), (2, ["wli-0", "wli-1"])]
    assert summary.final is not None
    messages = [r.getMessage() for r in caplog.records]
    assert "[student] dropped site 'wli-0': no reply within 30 s (fed.round_timeout)" in messages, messages
    assert any("[student] ignored a reply from 'wli-0'" in m for m in messages), messages
    assert sum("dropped site" in m for m in messages) == 1, messages
    # The stale update was never parsed nor counted: one update of wli-0 (round 2), two of wli-1.
    egress = json.loads((tmp_path / "run" / "egress.json").read_text())
    assert Counter(e["site"] for e in egress if e["kind"] == "student.update") == {"wli-0": 1, "wli-1": 2}
    assert summary.bytes["student"]["messages"] == 2 * 2 + 3


# ------------------------------------------------------------------------------------ resume


class Crash(RuntimeError):
    pass


def crash_on(grid: InProcessGrid, message_type: str, nth: int):
    """Raise (a server crash mid-round) on the nth message of a type to this node."""
    seen = Counter()

    def fault(node_id: int, message: Message):
        kind = message.metadata.message_type
        seen[kind] += 1
        if kind == message_type and seen[kind] == nth:
            raise Crash(f"simulated crash at {kind} #{nth}")
        return grid.deliver(node_id, message)

    return fault


# A fresh AdamW per round: the moments a site keeps (train.keep_optimizer_state, the default) live
# in the Flower context of one run and do not survive a restart, so only a run without them
# resumes bit for bit; with them a resumed run restarts the sites' moments (docs/privacy.md,
# the state and resume).
RESUME_CFG = {"fed.student_rounds": 3, "train.keep_optimizer_state": False}


def test_a_student_that_does_not_distil_is_sent_no_bank(full_run, tmp_path):
    """A student message carries only what its method uses: the bank goes to students that
    distil from it (the full run), not to a CE-only student (its requests are smaller by the bank)."""
    distilling = [p for p in parsed(full_run["grid"].sent) if p.kind == "student.train"]
    assert distilling and all(p.config["use-bank"] and "image_count" in p.arrays for p in distilling)
    cfg = tiny_config(pagkd__use_pro=False, pagkd__use_den=False)
    grid = make_grid(cfg)
    summary = run_federation(grid, cfg, tmp_path / "run")
    plain = [p for p in parsed(grid.sent) if p.kind == "student.train"]
    assert plain and all(not p.config["use-bank"] and p.arrays == {} for p in plain)
    assert summary.bytes["student"]["sent"] < full_run["summary"].bytes["student"]["sent"] - summary.bank_bytes


@pytest.fixture(scope="module")
def resumed(single_thread, tmp_path_factory):
    """A run that crashes in student round 2 (on the 2nd student.train to wli-0), then the same
    run folder started again with no fault."""
    cfg = tiny_config(**RESUME_CFG)
    run_dir = tmp_path_factory.mktemp("resume") / "run"
    first = make_grid(cfg)
    first.faults[WLI0] = crash_on(first, MESSAGE_TYPE["student.train"], nth=2)
    with pytest.raises(Crash):
        run_federation(first, cfg, run_dir)
    state_after_crash = json.loads((run_dir / META).read_text())
    second = make_grid(cfg)
    summary = run_federation(second, cfg, run_dir)
    return {
        "cfg": cfg,
        "run_dir": run_dir,
        "first": first,
        "second": second,
        "summary": summary,
        "crash_state": state_after_crash,
    }


def test_a_crashed_run_resumes_at_the_last_finished_round(resumed):
    state = resumed["crash_state"]
    assert state["progress"] == {"teacher_rounds": 1, "refreshes": 1, "student_rounds": 1}
    assert [e["round"] for e in state["metrics"]["student"]] == [1]

    first, second, summary, run_dir = resumed["first"], resumed["second"], resumed["summary"], resumed["run_dir"]
    sent = kinds_sent(second)
    assert sent[MESSAGE_TYPE["teacher.train"]] == 0, "teacher rounds were re-run"
    assert sent[MESSAGE_TYPE["knowledge.seed"]] == sent[MESSAGE_TYPE["knowledge.stats"]] == 0, "the bank was rebuilt"
    assert sent[MESSAGE_TYPE["student.train"]] == 2 * 2  # rounds 2 and 3, two WLI sites
    assert [e["round"] for e in summary.student] == [1, 2, 3]
    assert [(e["model"], e["round"], e["split"]) for e in summary.evaluation] == [
        ("teacher", 1, "val"),
        ("teacher", 1, "test"),
        ("student", 1, "val"),
        ("student", 2, "val"),
        ("student", 3, "val"),
        ("student", 3, "test"),
    ]
    assert len(summary.teacher) == 1 and len(summary.knowledge) == 1
    assert json.loads((run_dir / META).read_text())["progress"] == {"teacher_rounds": 1, "refreshes": 1, "student_rounds": 3}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [e["round"] for e in metrics["student"]] == [1, 2, 3]
    # The resumed run distils from the bank the first run built ...
    bank_1 = next(p for p in parsed(first.sent) if p.kind == "student.train").arrays
    bank_2 = next(p for p in parsed(second.sent) if p.kind == "student.train").arrays
    for name in bank_1:
        np.testing.assert_array_equal(bank_2[name], bank_1[name], err_msg=name)
    # ... and starts round 2 from the global student of round 1 (what the crashed attempt sent).
    eval_1 = next(p for p in parsed(first.sent) if p.kind == "student.train" and p.config["round"] == 2).weights["student"]
    round_2 = next(p for p in parsed(second.sent) if p.kind == "student.train").weights["student"]
    for name in eval_1:
        np.testing.assert_array_equal(round_2[name], eval_1[name], err_msg=name)


def test_the_egress_log_of_a_resumed_run_lists_every_message(resumed):
    summary, run_dir = resumed["summary"], resumed["run_dir"]
    egress = json.loads((run_dir / "egress.json").read_text())
    assert len(egress) == sum(e["messages"] for e in summary.bytes.values())
    assert [e["round"] for e in summary.student] == [1, 2, 3]
    rounds = [e["config"].get("round") for e in egress if e["kind"] == "student.train"]
    assert sorted(set(rounds)) == [1, 2, 3]


@pytest.mark.slow
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(resumed, tmp_path):
    cfg = resumed["cfg"]
    whole = run_federation(make_grid(cfg), cfg, tmp_path / "whole")
    assert [e["pooled"] for e in whole.evaluation] == [e["pooled"] for e in resumed["summary"].evaluation]
    from safetensors.numpy import load_file

    a, b = load_file(str(tmp_path / "whole" / STUDENT_CHECKPOINT)), load_file(str(resumed["run_dir"] / STUDENT_CHECKPOINT))
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture()
def early_state(tmp_path) -> tuple:
    """A run folder whose state was saved after discovery (a crash in teacher round 1)."""
    cfg = tiny_config()
    grid = make_grid(cfg)
    grid.faults[NBI0] = crash_on(grid, MESSAGE_TYPE["teacher.train"], nth=1)
    with pytest.raises(Crash):
        run_federation(grid, cfg, tmp_path / "run")
    assert (tmp_path / "run" / META).is_file()
    return cfg, tmp_path / "run"


@pytest.mark.parametrize("tamper", ["tensors", "digest"])
def test_a_state_whose_digest_does_not_match_is_refused(early_state, tamper):
    cfg, run_dir = early_state
    if tamper == "tensors":
        tensors = run_dir / TENSORS
        data = bytearray(tensors.read_bytes())
        data[-1] ^= 0xFF
        tensors.write_bytes(bytes(data))
    else:
        meta = json.loads((run_dir / META).read_text())
        meta["tensors_sha256"] = "0" * 64
        (run_dir / META).write_text(json.dumps(meta))
    grid = make_grid(cfg)
    with pytest.raises(StateError, match="digest"):
        run_federation(grid, cfg, run_dir)
    assert not grid.sent, "a refused checkpoint must stop the run before any message"


def test_a_state_json_that_is_not_json_is_refused(early_state):
    cfg, run_dir = early_state
    (run_dir / META).write_text("{not json")
    with pytest.raises(StateError, match="not valid JSON"):
        run_federation(make_grid(cfg), cfg, run_dir)


def test_a_config_change_between_runs_is_refused(early_state):
    cfg, run_dir = early_state
    changed = tiny_config(**{"train.lr": 0.01})
    grid = make_grid(changed)
    with pytest.raises(StateError, match=r"train\.lr"):
        run_federation(grid, changed, run_dir)
    assert not grid.sent


def test_more_rounds_is_not_a_config_change(early_state):
    cfg, run_dir = early_state
    more = tiny_config(**{"fed.student_rounds": 2})
    grid = make_grid(more)
    grid.faults[NBI0] = crash_on(grid, MESSAGE_TYPE["teacher.train"], nth=1)
    with pytest.raises(Crash):  # it resumed and got as far as teacher round 1 again
        run_federation(grid, more, run_dir)
    assert kinds_sent(grid)[MESSAGE_TYPE["teacher.train"]] == 1


# ------------------------------------------------------------------------------------ privacy audit

STATISTICS_KINDS = {
    "discover",
    "metadata",
    "knowledge.seed",
    "knowledge.seeds",
    "knowledge.stats",
    "knowledge.sums",
    "evaluate",
    "evaluation",
    "student.train",
}


def _reference_weights(cfg) -> dict[str, dict]:
    c = cfg.data.num_classes
    teacher, student, head = build_teacher(cfg.model, c), build_student(cfg.model, c), build_query_head(cfg.model, c)
    from client.wire import state_to_numpy

    return {
        "teacher": weight_shapes(state_to_numpy(teacher)),
        "student": weight_shapes(state_to_numpy(student)),
        "head": weight_shapes(state_to_numpy(head)),
    }


def _image_counts(cfg, partitions: int) -> set[int]:
    counts: set[int] = set()
    for p in range(partitions):
        site = resolve_site({"partition-id": p, "num-partitions": partitions}, cfg)
        counts |= {len(site.train), len(site.test)}
        counts |= set(np.bincount(np.asarray(site.train.labels)).tolist()) | set(
            np.bincount(np.asarray(site.test.labels)).tolist()
        )
    return counts - {0}


def image_shaped(shape: tuple[int, ...], size: int) -> bool:
    """[N, 3, S, S] (a batch of images) or [3, S, S] (one image)."""
    return (len(shape) == 4 and shape[1] == 3 and shape[2:] == (size, size)) or shape == (3, size, size)


def per_image_dims(shape: tuple[int, ...], per_image: set[int], declared: set[int]) -> list[int]:
    """Dims of a tensor that equal a site's number of images and are not a declared Dims value."""
    return [d for d in shape if d in per_image and d not in declared]


def test_the_audit_checks_themselves_can_fail():
    assert image_shaped((24, 3, 32, 32), 32) and image_shaped((3, 32, 32), 32)
    assert not image_shaped((16, 3, 3, 3), 32) and not image_shaped((3, 32), 32)
    assert per_image_dims((24, 32), {24, 15}, {3, 32}) == [24]
    assert per_image_dims((3, 15, 32), {24, 15}, {3, 32}) == [15]
    assert per_image_dims((3, 4, 32), {24, 4}, {3, 4, 32}) == []


def test_privacy_audit_of_every_message(full_run):
    cfg, grid, run_dir = full_run["cfg"], full_run["grid"], full_run["run_dir"]
    dims = dims_of(cfg)
    declared = {dims.C, dims.S, dims.M, dims.D, dims.L, dims.B}
    per_image = _image_counts(cfg, 4)
    assert not per_image & declared, "pick data sizes that differ from every declared dim, or the audit is blind"
    assert {cfg.data.train_per_site, cfg.data.test_per_site} <= per_image
    reference = _reference_weights(cfg)
    reference["net"] = reference["student"]  # student evaluation; the teacher's is the same backbone here
    assert cfg.model.student == cfg.model.teacher
    size = cfg.data.image_size
    payloads = parsed(grid.sent) + parsed(grid.received)
    assert len(payloads) == len(grid.sent) + len(grid.received) > 0
    k_min = cfg.pagkd.min_group_size
    sums = 0
    for payload in payloads:
        validate(payload, dims, {b: reference[b] for b in payload.weights}, sender=payload.kind)  # declared shapes only
        tensors = [(f"array {k}", a) for k, a in payload.arrays.items()]
        tensors += [(f"weight {b}.{k}", a) for b, block in payload.weights.items() for k, a in block.items()]
        for where, array in tensors:
            assert not image_shaped(array.shape, size), f"{payload.kind}: {where} is image-shaped {array.shape}"
            if payload.kind in STATISTICS_KINDS:
                leaking = per_image_dims(array.shape, per_image, declared)
                assert not leaking, f"{payload.kind}: {where} has a per-image dimension {array.shape}"
        if payload.kind == "knowledge.sums":
            sums += 1
            assert payload.config["groups"] > 0
            assert payload.config["smallest-group"] >= k_min, payload.config
        if payload.kind == "knowledge.seeds":
            for name in ("foreground_seed_count", "background_seed_count"):
                counts = payload.arrays[name]
                assert ((counts == 0) | (counts >= k_min)).all(), (name, counts)
    assert sums == 2 * cfg.pagkd.kmeans_iters
    assert {p.kind for p in payloads} == set(SCHEMAS) - {"error", "knowledge.masked"}  # masked: test_privacy.py
    # The run's own egress log lists exactly these messages, with the same shapes.
    egress = json.loads((run_dir / "egress.json").read_text())
    assert len(egress) == len(payloads)
    assert Counter(e["kind"] for e in egress) == Counter(p.kind for p in payloads)
    logged = Counter((e["kind"], k, tuple(v["shape"])) for e in egress for k, v in e["arrays"].items())
    actual = Counter((p.kind, k, a.shape) for p in payloads for k, a in p.arrays.items())
    assert logged == actual
    names = {"nbi-0", "nbi-1", "wli-0", "wli-1"}
    for entry in egress:
        assert entry["direction"] in ("to_site", "from_site")
        # Discovery happens before a node's site name is known: it is logged by node id.
        assert entry["site"] in names or (entry["phase"] == "discover" and entry["site"].startswith("node ")), entry["site"]


class ReversedGrid(InProcessGrid):
    """Replies arrive in the opposite order (as they may from real sites)."""

    def send_and_receive(self, messages, *, timeout=None):
        return list(reversed(list(super().send_and_receive(messages, timeout=timeout))))


def test_results_do_not_depend_on_the_order_replies_arrive_in(tmp_path):
    cfg = tiny_config(pagkd__codebook_size=4)
    forward = run_federation(make_grid(cfg), cfg, tmp_path / "forward")
    backward_grid = ReversedGrid(synthetic_node_configs(cfg.data.nbi_sites + cfg.data.wli_sites), config_to_flat(cfg))
    backward = run_federation(backward_grid, cfg, tmp_path / "backward")
    assert forward.bank_bytes == backward.bank_bytes
    a = load_checkpoint(tmp_path / "forward" / STUDENT_CHECKPOINT)[0].state_dict()
    b = load_checkpoint(tmp_path / "backward" / STUDENT_CHECKPOINT)[0].state_dict()
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a), "the student depends on reply order"
    assert forward.final.auc == backward.final.auc


def test_a_student_started_from_the_teacher_gets_the_federated_teacher(single_thread, tmp_path):
    """fed.student_init=teacher without distillation: teacher rounds on NBI, the teacher is
    evaluated on NBI, then the WLI student's first global model is exactly that teacher."""
    cfg = tiny_config(**{"fed.student_init": "teacher", "pagkd.use_pro": False, "pagkd.use_den": False})
    grid = make_grid(cfg)
    summary = run_federation(grid, cfg, tmp_path / "run")
    sent = parsed(grid.sent)
    teacher = next(p for p in sent if p.kind == "evaluate" and p.config["model"] == "teacher").weights["net"]
    student = next(p for p in sent if p.kind == "student.train").weights["student"]
    assert sorted(student) == sorted(teacher)
    for name in teacher:
        np.testing.assert_array_equal(student[name], teacher[name], err_msg=name)
    assert not any(p.kind.startswith("knowledge") for p in sent), "no bank without distillation"
    assert [(e["model"], e["round"], e["split"]) for e in summary.evaluation] == SELECTED_ONE_ROUND


def test_student_init_from_a_different_backbone_is_refused():
    with pytest.raises(ConfigError, match="fed.student_init"):
        tiny_config(**{"fed.student_init": "teacher", "model.teacher": "resnet18"})


def test_the_student_of_the_best_val_round_is_selected_and_only_it_is_tested(single_thread, tmp_path):
    """Model selection on the validation split: the round with the best pooled val AUC (ties to
    the later) is the one whose global student is scored on test, once, and checkpointed."""
    cfg = tiny_config(**{"fed.student_rounds": 3, "pagkd.use_pro": False, "pagkd.use_den": False})
    grid = make_grid(cfg)
    summary = run_federation(grid, cfg, tmp_path / "run")
    vals = [e for e in summary.evaluation if e["model"] == "student" and e["split"] == "val"]
    assert [e["round"] for e in vals] == [1, 2, 3]
    keys = [selection_key(e) for e in vals]  # learned first, then AUC
    best = max(r for r, key in zip((1, 2, 3), keys) if key == max(keys))
    assert summary.selection["student"].step == best == summary.final.selected_round
    # The global student of round r is what round r + 1's request carried (round 3's: the val evaluate).
    sent = parsed(grid.sent)
    globals_of = {
        p.config["round"] - 1: p.weights["student"] for p in sent if p.kind == "student.train" and p.config["round"] > 1
    }
    globals_of[3] = next(
        p.weights["net"] for p in sent if p.kind == "evaluate" and p.config["split"] == "val" and p.config["model"] == "student"
    )
    tested = [p for p in sent if p.kind == "evaluate" and p.config["split"] == "test" and p.config["model"] == "student"]
    assert len(tested) == cfg.data.wli_sites  # one test evaluation, each WLI site asked once
    for name, array in globals_of[best].items():
        for payload in tested:
            np.testing.assert_array_equal(payload.weights["net"][name], array, err_msg=name)
    net, _ = load_checkpoint(tmp_path / "run" / STUDENT_CHECKPOINT)
    for name, tensor in net.state_dict().items():
        np.testing.assert_allclose(tensor.numpy().reshape(-1), globals_of[best][name].reshape(-1), rtol=1e-6, err_msg=name)
    # Training requests cover the schedule in consecutive spans; only val is read before the end.
    spans = [(p.config["schedule-start"], p.config["schedule-end"]) for p in sent if p.kind == "student.train"][::2]
    assert spans == [(0.0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 1.0)]
    assert all(p.config["evaluate"] in ("", "val") for p in sent if p.kind in ("student.train", "teacher.train"))
