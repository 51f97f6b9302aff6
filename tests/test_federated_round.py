"""One federated round with real TorchClients equals the centralized computation it stands for."""

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ConfigRecord
from strategy_helpers import SimulatedGrid, record, serve, set_task_identity, unpack

from fl_app.client_core import build_client
from fl_app.config import compose
from fl_app.strategies import GradientAveraging, WeightedFedAvg

LR = 0.3


def _clients(n: int, partitioner: str = "dirichlet"):
    cfg = compose(["dataset=digits", f"partitioner={partitioner}", "batch_size=null",
                   f"lr={LR}", "val_fraction=0"])
    return [build_client(cfg, i, n) for i in range(n)]


def _round(strategy, clients):
    grid = SimulatedGrid(list(range(len(clients))), serve(clients))
    start = {k: v.numpy().copy() for k, v in clients[0].model.state_dict().items()}
    messages = strategy.configure_train(1, record(start), ConfigRecord(), grid)
    new, _ = strategy.aggregate_train(1, grid.send_and_receive(messages))
    return start, unpack(new)


def test_fedsgd_round_with_full_batch_gradients_equals_one_centralized_gd_step(monkeypatch):
    set_task_identity(monkeypatch)
    clients = _clients(3)
    strategy = GradientAveraging(server_lr=LR, min_train_nodes=3, min_available_nodes=3)
    start, federated = _round(strategy, clients)

    # Centralized: one step of gradient descent on the union of the clients' data.
    model = clients[0].model
    model.load_state_dict({k: torch.from_numpy(v) for k, v in start.items()})
    x = torch.cat([c.data.x_train for c in clients])
    y = torch.cat([c.data.y_train for c in clients])
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for name, param in model.named_parameters():
        expected = start[name] - LR * param.grad.numpy()
        np.testing.assert_allclose(federated[name], expected, rtol=1e-4, atol=1e-6)
        assert not np.allclose(federated[name], start[name])  # the step really moved


def test_fedavg_round_with_one_full_batch_step_equals_the_same_gd_step(monkeypatch):
    # McMahan et al. 2017: FedAvg with E=1, B=∞ is FedSGD with η = client lr.
    set_task_identity(monkeypatch)
    clients = _clients(3)
    _, fedavg = _round(WeightedFedAvg(min_train_nodes=3, min_available_nodes=3), clients)
    _, fedsgd = _round(GradientAveraging(server_lr=LR, min_train_nodes=3, min_available_nodes=3),
                       _clients(3))
    for name in fedsgd:
        np.testing.assert_allclose(fedavg[name], fedsgd[name], rtol=1e-4, atol=1e-6)
