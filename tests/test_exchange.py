"""The ServerApp's send-and-receive over a Flower Grid: pulls every PULL_INTERVAL, not 3 s, and
the simulation's in-memory grid every PULL_INTERVAL_IN_MEMORY."""

import time

import pytest
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid
from strategy_helpers import set_task_identity

from fl_app.exchange import PULL_INTERVAL, PULL_INTERVAL_IN_MEMORY, _pull_interval, exchange


class SlowGrid(Grid):
    """Node n's reply is there from `n` pulls on; nodes in `silent` never reply."""

    def __init__(self, silent=()) -> None:
        self.silent, self.pulls, self.sent = set(silent), 0, {}

    def push_messages(self, messages):
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as a SuperLink assigns it
            self.sent[msg.object_id] = msg
        return list(self.sent)

    def pull_messages(self, message_ids):
        self.pulls += 1
        ready = [self.sent[i] for i in message_ids]
        return [Message(RecordDict(), reply_to=msg) for msg in ready
                if msg.metadata.dst_node_id not in self.silent
                and msg.metadata.dst_node_id <= self.pulls]

    def send_and_receive(self, messages, timeout=None):
        raise AssertionError("exchange must push and pull itself")

    run = set_run = create_message = get_node_ids = send_and_receive


def instructions(nodes) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]


@pytest.fixture(autouse=True)
def _identity(monkeypatch):
    set_task_identity(monkeypatch)


def test_every_reply_is_collected_once_and_pulling_stops_when_all_are_in() -> None:
    grid = SlowGrid()
    started = time.monotonic()
    replies = exchange(grid, instructions([1, 2, 3]), timeout=60)
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2, 3]
    assert grid.pulls == 3
    assert time.monotonic() - started < 3  # Flower's own loop would have slept 2 x 3 s


def test_a_silent_node_costs_the_timeout_and_the_others_replies_are_kept() -> None:
    grid = SlowGrid(silent={2})
    started = time.monotonic()
    replies = exchange(grid, instructions([1, 2]), timeout=10 * PULL_INTERVAL)
    assert [r.metadata.src_node_id for r in replies] == [1]
    assert 10 * PULL_INTERVAL <= time.monotonic() - started < 10 * PULL_INTERVAL + 2


def test_the_simulations_in_memory_grid_is_pulled_far_more_often() -> None:
    # The interval is picked by the class of Flower's simulation grid: a Flower upgrade that
    # moves it must fail here, not silently slow every simulated round down.
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    assert _pull_interval(InMemoryGrid.__new__(InMemoryGrid)) == PULL_INTERVAL_IN_MEMORY
    assert _pull_interval(SlowGrid()) == PULL_INTERVAL

    class InMemorySlowGrid(SlowGrid, InMemoryGrid):  # SlowGrid's methods, Flower's class
        pass

    deployed, in_memory = SlowGrid(silent={2}), InMemorySlowGrid(silent={2})
    for grid in (deployed, in_memory):
        exchange(grid, instructions([1, 2]), timeout=4 * PULL_INTERVAL)
    assert deployed.pulls <= 6
    assert in_memory.pulls >= 4 * deployed.pulls
