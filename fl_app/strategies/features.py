"""What a strategy supports, asked of its class: the config checks read it here, never from the
string of a class name.

fl_app's strategies say it themselves, as class attributes (base.SampledStrategy documents them):
- `mode`: what its clients reply with (fl_app.messages.REPLY_KINDS);
- `needs_each_update`: why it needs each client's own update, or None when the weighted mean of
  the replies is all it uses (then secure aggregation, which reveals only their sum, serves it);
- `client_pool`: whether it samples clients itself, so a pool of nodes can serve a population;
- `central_dp`: whether it adds central DP noise (fl_app.privacy.central.DPNoise);
- `plans_cohort`: whether its `next_cohort(grid, round)` says whom that round's configure_train
  will sample, ahead and without sending anything (secure aggregation keys the round ahead).
Flower's built-in strategies cannot carry fl_app's attributes; `FLOWER` lists them by class.
A strategy of neither kind gets `UNKNOWN`: the safe answer to every question.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from flwr.serverapp import strategy as flower

from fl_app.messages import WEIGHTS

FEATURES = ("mode", "needs_each_update", "client_pool", "central_dp", "plans_cohort")

_MEAN = {"mode": WEIGHTS, "needs_each_update": None, "client_pool": False, "central_dp": False,
         "plans_cohort": False}


def _needs(why: str) -> dict:
    return {**_MEAN, "needs_each_update": why}


_KRUM = "Krum scores each client's update by its distances to the others"
FLOWER: dict[type, dict] = {
    flower.FedAvg: _MEAN, flower.FedProx: _MEAN, flower.FedAdam: _MEAN,
    flower.FedYogi: _MEAN, flower.FedAdagrad: _MEAN, flower.FedAvgM: _MEAN,
    flower.FedMedian: _needs("the coordinate-wise median needs every client's values"),
    flower.FedTrimmedAvg: _needs("the trimmed mean sorts every client's values"),
    flower.Krum: _needs(_KRUM), flower.MultiKrum: _needs(_KRUM),
    flower.Bulyan: _needs("Bulyan selects and trims individual updates"),
}
UNKNOWN = _needs("it does not aggregate by a (weighted) mean of the replies")


def of(cls: type) -> dict:
    """Every feature of strategy class `cls`, by name."""
    if cls in FLOWER:
        return dict(FLOWER[cls])
    if all(hasattr(cls, name) for name in FEATURES):
        return {name: getattr(cls, name) for name in FEATURES}
    return dict(UNKNOWN)


def strategy_class(node: Mapping) -> type | None:
    """The class a config node's `_target_` names (the target allow-list has checked it), or
    None when it names none."""
    target = node.get("_target_") if isinstance(node, Mapping) else None
    if not isinstance(target, str) or "." not in target:
        return None
    module, _, name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def of_config(strategy: Mapping) -> dict:
    """The features of the strategy a `strategy` config section builds. A wrapper (central DP)
    replies as its inner strategy (`strategy.strategy`) does."""
    cls = strategy_class(strategy)
    features = of(cls) if cls is not None else dict(UNKNOWN)
    inner = strategy.get("strategy")
    if isinstance(inner, Mapping) and (inner_cls := strategy_class(inner)) is not None:
        features["mode"] = of(inner_cls)["mode"]
    return features
