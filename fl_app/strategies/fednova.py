"""FedNova (Wang, Liu, Liang, Joshi, Poor 2020, "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization"): normalized averaging by the clients' local steps."""

import math
from collections.abc import Iterable, Iterator

import numpy as np
from flwr.app import Message, MetricRecord

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

    tau_i is the client's word, like n_i, and it scales the whole step: a claim of 1e-9 steps
    would blow up the client's own delta, one of 1e12 every other client's (through tau_eff).
    So a reply is dropped, with the reason, unless 1 <= tau_i, and, when `local_epochs` is
    given, tau_i <= local_epochs · ceil(n_i / batch_size), the steps its (bounded) example
    count allows (batch_size None: one step per epoch). A liar then moves the model at most as
    far as an honest client with that many examples could.

    FedNova needs each client's own step count, so secure aggregation cannot serve it. Under
    central DP (fl_app.privacy.central.DPNoise wrapping it) every clipped update counts once,
    whatever its steps or examples: DP-FedNova then is DP-FedAvg on deltas.
    """

    mode = DELTA
    needs_each_update = ("FedNova divides each client's update by that client's own local "
                         "step count (num-steps)")
    required_metrics = (NUM_STEPS,)

    def __init__(self, local_epochs: int | None = None, batch_size: int | None = None,
                 **sampling: float) -> None:
        """`local_epochs`, `batch_size`: the clients' training settings, which bound the steps
        a reply may claim (None: no upper bound); `sampling`: SampledStrategy's arguments."""
        for name, value in (("local_epochs", local_epochs), ("batch_size", batch_size)):
            if value is not None and (isinstance(value, bool) or int(value) != value
                                      or value < 1):
                raise ValueError(f"FedNova's {name} must be null or an integer >= 1 (the "
                                 f"clients' {name}), got {value!r}.")
        super().__init__(**sampling)
        self.local_epochs = local_epochs
        self.batch_size = batch_size

    def max_steps(self, num_examples: float) -> float:
        """The most local steps an honest client with `num_examples` examples takes."""
        if self.local_epochs is None:
            return float("inf")
        per_epoch = math.ceil(num_examples / self.batch_size) if self.batch_size else 1
        return float(self.local_epochs * per_epoch)

    def screen(self, server_round: int, replies: Iterable[Message], check_values: bool = True
               ) -> Iterator[tuple[Message, dict[str, np.ndarray], float, MetricRecord]]:
        """The base's usable replies, less those whose num-steps no honest client reports."""
        for msg, arrays, num_examples, metrics in super().screen(server_round, replies,
                                                                 check_values):
            steps, most = float(metrics[NUM_STEPS]), self.max_steps(num_examples)
            if steps < 1:
                self.drop(server_round, msg, f"metric '{NUM_STEPS}' = {steps:g} is below 1: a "
                          "client takes whole optimizer steps")
            elif steps > most:
                self.drop(server_round, msg, f"metric '{NUM_STEPS}' = {steps:g} exceeds the "
                          f"{most:g} steps {num_examples:g} examples allow (local_epochs="
                          f"{self.local_epochs}, batch_size={self.batch_size})")
            else:
                yield msg, arrays, num_examples, metrics

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
