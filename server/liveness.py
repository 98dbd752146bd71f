"""Sites that are lost while the server waits for them: a SuperNode that stopped or crashed, or one
that restarted and so lost the request it held.

Flower 1.41 already answers a message whose SuperNode missed its heartbeats with ``Node
Unavailable``, but only while the node stays offline: a SuperNode restarted by its service manager
is back online within a minute, under the same node id, without the message its dead instance had
pulled, and the server would wait for that reply until ``fed.round_timeout``. The SuperLink's node
record says both (``online_until`` from the last heartbeat, ``last_activated_at`` from the last
start), so the server reads it (``Grid.get_nodes``) every time it polls for replies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from flwr.app import Message
from flwr.common.constant import HEARTBEAT_MAX_INTERVAL, HEARTBEAT_PATIENCE
from flwr.serverapp import Grid

POLL_S = 3.0  # what Flower's own send_and_receive waits between two pulls
# Seconds between two reads of the node records: each read also writes (the SuperLink tags
# offline nodes first), and SQLite has one writer at a time, shared with every heartbeat and pull.
WATCH_EVERY_S = 10.0


@dataclass(frozen=True)
class Loss:
    """Why a site will not answer a request: ``restarted`` (asked again) or lost (dropped)."""

    reason: str
    restarted: bool


def last_heartbeat(node: Any) -> float | None:
    """When the SuperLink last heard from ``node`` (a Flower ``NodeInfo``), as a Unix time; None
    for a node without heartbeats (a simulated one: Flower sets an infinite interval)."""
    if not 0 < node.heartbeat_interval <= HEARTBEAT_MAX_INTERVAL:
        return None
    return node.online_until - HEARTBEAT_PATIENCE * node.heartbeat_interval


def site_loss(before: Any | None, now: Any | None, at: float, lost_after: float) -> Loss | None:
    """Whether the site whose node was ``before`` when its request went out (``NodeInfo`` or None)
    and is ``now`` (None: not online) will ever answer it; ``at``: the current Unix time."""
    if now is None:
        return Loss("lost: its SuperNode went offline (stopped, or its heartbeats stopped)", restarted=False)
    if before is not None and now.last_activated_at != before.last_activated_at:
        return Loss(
            f"its SuperNode restarted (activated again at {now.last_activated_at}): the request died with the old one",
            restarted=True,
        )
    heard = last_heartbeat(now)
    if heard is not None and at - heard > lost_after:
        return Loss(f"lost: no heartbeat from its SuperNode for {at - heard:.0f} s (fed.site_lost_s = {lost_after:.0f})", False)
    return None


def send_and_watch(
    grid: Grid, messages: list[Message], timeout: float, lost_after: float
) -> tuple[list[Message], dict[int, Loss]]:
    """Flower's ``Grid.send_and_receive`` that also stops waiting for a site lost meanwhile
    -> (the replies, the :class:`Loss` of each site given up on)."""
    before = {node.node_id: node for node in grid.get_nodes()}
    # Flower marks a message it could not push with None: no reply will come for it.
    pushed = zip(grid.push_messages(messages), (m.metadata.dst_node_id for m in messages))
    pending = {message_id: node_id for message_id, node_id in pushed if message_id}
    replies: list[Message] = []
    losses: dict[int, Loss] = {}
    end = time.time() + timeout
    next_watch = time.time() + WATCH_EVERY_S
    while pending:
        got = list(grid.pull_messages(set(pending)))
        replies += got
        for reply in got:
            pending.pop(reply.metadata.reply_to_message_id, None)
        if not pending or time.time() >= end:
            break
        if time.time() >= next_watch:
            next_watch = time.time() + WATCH_EVERY_S
            online = {node.node_id: node for node in grid.get_nodes()}
            for message_id, node_id in list(pending.items()):
                if loss := site_loss(before.get(node_id), online.get(node_id), time.time(), lost_after):
                    losses[node_id] = loss
                    del pending[message_id]
        if pending:
            time.sleep(min(getattr(grid, "pull_interval", POLL_S), max(0.0, end - time.time())))
    return replies, losses
