"""Train replies screened for Flower's built-in strategies (FedProx, FedAdam, Krum, ...).

Flower's strategies average whatever they are given: NaN, a lying Array header, a count of
1e12; and one reply whose metric names differ from the others' makes their aggregate_train
raise (InconsistentMessageReplies), ending the run. The server loop hands them only replies
fl_app's own strategies would accept (`check_reply`), each with its num-examples bounded and
its content reduced to what every reply has in common.
"""

from logging import WARNING

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict
from flwr.common.logger import log

from fl_app.messages import NUM_EXAMPLES
from fl_app.strategies.replies import BadReply, ExampleCap, check_reply


def usable_replies(rnd: int, replies: list[Message], weights: dict[str, np.ndarray],
                   cap: ExampleCap | None = None) -> list[Message]:
    """The replies fl_app's own strategies would accept, each num-examples bounded by `cap`;
    the others are logged and dropped. Each kept reply is left holding its 'arrays' and the
    scalar metrics every kept reply has, which is what Flower requires of them all."""
    usable = []
    for reply in replies:
        node_id = reply.metadata.src_node_id
        try:
            _, claimed, metrics = check_reply(reply, weights)
        except Exception as err:  # noqa: BLE001 - a malformed reply must not end the run
            reason = err if isinstance(err, BadReply) else f"unreadable reply ({err!r})"
            log(WARNING, "[round %d] dropping reply from node %d: %s", rnd, node_id, reason)
            continue
        counted = claimed if cap is None else cap.bound(rnd, node_id, claimed)
        usable.append((reply, int(counted) if counted.is_integer() else counted, metrics))
    common = set.intersection(*({k for k, v in metrics.items() if not isinstance(v, list)}
                                for _, _, metrics in usable)) if usable else set()
    left_out = sorted({k for _, _, metrics in usable for k in metrics} - common)
    if left_out:
        log(WARNING, "[round %d] metric(s) %s left out of the round's mean: not a number in "
            "every reply.", rnd, left_out)
    for reply, counted, metrics in usable:
        kept = {k: metrics[k] for k in common} | {NUM_EXAMPLES: counted}
        reply.content = RecordDict({"arrays": reply.content["arrays"],
                                    "metrics": MetricRecord(kept)})
    return [reply for reply, _, _ in usable]
