"""Utility of fl_app's privacy options: test accuracy and epsilon after the same rounds.

Runs every row on the embedded MNIST digits (4,000 training images) split IID over a large
simulated population, with the project's own config composition, strategies and TorchClients,
in this process: an in-process grid hands each Message to the client of its node, as the
ClientApp would, so no SuperLink, Ray or ports are involved. Prints a Markdown table, writes
`results.json` and a figure of test accuracy per round.

    python scripts/dp_utility.py                       # docs/privacy.md's table (~12 min, 2 cores)
    python scripts/dp_utility.py --rounds 5 --only fedavg,dp_fedavg_hi   # a quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from fl_app import training
from fl_app.client_core import TorchClient
from fl_app.config import compose
from fl_app.data import ClientData, load_dataset, partition
from fl_app.models import get_weights, set_weights
from fl_app.privacy.accounting import PrivacyBudgetExhausted
from fl_app.privacy.client import from_config as client_privacy
from fl_app.records import to_array_record
from fl_app.secagg.client import answer
from fl_app.secagg.protocol import MESSAGE_TYPE
from fl_app.server_loop import train_round

# One population and one local training recipe for every row; only the privacy differs.
COMMON = ["model=mlp", "dataset=mnist5k", "partitioner=iid", "val_fraction=0",
          "local_epochs=5", "batch_size=4", "lr=0.1", "min_clients=1"]
ROWS = {
    "fedavg": ("non-private FedAvg", ["strategy=fedavg"]),
    "dp_fedavg_lo": ("central DP-FedAvg, less noise",
                     ["strategy=dp_fedavg", "strategy.noise_multiplier=0.7",
                      "strategy.clip_norm=1.0"]),
    "dp_fedavg_hi": ("central DP-FedAvg, more noise",
                     ["strategy=dp_fedavg", "strategy.noise_multiplier=1.0",
                      "strategy.clip_norm=1.0"]),
    # gamma = 0.1: with the median (0.5) C grew with the noise-inflated updates here, and the
    # noise with it, until the model collapsed (see docs/privacy.md).
    "dp_fedavg_adaptive": ("central DP-FedAvg, adaptive clipping",
                           ["strategy=dp_fedavg_adaptive", "strategy.noise_multiplier=1.0",
                            "strategy.clip_norm=0.1", "strategy.target_quantile=0.1"]),
    "local_lo": ("local DP, little noise",
                 ["strategy=fedavg", "privacy=local", "privacy.clip_norm=1.0",
                  "privacy.noise_multiplier=0.1"]),
    "local_hi": ("local DP, more noise",
                 ["strategy=fedavg", "privacy=local", "privacy.clip_norm=1.0",
                  "privacy.noise_multiplier=1.0"]),
    # At the same epsilon as dp_fedavg_hi: main() picks the noise multiplier (MATCH below).
    "secagg_distributed": ("distributed DP in SecAgg+, same ε as central (its PLD)",
                           ["strategy=dp_fedavg", "strategy.clip_norm=1.0", "secagg=secaggplus",
                            "secagg.noise=distributed"]),
    "secagg_distributed_rdp": ("distributed DP in SecAgg+, same RDP ε as central",
                               ["strategy=dp_fedavg", "strategy.clip_norm=1.0",
                                "secagg=secaggplus", "secagg.noise=distributed"]),
    "dpsgd": ("DP-SGD in every client (Opacus)",
              ["strategy=fedavg", "privacy=dpsgd", "privacy.max_grad_norm=1.0",
               "privacy.noise_multiplier=1.0"]),
}

# Rows whose noise multiplier is chosen so that their expected epsilon after the run equals
# another row's: distributed DP's noise is calibrated to the threshold t of survivors, so
# with every sampled client surviving it adds n/t times the target variance, and only
# matching epsilon compares like with like.
# Central DP's reported epsilon is its PLD one (tighter than RDP); the Skellam mechanism has
# only RDP: one row matches the reported epsilon (the accountants' gap included), the other
# central DP's own RDP epsilon (the mechanisms alone). (row, matched row, its metric)
MATCH = {"secagg_distributed": ("dp_fedavg_hi", "train_epsilon"),
         "secagg_distributed_rdp": ("dp_fedavg_hi", "train_epsilon-rdp")}


def matching_noise_multiplier(cfg: DictConfig, target: float) -> float:
    """The noise multiplier whose distributed-DP epsilon after cfg.num_rounds rounds, every
    round holding the expected cohort q*N, all surviving, is `target`."""
    from fl_app.privacy.distributed import ClientNoise, DistributedAccount
    from fl_app.secagg.settings import SecAggSettings, share_plan

    torch.manual_seed(cfg.seed)
    dims = sum(a.size for a in get_weights(instantiate(cfg.model)).values())
    cohort = round(cfg.fraction_train * cfg.num_clients)
    _, threshold = share_plan(SecAggSettings.from_config(cfg.secagg), cohort)
    delta = cfg.strategy.delta or 1 / (10 * cfg.num_clients)

    def epsilon(z: float) -> float:
        account = DistributedAccount(cfg.strategy.clip_norm, z, dims, cfg.fraction_train,
                                     delta, int(cfg.secagg.modulus_range), cohort)
        for _ in range(cfg.num_rounds):
            account.record(ClientNoise(tuple(range(cohort)), threshold, cohort))
        return account.epsilon()

    low, high = 0.1, 10.0
    for _ in range(30):
        mid = math.sqrt(low * high)
        low, high = (mid, high) if epsilon(mid) > target else (low, mid)
    return high


class InProcessGrid:
    """Just enough of Flower's Grid: node i is partition i - 1, answered by its TorchClient;
    secure aggregation's stage messages by the ClientApp's own secagg code (each node keeps
    its Context, as a SuperNode does)."""

    def __init__(self, clients: list[TorchClient]) -> None:
        self.clients = clients
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config={},
                                      state=RecordDict(), run_config={})
                         for nid in self.get_node_ids()}

    def get_node_ids(self) -> list[int]:
        return list(range(1, len(self.clients) + 1))

    def send_and_receive(self, messages, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            if msg.metadata.message_type == MESSAGE_TYPE:
                content = answer(msg.content, self.contexts[nid],
                                 lambda c, client=self.clients[nid - 1]: fit(client, c))
            else:
                content = fit(self.clients[nid - 1], msg.content)
            replies.append(Message(content=content, reply_to=msg))
        return replies


def fit(client: TorchClient, content: RecordDict) -> RecordDict:
    """A train message's reply content, as the ClientApp builds it."""
    params = [content["arrays"][k].numpy() for k in client.keys]
    arrays, n, metrics = client.fit(params, dict(content["config"]))
    return RecordDict({"arrays": to_array_record(dict(zip(client.keys, arrays, strict=True))),
                       "metrics": MetricRecord({**metrics, "num-examples": n})})


def build_clients(cfg: DictConfig) -> list[TorchClient]:
    """One TorchClient per partition, as `fl_app.client_core.build_client` makes them, except
    that they share one model (each fit loads the global model first, and clients run one at
    a time) and the partitioning is computed once for the whole population."""
    torch.manual_seed(cfg.seed)
    model = instantiate(cfg.model)
    split = load_dataset(cfg.dataset)
    parts = partition(split.y_train.numpy(), cfg.partitioner, cfg.num_clients)
    clients = []
    for i, idx in enumerate(parts):
        idx = torch.from_numpy(np.random.default_rng([cfg.seed, i]).permutation(idx))
        n_val = int(len(idx) * cfg.val_fraction)
        data = ClientData(split.x_train[idx[n_val:]], split.y_train[idx[n_val:]],
                          split.x_train[idx[:n_val]], split.y_train[idx[:n_val]])
        clients.append(TorchClient(model, data, cfg.local_epochs, cfg.batch_size, cfg.lr,
                                   seed=cfg.seed * 7919 + i,
                                   privacy=client_privacy(cfg.privacy, cfg.num_clients)))
    return clients


def run(cfg: DictConfig, log_every: int = 10) -> dict:
    """The ServerApp's own round (`train_round`) on the in-process grid, with its central
    evaluation; returns the per-round rows and why the run stopped."""
    clients = build_clients(cfg)
    strategy = instantiate(cfg.strategy)
    grid = InProcessGrid(clients)
    torch.manual_seed(cfg.seed)
    model = instantiate(cfg.model)
    test = load_dataset(cfg.dataset)
    weights = get_weights(model)
    if cfg.secagg.get("noise") == "distributed":  # as server_loop.run sets it up
        strategy.add_noise_on_clients(sum(a.size for a in weights.values()),
                                      int(cfg.secagg.modulus_range))
    history, stop_reason, started = [], "num_rounds", time.time()
    for rnd in range(1, cfg.num_rounds + 1):
        try:
            weights, row = train_round(grid, strategy, cfg, rnd, weights)
        except PrivacyBudgetExhausted as err:
            stop_reason = str(err)
            break
        set_weights(model, weights)
        row["test_loss"], row["test_accuracy"] = training.evaluate(model, test.x_test,
                                                                   test.y_test)
        history.append(row)
        if rnd % log_every == 0 or rnd == cfg.num_rounds:
            print(f"  round {rnd}: test accuracy {row['test_accuracy']:.4f} "
                  f"({time.time() - started:.0f} s)", flush=True)
    return {"history": history, "stop_reason": stop_reason, "seconds": time.time() - started}


def epsilon_cell(final: dict) -> str:
    """The row's epsilon, saying whose it is and at which delta."""
    if "train_epsilon-vs-server" in final:
        return (f"{final['train_epsilon']:.2f} (δ = {final['train_delta']:.0e}), user-level; "
                f"vs. the server {final['train_epsilon-vs-server']:.3g}")
    if "train_epsilon" in final:
        return f"{final['train_epsilon']:.2f} (δ = {final['train_delta']:.0e}), user-level, central"
    if "train_local_epsilon_max" in final:
        return (f"{final['train_local_epsilon_max']:.3g} (δ = {final['train_local_delta']:.0e}), "
                "per client vs. the server; largest over clients")
    if "train_dpsgd_epsilon_max" in final:
        return (f"{final['train_dpsgd_epsilon_max']:.2f} (δ = {final['train_dpsgd_delta']:.0e}), "
                "example-level, per client; largest over clients")
    return "∞ (no privacy)"


def settings_cell(cfg: DictConfig, final: dict) -> str:
    """The noise settings of the row, as a reader would reproduce them."""
    if "noise_multiplier" in cfg.strategy:
        s = cfg.strategy
        if s.clipping == "adaptive":
            return (f"σ = {s.noise_multiplier:g} (update: "
                    f"{final['train_update-noise-multiplier']:.3g}), C₀ = {s.clip_norm:g} → "
                    f"quantile {s.target_quantile:g} (η = {s.clip_lr:g}), C ended at "
                    f"{final['train_clip-norm']:.2f}")
        if cfg.secagg.get("noise") == "distributed" and "train_noise-threshold" in final:
            return (f"z = {s.noise_multiplier:.4g}, C = {s.clip_norm:g}, Skellam shares for "
                    f"t = {final['train_noise-threshold']:g} of "
                    f"{final['train_noise-survivors']:g} survivors (last round)")
        return f"σ = {s.noise_multiplier:g}, C = {s.clip_norm:g}"
    if cfg.privacy.name == "local":
        return f"σ = {cfg.privacy.noise_multiplier:g}, C = {cfg.privacy.clip_norm:g}"
    if cfg.privacy.name == "dpsgd":
        expected = len(load_dataset(cfg.dataset).y_train) // cfg.num_clients
        return (f"σ = {cfg.privacy.noise_multiplier:g}, C = {cfg.privacy.max_grad_norm:g}, "
                f"Poisson batches q = {cfg.batch_size}/{expected}")
    return "–"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--fraction", type=float, default=0.1, help="client sampling rate q")
    parser.add_argument("--only", default="", help="comma-separated row names: " + ",".join(ROWS))
    parser.add_argument("--out", default="outputs/dp_utility")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()

    training.setup_torch(args.threads)
    logging.getLogger("flwr").setLevel(logging.WARNING)  # one line per sampled round is noise
    # Building Messages needs the identity a ServerApp process has.
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.only.split(",") if n] or list(ROWS)
    results = {}
    for name in names:
        label, overrides = ROWS[name]
        cfg = compose([*COMMON, *overrides, f"num_rounds={args.rounds}",
                       f"num_clients={args.clients}", f"fraction_train={args.fraction}"])
        with open_dict(cfg):
            cfg.num_clients = args.clients
        if name in MATCH:
            matched, metric = MATCH[name]
            if matched not in results:
                raise SystemExit(f"{name} matches {matched}'s epsilon: run both "
                                 f"(--only {matched},{name})")
            target = results[matched]["history"][-1][metric]
            cfg.strategy.noise_multiplier = matching_noise_multiplier(cfg, target)
            print(f"  noise multiplier {cfg.strategy.noise_multiplier:.4f} for epsilon "
                  f"{target:.4g}", flush=True)
        print(f"{name}: {label}", flush=True)
        outcome = run(cfg)
        final = outcome["history"][-1] if outcome["history"] else {}
        results[name] = {"label": label, "overrides": [*COMMON, *overrides], **outcome,
                         "epsilon": epsilon_cell(final), "settings": settings_cell(cfg, final)}
        (out / "results.json").write_text(json.dumps(results, indent=1))

    cfg = compose(COMMON)
    per_client = len(load_dataset(cfg.dataset).y_train) // args.clients
    header = (f"{args.clients} clients × {per_client} MNIST images, q = {args.fraction:g}, "
              f"{args.rounds} rounds, 2NN, E = {cfg.local_epochs}, B = {cfg.batch_size}, "
              f"lr = {cfg.lr:g}")
    print(f"\n{header}\n")
    # One run's final accuracy moves by a few points from round to round under DP noise: the
    # mean over the last 10 rounds compares rows more steadily.
    print("| run | test accuracy | mean of the last 10 rounds | ε | settings | time |")
    print("|---|---|---|---|---|---|")
    for result in results.values():
        hist = result["history"]
        acc = hist[-1]["test_accuracy"] if hist else math.nan
        last = float(np.mean([h["test_accuracy"] for h in hist[-10:]])) if hist else math.nan
        print(f"| {result['label']} | {acc:.3f} (round {len(hist)}) | {last:.3f} | "
              f"{result['epsilon']} | {result['settings']} | {result['seconds']:.0f} s |")
    plot(results, out / "dp_utility.png", header)


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for result in results.values():
        rounds = [h["round"] for h in result["history"]]
        ax.plot(rounds, [h["test_accuracy"] for h in result["history"]], label=result["label"])
    ax.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1), title=title)
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
