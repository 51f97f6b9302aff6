"""Privacy accounting for user-level DP-FedAvg: RDP of a Poisson-sampled Gaussian mechanism.

One round of `DPNoise` is one release of the sampled Gaussian mechanism: each client is in the
round independently with probability q (Poisson sampling), each client's update is clipped to L2
norm C and Gaussian noise N(0, sigma^2 C^2) is added to the sum. Neighbouring federations differ
by adding or removing one client's whole data (user-level privacy). `dp_accounting`'s Renyi-DP
accountant turns `rounds` such releases into an (epsilon, delta) guarantee.

Adaptive clipping (Andrew et al. 2019) releases a second noised quantity each round, the count of
clients whose update norm was <= C. Both are Gaussian mechanisms on the same sampled clients, so
together they are one Gaussian mechanism whose noise multiplier `combined_noise_multiplier` gives;
`update_noise_multiplier` inverts that to keep the accounted multiplier at the configured one.
Local DP (`fl_app.privacy.client.LocalDP`) reuses `epsilon_spent` with q = 1 for each client's
releases.
`check_budget` refuses the round that would take epsilon past a budget (`max_epsilon`).
"""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from fl_app.privacy import settings


class PrivacyBudgetExhausted(RuntimeError):
    """The next round would push epsilon past `max_epsilon`; the server should stop here."""


def _check_inputs(noise_multiplier: float, sample_rate: float, delta: float) -> None:
    """Refuse settings the accountant cannot (or should not) be asked about."""
    settings.require("noise_multiplier", noise_multiplier,
                     settings.noise_multiplier(noise_multiplier))
    settings.require("sample_rate", sample_rate, settings.sample_rate(sample_rate))
    settings.require("delta", delta, settings.delta(delta))


@contextmanager
def _quiet_absl() -> Iterator[None]:
    """Silence dp_accounting's warnings that some low RDP orders did not converge.

    Those orders are simply left out of the minimum over orders (the bound stays valid), and
    the warnings would otherwise flood the server log every round.
    """
    absl_logger = logging.getLogger("absl")
    previous = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(previous)


# One round's RDP curve costs ~40 ms when q < 1 (the subsampled Gaussian's series at every
# order), once per (sigma, q). Rounds compose additively in RDP, so T rounds are T times that
# curve, and epsilon after any number of rounds is then one conversion (~0.1 ms): the server
# asks every round, and more than once (budget check, then the reported epsilon).
@lru_cache(maxsize=64)
def _one_round_rdp(noise_multiplier: float, sample_rate: float) -> tuple[tuple, tuple]:
    # Imported here: dp_accounting pulls in scipy (~1 s), and a ClientApp process started
    # for one message should not pay that unless it accounts.
    import dp_accounting
    from dp_accounting import dp_event, rdp

    accountant = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    with _quiet_absl():
        accountant.compose(dp_event.PoissonSampledDpEvent(
            sample_rate, dp_event.GaussianDpEvent(noise_multiplier)))
    return tuple(accountant.orders), tuple(accountant.rdp)


@lru_cache(maxsize=1024)
def _epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    orders, one_round = _one_round_rdp(noise_multiplier, sample_rate)
    with _quiet_absl():
        return float(compute_epsilon(orders, [rounds * r for r in one_round], delta)[0])


def epsilon_spent(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """Return the epsilon (at `delta`) of `rounds` Poisson-sampled Gaussian releases.

    `noise_multiplier` is sigma (noise std / clip norm), `sample_rate` the per-round
    probability q that a client participates. Zero rounds cost nothing.
    """
    _check_inputs(noise_multiplier, sample_rate, delta)
    if isinstance(rounds, bool) or int(rounds) != rounds or rounds < 0:
        raise ValueError(f"rounds must be a non-negative integer, got {rounds!r}.")
    if rounds == 0:
        return 0.0
    return _epsilon(float(noise_multiplier), float(sample_rate), int(rounds), float(delta))


def check_budget(noise_multiplier: float, sample_rate: float, delta: float, max_epsilon: float,
                 rounds_done: int, num_clients: int) -> None:
    """Raise PrivacyBudgetExhausted, saying what would allow more rounds, when one more round
    after `rounds_done` would take epsilon above `max_epsilon`."""
    next_epsilon = epsilon_spent(noise_multiplier, sample_rate, rounds_done + 1, delta)
    if next_epsilon > max_epsilon:
        epsilon = epsilon_spent(noise_multiplier, sample_rate, rounds_done, delta)
        raise PrivacyBudgetExhausted(
            f"Privacy budget exhausted after {rounds_done} round(s): epsilon is "
            f"{epsilon:.4g} now and would be {next_epsilon:.4g} after round "
            f"{rounds_done + 1}, above max_epsilon = {max_epsilon:g} "
            f"(delta = {delta:g}). For more rounds within the budget raise "
            f"noise_multiplier (now {noise_multiplier:g}), lower the sampling "
            f"fraction fraction_train (now {sample_rate:g}), train with more "
            f"clients (num_clients, now {num_clients}), or raise max_epsilon."
        )


def rounds_within_budget(
    noise_multiplier: float,
    sample_rate: float,
    delta: float,
    max_epsilon: float,
    max_rounds: int,
) -> int:
    """Return the most rounds (at most `max_rounds`) whose epsilon stays <= `max_epsilon`.

    Epsilon only grows with the number of rounds, so a binary search needs about
    log2(max_rounds) accountant calls instead of one per round.
    """
    _check_inputs(noise_multiplier, sample_rate, delta)
    settings.require("max_epsilon", max_epsilon, settings.max_epsilon(max_epsilon)
                     if max_epsilon is not None else "a positive finite number")
    if isinstance(max_rounds, bool) or int(max_rounds) != max_rounds or max_rounds < 0:
        raise ValueError(f"max_rounds must be a non-negative integer, got {max_rounds!r}.")
    low, high = 0, int(max_rounds)  # invariant: epsilon(low) <= max_epsilon
    while low < high:
        mid = (low + high + 1) // 2
        if epsilon_spent(noise_multiplier, sample_rate, mid, delta) <= max_epsilon:
            low = mid
        else:
            high = mid - 1
    return low


def combined_noise_multiplier(update_noise_multiplier: float, clipped_count_stddev: float) -> float:
    """Noise multiplier of (noised update sum, noised unclipped count) released together.

    The update sum has sensitivity C and noise std z_u * C; the count of centred bits
    (b - 1/2) has sensitivity 1/2 and noise std sigma_b, i.e. multiplier 2 sigma_b. Two Gaussian
    mechanisms on the same data compose into one with z = (z_u^-2 + (2 sigma_b)^-2)^-1/2
    (Andrew et al. 2019, Thm. 1; Mironov et al. 2019, Sec. 3).
    """
    return (update_noise_multiplier ** -2 + (2 * clipped_count_stddev) ** -2) ** -0.5


def update_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """The update's multiplier z_u = (z^-2 - (2 sigma_b)^-2)^-1/2 that keeps the total at z.

    Raises ValueError when the count's noise alone already spends the budget of z
    (2 sigma_b <= z): then no amount of update noise can reach z.
    """
    settings.require("clipped_count_stddev", clipped_count_stddev,
                     settings.clipped_count_stddev(clipped_count_stddev, noise_multiplier))
    remaining = noise_multiplier ** -2 - (2 * clipped_count_stddev) ** -2
    return remaining ** -0.5
