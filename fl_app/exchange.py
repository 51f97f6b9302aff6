"""Sending a round's messages and gathering the replies: pull cadence, message lifetime and
the bytes that cross the network. The server loop and secure aggregation's stages both use it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

# Flower's deployment grid sleeps 3 s between pulls for replies (its simulation grid 0.1 s):
# up to 3 s added to every deployed round, 1.5 s on average, for nothing. A deployed pull is a
# call to the SuperLink; the simulation's grid reads the replies from memory in its own
# process, so it is asked far more often: the round then ends within milliseconds of its last
# reply instead of 50 ms later on average, a tenth of a 2NN round.
PULL_INTERVAL = 0.1
PULL_INTERVAL_IN_MEMORY = 0.005


def is_flower_simulation(grid: Grid) -> bool:
    """Whether `grid` is Flower's simulation grid (replies in memory, nodes simulated)."""
    return isinstance(grid, InMemoryGrid)


def _pull_interval(grid: Grid) -> float:
    return PULL_INTERVAL_IN_MEMORY if is_flower_simulation(grid) else PULL_INTERVAL


def exchange(grid: Grid, messages: list[Message], timeout: float | None) -> list[Message]:
    """Send `messages` and return the replies that came within `timeout` seconds: Flower's
    `send_and_receive`, pulling every PULL_INTERVAL s. Grids that are not Flower's (the
    in-process one, tests' fakes) do their own `send_and_receive`."""
    if not isinstance(grid, Grid):
        return list(grid.send_and_receive(messages, timeout=timeout))
    waiting = {msg_id for msg_id in grid.push_messages(messages) if msg_id}  # "": not sent
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    interval = _pull_interval(grid)
    while waiting:
        pulled = list(grid.pull_messages(waiting))
        replies += pulled
        waiting -= {reply.metadata.reply_to_message_id for reply in pulled}
        if not waiting or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(interval)
    return replies


def expire_with_round(messages: Iterable[Message], round_timeout: float) -> list[Message]:
    """Give each message the round's lifetime instead of Flower's default 12 hours.

    A SuperNode that was away would otherwise work through a backlog of stale rounds after it
    rejoins and answer every current round too late.
    """
    messages = list(messages)
    for message in messages:
        message.metadata.ttl = float(round_timeout)
    return messages


def payload_bytes(messages: Iterable[Message]) -> int:
    """Bytes of the records the messages carry (what crosses the network, before framing)."""
    return sum(record.count_bytes() for m in messages if m.has_content()
               for record in m.content.values())
