"""One rule, said in one line: will the configured DP noise swamp what the clients send?

Central DP adds N(0, sigma^2 C^2) to every one of the model's d coordinates of the sum of the
clipped updates and divides by m = q * N, the expected clients per round: the mean's noise has
norm ~ sigma * C * sqrt(d) / m, while the mean of m updates clipped to C has norm at most C.
Local DP: each client's own noise has norm sigma * C * sqrt(d); averaging m independent ones
divides it by sqrt(m): sigma * C * sqrt(d) / sqrt(m). The ratio noise norm / C is then
sigma * sqrt(d) / m (central) or sigma * sqrt(d / m) (local), and a run is warned about when it
exceeds `NOISE_TO_SIGNAL_LIMIT`.

The limit is set from docs/privacy.md's runs: the central rows there (500 clients, q = 0.1, the
2NN's 199,210 parameters, sigma 0.7 to 1) sit at 6 to 9 and train to 0.74 - 0.83; local DP at
sigma = 1 sits at 63 and ends at chance (0.11). Noise averages out over rounds (its norm grows
as sqrt(rounds), a steady signal's as rounds), which is why a ratio of a few is workable.

d is known only once the model is built, so the server checks at its start (server_loop).
DP-SGD is left out: its noise is on each local step's batch gradient, which this rule's
one-release picture does not describe.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

NOISE_TO_SIGNAL_LIMIT = 20.0


def noise_to_signal(noise_multiplier: float, num_params: int, clients_per_round: float,
                    local: bool = False) -> float:
    """Norm of the noise on the round's mean update over the largest clipped mean (C)."""
    spread = math.sqrt(clients_per_round) if local else clients_per_round
    return noise_multiplier * math.sqrt(num_params) / spread


def clients_needed(noise_multiplier: float, num_params: int, local: bool = False) -> int:
    """The fewest clients per round that bring `noise_to_signal` to the limit or under it."""
    central = noise_multiplier * math.sqrt(num_params) / NOISE_TO_SIGNAL_LIMIT
    return math.ceil(central ** 2 if local else central)


def noise_warning(cfg: Mapping, num_params: int) -> str | None:
    """One line when `cfg`'s DP noise is over the limit for a `num_params`-parameter model,
    saying how many clients per round it needs (and so num_clients or fraction_train);
    None when it is not (or the run has no noise-adding DP)."""
    strategy, privacy = cfg["strategy"], cfg.get("privacy") or {}
    population, q = cfg.get("num_clients"), float(cfg.get("fraction_train", 1.0))
    if not population:
        return None
    if "noise_multiplier" in strategy:
        sigma, local, where = float(strategy["noise_multiplier"]), False, "strategy"
    elif privacy.get("name") == "local":
        sigma, local, where = float(privacy["noise_multiplier"]), True, "privacy"
    else:
        return None
    per_round = q * population
    ratio = noise_to_signal(sigma, num_params, per_round, local)
    if ratio <= NOISE_TO_SIGNAL_LIMIT:
        return None
    need = clients_needed(sigma, num_params, local)
    formula = "sigma*C*sqrt(d/m)" if local else "sigma*C*sqrt(d)/m"
    fraction = (f", or fraction_train>={need / population:.2g} with num_clients={population}"
                if need <= population else "")
    return (f"DP noise will swamp the signal: {where}.noise_multiplier={sigma:g} with m = "
            f"{per_round:g} clients per round (fraction_train={q:g} x num_clients={population}) "
            f"on a {num_params}-parameter model puts noise of norm {formula} = {ratio:.0f}x "
            f"the clipped mean's largest norm C on each round's update (warned above "
            f"{NOISE_TO_SIGNAL_LIMIT:g}x). Needs >= {need} clients per round: "
            f"num_clients>={math.ceil(need / q)} at fraction_train={q:g}{fraction}; or less "
            "noise (a larger epsilon).")
