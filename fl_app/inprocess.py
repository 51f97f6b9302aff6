"""The ServerApp's round loop with the real ClientApp in one process: no SuperLink, no Ray.

For experiments that run hundreds of rounds (scripts/mcmahan_table2.py), for benchmarks and for
tests. Every message still goes through `client_app.app` (the same handlers, Contexts and
caches a SuperNode uses), and the server side is `server_loop.run` unchanged, so a result here is
a result of the app; only the transport is left out. Use `flwr run` for anything that needs
Flower's isolation, scheduling or a network.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Sequence

from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fl_app.client_app import app as client_app
from fl_app.config import compose, num_supernodes
from fl_app.server_loop import run as run_rounds

_RUN_ID = 1


class InProcessGrid:
    """A Flower `Grid` whose nodes 0..num_nodes-1 are partitions served in this process (with a
    client pool: nodes that serve whichever client each message names).

    Each node keeps its own `Context` (and so its client-side state, e.g. DP-SGD accounting)
    for the life of the grid. `silent` nodes never answer, like SuperNodes that died.
    """

    def __init__(self, overrides: Sequence[str], num_nodes: int,
                 silent: Iterable[int] = ()) -> None:
        _set_identity()
        run_config = {"overrides": shlex.join(overrides)}
        self.contexts = {
            node_id: Context(run_id=_RUN_ID, node_id=node_id, state=RecordDict(),
                             run_config=run_config,
                             node_config={"partition-id": node_id,
                                          "num-partitions": num_nodes})
            for node_id in range(num_nodes)
        }
        self.silent = set(silent)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message],
                         timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            node_id = message.metadata.dst_node_id
            if node_id not in self.silent:
                replies.append(client_app(message, self.contexts[node_id]))
        return replies


def run(overrides: Sequence[str] = (), num_clients: int | None = None) -> dict:
    """Compose `overrides`, run every round in this process, return the run's summary.

    `num_clients` defaults to the config's own (which must then be set).
    """
    cfg = compose([*overrides, *([f"num_clients={num_clients}"] if num_clients else [])])
    if cfg.num_clients is None:
        raise ValueError("An in-process run needs num_clients: pass num_clients=N.")
    overrides = [*overrides, f"num_clients={cfg.num_clients}"]
    cfg = compose(overrides)
    return run_rounds(InProcessGrid(overrides, num_supernodes(cfg)), cfg)


def _set_identity() -> None:
    # Flower stamps every Message with the running task's identity, which a ServerApp or
    # ClientApp process is given by its SuperLink/SuperNode; here this process is both.
    TaskIdentity.run_id = _RUN_ID
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1
