"""DP-FedAvg's clipping: every update brought within L2 norm C, then added to the round's sum.

Fixed clipping keeps C; adaptive clipping (adaptive_clipping.py) moves it after each round.
"""

import math
from collections.abc import Iterable

import numpy as np
from flwr.app import Message

from fl_app.strategies.aggregation import MetricAverager, update_and_squared_norm
from fl_app.strategies.base import SampledStrategy


def clip_scale(norm: float, clip_norm: float) -> float:
    """min(1, C / ||u||): the factor that brings an update of L2 norm `norm` within C."""
    return 1.0 if norm <= clip_norm else clip_norm / norm


def add_clipped_updates(inner: SampledStrategy, server_round: int, replies: Iterable[Message],
                        total: dict[str, np.ndarray], weight: float, clip: float,
                        averager: MetricAverager) -> int:
    """Add weight · (each usable reply's update clipped to norm `clip`) to `total`, in place;
    return how many updates were clipped. The clients' metrics go into `averager`.

    Each update's norm is taken in one pass, chunk by chunk; then weight·s_i times it is added
    to the sum while it is still in cache. Replies of weights (a strategy resumed from an older
    checkpoint) are first turned into updates in one reused scratch buffer. Memory: the sum
    (and the scratch), whatever the number of replies.
    """
    offset = inner.update_offset()  # update = reply - offset
    scratch = {} if offset is None else {k: np.empty_like(v) for k, v in inner.current.items()}
    num_clipped = 0
    for msg, arrays, num_examples, metrics in inner.screen(
            server_round, replies, check_values=False):
        try:
            update, squared = update_and_squared_norm(arrays, offset, scratch)
        except Exception as exc:  # noqa: BLE001 - one reply must not end the run
            inner.drop(server_round, msg, f"its update cannot be formed ({type(exc).__name__}:"
                       f" {exc})")
            continue
        if not math.isfinite(squared):  # NaN or Inf in the reply: it cannot be clipped
            inner.drop(server_round, msg, "its update contains NaN or Inf")
            continue
        scale = clip_scale(math.sqrt(squared), clip)
        if inner.fold(server_round, msg, total, scale * weight, update):
            num_clipped += int(scale < 1.0)
            averager.add(num_examples, metrics)
    return num_clipped
