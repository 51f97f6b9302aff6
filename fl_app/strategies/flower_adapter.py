"""Flower's built-in strategies (FedProx, FedAdam, Krum, ...) made fit for fl_app: the train
replies they are handed are screened, and their state is checkpointed as arrays.

Flower's strategies average whatever they are given: NaN, a lying Array header, a count of
1e12; and one reply whose metric names differ from the others' makes their aggregate_train
raise (InconsistentMessageReplies), ending the run. The server loop hands them only replies
fl_app's own strategies would accept (`check_reply`), each with its num-examples bounded and
its content reduced to what every reply has in common.
"""

from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp.strategy import FedAvgM, QFedAvg

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


# What Flower's built-in strategies carry from one round to the next: the FedOpt family
# (FedAdam, FedYogi, FedAdagrad) its moments and the model it sent, FedAvgM its momentum and
# the current model (an ArrayRecord), QFedAvg the model it sent. FedAvg, FedProx, FedMedian,
# FedTrimmedAvg, Krum and Bulyan carry nothing: a fresh one from the config is the same.
FLOWER_STATE = ("m_t", "v_t", "current_arrays", "momentum_vector")
# The strategies whose current_arrays is an ArrayRecord (the FedOpt family's is a dict).
KEEP_RECORDS = (FedAvgM, QFedAvg)


def state_of(strategy: object) -> dict:
    """What a checkpoint must keep of `strategy` (its own `state_dict()` where it has one):
    nested dicts and lists of JSON values and numpy arrays."""
    if hasattr(strategy, "state_dict"):
        return strategy.state_dict()
    state = {}
    for name in FLOWER_STATE:
        if hasattr(strategy, name):
            state[name] = _plain(getattr(strategy, name))
    return state


def load_state(strategy: object, state: dict) -> None:
    """Restore into a freshly built `strategy` what `state_of` returned for it."""
    if hasattr(strategy, "load_state_dict"):
        strategy.load_state_dict(state)
        return
    unknown = sorted(set(state) - {n for n in FLOWER_STATE if hasattr(strategy, n)})
    if unknown:
        raise ValueError(f"{type(strategy).__name__} has no state {unknown}: the checkpoint "
                         "was written by another strategy")
    for name, value in state.items():
        if name == "current_arrays" and value is not None and isinstance(strategy, KEEP_RECORDS):
            value = ArrayRecord({k: Array(np.asarray(v)) for k, v in value.items()})
        elif isinstance(value, dict):
            value = {k: np.array(v) for k, v in value.items()}
        elif isinstance(value, list):
            value = [np.array(v) for v in value]
        setattr(strategy, name, value)


def _plain(value: object) -> object:
    """An ArrayRecord, dict or list of arrays as numpy copies (None stays None)."""
    if isinstance(value, ArrayRecord):
        return {k: np.array(v.numpy()) for k, v in value.items()}
    if isinstance(value, dict):
        return {k: np.array(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [np.array(v) for v in value]
    return value
