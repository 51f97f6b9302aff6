"""The checks on DPNoise's settings: each bad one is refused with what to set instead."""

import math

from fl_app.strategies.base import SampledStrategy


def checked_settings(strategy: object, clip_norm: float, noise_multiplier: float,
                     num_clients: int, delta: float | None,
                     max_epsilon: float | None) -> tuple[int, float]:
    """(num_clients as an int, delta with its default 1 / (10 N) filled in) of settings that
    give a meaningful guarantee; ValueError / TypeError naming the setting otherwise."""
    if not isinstance(strategy, SampledStrategy):
        raise TypeError(
            f"DPNoise wraps an fl_app SampledStrategy (WeightedFedAvg or GradientAveraging), "
            f"got {type(strategy).__name__}: it needs update_offset/apply_update."
        )
    if isinstance(num_clients, bool) or int(num_clients) != num_clients or num_clients < 1:
        raise ValueError(
            f"num_clients must be a positive integer (the number of clients sampled from), "
            f"got {num_clients!r}. Set it to the number of SuperNodes / partitions."
        )
    num_clients = int(num_clients)
    if not math.isfinite(clip_norm) or clip_norm <= 0:
        raise ValueError(
            f"clip_norm must be a positive finite number, got {clip_norm!r}. It bounds each "
            "client's update norm; pick it near the typical update norm (e.g. 0.1 - 1.0)."
        )
    if not math.isfinite(noise_multiplier) or noise_multiplier <= 0:
        raise ValueError(
            f"noise_multiplier must be a positive finite number, got {noise_multiplier!r}. "
            "Without noise there is no privacy; use e.g. 1.0 (more noise, smaller epsilon)."
        )
    if delta is None:
        delta = 1.0 / (10 * num_clients)
    if not 0 < delta < 1:
        raise ValueError(
            f"delta must be strictly between 0 and 1, got {delta!r}. Leave it unset for "
            f"the default 1/(10*num_clients) = {1.0 / (10 * num_clients):g}."
        )
    if delta >= 1.0 / num_clients:
        raise ValueError(
            f"delta = {delta:g} is >= 1/num_clients = {1.0 / num_clients:g}: a mechanism "
            "that publishes one client's data outright would satisfy that. Use a delta "
            f"well below 1/num_clients, e.g. {1.0 / (10 * num_clients):g} (the default)."
        )
    if max_epsilon is not None and (not math.isfinite(max_epsilon) or max_epsilon <= 0):
        raise ValueError(
            f"max_epsilon must be a positive finite number or None (no budget), "
            f"got {max_epsilon!r}."
        )
    if not 0 < strategy.fraction_train <= 1:
        raise ValueError(
            f"fraction_train of the wrapped strategy is the client sampling rate q and must "
            f"be in (0, 1], got {strategy.fraction_train!r}."
        )
    return num_clients, float(delta)
