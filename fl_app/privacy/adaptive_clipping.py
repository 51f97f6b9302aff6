"""Adaptive clipping for DP-FedAvg (Andrew et al. 2019, "Differentially Private Learning with
Adaptive Clipping"): the clip norm C follows a target quantile of the clients' update norms.

Each round every sampled client contributes one bit b = [||update|| <= C]. The server releases
the noised fraction of clients under C,

    b~ = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / m + 1/2,

with m = q * N the expected number of clients (a public constant, like the denominator of the
noisy mean), and takes a geometric step toward the target quantile gamma:

    C <- C * exp(-eta * (b~ - gamma)).

Too many clients under C (b~ > gamma) shrinks C; too few grows it. Centring the bits gives the
count sensitivity 1/2, which is what `accounting.combined_noise_multiplier` assumes.
"""

import math

from fl_app.privacy import settings
from fl_app.privacy.noise import GaussianNoise


class QuantileClipNorm:
    """The clip norm of adaptive clipping and its geometric update from a noised count.

    Parameters
    ----------
    initial : C at round 1.
    target_quantile : gamma in (0, 1): the fraction of clients whose update should be unclipped.
    learning_rate : eta > 0 of the geometric update (Andrew et al. use 0.2).
    count_stddev : sigma_b > 0, the noise std on the count of unclipped clients.
    expected_clients : m = q * N, the fixed denominator of the fraction.
    noise : the noise source (the DP strategy's generator, noise.py).
    """

    def __init__(
        self,
        initial: float,
        target_quantile: float,
        learning_rate: float,
        count_stddev: float,
        expected_clients: float,
        noise: GaussianNoise,
    ) -> None:
        for name, value, expected in (
                ("clip_norm", initial, settings.clip_norm(initial)),
                ("target_quantile", target_quantile, settings.target_quantile(target_quantile)),
                ("clip_lr", learning_rate, settings.positive(learning_rate)),
                ("clipped_count_stddev", count_stddev, settings.positive(count_stddev)),
                ("expected clients per round (q * num_clients)", expected_clients,
                 settings.positive(expected_clients))):
            settings.require(name, value, expected)
        self.value = float(initial)
        self.target_quantile = float(target_quantile)
        self.learning_rate = float(learning_rate)
        self.count_stddev = float(count_stddev)
        self.expected_clients = float(expected_clients)
        self.noise = noise

    def noisy_unclipped_fraction(self, num_unclipped: int, num_reports: int) -> float:
        """b~: the DP estimate of the fraction of clients whose update norm was <= C."""
        centred = num_unclipped - 0.5 * num_reports
        noisy = centred + self.noise.normal(self.count_stddev)
        return noisy / self.expected_clients + 0.5

    def update(self, num_unclipped: int, num_reports: int) -> float:
        """Step C toward the target quantile; return the released fraction b~."""
        fraction = self.noisy_unclipped_fraction(num_unclipped, num_reports)
        self.value *= math.exp(-self.learning_rate * (fraction - self.target_quantile))
        return fraction
