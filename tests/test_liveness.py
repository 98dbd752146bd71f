"""A site lost while the server waits for it (server/liveness.py): noticed from the SuperLink's node
records, logged by site name, the round going on without it or asking again when it restarted;
and the ServerApp's line that makes the operator's ``deploy/follow.py`` exit non-zero for a
degraded run (tests/test_site_audit.py runs follow.py on it).

The grid here answers through push/pull like a SuperLink's, with the real ClientApp behind it and
node records (Flower's ``NodeInfo``) that each test changes when a chosen request goes out: the
SuperNode restarts, goes offline, or stops sending heartbeats. The same faults on real processes:
tests/test_deployment_faults.py.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Callable
from uuid import uuid4

import pytest
from flwr.app import Error, Message
from flwr.common.constant import ErrorCode
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=no-name-in-module

from client.wire import MESSAGE_TYPE
from deploy import follow
from common.config import ConfigError, config_to_flat
from server.channel import NODE_UNAVAILABLE
from server import liveness
from server.liveness import last_heartbeat, site_loss
from server.workflow import run_federation
from tests.conftest import tiny_config
from tests.fakes import InProcessGrid, synthetic_node_configs

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def watch_at_every_pull(monkeypatch):
    """The node records read at every pull (a real run reads them every WATCH_EVERY_S)."""
    monkeypatch.setattr(liveness, "WATCH_EVERY_S", 0.0)


WLI0 = 103  # nbi-0, nbi-1, wli-0, wli-1 are nodes 101..104
HEARTBEAT_S = 30.0


def node(node_id: int, activated: str = "2026-12-03T17:00:00", heard_ago: float = 5.0, interval: float = HEARTBEAT_S) -> NodeInfo:
    """A node record as the SuperLink keeps it: online until 2 heartbeat intervals after the last one."""
    return NodeInfo(
        node_id=node_id,
        last_activated_at=activated,
        online_until=time.time() - heard_ago + 2 * interval,
        heartbeat_interval=interval,
    )


# --------------------------------------------------------------------------- the rule


def test_a_node_heard_recently_and_never_restarted_is_waited_for():
    assert site_loss(node(1), node(1, heard_ago=20.0), time.time(), lost_after=60.0) is None


def test_an_offline_node_is_lost():
    loss = site_loss(node(1), None, time.time(), lost_after=60.0)
    assert loss is not None and not loss.restarted and loss.reason.startswith("lost: its SuperNode went offline")


def test_a_node_activated_again_restarted_and_is_asked_again():
    loss = site_loss(node(1), node(1, activated="2026-12-03T17:05:00"), time.time(), lost_after=60.0)
    assert loss is not None and loss.restarted and "2026-12-03T17:05:00" in loss.reason


def test_a_node_silent_for_longer_than_fed_site_lost_s_is_lost():
    assert site_loss(node(1), node(1, heard_ago=35.0), time.time(), lost_after=60.0) is None
    loss = site_loss(node(1), node(1, heard_ago=45.0), time.time(), lost_after=40.0)
    assert (
        loss is not None
        and not loss.restarted
        and "no heartbeat from its SuperNode for 45 s (fed.site_lost_s = 40)" in loss.reason
    )


def test_a_simulated_node_without_heartbeats_is_never_lost():
    simulated = node(1, heard_ago=0.0, interval=1e300)  # Flower's HEARTBEAT_INTERVAL_INF
    assert last_heartbeat(simulated) is None
    assert site_loss(simulated, simulated, time.time() + 10**6, lost_after=30.0) is None


def test_fed_site_lost_s_below_the_heartbeat_spacing_is_refused():
    with pytest.raises(ConfigError, match="fed.site_lost_s"):
        tiny_config(fed__site_lost_s=20.0)


# --------------------------------------------------------------------------- a whole run

Event = Callable[[dict[int, NodeInfo], int], None]


def restart(nodes: dict[int, NodeInfo], node_id: int) -> None:
    nodes[node_id] = node(node_id, activated="2026-12-03T17:05:00", heard_ago=0.0)


def go_offline(nodes: dict[int, NodeInfo], node_id: int) -> None:
    del nodes[node_id]


def fall_silent(nodes: dict[int, NodeInfo], node_id: int) -> None:
    nodes[node_id] = node(node_id, heard_ago=50.0)


class WatchedGrid(InProcessGrid):
    """Pushes and pulls like a SuperLink's grid; ``events[(node, kind)]`` happens to that node's
    SuperNode when the first such request goes out (that request then gets no reply)."""

    in_process = False
    pull_interval = 0.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.nodes = {node_id: node(node_id) for node_id in self.contexts}
        self.events: dict[tuple[int, str], Event] = {}
        self.outbox: dict[str, Message] = {}

    def get_nodes(self):
        return list(self.nodes.values())

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            self.sent.append(message)
            dst, kind = message.metadata.dst_node_id, message.metadata.message_type
            if event := self.events.pop((dst, kind), None):
                event(self.nodes, dst)
            elif dst in self.nodes:
                self.outbox[message.metadata.message_id] = self.deliver(dst, message)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.outbox.pop(i) for i in list(message_ids) if i in self.outbox]


def watched_run(tmp_path: Path, event: Event, **overrides) -> tuple[WatchedGrid, dict]:
    cfg = tiny_config(**overrides)
    grid = WatchedGrid(synthetic_node_configs(cfg.data.nbi_sites + cfg.data.wli_sites), config_to_flat(cfg))
    grid.events[(WLI0, MESSAGE_TYPE["student.train"])] = event
    return grid, run_federation(grid, cfg, tmp_path / "run")


def student_requests_to(grid: WatchedGrid, node_id: int) -> int:
    return sum(m.metadata.dst_node_id == node_id and m.metadata.message_type == MESSAGE_TYPE["student.train"] for m in grid.sent)


def test_a_restarted_site_is_asked_again_and_takes_part(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fedpagkd.server"):
        grid, summary = watched_run(tmp_path, restart, fed__round_timeout=600.0)
    assert "[student] site 'wli-0': its SuperNode restarted (activated again at 2026-12-03T17:05:00)" in caplog.text
    assert "asking again (1/1, fed.resend_crashed)" in caplog.text
    assert student_requests_to(grid, WLI0) == 2
    assert summary["site_status"]["wli-0"]["student"] == "took part" and summary["status"] == "completed"


@pytest.mark.parametrize(
    "event, reason",
    [
        (go_offline, "lost: its SuperNode went offline"),
        (fall_silent, r"lost: no heartbeat from its SuperNode for 5\d s \(fed.site_lost_s = 40\)"),
        (restart, "its SuperNode restarted"),  # with fed.resend_crashed = 0: dropped, not asked again
    ],
)
def test_a_lost_site_is_dropped_by_name_and_the_round_goes_on(tmp_path, caplog, event, reason):
    with caplog.at_level(logging.WARNING, logger="fedpagkd.server"):
        grid, summary = watched_run(
            tmp_path, event, fed__round_timeout=600.0, fed__site_lost_s=40.0, fed__resend_crashed=0, fed__min_site_share=1.0
        )
    assert re.search(rf"\[student\] dropped site 'wli-0': {reason}", caplog.text), caplog.text
    assert re.match(f"dropped in student round 1: {reason}", summary["site_status"]["wli-0"]["student"])
    assert summary["student"][0]["sites"] == ["wli-1"]  # the round went on with the other site
    assert summary["status"] == "degraded" and summary["sites_lost"] == ["wli-0"] and not summary["accepted"]
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_flower_node_unavailable_is_reported_as_a_lost_site(tmp_path, caplog):
    cfg = tiny_config()
    grid = InProcessGrid(synthetic_node_configs(cfg.data.nbi_sites + cfg.data.wli_sites), config_to_flat(cfg))

    def unavailable(node_id: int, message: Message) -> Message | None:
        if message.metadata.message_type == MESSAGE_TYPE["student.train"]:
            return Message(Error(ErrorCode.NODE_UNAVAILABLE, "Error: Node Unavailable"), reply_to=message)
        return grid.deliver(node_id, message)

    grid.faults[WLI0] = unavailable
    with caplog.at_level(logging.WARNING, logger="fedpagkd.server"):
        summary = run_federation(grid, cfg, tmp_path / "run")
    assert f"[student] dropped site 'wli-0': {NODE_UNAVAILABLE}" in caplog.text
    assert summary["site_status"]["wli-0"]["student"] == f"dropped in student round 1: {NODE_UNAVAILABLE}"


# --------------------------------------------------------------------------- the operator's view


def test_the_workflow_degraded_line_is_the_one_follow_reads(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fedpagkd.server"):
        watched_run(tmp_path, go_offline, fed__resend_crashed=0)
    lines = [r.getMessage() for r in caplog.records if "DEGRADED" in r.getMessage()]
    assert len(lines) == 1 and follow.degraded(lines) == (lines[0][lines[0].index("run DEGRADED") :], False)
