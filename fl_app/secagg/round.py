"""A round's train stage with secure aggregation (`secagg=secaggplus`): the strategy's train
messages go through SecAgg+, and the strategy is handed the sum instead of the replies.

- Averaging strategies (WeightedFedAvg, GradientAveraging, Flower's FedAvg, FedProx, FedAdam,
  FedYogi, ...) get one reply holding the weighted mean Σ ratio'·u / Σ ratio' and the total
  example count: the average of one reply is that reply, so the strategy steps as it would on
  the mean of the individual replies.
- Central DP (DPNoise) gets the sum of the client-clipped updates (`release_secure_sum`): the
  same noise, denominator and accountant as its own aggregate_train.

A round whose cohort is too small for a safe share plan (Poisson sampling drew 1 client, or
fewer than an integer threshold) is skipped: model unchanged, the round recorded with
`secagg_skipped`, and under central DP the round still counted by the accountant.
"""

from __future__ import annotations

from logging import WARNING

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from omegaconf import DictConfig

from fl_app.exchange import exchange
from fl_app.messages import CLIENT_EPSILONS
from fl_app.privacy.central import DPNoise
from fl_app.records import from_array_record, to_array_record
from fl_app.secagg.protocol import DP_CLIPPED
from fl_app.secagg.server import SecAggSession, SecureSum, secure_sum
from fl_app.secagg.settings import SecAggSettings, can_aggregate
from fl_app.strategies import features


def secure_train_round(grid: Grid, strategy: Strategy, cfg: DictConfig, rnd: int,
                       messages: list[Message], weights: dict[str, np.ndarray],
                       session: SecAggSession | None = None
                       ) -> tuple[dict[str, np.ndarray], dict]:
    """`server_loop.train_round` after configure_train, with SecAgg+: the new global weights
    and the round's metrics row. SecAggError (too few clients left) ends the round unchanged.
    `session` (one for the run): with a strategy that knows its next cohort, each round keys
    the next one ahead, so that round runs in two exchanges instead of four."""
    s = SecAggSettings.from_config(cfg.secagg)
    timeout = s.timeout if s.timeout is not None else cfg.round_timeout
    dp = strategy if isinstance(strategy, DPNoise) else None
    if dp is not None and not messages:  # Poisson sampling drew nobody: noise is still released
        new, metrics = dp.release_secure_sum(rnd, None, 0, 0, 0, MetricRecord({}))
        return from_array_record(new), _row(rnd, messages, [], 0, 0, metrics) | {
            "secagg_clients": 0}
    if not can_aggregate(s, len(messages)):
        log(WARNING, "[round %d] secagg: %d sampled client(s) are too few for a safe share "
            "plan; the round is skipped with the global model unchanged%s", rnd, len(messages),
            " (the accountant still counts it)" if dp is not None else "")
        metrics = dp.skip_secure_round(rnd) if dp is not None else None
        return weights, _row(rnd, messages, [], 0, 0, metrics) | {
            "secagg_clients": 0, "secagg_skipped": 1}
    result = secure_sum(
        rnd, messages, s, lambda m, t: exchange(grid, m, t), timeout, cfg.round_timeout,
        weighted=dp is None and getattr(strategy, "weighted", True),
        clip_norm=dp.clip_norm if dp is not None else 0.0, session=session,
        next_cohort=next_cohort(grid, strategy, cfg, rnd, s) if session is not None else None,
        noise_multiplier=(dp.noise_multiplier if dp is not None and s.noise == "distributed"
                          else None))
    if dp is not None:
        averages = result_metrics(result)
        num_clipped = round(averages.pop(DP_CLIPPED, 0.0) * result.weight)
        new, metrics = dp.release_secure_sum(rnd, result.update_sum, result.num_clients,
                                             result.num_examples, num_clipped,
                                             MetricRecord(averages), noised=result.noise)
    elif result.num_clients < getattr(strategy, "min_train_nodes", 0):
        log(WARNING, "[round %d] only %d of %d sampled clients are in the secure sum, below "
            "min_clients=%d: global model unchanged", rnd, result.num_clients, len(messages),
            strategy.min_train_nodes)
        new, metrics = None, None
    else:
        new, metrics = strategy.aggregate_train(rnd, [mean_reply(result, messages[0], weights)])
        if metrics is not None:  # the cohort's total, which a per-client bound must not cut
            metrics["num-examples"] = result.num_examples
    new_weights = weights if new is None else from_array_record(new)
    row = _row(rnd, messages, result.lost, result.bytes_sent, result.bytes_received, metrics)
    return new_weights, row | {"secagg_clients": result.num_clients}


def next_cohort(grid: Grid, strategy: Strategy, cfg: DictConfig, rnd: int,
                s: SecAggSettings) -> list[int] | None:
    """The nodes round `rnd` + 1 will sample, when the strategy can say so ahead
    (features `plans_cohort`), that round will run, and its cohort can hold a safe share plan
    on distinct nodes; else None (that round starts cold)."""
    if rnd >= cfg.num_rounds or not features.of(type(strategy))["plans_cohort"]:
        return None
    cohort = strategy.next_cohort(grid, rnd + 1)
    if not cohort or len(set(cohort)) != len(cohort) or not can_aggregate(s, len(cohort)):
        return None
    return sorted(cohort)


def result_metrics(result: SecureSum) -> dict[str, float]:
    """The clients' weighted-mean metrics, and the largest of each clear (privacy) metric. A
    client-side epsilon in the sum (DP-SGD's: it is not public) is a mean, named `<key>_mean`:
    never taken for the worst client's."""
    means = {(f"{k}_mean" if k in CLIENT_EPSILONS else k): v / result.weight
             for k, v in result.metric_sums.items()}
    return {**means, **result.clear_metrics}


def mean_reply(result: SecureSum, sent: Message, weights: dict[str, np.ndarray]) -> Message:
    """One reply standing for the round's clients: their weighted mean, in the model's
    dtypes, with their total example count."""
    mean = {k: (result.update_sum[k] / result.weight).astype(weights[k].dtype, copy=False)
            for k in weights}
    metrics = MetricRecord({**result_metrics(result), "num-examples": result.num_examples})
    return Message(RecordDict({"arrays": to_array_record(mean), "metrics": metrics}),
                   reply_to=sent)


def _row(rnd: int, messages: list[Message], lost: list[int], sent: int, received: int,
         metrics: MetricRecord | None) -> dict:
    if lost:
        log(WARNING, "[round %d] %d of %d sampled node(s) are not in the secure sum: %s", rnd,
            len(lost), len(messages), lost)
    return {"round": rnd, "sampled": len(messages), "lost_nodes": lost, "bytes_sent": sent,
            "bytes_received": received,
            **{f"train_{k}": v for k, v in dict(metrics or {}).items()}}
