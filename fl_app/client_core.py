"""The client's work: a NumPyClient that wraps local PyTorch training, and what a train or
evaluate message becomes for it (`handle`).

This is the heavy half of the ClientApp (torch, the model, the data). `fl_app.client_app` runs
it in the process that received the message: a simulation actor, a SuperNode's
`fl-app-executor` (both keep it loaded across messages), or Flower's per-message process.
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.client import NumPyClient
from omegaconf import DictConfig

from fl_app import device, targets, training
from fl_app.config import compose, overrides_from_run_config
from fl_app.data import ClientData, client_data, local_data
from fl_app.messages import (
    ARRAYS,
    CONFIG,
    DELTA,
    GRADIENT,
    METRICS,
    NUM_EXAMPLES,
    NUM_STEPS,
    TRAIN_LOSS,
    TrainRequest,
)
from fl_app.models import get_weights, is_small_dense, set_weights
from fl_app.privacy.client import DPSGD, LocalDP
from fl_app.privacy.client import from_config as client_privacy
from fl_app.records import array_view, to_array_record


class TorchClient(NumPyClient):
    """Trains a torch model on one client's data; numpy in, numpy out.

    `fit` answers a train message as fl_app.messages (the contract) says: it runs E local epochs
    and returns the new weights, or for a DELTA reply (DP-FedAvg) their difference from the
    received weights; for a GRADIENT reply (FedSGD) the gradient of the local loss at the
    received weights instead. A PROXIMAL_MU (Flower's FedProx) adds mu/2·||w − w_received||²
    to the local loss. The reply's metrics hold the local steps taken (NUM_STEPS).
    `privacy` (fl_app.privacy.client): DP-SGD replaces the local SGD; local DP clips and noises
    the update before it is returned, and the reply's metrics then hold the client's epsilon
    instead of its training loss.
    """

    def __init__(self, model: torch.nn.Module, data: ClientData, local_epochs: int,
                 batch_size: int | None, lr: float, seed: int,
                 privacy: LocalDP | DPSGD | None = None) -> None:
        self.model, self.data = model, data
        self.local_epochs, self.batch_size, self.lr, self.seed = local_epochs, batch_size, lr, seed
        self.keys = list(model.state_dict())
        self.privacy = privacy
        self.threads: int | None = None  # torch threads to train with; None: leave as is
        if isinstance(privacy, DPSGD):
            privacy.check_dataset_size(len(data.y_train))

    def get_parameters(self, config: dict) -> list[np.ndarray]:
        return list(get_weights(self.model).values())

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        self._load(parameters)
        request = TrainRequest.from_config(config)
        # A different but reproducible batch order every round.
        seed = self.seed * 1_000_003 + request.server_round
        x, y = self.data.x_train, self.data.y_train
        if request.reply == GRADIENT:
            if isinstance(self.privacy, DPSGD):
                raise ValueError("privacy=dpsgd trains locally, but the server asks for gradients "
                                 "(FedSGD): use strategy=fedavg or dp_fedavg, or privacy=local.")
            # The server's protocol decides the gradient batch (0: the whole local set).
            batch = (request.batch_size if request.batch_size is not None
                     else self.batch_size or 0) or None
            grads, loss, n = training.gradient(self.model, x, y, batch, seed)
            reply = self._private([grads[k].cpu().numpy() for k in self.keys])
            return reply, n, self._metrics(loss, steps=1)
        mu = request.proximal_mu
        if isinstance(self.privacy, DPSGD):
            loss, self.privacy.history = training.train_dpsgd(
                self.model, x, y, self.local_epochs, self.batch_size, self.lr,
                self.privacy.noise_multiplier, self.privacy.max_grad_norm, self.privacy.history,
                proximal_mu=mu)
        else:
            loss = training.train(self.model, x, y, self.local_epochs, self.batch_size, self.lr,
                                  seed, proximal_mu=mu)
        steps = self.local_epochs * training.steps_per_epoch(len(y), self.batch_size)
        weights = self.get_parameters({})
        if request.reply == DELTA:  # DP-FedAvg: the server clips the delta
            delta = [np.subtract(w, r, dtype=w.dtype) for w, r in zip(weights, parameters,
                                                                      strict=True)]
            return self._private(delta), len(y), self._metrics(loss, steps)
        return (self._private(weights, received=parameters), len(y),
                self._metrics(loss, steps))

    def evaluate(self, parameters: list[np.ndarray], config: dict) -> tuple[float, int, dict]:
        self._load(parameters)
        loss, acc = training.evaluate(self.model, self.data.x_val, self.data.y_val)
        return loss, len(self.data.y_val), {"accuracy": acc}

    def _private(self, reply: list[np.ndarray],
                 received: list[np.ndarray] | None = None) -> list[np.ndarray]:
        """With local DP, the reply with its update clipped and noised; else the reply as is.

        The update is the gradient itself, or the weight delta against `received`; the server
        knows `received`, so it learns the noisy delta and nothing more.
        """
        if not isinstance(self.privacy, LocalDP):
            return reply
        base = received or [np.zeros_like(r) for r in reply]
        noisy = self.privacy.privatize(
            {k: r - b for k, r, b in zip(self.keys, reply, base, strict=True)})
        return [(b + noisy[k]).astype(r.dtype) for k, r, b in zip(self.keys, reply, base,
                                                                  strict=True)]

    def _metrics(self, loss: float, steps: int) -> dict:
        # With client-side DP the loss on private data is not released: only the epsilon. The
        # step count follows from the config and the example count, which the reply holds.
        if self.privacy is not None:
            return {**self.privacy.metrics(), NUM_STEPS: steps}
        return {TRAIN_LOSS: loss, NUM_STEPS: steps}

    def _load(self, parameters: list[np.ndarray]) -> None:
        if len(parameters) != len(self.keys):
            raise ValueError(f"Received {len(parameters)} arrays, the model has {len(self.keys)}.")
        set_weights(self.model, dict(zip(self.keys, parameters, strict=True)))


def build_client(cfg: DictConfig, partition_id: int, num_partitions: int,
                 data_dir: str | None = None) -> TorchClient:
    """The TorchClient for one partition of the composed config, or for a SuperNode's own
    data folder (`data_dir`, holding train.npz) instead of a partition."""
    if data_dir is None and cfg.num_clients is not None and cfg.num_clients != num_partitions:
        raise ValueError(
            f"This federation has {num_partitions} partitions (SuperNodes) but the config says "
            f"num_clients={cfg.num_clients}. Start the run with --federation-config "
            f"'num-supernodes={cfg.num_clients}' (or num-partitions={cfg.num_clients} on every "
            f"SuperNode), or override num_clients={num_partitions} (null = follow the federation)."
        )
    on = device.resolve(cfg.get("device", "auto"))
    torch.manual_seed(cfg.seed)  # initialised on the CPU: the same model on every device
    model = targets.build("model", cfg.model).to(on)
    data = (local_data(cfg, data_dir, partition_id) if data_dir
            else client_data(cfg, partition_id, num_partitions))
    # Moved once: the cached client keeps model and data on the device across rounds, and a
    # message's arrays are the only host <-> device copies.
    data = ClientData(*(t.to(on) for t in data))
    return TorchClient(model, data, cfg.local_epochs, cfg.batch_size, cfg.lr,
                       seed=cfg.seed * 7919 + partition_id,
                       privacy=client_privacy(cfg.privacy, cfg.num_clients or num_partitions))


# A simulation process serves many partitions in turn; with 8 entries, 20 clients on 2 actors
# rebuilt a client for almost every message (17% of an actor's time on the 2NN, py-spy).
# 32 cover a typical round's sample; a CNN client holds ~7 MB, so at most ~220 MB per process.
@lru_cache(maxsize=32)
def _cached_client(run_id: int, run_config: tuple, partition_id: int, num_partitions: int | None,
                   data_dir: str | None) -> TorchClient:
    # Keyed by run too: an fl-app-executor serves a SuperNode's every run, and one run's client
    # (its DP-SGD or local-DP accounting) must not carry into the next.
    # num_partitions None: a pool client, one of the config's num_clients.
    training.setup_torch()
    cfg = compose(overrides_from_run_config(dict(run_config)))
    client = build_client(cfg, partition_id, num_partitions or cfg.num_clients, data_dir)
    client.threads = _threads_for(client.model)
    return client


def clear_client_cache() -> None:
    """Forget every cached client: the next message of any run builds its client afresh."""
    _cached_client.cache_clear()


_process_threads: list[int] = []  # torch's thread count before any client set its own


def _threads_for(model: torch.nn.Module) -> int:
    """FL_APP_TORCH_THREADS if set; else 1 for a small dense model (see
    models.is_small_dense); else what the process had (torch's default, Ray's share for an
    actor, an fl-app-executor's share of the host: processes.share_cores)."""
    override = int(os.environ.get("FL_APP_TORCH_THREADS", "0"))
    if override > 0:
        return override
    if not _process_threads:
        _process_threads.append(torch.get_num_threads())
    return 1 if is_small_dense(model) else _process_threads[0]


def _client(context: Context, client_id: int | None = None) -> TorchClient:
    # A simulated ClientApp process serves many partitions: one cached client each.
    node = context.node_config
    data_dir = node.get("data-dir")
    run = (int(context.run_id), tuple(sorted(context.run_config.items())))
    if client_id is not None:  # a pool node: the server names the client (partition) to serve
        if data_dir is not None:
            raise ValueError("The server sent a client id (config client_pool), but this "
                             "SuperNode holds its own data (data-dir): a client pool is for "
                             "simulations. Set client_pool=null.")
        return _cached_client(*run, client_id, None, None)
    if data_dir is None and not {"partition-id", "num-partitions"} <= set(node):
        raise ValueError("This SuperNode has no data: start it with --node-config "
                         "'partition-id=I num-partitions=N', or 'data-dir=\"/path\"' to a "
                         "folder holding train.npz (see fl_app.deploy.partitions).")
    return _cached_client(*run, int(node.get("partition-id", 0)),
                          int(node.get("num-partitions", 1)),
                          str(data_dir) if data_dir is not None else None)


def _ndarrays(client: TorchClient, record: ArrayRecord) -> list[np.ndarray]:
    if set(record) != set(client.keys):
        raise ValueError(f"Server sent arrays {sorted(record)}, the model has {client.keys}: "
                         "server and clients must use the same model config.")
    return [array_view(record[k]) for k in client.keys]  # read-only, no copy: only read


# The client's privacy accounting lives in the node's Context.state, which Flower keeps for the
# whole run: a client evicted from the cache above is rebuilt with its epsilon intact. A pool
# node keeps one entry per client it has served.
_PRIVACY_STATE = "privacy"


def handle(kind: str, content: RecordDict, context: Context) -> RecordDict:
    """The reply content to a "train" or "evaluate" message's `content`; the client's privacy
    state is read from and written back to `context.state`."""
    config = dict(content[CONFIG])
    client_id = TrainRequest.from_config(config).client_id
    client = _client(context, client_id)
    if client.threads and torch.get_num_threads() != client.threads:
        torch.set_num_threads(client.threads)  # per message: one process may serve two models
    params = _ndarrays(client, content[ARRAYS])
    if kind == "evaluate":
        loss, num_examples, metrics = client.evaluate(params, config)
        return RecordDict({METRICS: MetricRecord({**metrics, "loss": loss,
                                                  NUM_EXAMPLES: num_examples})})
    if kind != "train":
        raise ValueError(f"Unknown message kind {kind!r}: expected 'train' or 'evaluate'.")
    state_key = _PRIVACY_STATE if client_id is None else f"{_PRIVACY_STATE}.{client_id}"
    if client.privacy is not None and state_key in context.state:
        client.privacy.load_state(dict(context.state[state_key]))
    arrays, num_examples, metrics = client.fit(params, config)
    if client.privacy is not None:
        context.state[state_key] = ConfigRecord(client.privacy.state())
    return RecordDict({ARRAYS: to_array_record(dict(zip(client.keys, arrays, strict=True))),
                       METRICS: MetricRecord({**metrics, NUM_EXAMPLES: num_examples})})
