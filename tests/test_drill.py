"""The fault-injection drill knob of the ClientApp (``FEDPAGKD_DRILL_DELAY_S``, deploy/README.md
"Drills"): its parsing, and what a handler does with it, called the way Flower calls the ClientApp
(as in tests/test_client_app.py). Fast: only discovery requests, and ``time.sleep`` recorded, not slept.
The real drill (a SuperNode answering past fed.round_timeout) runs in tests/test_deployment_faults.py.
"""

from __future__ import annotations

import pytest
from flwr.app import Context, Message, RecordDict

from client import app as client_module
from client.app import DRILL_DELAY_ENV, dims_of, drill_delays
from client.wire import MESSAGE_TYPE, from_recorddict, to_recorddict
from common.config import config_to_flat
from common.records import PROTOCOL_VERSION, Payload, make, validate
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("single_thread", "task_identity")

CFG = tiny_config()
DIMS = dims_of(CFG)
WLI = {"partition-id": 2, "num-partitions": 4}  # wli-0 of the synthetic federation


def discover(context_config: dict = WLI) -> Payload:
    context = Context(run_id=1, node_id=7, node_config=dict(context_config), state=RecordDict(), run_config=config_to_flat(CFG))
    request = make("discover", DIMS, config={"protocol": PROTOCOL_VERSION})
    reply = client_module.app(Message(to_recorddict(request), dst_node_id=7, message_type=MESSAGE_TYPE["discover"]), context)
    assert reply.has_content() and not reply.has_error()  # never a Flower error: always our own reply
    return validate(from_recorddict(reply.content, "site"), DIMS)


@pytest.fixture()
def slept(monkeypatch) -> list[float]:
    calls: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", calls.append)
    monkeypatch.delenv(DRILL_DELAY_ENV, raising=False)
    return calls


def test_drill_delays_parse_comma_separated_kind_seconds():
    assert drill_delays("") == {} and drill_delays(" , ") == {}
    assert drill_delays("student.train=40") == {"student.train": 40.0}
    assert drill_delays(" student.train = 2.5 , evaluate=0,discover=1e1 ") == {
        "student.train": 2.5,
        "evaluate": 0.0,
        "discover": 10.0,
    }
    assert set(drill_delays(",".join(f"{kind}=1" for kind in MESSAGE_TYPE))) == set(MESSAGE_TYPE)  # every request kind


def test_the_drill_is_off_unless_set(slept):
    assert drill_delays() == {}
    assert discover().kind == "metadata"
    assert slept == []


@pytest.mark.parametrize(
    "value",
    [
        "student.train",
        "student.train=soon",
        "student.train=-1",
        "student.train=nan",
        "student.train=inf",
        "studnet.train=40",
        "=40",
        "train.student=40",
        "student.train=40;evaluate=5",
    ],
)
def test_a_bad_drill_value_names_the_variable_and_the_expected_form(value):
    with pytest.raises(ValueError) as err:
        drill_delays(value)
    message = str(err.value)
    assert DRILL_DELAY_ENV in message and repr(value) in message, message
    assert "kind=seconds" in message and "student.train=40" in message and "discover" in message, message


def test_a_delay_applies_to_its_kind_only(slept, monkeypatch):
    monkeypatch.setenv(DRILL_DELAY_ENV, "student.train=40")
    assert discover().kind == "metadata"
    assert slept == []
    monkeypatch.setenv(DRILL_DELAY_ENV, "discover=40,student.train=3")
    reply = discover()
    assert reply.kind == "metadata" and reply.config["site-name"] == "wli-0"
    assert slept == [40.0]


def test_a_bad_drill_value_is_an_error_reply_naming_the_site_and_the_variable(slept, monkeypatch):
    """Not a crash, not silence: every request gets an error reply the server logs with the site."""
    monkeypatch.setenv(DRILL_DELAY_ENV, "student.train=soon")
    reply = discover({"site-name": "hospital-b", "modality": "wli", "data-path": "/nowhere"})
    assert reply.kind == "error" and reply.config["site-name"] == "hospital-b"
    reason = reply.config["reason"]
    assert reason.startswith("ValueError: ") and DRILL_DELAY_ENV in reason and "kind=seconds" in reason, reason
    assert slept == []
