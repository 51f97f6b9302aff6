"""Distributed DP inside secure aggregation (secagg.noise=distributed): the clients noise what
they mask, so the sum the server unmasks is already private; no server path adds noise or
holds the exact sum; epsilon follows the clients that survived."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Context, MetricRecord, RecordDict
from hydra.utils import instantiate
from strategy_helpers import set_task_identity
from test_secagg import StageGrid, train_messages, trainer

from fl_app import client_core, server_loop
from fl_app.config import ConfigError, compose
from fl_app.inprocess import InProcessGrid
from fl_app.privacy import distributed
from fl_app.privacy.accounting import PrivacyBudgetExhausted
from fl_app.privacy.central import DPNoise
from fl_app.privacy.noise import GaussianNoise
from fl_app.secagg import client, protocol, server, vectors
from fl_app.secagg.settings import SecAggError, SecAggSettings
from fl_app.strategies import WeightedFedAvg

S = SecAggSettings(noise="distributed")
CLIP, SIGMA, SIZE = 1.0, 0.5, 20_000


@pytest.fixture(autouse=True)
def _identity(monkeypatch):
    set_task_identity(monkeypatch)


def updates(num: int, norm: float = 3.0) -> dict:
    """Per node: an update of L2 norm `norm` (> C: each is clipped), 50 examples, a loss."""
    rng = np.random.default_rng(1)
    out = {}
    for n in range(num):
        w = rng.normal(0, 1, SIZE)
        out[n] = ({"w": (w * norm / np.linalg.norm(w)).astype(np.float32)}, 50, 1.0)
    return out


def clipped_sum(clients: dict, nodes) -> np.ndarray:
    total = np.zeros(SIZE)
    for n in nodes:
        w = clients[n][0]["w"].astype(np.float64)
        total += w * min(1.0, CLIP / np.linalg.norm(w))
    return total


def distributed_sum(grid: StageGrid, nodes, **kwargs) -> server.SecureSum:
    current = {"w": np.zeros(SIZE, np.float32)}
    return server.secure_sum(1, train_messages(nodes, current), S, grid.send_and_receive, None,
                             60, weighted=False, clip_norm=CLIP, noise_multiplier=SIGMA,
                             **kwargs)


def test_the_unmasked_sum_is_the_clipped_sum_plus_the_calibrated_noise_and_nothing_else(
        monkeypatch):
    """Every aggregate the server side holds (the unmasked integer sum, its decoding) already
    carries the clients' noise: its difference from the true clipped sum has the std the
    threshold calibration promises for the survivors, and mean ~0."""
    clients = updates(5)
    held = []  # every sum the server decodes, as the update it stands for
    real_decode = distributed.server_decode

    def spy(total, params, seed):
        out = real_decode(total, params, seed)
        held.append((out.copy(), params))
        return out

    monkeypatch.setattr(distributed, "server_decode", spy)
    result = distributed_sum(StageGrid(range(5), trainer(clients)), range(5))
    assert result.noise.survivors == tuple(range(5)) and result.noise.cohort == 5
    (decoded, params), = held
    error = result.update_sum["w"].astype(np.float64) - clipped_sum(clients, range(5))
    assert np.array_equal(decoded, result.update_sum["w"].ravel())
    expected = params.noise_std(5)  # 5 survivors, calibrated for t = 4: more than the target
    assert expected == pytest.approx(SIGMA * CLIP * math.sqrt(5 / result.noise.threshold),
                                     rel=1e-3)
    assert abs(error.std() / expected - 1) < 0.03
    assert abs(error.mean()) < 5 * expected / math.sqrt(SIZE)
    assert result.num_clipped == 0 and result.weight == 5


def test_no_server_code_path_draws_noise_or_releases_an_exact_sum(monkeypatch):
    """A whole DP round through train_round: the server's noise generator is never touched,
    and the released model differs from the exact mean by the clients' noise."""
    cfg = compose(["+experiment=hospitals", "strategy=dp_fedavg", "secagg=secaggplus",
                   "secagg.noise=distributed", "strategy.noise_multiplier=1.0",
                   "fraction_train=1.0"])

    def forbidden(*args, **kwargs):
        raise AssertionError("the server drew DP noise under distributed DP")

    monkeypatch.setattr(GaussianNoise, "like", forbidden)
    monkeypatch.setattr(GaussianNoise, "normal", forbidden)
    client_core.clear_client_cache()
    grid = InProcessGrid(["+experiment=hospitals", "strategy=dp_fedavg"], 5)
    strategy = instantiate(cfg.strategy)
    weights = {k: v.copy() for k, v in _weights(cfg).items()}
    dims = sum(a.size for a in weights.values())
    strategy.add_noise_on_clients(dims, int(cfg.secagg.modulus_range))
    new, row = server_loop.train_round(grid, strategy, cfg, 1, dict(weights))
    assert row["train_noise-survivors"] == 5 and row["train_epsilon"] > 0
    assert "train_epsilon-pld" not in row  # Skellam: RDP only, said so
    assert any(not np.array_equal(new[k], weights[k]) for k in weights)


def test_epsilon_rises_when_clients_drop_and_the_round_says_how_many_noised_it():
    clients = updates(8)
    full = distributed_sum(StageGrid(range(8), trainer(clients)), range(8))
    dropped = distributed_sum(StageGrid(range(8), trainer(clients),
                                        drop={protocol.COLLECT: {6, 7}}), range(8))
    assert len(full.noise.survivors) == 8 and dropped.noise.survivors == tuple(range(6))
    assert dropped.noise.threshold == full.noise.threshold  # calibrated before anyone dropped
    epsilons = []
    for result in (full, dropped):
        dp = DPNoise(WeightedFedAvg(fraction_train=0.5, seed=0), clip_norm=CLIP,
                     noise_multiplier=SIGMA, num_clients=12)
        dp.inner.set_current({"w": np.zeros(SIZE, np.float32)})
        dp.add_noise_on_clients(SIZE, S.modulus_range)
        _, metrics = dp.release_secure_sum(1, result.update_sum, result.num_clients, 300, 0,
                                           MetricRecord({}), noised=result.noise)
        assert metrics["noise-survivors"] == len(result.noise.survivors)
        epsilons.append(metrics["epsilon"])
    assert epsilons[1] > epsilons[0] * 1.05


def test_a_distributed_release_without_the_clients_noise_is_refused():
    dp = DPNoise(WeightedFedAvg(fraction_train=0.5, seed=0), clip_norm=CLIP,
                 noise_multiplier=SIGMA, num_clients=12)
    dp.inner.set_current({"w": np.zeros(SIZE, np.float32)})
    dp.add_noise_on_clients(SIZE, S.modulus_range)
    with pytest.raises(ValueError, match="un-noised"):
        dp.release_secure_sum(1, {"w": np.ones(SIZE)}, 3, 150, 0, MetricRecord({}))
    with pytest.raises(RuntimeError, match="only secure sums"):
        dp.aggregate_train(1, [])
    central = DPNoise(WeightedFedAvg(fraction_train=0.5, seed=0), clip_norm=CLIP,
                      noise_multiplier=SIGMA, num_clients=12)
    central.inner.set_current({"w": np.zeros(SIZE, np.float32)})
    with pytest.raises(ValueError, match="add_noise_on_clients"):  # it would noise it twice
        central.release_secure_sum(1, {"w": np.ones(SIZE)}, 3, 150, 0, MetricRecord({}),
                                   noised=distributed.ClientNoise((0, 1, 2), 2, 3))


def test_a_node_with_a_noise_floor_refuses_a_server_that_asks_for_less_or_for_none():
    """A SuperNode's operator sets --node-config "min-noise-multiplier=1.0": a server asking
    for less noise, or for central noise (it would see the exact sum), gets no update, and
    the node's training never runs."""
    clients = updates(5)
    trained = []

    def train(nid, content):
        trained.append(nid)
        return trainer(clients)(nid, content)

    for noise in (SIGMA, None):  # SIGMA = 0.5 < 1.0; None: secagg.noise=central
        trained.clear()
        grid = StageGrid(range(5), train)
        grid.contexts[2].node_config["min-noise-multiplier"] = 1.0
        current = {"w": np.zeros(SIZE, np.float32)}
        result = server.secure_sum(1, train_messages(range(5), current), S,
                                   grid.send_and_receive, None, 60, weighted=False,
                                   clip_norm=CLIP, noise_multiplier=noise)
        assert 2 not in trained and 2 in result.lost
        refusal = next(m for m in grid.received if m.has_error()
                       and m.metadata.src_node_id == 2)
        assert "min-noise-multiplier" in refusal.error.reason


def test_the_client_derives_the_noise_from_its_own_threshold_not_the_servers_word():
    """The collect request carries no derived value: a server that adds a smaller variance or a
    larger threshold to it changes nothing the client adds."""
    clients = updates(5)

    grid = StageGrid(range(5), trainer(clients))
    sent_keys = set()
    real_send = grid.send_and_receive

    def send(messages, timeout=None):
        for m in messages:
            if m.content["secagg"]["stage"] == protocol.COLLECT:
                request = m.content["secagg"]
                request["client_variance"] = 1e-9
                request["threshold"] = 1000
                sent_keys.update(request.keys())
        return real_send(messages, timeout)

    current = {"w": np.zeros(SIZE, np.float32)}
    result = server.secure_sum(1, train_messages(range(5), current), S, send, None, 60,
                               weighted=False, clip_norm=CLIP, noise_multiplier=SIGMA)
    assert {protocol.NOISE_MULTIPLIER, protocol.COHORT, protocol.ROTATION_SEED} <= sent_keys
    error = result.update_sum["w"].astype(np.float64) - clipped_sum(clients, range(5))
    params = distributed.calibrate(CLIP, SIGMA, SIZE, result.noise.threshold, 5)
    assert abs(error.std() / params.noise_std(5) - 1) < 0.03


@pytest.mark.parametrize("bad,named", [
    ({protocol.ROTATION_SEED: b"short"}, "rotation seed"),
    ({protocol.NOISE_MULTIPLIER: -1.0}, "noise_multiplier"),
    ({protocol.COHORT: 2}, "threshold"),
])
def test_a_malformed_distributed_request_is_refused_by_the_client(bad, named):
    update = [np.zeros(10, np.float32)]
    request = {"clip-norm": 1.0, protocol.NOISE_MULTIPLIER: 1.0, protocol.COHORT: 5,
               protocol.ROTATION_SEED: bytes(32), **bad}
    state = {"reconstruction_threshold": 4}
    with pytest.raises(SecAggError, match=named):
        client.noise_share(update, request, state, 7, S)


def test_the_budget_stop_counts_the_next_round_at_its_least_noise():
    dp = DPNoise(WeightedFedAvg(fraction_train=1.0, seed=0), clip_norm=CLIP,
                 noise_multiplier=2.0, num_clients=5, max_epsilon=3.0)
    dp.add_noise_on_clients(1000, 2**32)
    noised = distributed.ClientNoise((0, 1, 2, 3, 4), 4, 5)
    spent = []
    with pytest.raises(PrivacyBudgetExhausted, match="distributed"):
        for _ in range(100):
            dp.client_noise.check_budget(dp.max_epsilon, 5)
            dp.client_noise.record(noised)
            spent.append(dp.client_noise.epsilon())
    assert spent and spent[-1] <= 3.0
    assert dp.client_noise.epsilon(lookahead=1) > 3.0


def test_a_checkpoint_keeps_who_survived_so_resumed_epsilon_is_the_same():
    def strategy():
        dp = DPNoise(WeightedFedAvg(fraction_train=0.5, seed=0), clip_norm=CLIP,
                     noise_multiplier=SIGMA, num_clients=12)
        dp.add_noise_on_clients(1000, 2**32)
        return dp

    before = strategy()
    for survivors in ((0, 1, 2, 3, 4, 5), (0, 1, 2, 3), None):
        before.client_noise.record(None if survivors is None
                                   else distributed.ClientNoise(survivors, 4, 6))
    before.rounds_done = 3
    after = strategy()
    after.load_state_dict(before.state_dict())
    assert after.epsilon == pytest.approx(before.client_noise.epsilon())
    assert after.client_noise.epsilon_vs_server() == before.client_noise.epsilon_vs_server()


@pytest.mark.parametrize("overrides,named", [
    (["strategy=fedavg"], "adds no DP noise"),
    (["strategy=dp_fedavg_adaptive"], "adaptive clipping"),
    (["strategy=dp_fedavg", "secagg.noise=gaussian"], "secagg.noise"),
])
def test_distributed_noise_needs_central_dp_with_fixed_clipping(overrides, named):
    with pytest.raises(ConfigError, match=named):
        compose(["secagg=secaggplus", "secagg.noise=distributed", *overrides])


def test_vectors_carry_the_distributed_integers_beside_the_quantized_metrics():
    ints = np.arange(8, dtype=np.int64) * 1000
    vector = vectors.encode([], [0.5], 1.0, 40, S, ints)
    total = (vector + vector).astype(np.uint32)
    weight, examples, _, metrics, update = vectors.decode(total, 2, 1, S, integers=True)
    assert weight == 2 and examples == 80
    assert metrics[0] == pytest.approx(1.0, abs=1e-5)
    assert np.array_equal(update, 2 * ints)


def _weights(cfg) -> dict:
    import torch

    from fl_app.models import get_weights
    torch.manual_seed(cfg.seed)
    return get_weights(instantiate(cfg.model))


def test_context_free_node_config_floor_must_be_a_positive_number():
    grid_context = Context(run_id=1, node_id=3, node_config={"min-noise-multiplier": "x"},
                           state=RecordDict(), run_config={})
    with pytest.raises(SecAggError, match="positive number"):
        client._noise_floor(grid_context, 3)
