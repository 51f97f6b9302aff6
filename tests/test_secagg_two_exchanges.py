"""Secure aggregation in two exchanges per round (issue 25, item 5): round r + 1's setup rides
on round r's collect and its share-keys on round r's unmask, so a steady round pays only its
collect and unmask exchanges; a round nobody keyed ahead starts cold (four)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvg
from hydra.utils import instantiate
from strategy_helpers import set_task_identity
from test_secagg import (
    S,
    StageGrid,
    fake_clients,
    mean_bound,
    plain_weighted_mean,
    train_messages,
    trainer,
)

from fl_app import server_loop
from fl_app.config import compose
from fl_app.secagg import round as secagg_round
from fl_app.secagg import server
from fl_app.strategies import WeightedFedAvg

REFERENCE = {"w": np.zeros(300, np.float32), "b": np.zeros(3, np.float32)}


@pytest.fixture(autouse=True)
def _identity(monkeypatch):
    set_task_identity(monkeypatch)


class Counting:
    """An exchange function that counts its calls (one call = one parallel send/pull)."""

    def __init__(self, grid: StageGrid) -> None:
        self.grid, self.calls = grid, 0

    def __call__(self, messages, timeout=None):
        self.calls += 1
        return self.grid.send_and_receive(messages, timeout)


def run_rounds(grid, cohorts, predicted=None):
    """secure_sum over consecutive rounds with one session; round i keys round i + 1 with
    `predicted[i + 1]` (default: the cohort it will really have). Per round: (result,
    exchanges)."""
    predicted = predicted or cohorts
    session, exchange, out = server.SecAggSession(), Counting(grid), []
    for i, cohort in enumerate(cohorts):
        before = exchange.calls
        ahead = predicted[i + 1] if i + 1 < len(predicted) else None
        result = server.secure_sum(i + 1, train_messages(cohort, REFERENCE), S, exchange,
                                   timeout=None, ttl=60, session=session, next_cohort=ahead)
        out.append((result, exchange.calls - before))
    return out


def assert_plain_mean(result, clients, nodes):
    assert result.num_clients == len(nodes) and result.lost == []
    for key in ("w", "b"):
        error = np.abs(result.update_sum[key] / result.weight
                       - plain_weighted_mean(clients, nodes, key))
        assert error.max() <= mean_bound(result, clients, nodes)


def test_steady_rounds_take_two_exchanges_and_still_sum_exactly_the_cohort():
    clients = fake_clients(5)
    rounds = run_rounds(StageGrid(range(5), trainer(clients)), [list(range(5))] * 4)
    assert [calls for _, calls in rounds] == [4, 2, 2, 2]
    for result, _ in rounds:
        assert_plain_mean(result, clients, range(5))


def test_a_cohort_that_changes_is_keyed_ahead_with_setup_only_messages_for_newcomers():
    clients = fake_clients(7)
    grid = StageGrid(range(7), trainer(clients))
    cohorts = [[0, 1, 2, 3, 4], [1, 2, 3, 4, 5, 6], [0, 2, 3, 5, 6]]
    rounds = run_rounds(grid, cohorts)
    assert [calls for _, calls in rounds] == [4, 2, 2]
    for (result, _), cohort in zip(rounds, cohorts, strict=True):
        assert_plain_mean(result, clients, cohort)
    # Newcomers 5 and 6 got round 2's setup alone while round 1 collected.
    alone = [m for m in grid.sent if m.metadata.dst_node_id in (5, 6)
             and m.content["secagg"]["stage"] == "setup"]
    assert [m.content["secagg"]["round"] for m in alone] == [2, 2]
    assert all("arrays" not in m.content for m in alone)


def test_a_round_whose_cohort_differs_from_the_one_keyed_ahead_starts_cold_and_is_correct():
    clients = fake_clients(6)
    cohorts = [[0, 1, 2, 3, 4], [1, 2, 3, 4, 5]]
    rounds = run_rounds(StageGrid(range(6), trainer(clients)), cohorts,
                        predicted=[cohorts[0], [0, 1, 2, 3, 4]])
    assert [calls for _, calls in rounds] == [4, 4]
    assert_plain_mean(rounds[1][0], clients, cohorts[1])


def test_a_node_dropping_from_the_next_rounds_setup_is_left_out_of_that_round_only():
    clients = fake_clients(6)
    grid = StageGrid(range(6), trainer(clients))
    real = grid.send_and_receive

    def drop_5_at_round_2_setup(messages, timeout=None):
        kept = [m for m in messages if not (m.metadata.dst_node_id == 5
                                            and m.content["secagg"]["round"] == 2)]
        return real(kept, timeout)

    grid.send_and_receive = drop_5_at_round_2_setup
    rounds = run_rounds(grid, [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5]])
    assert rounds[1][1] == 2 and rounds[1][0].lost == [5]
    assert rounds[1][0].num_clients == 5


def _loop(monkeypatch, strategy, cohort_size, num_rounds=4):
    """server_loop.train_round for `num_rounds` rounds over 6 StageGrid nodes, with one
    session; the exchanges each round paid."""
    cfg = compose(["secagg=secaggplus", f"num_rounds={num_rounds}"])
    grid = StageGrid(range(6), trainer(fake_clients(6)))
    counted, session, weights, calls = Counting(grid), server.SecAggSession(), REFERENCE, []
    monkeypatch.setattr(secagg_round, "exchange", lambda _grid, m, t: counted(m, t))
    for rnd in range(1, num_rounds + 1):
        before = counted.calls
        weights, row = server_loop.train_round(grid, strategy, cfg, rnd, weights, session)
        assert row["secagg_clients"] == cohort_size and row["lost_nodes"] == []
        calls.append(counted.calls - before)
    return calls


def test_an_fl_app_strategy_runs_round_1_in_four_exchanges_and_later_rounds_in_two(
        monkeypatch):
    strategy = WeightedFedAvg(fraction_train=0.84, min_train_nodes=2, min_available_nodes=2,
                              seed=3)
    assert _loop(monkeypatch, strategy, 5) == [4, 2, 2, 2]


def test_flowers_fedavg_cannot_say_its_next_cohort_and_pays_four_exchanges_every_round(
        monkeypatch):
    fedavg = FedAvg(fraction_train=1.0, min_train_nodes=2, min_available_nodes=2)
    assert _loop(monkeypatch, fedavg, 6, num_rounds=3) == [4, 4, 4]


def test_next_cohort_is_exactly_the_sample_configure_train_draws():
    grid = StageGrid(range(20), None)
    strategy = WeightedFedAvg(fraction_train=0.3, min_train_nodes=2, min_available_nodes=2,
                              seed=11)
    for rnd in range(1, 6):
        ahead = strategy.next_cohort(grid, rnd)
        sent = strategy.configure_train(rnd, server_loop.to_array_record(REFERENCE),
                                        server_loop.ConfigRecord(), grid)
        assert ahead == sorted(m.metadata.dst_node_id for m in sent)
    assert len({tuple(strategy.next_cohort(grid, rnd)) for rnd in range(1, 6)}) > 1


def test_dp_noise_next_cohort_is_its_poisson_draw_and_leaves_budget_and_noise_alone():
    cfg = compose(["+experiment=hospitals", "strategy=dp_fedavg", "secagg=secaggplus",
                   "fraction_train=0.5", "num_clients=20"])
    dp = instantiate(cfg.strategy)
    grid = StageGrid(range(20), None)
    for rnd in range(1, 5):
        ahead = dp.next_cohort(grid, rnd)
        assert dp.rounds_done == 0
        sent = dp.configure_train(rnd, server_loop.to_array_record(REFERENCE),
                                  server_loop.ConfigRecord(), grid)
        assert ahead == sorted(m.metadata.dst_node_id for m in sent)


def test_next_cohort_says_nothing_while_too_few_nodes_are_connected():
    strategy = WeightedFedAvg(fraction_train=1.0, min_train_nodes=4, min_available_nodes=4)
    assert strategy.next_cohort(StageGrid(range(3), None), 2) is None


def test_only_strategies_with_next_cohort_declare_plans_cohort():
    from fl_app.privacy.central import DPNoise
    from fl_app.strategies import features

    assert features.of(WeightedFedAvg)["plans_cohort"] is True
    assert features.of(DPNoise)["plans_cohort"] is True
    assert features.of(FedAvg)["plans_cohort"] is False
    assert features.of(object)["plans_cohort"] is False
    assert not hasattr(FedAvg, "next_cohort")


@pytest.mark.parametrize("stage", ["collect", "unmask"])
def test_a_malformed_piggybacked_reply_drops_its_node_from_the_next_round_only(stage):
    clients = fake_clients(6)

    def strip_next(at, nid, content):
        if at == stage and nid == 2:
            del content["secagg-next"]

    grid = StageGrid(range(6), trainer(clients), alter=strip_next)
    rounds = run_rounds(grid, [list(range(6))] * 2)
    assert_plain_mean(rounds[0][0], clients, range(6))  # this round keeps node 2
    assert rounds[1][1] == 2 and rounds[1][0].lost == [2]
    nodes = [0, 1, 3, 4, 5]
    for key in ("w", "b"):
        error = np.abs(rounds[1][0].update_sum[key] / rounds[1][0].weight
                       - plain_weighted_mean(clients, nodes, key))
        assert error.max() <= mean_bound(rounds[1][0], clients, nodes)
