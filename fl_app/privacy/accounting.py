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

Two accountants, one answer: RDP (Mironov 2017) and the privacy-loss distribution (PLD, Koskela
et al. 2020; Doroshenko et al. 2022, dp_accounting's `pld`, pessimistic estimate) both bound the
same mechanism, so both epsilons are valid and the smaller is used (`Epsilon.value`): for the
budget stop and as the reported `epsilon`. PLD is exact up to its discretization (rounded up) and
is usually 10-30 % tighter; RDP is kept beside it for reference, and alone where PLD is not
available for the mechanism (`Epsilon.rdp_only`) or fails.
"""

import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from logging import WARNING
from typing import TYPE_CHECKING

from flwr.common.logger import log

from fl_app.privacy import settings

if TYPE_CHECKING:
    from dp_accounting.pld.privacy_loss_distribution import PrivacyLossDistribution


class PrivacyBudgetExhausted(RuntimeError):
    """The next round would push epsilon past `max_epsilon`; the server should stop here."""


@dataclass(frozen=True)
class Epsilon:
    """One composition's epsilon (at one delta) from both accountants.

    `pld` is None where the PLD accountant cannot be used (`pld_missing` says why); `value`, the
    one to report and to stop on, is then the RDP one.
    """

    rdp: float
    pld: float | None = None
    pld_missing: str | None = None

    @property
    def value(self) -> float:
        """The tighter valid bound: min(RDP, PLD)."""
        return self.rdp if self.pld is None else min(self.rdp, self.pld)

    def metrics(self, name: str = "epsilon", sep: str = "-") -> dict[str, float]:
        """{name: value, name-rdp: RDP, name-pld: PLD}; no PLD key where PLD is missing."""
        out = {name: self.value, f"{name}{sep}rdp": self.rdp}
        if self.pld is not None:
            out[f"{name}{sep}pld"] = self.pld
        return out

    def __str__(self) -> str:
        pld = "n/a" if self.pld is None else f"{self.pld:.4g}"
        return f"{self.value:.4g} (RDP {self.rdp:.4g}, PLD {pld})"

    @classmethod
    def rdp_only(cls, rdp: float, mechanism: str) -> "Epsilon":
        """For a mechanism dp_accounting's PLD cannot compose (e.g. distributed Skellam noise):
        RDP alone, said once in the log."""
        return cls(float(rdp), None, _pld_unavailable(mechanism))


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


def _check_rounds(rounds: int, name: str = "rounds") -> None:
    if isinstance(rounds, bool) or int(rounds) != rounds or rounds < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {rounds!r}.")


def epsilon_rdp(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """The RDP accountant's epsilon (at `delta`) of `rounds` Poisson-sampled Gaussian releases.

    `noise_multiplier` is sigma (noise std / clip norm), `sample_rate` the per-round
    probability q that a client participates. Zero rounds cost nothing.
    """
    _check_inputs(noise_multiplier, sample_rate, delta)
    _check_rounds(rounds)
    if rounds == 0:
        return 0.0
    return _epsilon(float(noise_multiplier), float(sample_rate), int(rounds), float(delta))


def epsilon_pld(noise_multiplier: float, sample_rate: float, rounds: int,
                delta: float) -> float | None:
    """The PLD accountant's epsilon of the same releases as `epsilon_rdp`; None (said once in
    the log) where PLD failed or was too slow for this setting."""
    return pld_epsilon_of_steps(((noise_multiplier, sample_rate, rounds),), delta)


def epsilons(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> Epsilon:
    """Both accountants' epsilon of `rounds` Poisson-sampled Gaussian releases."""
    rdp = epsilon_rdp(noise_multiplier, sample_rate, rounds, delta)
    pld = epsilon_pld(noise_multiplier, sample_rate, rounds, delta)
    return Epsilon(rdp, pld, None if pld is not None else "failed or too slow")


def epsilon_spent(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """The epsilon (at `delta`) of `rounds` Poisson-sampled Gaussian releases: the tighter of
    the RDP and PLD accountants' (see `epsilons`)."""
    return epsilons(noise_multiplier, sample_rate, rounds, delta).value


# ------------------------------------------------------------------------------------------
# The privacy-loss distribution (PLD) accountant
# ------------------------------------------------------------------------------------------

# dp_accounting's accountant discretizes the privacy loss in steps of 1e-4; rounded up
# (pessimistic), any step gives a valid bound, and 1e-3 costs ~10x less time (a one-round PLD
# ~50 ms instead of ~700 ms) for epsilons that differ by under 1e-3 (measured at q = 0.1 and
# 0.01, 1 to 1000 rounds).
PLD_DISCRETIZATION = 1e-3
# A q = 1 Gaussian with tiny noise has a huge loss range: its step grows with the epsilon
# (RDP's, an upper bound) so that the PLD has ~10^4 points, not ~10^7 (1e-4 relative error).
PLD_RELATIVE_DISCRETIZATION = 1e-4
# A PLD computation slower than this marks its setting as too slow: RDP alone from then on.
PLD_SLOW_SECONDS = 5.0
_said: set[str] = set()
_too_slow: set[tuple[float, float]] = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log(WARNING, "%s", message)


def _pld_unavailable(mechanism: str) -> str:
    reason = f"PLD: not available for {mechanism}, using RDP"
    _say_once(reason)
    return reason


@lru_cache(maxsize=64)
def _one_round_pld(noise_multiplier: float, sample_rate: float) -> "PrivacyLossDistribution":
    """One Poisson-sampled Gaussian release (add or remove one), pessimistic."""
    import dp_accounting
    from dp_accounting.pld import privacy_loss_distribution

    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=noise_multiplier, sampling_prob=sample_rate,
        value_discretization_interval=PLD_DISCRETIZATION, pessimistic_estimate=True,
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)


def _steps_pld(noise_multiplier: float, sample_rate: float, steps: int,
               delta: float) -> "PrivacyLossDistribution":
    """`steps` compositions: q = 1 is one Gaussian with sigma / sqrt(steps) (exact); q < 1 the
    cached one-round PLD self-composed (FFT, ~40 ms at 1000 rounds)."""
    if sample_rate < 1.0:
        return _one_round_pld(noise_multiplier, sample_rate).self_compose(steps)
    import dp_accounting
    from dp_accounting.pld import privacy_loss_distribution

    bound = epsilon_rdp(noise_multiplier, 1.0, steps, delta)
    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=noise_multiplier / math.sqrt(steps),
        value_discretization_interval=max(PLD_DISCRETIZATION,
                                          bound * PLD_RELATIVE_DISCRETIZATION),
        pessimistic_estimate=True,
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)


@lru_cache(maxsize=1024)
def _pld_epsilon(steps: tuple[tuple[float, float, int], ...], delta: float) -> float | None:
    settings_ = [(sigma, q) for sigma, q, _ in steps]
    if any(s in _too_slow for s in settings_):
        return None
    start = time.perf_counter()
    try:
        pld = None
        for sigma, q, count in steps:
            part = _steps_pld(sigma, q, count, delta)
            pld = part if pld is None else pld.compose(part)
        epsilon = float(pld.get_epsilon_for_delta(delta))
    except (ArithmeticError, ValueError, MemoryError) as err:
        _say_once(f"PLD: failed for {_describe(steps)} ({err}), using RDP")
        return None
    seconds = time.perf_counter() - start
    if seconds > PLD_SLOW_SECONDS:
        _too_slow.update(settings_)
        _say_once(f"PLD: {seconds:.1f} s for {_describe(steps)}, too slow: using RDP for "
                  "this setting from now on")
    if not math.isfinite(epsilon):
        _say_once(f"PLD: no finite epsilon for {_describe(steps)} at delta={delta:g}, using RDP")
        return None
    return epsilon


def _describe(steps: Sequence[tuple[float, float, int]]) -> str:
    return ", ".join(f"{n} x (sigma={s:g}, q={q:g})" for s, q, n in steps)


def pld_epsilon_of_steps(steps: Sequence[tuple[float, float, int]], delta: float) -> float | None:
    """The PLD epsilon of stretches of Poisson-sampled Gaussian releases, each (sigma, q,
    count) as in Opacus' accountant history (DP-SGD); None where PLD failed or was too slow
    (said once in the log: RDP then stands alone)."""
    for sigma, q, count in steps:
        _check_inputs(sigma, q, delta)
        _check_rounds(count, "a step count")
    kept = tuple((float(s), float(q), int(n)) for s, q, n in steps if n > 0)
    return _pld_epsilon(kept, float(delta)) if kept else 0.0


def check_budget(noise_multiplier: float, sample_rate: float, delta: float, max_epsilon: float,
                 rounds_done: int, num_clients: int) -> None:
    """Raise PrivacyBudgetExhausted, saying what would allow more rounds, when one more round
    after `rounds_done` would take epsilon above `max_epsilon`."""
    after = epsilons(noise_multiplier, sample_rate, rounds_done + 1, delta)
    if after.value > max_epsilon:
        epsilon = epsilon_spent(noise_multiplier, sample_rate, rounds_done, delta)
        pld = "n/a" if after.pld is None else f"{after.pld:.4g}"
        raise PrivacyBudgetExhausted(
            f"Privacy budget exhausted after {rounds_done} round(s): epsilon is "
            f"{epsilon:.4g} now and would be {after.value:.4g} after round "
            f"{rounds_done + 1} (RDP {after.rdp:.4g}, PLD {pld}: the smaller counts), "
            f"above max_epsilon = {max_epsilon:g} "
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

    Epsilon (the tighter of RDP and PLD) only grows with the number of rounds, so a binary
    search needs about log2(max_rounds) accountant calls instead of one per round.
    """
    _check_inputs(noise_multiplier, sample_rate, delta)
    settings.require("max_epsilon", max_epsilon, settings.max_epsilon(max_epsilon)
                     if max_epsilon is not None else "a positive finite number")
    _check_rounds(max_rounds, "max_rounds")
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
