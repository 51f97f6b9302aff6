"""Fakes for strategy tests: a grid that lists node ids, and client replies built by hand."""

from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity


def set_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give this process the identity a ServerApp has; Flower refuses to build Messages without."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class FakeGrid:
    """Just enough of flwr's Grid for sampling: the connected node ids, changeable over time."""

    def __init__(self, node_ids: list[int], later: list[list[int]] | None = None) -> None:
        self.node_ids = list(node_ids)
        self.later = list(later or [])  # what successive polls return after the first
        self.polls = 0

    def get_node_ids(self) -> list[int]:
        self.polls += 1
        if self.later and self.polls > 1:
            self.node_ids = self.later.pop(0)
        return list(self.node_ids)


class SimulatedGrid(FakeGrid):
    """A grid whose nodes answer at once: `client(node_id, instruction)` gives reply content."""

    def __init__(self, node_ids: list[int], client) -> None:
        super().__init__(node_ids)
        self.client = client
        self.sent: list[list[int]] = []  # node ids messaged, per send_and_receive call

    def send_and_receive(self, messages, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        self.sent.append([m.metadata.dst_node_id for m in messages])
        return [Message(content=self.client(m.metadata.dst_node_id, m), reply_to=m)
                for m in messages]


def serve(clients: list) -> Callable[[int, Message], RecordDict]:
    """A SimulatedGrid client: node i answers with clients[i].fit (fl_app TorchClients)."""
    def reply(node_id: int, msg: Message) -> RecordDict:
        client = clients[node_id]
        params = [msg.content["arrays"][k].numpy() for k in client.keys]
        arrays, n, metrics = client.fit(params, dict(msg.content["config"]))
        return RecordDict({"arrays": record(dict(zip(client.keys, arrays, strict=True))),
                           "metrics": MetricRecord({**metrics, "num-examples": n})})
    return reply


def record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def unpack(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in arrays.items()}


def instruction(node_id: int, message_type: str = MessageType.TRAIN) -> Message:
    return Message(
        content=RecordDict({"config": ConfigRecord()}),
        dst_node_id=node_id,
        message_type=message_type,
    )


def reply(node_id: int, content: RecordDict) -> Message:
    """A reply as it arrives from node `node_id` (its src_node_id is that node)."""
    return Message(content=content, reply_to=instruction(node_id))


def train_reply(
    node_id: int, arrays: dict[str, np.ndarray], num_examples: float, **metrics: float
) -> Message:
    """A well-formed train reply: arrays plus metrics with num-examples."""
    return reply(
        node_id,
        RecordDict({
            "arrays": record(arrays),
            "metrics": MetricRecord({"num-examples": num_examples, **metrics}),
        }),
    )


def error_reply(node_id: int, reason: str) -> Message:
    return Message(Error(code=0, reason=reason), reply_to=instruction(node_id))


def eval_reply(node_id: int, num_examples: int, **metrics: float) -> Message:
    return Message(
        content=RecordDict({"metrics": MetricRecord({"num-examples": num_examples, **metrics})}),
        reply_to=instruction(node_id, MessageType.EVALUATE),
    )
