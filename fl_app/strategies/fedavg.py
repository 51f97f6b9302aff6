"""FedAvg (McMahan et al. 2017): the new global model is the example-weighted mean of the clients'
locally trained weights."""

import numpy as np

from fl_app.messages import DELTA, WEIGHTS
from fl_app.strategies.aggregation import MetricAverager
from fl_app.strategies.base import SampledStrategy


class WeightedFedAvg(SampledStrategy):
    """Federated Averaging: W <- sum_i n_i W_i / sum_i n_i over the usable replies.

    By default clients reply with their new weights (`mode = WEIGHTS`) and the mean is taken
    directly over them. `reply_with_updates()` makes them reply with W_i - W instead
    (`mode = DELTA`; the same model follows, W + the mean delta). DP-FedAvg asks for deltas:
    the delta is what it clips, and a client forms its own in one pass over a model it already
    holds, where the server would form every client's, one after another, in a round's
    critical path.
    """

    mode = WEIGHTS
    weighted = True

    def reply_with_updates(self) -> None:
        """From the next round on, clients send their delta W_i - W rather than W_i."""
        self.mode = DELTA

    def update_offset(self) -> dict[str, np.ndarray] | None:
        """What a reply is measured from: the global model when clients send weights (the
        update is W_i - W), nothing when they send the delta itself."""
        return self._require_current() if self.mode == WEIGHTS else None

    def update_step(self) -> float:
        """1: the new model is W + the mean delta."""
        return 1.0

    def apply_update(self, mean_update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """W + mean delta, in the mean's own arrays."""
        for key, weights in self._require_current().items():
            mean_update[key] += weights
        return self.commit(mean_update)

    def global_from_mean_reply(self, mean_reply: dict[str, np.ndarray],
                               averager: MetricAverager) -> dict[str, np.ndarray]:
        """The mean of the replied weights already is the new model; a mean delta is added."""
        if self.mode == DELTA:
            return self.apply_update(mean_reply)
        return self.commit(mean_reply)
