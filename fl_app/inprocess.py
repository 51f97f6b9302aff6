"""The ServerApp's round loop with the real ClientApp in one process: no SuperLink, no Ray.

`fl-app engine=inprocess` runs simulations here; so do experiments that run hundreds of rounds
(scripts/mcmahan_table2.py), benchmarks and tests. Every message still goes through
`client_app.app` (the same handlers, Contexts and caches a SuperNode uses), a ClientApp that
raises becomes an error reply as in Flower's simulation, and the server side is
`server_loop.run` unchanged, so a result here is a result of the app; only the transport is
left out. Clients train one after another, with the threads the ClientApp picks for them. Use
`flwr run` for anything that needs Flower's isolation, parallel actors, a Ray cluster or a
network.
"""

from __future__ import annotations

import shlex
import traceback
from collections.abc import Iterable, Sequence
from logging import ERROR

from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.supercore.task_identity import TaskIdentity

from fl_app import client_core
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

    def partition_ids(self) -> dict[int, int]:
        """node id -> the partition that node trains on (what Flower's engine keeps to itself)."""
        return {node_id: int(context.node_config["partition-id"])
                for node_id, context in self.contexts.items()}

    def send_and_receive(self, messages: Iterable[Message],
                         timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            node_id = message.metadata.dst_node_id
            if node_id not in self.silent:
                replies.append(_answer(message, self.contexts[node_id]))
        return replies


def _answer(message: Message, context: Context) -> Message:
    try:
        return client_app(message, context)
    except Exception as err:  # noqa: BLE001 - a failing client is a reply, as in Flower
        # Flower's simulation logs the traceback and replies with an error Message; the server
        # loop then drops that client from the round (or stops if every client failed).
        log(ERROR, "ClientApp on node %d failed:\n%s", message.metadata.dst_node_id,
            traceback.format_exc())
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                             reason=f"{type(err).__name__}: {err}"), reply_to=message)


def run(overrides: Sequence[str] = (), num_clients: int | None = None,
        run_config: dict | None = None) -> dict:
    """Compose `overrides`, run every round in this process, return the run's summary.

    `num_clients` defaults to the config's own (which must then be set). `run_config` is saved
    with the outputs, for `fl-app resume=`.
    """
    cfg = compose([*overrides, *([f"num_clients={num_clients}"] if num_clients else [])])
    if cfg.num_clients is None:
        raise ValueError("An in-process run needs num_clients: pass num_clients=N.")
    overrides = [*overrides, f"num_clients={cfg.num_clients}"]
    cfg = compose(overrides)
    # Clients are cached by run and config; a sweep's jobs in one process must each start
    # from fresh clients, as separate `flwr run`s would.
    client_core.clear_client_cache()
    return run_rounds(InProcessGrid(overrides, num_supernodes(cfg)), cfg, run_config=run_config)


def _set_identity() -> None:
    # Flower stamps every Message with the running task's identity, which a ServerApp or
    # ClientApp process is given by its SuperLink/SuperNode; here this process is both.
    TaskIdentity.run_id = _RUN_ID
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1
