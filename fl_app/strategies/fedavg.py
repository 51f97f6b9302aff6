"""FedAvg (McMahan et al. 2017): the new global model is the example-weighted mean of the clients'
locally trained weights."""

import numpy as np

from fl_app.strategies.base import SampledStrategy


class WeightedFedAvg(SampledStrategy):
    """Federated Averaging: W <- sum_i n_i W_i / sum_i n_i over the usable replies.

    Clients train locally and reply with their new weights (`mode = "weights"`). The mean is
    taken directly over the replied weights (no per-client delta is materialised); the update a
    DP wrapper clips is the client's delta `W_i - W`.
    """

    mode = "weights"
    weighted = True

    def update_offset(self) -> dict[str, np.ndarray]:
        """The global model: a client's update is its delta W_i - W (what DP-FedAvg clips)."""
        return self._require_current()

    def apply_update(self, mean_update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """W + mean delta, in the mean's own arrays."""
        for key, weights in self._require_current().items():
            mean_update[key] += weights
        return self.commit(mean_update)

    def global_from_mean_reply(self, mean_reply: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The mean of the replied weights already is the new model."""
        return self.commit(mean_reply)
