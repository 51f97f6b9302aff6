"""TorchClient trains, returns true gradients, applies FedProx's proximal term, and refuses a
mismatched federation."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fl_app import training
from fl_app.client_core import build_client
from fl_app.config import compose
from fl_app.models import MLP


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


def test_delta_mode_returns_the_trained_weights_minus_the_received_ones():
    """DP-FedAvg's clients send W_i - W: exactly what the server would form from W_i."""
    a, b = _client(), _client()
    received = a.get_parameters({})
    weights, n, metrics = a.fit(received, {"server-round": 2})
    deltas, n_delta, metrics_delta = b.fit(received, {"mode": "delta", "server-round": 2})
    assert (n, metrics) == (n_delta, metrics_delta)
    for w, d, r in zip(weights, deltas, received, strict=True):
        assert d.dtype == w.dtype and d.shape == w.shape
        np.testing.assert_array_equal(d, w - r)
    assert max(float(np.abs(d).max()) for d in deltas) > 0


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


def test_client_refuses_a_reply_kind_it_does_not_know_and_reports_its_steps():
    # A server (another version, or one probing the client) asking for an unnamed reply kind
    # gets one error, never a reply of some other kind; an honest reply counts its steps.
    client = _client("local_epochs=2", "batch_size=32")
    params = client.get_parameters({})
    with pytest.raises(ValueError, match="different fl_app versions"):
        client.fit(params, {"mode": "raw-data", "server-round": 1})
    _, n, metrics = client.fit(params, {"mode": "weights", "server-round": 1})
    assert metrics["num-steps"] == 2 * -(-n // 32)


def test_torch_is_seeded_so_the_initial_model_is_reproducible():
    a, b = _client(), _client()
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(),
                                                 b.model.state_dict().values(), strict=True))


# FedProx: Flower's FedProx sends "proximal-mu"; the client adds mu/2·||w − w_received||².

def _distance(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((x.astype(np.float64) - y) ** 2)
                             for x, y in zip(a, b, strict=True))))


def test_proximal_gradient_is_the_gradient_of_half_mu_squared_distance_mu_times_w_minus_w0():
    torch.manual_seed(0)
    params = [torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    anchor = [torch.randn(4, 3), torch.randn(3)]
    mu = 0.3
    term = mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
    autograd = torch.autograd.grad(term, params)
    for p in params:  # a data-loss gradient already there is added to, not replaced
        p.grad = torch.ones_like(p)
    training.add_proximal_gradient(params, anchor, mu)
    for p, a, g in zip(params, anchor, autograd, strict=True):
        torch.testing.assert_close(g, mu * (p.detach() - a))
        torch.testing.assert_close(p.grad, 1 + mu * (p.detach() - a))


def test_fit_with_proximal_mu_zero_equals_plain_training_bit_for_bit():
    a, b = _client(), _client()
    wa, _, _ = a.fit(a.get_parameters({}), {"server-round": 3})
    wb, _, _ = b.fit(b.get_parameters({}), {"server-round": 3, "proximal-mu": 0.0})
    assert all(np.array_equal(x, y) for x, y in zip(wa, wb, strict=True))


@pytest.mark.parametrize("privacy", ["none", "dpsgd"])
def test_fit_with_a_huge_proximal_mu_stays_near_the_received_weights(privacy):
    # lr·mu = 1: every step pulls the weights all the way back to the received ones, so they
    # end one step away from them instead of a whole local training run away.
    start = _client().get_parameters({})
    moved = {}
    for mu in (0.0, 10.0):
        client = _client(f"privacy={privacy}", "lr=0.1", "local_epochs=2")
        weights, _, _ = client.fit(start, {"server-round": 1, "proximal-mu": mu})
        moved[mu] = _distance(weights, start)
    assert 0 < moved[10.0] < 0.35 * moved[0.0]


def _mlp_and_data():
    torch.manual_seed(0)
    model = MLP(input_shape=(1, 8, 8), num_classes=10, hidden=16)
    return model, torch.randn(40, 1, 8, 8), torch.randint(0, 10, (40,))


def _train_from(start: dict, epochs: int, mu: float, dpsgd: bool) -> list[torch.Tensor]:
    model, x, y = _mlp_and_data()
    model.load_state_dict(start)
    if dpsgd:  # q = 1 and no noise to speak of: DP-SGD becomes deterministic full-batch GD
        training.train_dpsgd(model, x, y, epochs, None, 0.5, 1e-9, 100.0, [], proximal_mu=mu)
    else:
        training.train(model, x, y, epochs, None, 0.5, seed=0, proximal_mu=mu)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("dpsgd", [False, True], ids=["sgd", "dpsgd"])
def test_proximal_step_adds_lr_mu_times_the_distance_to_the_global_weights(dpsgd):
    # Full-batch steps from w0: w1 = w0 − lr·g(w0), the proximal pull being zero at w0; then
    # w2 = w1 − lr·(g(w1) + mu·(w1 − w0)). So w2(mu) − w2(0) = −lr·mu·(w1 − w0) exactly.
    model, _, _ = _mlp_and_data()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    w0 = [p.detach().clone() for p in model.parameters()]
    mu, lr = 0.8, 0.5
    w1 = _train_from(start, 1, 0.0, dpsgd)
    with_prox, without = _train_from(start, 2, mu, dpsgd), _train_from(start, 2, 0.0, dpsgd)
    for a, b, p1, p0 in zip(with_prox, without, w1, w0, strict=True):
        torch.testing.assert_close(a - b, -lr * mu * (p1 - p0), rtol=1e-4, atol=1e-6)


def test_fit_refuses_a_negative_proximal_mu_or_one_that_makes_local_sgd_diverge():
    client = _client("lr=0.1")
    params = client.get_parameters({})
    with pytest.raises(ValueError, match=">= 0"):
        client.fit(params, {"proximal-mu": -1.0})
    with pytest.raises(ValueError, match="diverges.*proximal_mu < 20"):
        client.fit(params, {"proximal-mu": 20.0})


def test_local_sgd_takes_exactly_torch_optim_sgd_steps():
    torch.manual_seed(0)
    x, y = torch.randn(95, 1, 8, 8), torch.randint(0, 10, (95,))
    ours, reference = MLP((1, 8, 8), 10), MLP((1, 8, 8), 10)
    reference.load_state_dict(ours.state_dict())
    training.train(ours, x, y, epochs=2, batch_size=10, lr=0.1, seed=3)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(3)
    for _ in range(2):
        for idx in training._batches(len(y), 10, generator):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(reference(x[idx]), y[idx]).backward()
            optimizer.step()
    for a, b in zip(ours.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)


def test_local_training_does_not_import_torch_dynamo():
    # torch.optim.SGD's first construction imports torch._dynamo: 1.7 s in every client
    # process's first round.
    code = ("import sys, torch; from fl_app import training; from fl_app.models import MLP\n"
            "training.train(MLP((1, 4, 4), 3), torch.randn(8, 1, 4, 4), torch.arange(8) % 3, "
            "1, 4, 0.1, 0)\n"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_small_dense_models_train_on_one_thread_and_others_on_the_process_threads(monkeypatch):
    from flwr.app import ConfigRecord, Context, RecordDict
    from strategy_helpers import record

    from fl_app import client_core
    from fl_app.models import CNN, is_small_dense

    assert is_small_dense(MLP((1, 28, 28), 10)) and not is_small_dense(CNN((1, 28, 28), 10))
    assert not is_small_dense(MLP((1, 28, 28), 10, hidden=2000))  # 5.6 M multiply-adds
    monkeypatch.delenv("FL_APP_TORCH_THREADS", raising=False)
    monkeypatch.setattr(client_core, "_process_threads", [3])
    before = torch.get_num_threads()

    def message(model: str, run_id: int):
        overrides = f"dataset=digits model={model}"
        client = build_client(compose(overrides.split()), 0, 4)
        content = RecordDict({"arrays": record(dict(zip(client.keys, client.get_parameters({}),
                                                        strict=True))),
                              "config": ConfigRecord({"server-round": 1})})
        context = Context(run_id=run_id, node_id=1, state=RecordDict(),
                          node_config={"partition-id": 0, "num-partitions": 4},
                          run_config={"overrides": overrides})
        return content, context

    try:  # one process serving both models (an fl-app-executor serves every run of its node)
        for (content, context), threads in ((message("mlp", 91), 1), (message("cnn", 92), 3),
                                             (message("mlp", 91), 1)):
            client_core.handle("train", content, context)
            assert torch.get_num_threads() == threads
        monkeypatch.setenv("FL_APP_TORCH_THREADS", "2")
        assert client_core._threads_for(MLP((1, 8, 8), 10)) == 2
    finally:
        torch.set_num_threads(before)


def _train_message(run_id: int, state, server_round: int):
    from flwr.app import ConfigRecord, Context, RecordDict
    from strategy_helpers import record

    run_config = {"dataset": "digits", "privacy": "local",
                  "overrides": "batch_size=32 local_epochs=1"}
    client = _client("privacy=local", partition_id=1)
    content = RecordDict({"arrays": record(dict(zip(client.keys, client.get_parameters({}),
                                                    strict=True))),
                          "config": ConfigRecord({"server-round": server_round})})
    context = Context(run_id=run_id, node_id=3, state=state, run_config=run_config,
                      node_config={"partition-id": 1, "num-partitions": 4})
    return content, context


def test_one_process_serves_every_run_with_clients_of_their_own():
    """An fl-app-executor serves every run of its SuperNode from one client cache: a new run's
    client starts its privacy accounting from zero, not from the previous run's."""
    from flwr.app import RecordDict

    from fl_app.client_core import handle

    first_run_state = RecordDict()
    handle("train", *_train_message(9105, first_run_state, 1))
    once = handle("train", *_train_message(9105, first_run_state, 2))
    fresh = handle("train", *_train_message(9106, RecordDict(), 1))
    assert fresh["metrics"]["local_epsilon"] < once["metrics"]["local_epsilon"]
