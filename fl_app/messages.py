"""The contract between the server and its clients: what a message asks for and what a reply holds.

Both sides import these names; none of these strings is written anywhere else.

A train message carries the global model (`ARRAYS`) and a config (`CONFIG`) with:
- `SERVER_ROUND`: the round number (clients seed their batch order with it);
- `REPLY`: what the client sends back, one of `REPLY_KINDS`: its new weights (`WEIGHTS`), their
  difference from the weights it was sent (`DELTA`, what DP clips), or the gradient of its loss
  at the weights it was sent (`GRADIENT`, FedSGD);
- `BATCH_SIZE`: with `GRADIENT`, the gradient's batch (0: the whole local set);
- `PROXIMAL_MU`: FedProx's mu (Flower's FedProx names it), the weight of mu/2·||w - w_sent||²;
- `CLIENT_ID`: with a client pool, which client of the population the node serves.
A reply carries `ARRAYS` (train only) and `METRICS`, with `NUM_EXAMPLES` and, for train,
`NUM_STEPS` (the local optimizer steps taken: FedNova normalizes by it) and either `TRAIN_LOSS`
or, with client-side DP, the client's privacy metrics (`CLIENT_EPSILONS`).
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

# Record names of a message's content.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# Config keys of a train or evaluate message.
SERVER_ROUND = "server-round"
REPLY = "mode"
BATCH_SIZE = "batch-size"
PROXIMAL_MU = "proximal-mu"
CLIENT_ID = "client-id"

# What a train reply holds (the value of REPLY).
WEIGHTS = "weights"
DELTA = "delta"
GRADIENT = "gradient"
REPLY_KINDS = (WEIGHTS, DELTA, GRADIENT)

# Reply metrics.
NUM_EXAMPLES = "num-examples"
NUM_STEPS = "num-steps"
TRAIN_LOSS = "train_loss"
# Client-side privacy: each client reports its own epsilon, which only grows. A mean over a
# round's clients hides the worst one, so the server records the largest seen as <key>_max.
# `<kind>_epsilon` is the tighter of the RDP and PLD accountants', both reported beside it.
CLIENT_EPSILONS = ("local_epsilon", "dpsgd_epsilon", "local_epsilon_rdp", "local_epsilon_pld",
                   "dpsgd_epsilon_rdp", "dpsgd_epsilon_pld")


@dataclass(frozen=True)
class TrainRequest:
    """What a train message's config asks of a client, read in one place."""

    server_round: int = 0
    reply: str = WEIGHTS
    batch_size: int | None = None  # GRADIENT only; None: the client's own setting
    proximal_mu: float = 0.0
    client_id: int | None = None

    @classmethod
    def from_config(cls, config: dict) -> TrainRequest:
        """Read a message's config; ValueError naming the key when a value is not understood."""
        reply = str(config.get(REPLY, WEIGHTS))
        if reply not in REPLY_KINDS:
            raise ValueError(f"The server asks for a '{reply}' reply ({REPLY}); this client "
                             f"sends one of {REPLY_KINDS}: server and clients run different "
                             "fl_app versions.")
        batch = config.get(BATCH_SIZE)
        client_id = config.get(CLIENT_ID)
        return cls(server_round=int(config.get(SERVER_ROUND, 0)), reply=reply,
                   batch_size=None if batch is None else int(batch),
                   proximal_mu=float(config.get(PROXIMAL_MU, 0.0)),
                   client_id=None if client_id is None else int(client_id))


def round_messages(message_type: str, server_round: int, arrays: ArrayRecord,
                   config: ConfigRecord, targets: list[tuple[int, int | None]],
                   extra: dict | None = None) -> list[Message]:
    """One message per (node id, client id) target, carrying the arrays and a copy of the config
    (never the caller's, which is reused every round) with the round and `extra` added. Without
    client ids every message shares one content; a pool node's message also says which client
    it serves (CLIENT_ID)."""
    sent = {**dict(config), **(extra or {}), SERVER_ROUND: server_round}
    shared = RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord(sent)})

    def content(client_id: int | None) -> RecordDict:
        if client_id is None:
            return shared
        return RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord({**sent, CLIENT_ID: client_id})})

    return [Message(content=content(client_id), dst_node_id=node_id, message_type=message_type)
            for node_id, client_id in targets]
