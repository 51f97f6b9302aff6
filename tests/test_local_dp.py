"""Specifications of local DP: the client clips and noises its update before it leaves it."""

import dp_accounting
import numpy as np
import pytest
from dp_accounting import dp_event, rdp
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from strategy_helpers import record, set_task_identity

from fl_app import client_app, client_core
from fl_app.client_core import build_client
from fl_app.config import compose
from fl_app.privacy.client import LocalDP


def global_norm(update: dict[str, np.ndarray]) -> float:
    """L2 norm of all arrays together, in float64."""
    return float(np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for v in update.values())))


class NoNoise:
    """An rng whose Gaussian draws are all zero: what `privatize` sends before noise."""

    def normal(self, loc: float, scale: float, size) -> np.ndarray:
        return np.zeros(size)


def local_client(*overrides: str, partition_id: int = 0, **privacy: float):
    cfg = compose(["dataset=digits", "privacy=local", "local_epochs=2", "lr=0.1",
                   *[f"privacy.{k}={v}" for k, v in privacy.items()], *overrides])
    return build_client(cfg, partition_id, 4)


def test_update_norm_before_noise_is_at_most_c_and_small_updates_pass_unchanged() -> None:
    local = LocalDP(clip_norm=0.7, noise_multiplier=1.0, delta=1e-5, num_clients=10,
                    rng=NoNoise())
    rng = np.random.default_rng(0)
    for scale in np.geomspace(1e-3, 1e3, 100):
        update = {"a": rng.normal(size=(20, 5)), "b": rng.normal(size=7).astype(np.float32)}
        update = {k: (v * scale / global_norm(update)).astype(v.dtype) for k, v in update.items()}
        sent = local.privatize(update)
        assert global_norm(sent) <= 0.7 * (1 + 1e-6)
        assert sent["b"].dtype == np.float32
        if scale <= 0.7 * 0.999:
            np.testing.assert_allclose(sent["a"], update["a"], rtol=1e-12)


def test_local_noise_std_matches_sigma_times_c() -> None:
    sigma, clip = 1.7, 0.4
    local = LocalDP(clip, sigma, delta=1e-5, num_clients=10, rng=np.random.default_rng(5))
    update = {"w": np.full(200_000, 1.0)}  # norm ~447: clipped to 0.4, i.e. ~9e-4 per coordinate
    noise = local.privatize(update)["w"] - clip / np.sqrt(200_000)
    assert noise.std() == pytest.approx(sigma * clip, rel=0.02)
    assert abs(noise.mean()) < 5 * sigma * clip / np.sqrt(noise.size)


def test_local_dp_reply_is_received_plus_noisy_clipped_delta_and_carries_no_loss() -> None:
    sigma, clip = 0.5, 0.3
    noisy, clean = local_client(noise_multiplier=sigma, clip_norm=clip), local_client(
        "privacy=none")
    received = noisy.get_parameters({})
    sent, n, metrics = noisy.fit(received, {"server-round": 1})
    trained, _, clean_metrics = clean.fit(received, {"server-round": 1})

    delta = np.concatenate([(t - r).ravel() for t, r in zip(trained, received, strict=True)])
    assert np.linalg.norm(delta) > clip  # the real update is clipped
    clipped = delta * clip / np.linalg.norm(delta)
    noise = np.concatenate([(s - r).ravel() for s, r in zip(sent, received, strict=True)])
    noise -= clipped
    assert noise.std() == pytest.approx(sigma * clip, rel=0.03)  # ~19k coordinates
    assert n == len(noisy.data.y_train)
    assert "train_loss" in clean_metrics and "train_loss" not in metrics
    # Besides the privacy settings, only the local step count (a function of the example
    # count the reply carries anyway and of the run's config: FedNova needs it).
    assert set(metrics) == {"local_epsilon", "local_epsilon_rdp", "local_epsilon_pld",
                            "local_delta", "local_noise_multiplier", "local_clip_norm",
                            "num-steps"}


def test_local_dp_in_delta_mode_sends_the_noisy_clipped_delta_itself() -> None:
    client = local_client(noise_multiplier=1.0, clip_norm=1e-6)  # the delta is clipped away
    sent, _, metrics = client.fit(client.get_parameters({}), {"mode": "delta", "server-round": 1})
    flat = np.concatenate([d.ravel() for d in sent])
    assert flat.std() == pytest.approx(1e-6, rel=0.03)  # noise only: not the received weights
    assert abs(flat.mean()) < 5 * 1e-6 / np.sqrt(flat.size)
    assert metrics["local_epsilon"] > 0


def test_local_dp_noises_the_gradient_in_fedsgd_mode() -> None:
    client = local_client(noise_multiplier=1.0, clip_norm=1e-6)  # the gradient is clipped away
    sent, _, metrics = client.fit(client.get_parameters({}),
                                  {"mode": "gradient", "server-round": 1})
    flat = np.concatenate([g.ravel() for g in sent])
    assert flat.std() == pytest.approx(1e-6, rel=0.03)
    assert metrics["local_epsilon"] > 0


def test_local_noise_comes_from_os_entropy_not_the_config_seed() -> None:
    a, b = local_client(), local_client()
    received = a.get_parameters({})
    sent_a, _, _ = a.fit(received, {"server-round": 1})
    sent_b, _, _ = b.fit(received, {"server-round": 1})
    assert not np.array_equal(sent_a[0], sent_b[0])  # same seed, same data, different noise


def test_local_epsilon_is_the_gaussian_mechanism_with_sensitivity_2c_over_the_clients_releases(
) -> None:
    sigma, delta = 2.0, 1e-5
    local = LocalDP(1.0, sigma, delta, num_clients=100, rng=np.random.default_rng(0))
    assert local.epsilon() == 0.0
    epsilons = []
    for releases in range(1, 4):
        local.privatize({"w": np.ones(3)})
        accountant = rdp.RdpAccountant(
            neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
        # Any two local datasets give updates up to 2C apart: noise sigma*C is sigma/2 per 2C.
        accountant.compose(dp_event.GaussianDpEvent(sigma / 2), releases)
        assert local.epsilons().rdp == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)
        epsilons.append(local.epsilon())
    assert epsilons[0] < epsilons[1] < epsilons[2]
    more_noise = LocalDP(1.0, 2 * sigma, delta, num_clients=100)
    more_noise.releases = 3
    assert more_noise.epsilon() < epsilons[2]


def test_client_epsilon_survives_the_clientapp_cache_through_context_state(monkeypatch) -> None:
    set_task_identity(monkeypatch)
    run_config = {"dataset": "digits", "privacy": "local", "overrides": "batch_size=32"}
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 4},
                      state=RecordDict(), run_config=run_config)
    model = build_client(compose(["dataset=digits"]), 1, 4).get_parameters({})
    keys = list(build_client(compose(["dataset=digits"]), 1, 4).keys)

    def train_round(server_round: int) -> float:
        msg = Message(RecordDict({"arrays": record(dict(zip(keys, model, strict=True))),
                                  "config": ConfigRecord({"server-round": server_round})}),
                      dst_node_id=7, message_type=MessageType.TRAIN)
        reply = client_app.train(msg, context)
        return reply.content["metrics"]["local_epsilon"]

    first = train_round(1)
    client_core._cached_client.cache_clear()  # as when the cache evicts this partition's client
    second = train_round(2)
    local = LocalDP(1.0, 1.0, 1e-5, num_clients=4)
    local.releases = 2
    assert first < second == pytest.approx(local.epsilon())


@pytest.mark.parametrize(("settings", "named"), [
    ({"noise_multiplier": 0.0}, "noise_multiplier"),
    ({"noise_multiplier": -1.0}, "noise_multiplier"),
    ({"clip_norm": 0.0}, "clip_norm"),
    ({"delta": 1.0}, "delta"),
    ({"delta": 0.0}, "delta"),
    ({"delta": 0.5}, "1/num_clients"),  # 4 clients: delta must be well below 0.25
])
def test_bad_local_dp_settings_are_refused_naming_the_setting(settings, named) -> None:
    kwargs = {"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5, "num_clients": 4,
              **settings}
    with pytest.raises(ValueError, match=named):
        LocalDP(**kwargs)
