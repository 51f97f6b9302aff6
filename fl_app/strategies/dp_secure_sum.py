"""Central DP on a secure sum (`secagg=secaggplus`, fl_app.secagg): the release of DPNoise
when the server holds only the sum of the clients' updates, each clipped by its client.

`SecureSumRelease` is a part of `DPNoise` (dp.py), on top of its presampled noise
(dp_noise.py); it uses DPNoise's inner strategy, accounting and settings, so the released model
has the noise, denominator and epsilon that `DPNoise.aggregate_train` gives.
"""

from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, MetricRecord
from flwr.common.logger import log

from fl_app.strategies.averaging import axpy
from fl_app.strategies.dp_noise import PresampledNoise
from fl_app.strategies.metrics import MetricAverager


class SecureSumRelease(PresampledNoise):
    """DPNoise's release from a secure sum of client-clipped updates."""

    def release_secure_sum(self, server_round: int, clipped_sum: dict[str, np.ndarray] | None,
                           num_clients: int, num_examples: int, num_clipped: int,
                           client_metrics: MetricRecord) -> tuple[ArrayRecord, MetricRecord]:
        """`aggregate_train` for secure aggregation (fl_app.secagg): the clients clipped their
        own updates to clip_norm and the server holds only their sum (None: nobody sampled),
        and the clients' mean metrics. The same N(0, sigma^2 C^2) noise, denominator q*N and
        accounting are applied to it."""
        if self.adaptive_clip is not None:
            raise ValueError("Adaptive clipping needs each update's norm, which secure "
                             "aggregation hides: use clipping=fixed.")
        step, total = self._take_sum_start(server_round, self.clip_norm)
        weight = (1.0 if step is None else step) / self.expected_clients
        for key, acc in total.items():
            if clipped_sum is not None:
                axpy(acc, weight, clipped_sum[key])
        new_global = (self.inner.apply_update(total) if step is None
                      else self.inner.commit(total))
        self.rounds_done += 1
        self.epsilon = self._epsilon_after(self.rounds_done)
        averager = MetricAverager(self.inner.client_epsilon_max)  # client-side DP's worst ε
        averager.add(num_examples, client_metrics)
        metrics_out = MetricRecord({
            **averager.record(), "num-clients": num_clients, "num-clipped": num_clipped,
            "epsilon": self.epsilon, "delta": self.delta, "clip-norm": self.clip_norm,
            "noise-multiplier": self.noise_multiplier,
            "update-noise-multiplier": self.update_noise_multiplier})
        log(INFO, "DP round %s (secure sum): %d update(s), %d clipped; epsilon = %.4g "
            "(delta = %g)", server_round, num_clients, num_clipped, self.epsilon, self.delta)
        return self.inner.to_record(new_global), metrics_out

    def skip_secure_round(self, server_round: int) -> MetricRecord:
        """A round secure aggregation could not run (too few clients sampled for a safe share
        plan): nothing is released and the model stays, but the round is counted as if it
        were (the accountant's epsilon only grows), so the epsilon reported never undercounts
        a round whose cohort depended on who was sampled."""
        self._next_start = None  # this round's presampled noise is never used
        self.rounds_done += 1
        self.epsilon = self._epsilon_after(self.rounds_done)
        log(INFO, "DP round %s (secure sum): skipped, nothing released; epsilon = %.4g "
            "(delta = %g)", server_round, self.epsilon, self.delta)
        return MetricRecord({"num-clients": 0, "epsilon": self.epsilon, "delta": self.delta,
                             "clip-norm": self.clip_norm,
                             "noise-multiplier": self.noise_multiplier})
