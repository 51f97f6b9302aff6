"""Every DP setting's check, each written once: the config (at compose time), the strategy and the
clients (when built) and the accountant (when asked) all call these.

A rule returns None for a good value, or what the value must be: `require` turns that into one
ValueError naming the setting, `config_problem` into the one line a bad run config fails with.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

from fl_app.messages import GRADIENT

CLIPPING_MODES = ("fixed", "adaptive")
CLIENT_PRIVACY = ("none", "local", "dpsgd")

_POSITIVE = "a positive finite number"


def _number(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def noise_multiplier(value: object) -> str | None:
    """sigma: the noise std over the clip norm."""
    if _number(value) and value > 0:
        return None
    return (f"{_POSITIVE} (without noise there is no differential privacy; around 1.0 is a "
            "common start: more noise, smaller epsilon)")


def clip_norm(value: object) -> str | None:
    """C: the L2 bound on each client's update."""
    if _number(value) and value > 0:
        return None
    return (f"{_POSITIVE}: it bounds each client's update norm; pick it near the typical "
            "update norm (e.g. 0.1 - 1.0)")


def max_grad_norm(value: object) -> str | None:
    """DP-SGD's per-example gradient bound."""
    return None if _number(value) and value > 0 else f"{_POSITIVE}: it bounds each example's "\
        "gradient norm"


def delta(value: object, population: int | None = None, unit: str = "num_clients") -> str | None:
    """delta, well below 1/population (a mechanism that publishes one record outright with
    probability delta would pass otherwise); `unit` names what the population counts."""
    if not (_number(value) and 0 < value < 1):
        return f"strictly between 0 and 1, well below 1/{unit}"
    if population and value >= 1.0 / population:
        return (f"below 1/{unit} = {1.0 / population:g}, e.g. {1.0 / (10 * population):g} "
                "(a larger delta lets a mechanism publish one record's data outright)")
    return None


def max_epsilon(value: object) -> str | None:
    """The privacy budget: the run stops before a round that would exceed it."""
    return None if value is None or (_number(value) and value > 0) else \
        f"null (no budget) or {_POSITIVE}"


def sample_rate(value: object) -> str | None:
    """q: the probability that a client takes part in a round (fraction_train)."""
    if _number(value) and 0 < value <= 1:
        return None
    return "in (0, 1]: the probability that a client takes part in a round (fraction_train)"


def num_clients(value: object) -> str | None:
    """N: the population sampled from."""
    if _number(value) and int(value) == value and value >= 1:
        return None
    return "a positive integer (the number of clients sampled from: SuperNodes / partitions)"


def clipping(value: object) -> str | None:
    return None if value in CLIPPING_MODES else " or ".join(CLIPPING_MODES)


def target_quantile(value: object) -> str | None:
    """gamma: the fraction of updates adaptive clipping leaves unclipped."""
    return None if _number(value) and 0 < value < 1 else "in (0, 1)"


def positive(value: object) -> str | None:
    """Any positive finite setting (adaptive clipping's step eta, a noise std, ...)."""
    return None if _number(value) and value > 0 else _POSITIVE


def clipped_count_stddev(value: object, sigma: float) -> str | None:
    """sigma_b: the noised count of unclipped clients costs privacy too, so it must leave some
    of sigma's budget to the update (2 sigma_b > sigma); None picks the default."""
    if value is None or (_number(value) and value > 0 and 2 * value > sigma):
        return None
    return (f"null (the default) or above noise_multiplier / 2 = {sigma / 2:g} (the noised count "
            "costs privacy too; Andrew et al. suggest expected clients per round / 20)")


def require(name: str, value: object, expected: str | None) -> None:
    """Raise ValueError naming `name` when a rule said what `value` must be."""
    if expected is not None:
        raise ValueError(f"{name}={value!r} is invalid: it must be {expected}.")


def central_rules(section: Mapping, population: int | None) -> Iterator[tuple[str, str | None]]:
    """(setting, what it must be or None) for central DP's settings in a strategy section."""
    sigma = section.get("noise_multiplier")
    yield "noise_multiplier", noise_multiplier(sigma)
    yield "clip_norm", clip_norm(section.get("clip_norm"))
    if section.get("delta") is not None:
        yield "delta", delta(section.get("delta"), population)
    yield "max_epsilon", max_epsilon(section.get("max_epsilon"))
    yield "clipping", clipping(section.get("clipping", "fixed"))
    for key, rule in (("target_quantile", target_quantile), ("clip_lr", positive)):
        if key in section:
            yield key, rule(section[key])
    if _number(sigma):
        yield "clipped_count_stddev", clipped_count_stddev(section.get("clipped_count_stddev"),
                                                           sigma)


def client_rules(section: Mapping, population: int | None) -> Iterator[tuple[str, str | None]]:
    """(setting, what it must be or None) for the `privacy` group (client-side DP)."""
    name = section.get("name", "none")
    if name not in CLIENT_PRIVACY:
        yield "name", ", ".join(CLIENT_PRIVACY)
        return
    if name == "none":
        return
    yield "noise_multiplier", noise_multiplier(section.get("noise_multiplier"))
    if name == "local":
        yield "clip_norm", clip_norm(section.get("clip_norm"))
        yield "delta", delta(section.get("delta"), population)
    else:
        yield "max_grad_norm", max_grad_norm(section.get("max_grad_norm"))
        # Example-level: checked against each client's example count when it is built.
        yield "delta", delta(section.get("delta"), unit="(examples per client)")


def config_problem(cfg: Mapping, strategy_mode: str, model_reads_tokens: bool) -> str | None:
    """The first bad DP setting of a composed config, as one line (None: all good).
    `strategy_mode` is what the strategy's clients reply with (fl_app.messages)."""
    population = cfg.get("num_clients")
    strategy, privacy = cfg["strategy"], cfg.get("privacy") or {}
    checks = []
    if "noise_multiplier" in strategy:  # central DP's settings
        checks += [(f"strategy.{k}", strategy.get(k), e) for k, e in
                   central_rules(strategy, population)]
    checks += [(f"privacy.{k}", privacy.get(k), e) for k, e in client_rules(privacy, population)]
    if privacy.get("name") == "dpsgd":
        checks += [
            ("privacy.name", "dpsgd", None if strategy_mode != GRADIENT else
             "local or none with a FedSGD strategy: DP-SGD trains locally, so it needs "
             "strategy=fedavg or dp_fedavg"),
            ("privacy.name", "dpsgd", None if not model_reads_tokens else
             "local or none with model=char_lstm: Opacus computes no per-example gradients for "
             "nn.LSTM (it would need its own DPLSTM layer)")]
    for key, value, expected in checks:
        if expected is not None:
            return f"{key}={value} is invalid: it must be {expected}."
    return None


def checked_central(strategy: object, clip_norm_: float, noise_multiplier_: float,
                    num_clients_: int, delta_: float | None, max_epsilon_: float | None,
                    base: type) -> tuple[int, float]:
    """DPNoise's settings, checked: (num_clients as an int, delta with its default 1 / (10 N)).
    `base` is the class the wrapped strategy must extend (fl_app's SampledStrategy)."""
    if not isinstance(strategy, base):
        raise TypeError(
            f"DPNoise wraps an fl_app SampledStrategy (WeightedFedAvg, GradientAveraging, ...), "
            f"got {type(strategy).__name__}: it needs update_offset/apply_update.")
    require("num_clients", num_clients_, num_clients(num_clients_))
    population = int(num_clients_)
    delta_ = 1.0 / (10 * population) if delta_ is None else delta_
    section = {"clip_norm": clip_norm_, "noise_multiplier": noise_multiplier_, "delta": delta_,
               "max_epsilon": max_epsilon_}
    for key, expected in central_rules(section, population):
        require(key, section.get(key), expected)
    require("fraction_train", strategy.fraction_train, sample_rate(strategy.fraction_train))
    return population, float(delta_)
