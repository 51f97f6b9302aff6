"""FedNova (Wang, Liu, Liang, Joshi, Poor 2020, "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization"): normalized averaging by the clients' local steps."""

import numpy as np
from flwr.app import MetricRecord

from fl_app.messages import DELTA, NUM_STEPS
from fl_app.strategies.aggregation import MetricAverager
from fl_app.strategies.fedavg import WeightedFedAvg


class FedNova(WeightedFedAvg):
    """Normalized averaging: W <- W + tau_eff · Σ_i p_i Delta_i / tau_i.

    Clients reply with their delta Delta_i = W_i - W (`mode = DELTA`) and the local SGD steps
    they took, tau_i (`num-steps`); p_i = n_i / Σ_j n_j and tau_eff = Σ_i p_i tau_i. FedAvg
    weighs a client that took more steps more (its delta is longer), so on heterogeneous
    clients it optimizes a mixture skewed towards them; dividing each delta by its tau_i
    removes that skew. fl_app's clients run plain SGD (no momentum, no proximal term), for
    which the paper's normalization vector a_i has ||a_i||_1 = tau_i.

    A reply without a positive `num-steps` is dropped with the reason (`required_metrics`).
    FedNova needs each client's own step count, so secure aggregation cannot serve it.

    Under central DP (fl_app.privacy.central.DPNoise wrapping it) every clipped update counts
    once, whatever its steps or examples: DP-FedNova then is DP-FedAvg on deltas.
    """

    mode = DELTA
    needs_each_update = ("FedNova divides each client's update by that client's own local "
                         "step count (num-steps)")
    required_metrics = (NUM_STEPS,)

    def reply_weight(self, num_examples: float, metrics: MetricRecord) -> float:
        """n_i / tau_i: the weighted mean of the deltas is then Σ p_i Delta_i / tau_i up to one
        factor per round (see `global_from_mean_reply`)."""
        return num_examples / float(metrics[NUM_STEPS])

    def global_from_mean_reply(self, mean_reply: dict[str, np.ndarray],
                               averager: MetricAverager) -> dict[str, np.ndarray]:
        """W + tau_eff · Σ p_i Delta_i / tau_i from the mean m = Σ w_i Delta_i / Σ w_i with
        w_i = n_i / tau_i: Σ p_i Delta_i / tau_i = m · Σ w_i / Σ n_i, and tau_eff is the
        example-weighted mean of the steps."""
        scale = averager.mean(NUM_STEPS) * averager.total_weight / averager.num_examples
        for array in mean_reply.values():
            array *= scale
        return self.apply_update(mean_reply)
