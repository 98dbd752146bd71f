"""An in-process Grid: the ServerApp's protocol talks to the real ClientApp handlers directly,
with no SuperLink or Ray (as Flower tests its strategies with hand-made replies)."""

from __future__ import annotations

from typing import Callable, Iterable
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from client.app import app as client_app

# A fault hook gets (node_id, request) and returns a replacement reply, or None to drop it.
Fault = Callable[[int, Message], "Message | None"]


class InProcessGrid(Grid):
    in_process = True  # every reply is in when send_and_receive returns: no SuperNode to watch (server.channel)

    def __init__(self, node_configs: dict[int, dict], run_config: dict, faults: dict[int, Fault] | None = None):
        self.contexts = {
            node_id: Context(run_id=1, node_id=node_id, node_config=dict(cfg), state=RecordDict(), run_config=dict(run_config))
            for node_id, cfg in node_configs.items()
        }
        self.faults = faults or {}
        # Server-side Message() reads the process's task identity, which a real ServerApp process has.
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.sent: list[Message] = []
        self.received: list[Message] = []

    # The abstract plumbing the protocol does not use.
    def set_run(self, run):  # pragma: no cover
        self._run = run

    @property
    def run(self):  # pragma: no cover
        return self._run

    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def get_nodes(self):  # pragma: no cover
        return []

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def deliver(self, node_id: int, message: Message) -> Message:
        """The real ClientApp's reply (what a fault hook calls to pass a message through or to
        tamper with a genuine reply)."""
        return client_app(message, self.contexts[node_id])

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            node_id = message.metadata.dst_node_id
            # A message id as a SuperLink (and Flower's InMemoryGrid) gives one: replies are
            # matched to their request by it, so a reply to another round's request is not taken.
            if not message.metadata.message_id:
                message.metadata.__dict__["_message_id"] = str(uuid4())
            self.sent.append(message)
            if node_id in self.faults:
                reply = self.faults[node_id](node_id, message)
            else:
                reply = self.deliver(node_id, message)
            if reply is not None:
                self.received.append(reply)
                replies.append(reply)
        return replies


def synthetic_node_configs(num_sites: int) -> dict[int, dict]:
    """Simulation-style node configs: node ids 101.. with partition ids 0.."""
    return {101 + i: {"partition-id": i, "num-partitions": num_sites} for i in range(num_sites)}
