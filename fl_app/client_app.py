"""The ClientApp Flower runs: it answers train and evaluate messages with `fl_app.client_core`.

Where the work runs depends on the process Flower gave the message to:
- a simulation actor (Ray) or an in-process grid serves many messages: the work runs here, and
  the clients it builds stay cached in the process;
- a deployed SuperNode starts a fresh `flwr-clientapp` process for every message (Flower 1.41,
  every isolation mode), which would import torch, rebuild the client and warm torch up each
  time. There the message is handed to the SuperNode's persistent worker process
  (`fl_app.client_worker`), started on first use. Start a SuperNode with
  `--node-config "client-worker=false"` to train in the fresh process instead.

This module imports no torch, so a fresh process that hands its message on stays light.
"""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fl_app import worker_link

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return Message(content=_run("train", msg.content, context), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return Message(content=_run("evaluate", msg.content, context), reply_to=msg)


def _run(kind: str, content: RecordDict, context: Context) -> RecordDict:
    if worker_link.wanted(context):
        return worker_link.call(kind, content, context)
    from fl_app.client_core import handle  # torch: only in a process that trains

    return handle(kind, content, context)
