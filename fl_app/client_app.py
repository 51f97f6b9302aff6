"""The ClientApp Flower runs: it answers train and evaluate messages with `fl_app.client_core`.

The process that runs it decides how long its clients live:
- a simulation actor (Ray), an in-process grid, or a deployed SuperNode's `fl-app-executor`
  (`fl_app.deploy.executor`) serves many messages: the clients it builds stay cached in the process;
- a SuperNode without the executor (Flower's own `flower-superexec`) starts a fresh
  `flwr-clientapp` process for every message, which imports torch and builds its client each
  time (the plain Flower path: it works, a few seconds slower per round).

This module imports no torch: Flower's simulation loads it before it starts Ray.
"""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fl_app.secagg.protocol import ACTION

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return Message(content=_run("train", msg.content, context), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return Message(content=_run("evaluate", msg.content, context), reply_to=msg)


@app.train(ACTION)
def train_secagg(msg: Message, context: Context) -> Message:
    """A stage of secure aggregation (fl_app.secagg): crypto here, training through `_run`."""
    from fl_app.secagg.client import answer

    return Message(content=answer(msg.content, context,
                                  lambda content: _run("train", content, context)),
                   reply_to=msg)


def _run(kind: str, content: RecordDict, context: Context) -> RecordDict:
    from fl_app.client_core import handle  # torch: only in a process that trains

    return handle(kind, content, context)
