"""TorchClient trains, returns true gradients, and refuses a mismatched federation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fl_app.client_app import build_client
from fl_app.config import compose


def _client(*overrides, partition_id=0, num_partitions=4):
    cfg = compose(["dataset=digits", *overrides])
    return build_client(cfg, partition_id, num_partitions)


def test_fit_trains_local_epochs_and_lowers_the_validation_loss():
    client = _client("local_epochs=3", "lr=0.1")
    start = client.get_parameters({})
    before, _, _ = client.evaluate(start, {})
    weights, n, metrics = client.fit(start, {"server-round": 1})
    after, n_val, acc = client.evaluate(weights, {})
    assert n == len(client.data.y_train) and n_val == len(client.data.y_val)
    assert after < before * 0.8 and acc["accuracy"] > 0.3  # chance: 0.1
    assert [w.shape for w in weights] == [w.shape for w in start]


def test_gradient_mode_returns_the_full_batch_gradient_of_the_mean_loss():
    client = _client()
    params = client.get_parameters({})
    grads, n, _ = client.fit(params, {"mode": "gradient", "batch-size": 0, "server-round": 1})
    model = client.model
    model.zero_grad()
    F.cross_entropy(model(client.data.x_train), client.data.y_train).backward()
    expected = [p.grad.numpy() for p in model.parameters()]
    assert n == len(client.data.y_train)
    for g, e in zip(grads, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7)


def test_gradient_mode_uses_the_batch_size_the_server_sends():
    client = _client("batch_size=10")
    config = {"mode": "gradient", "batch-size": 16, "server-round": 2}
    _, n, _ = client.fit(client.get_parameters({}), config)
    assert n == 16


def test_fit_is_reproducible_for_the_same_seed_and_round():
    a, b = _client(), _client()
    wa, _, _ = a.fit(a.get_parameters({}), {"server-round": 3})
    wb, _, _ = b.fit(b.get_parameters({}), {"server-round": 3})
    assert all(np.array_equal(x, y) for x, y in zip(wa, wb, strict=True))


def test_client_refuses_a_federation_of_the_wrong_size_naming_the_fix():
    with pytest.raises(ValueError, match="num-supernodes=10"):
        _client("num_clients=10", num_partitions=4)


def test_client_refuses_arrays_of_the_wrong_count_or_shape():
    client = _client()
    params = client.get_parameters({})
    with pytest.raises(ValueError, match="Received 5 arrays"):
        client.fit(params[:5], {})
    params[0] = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match="has shape"):
        client.fit(params, {})


def test_torch_is_seeded_so_the_initial_model_is_reproducible():
    a, b = _client(), _client()
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(),
                                                 b.model.state_dict().values(), strict=True))
