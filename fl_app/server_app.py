"""The ServerApp: compose the config, build strategy and model, run the rounds, save outputs."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from datetime import datetime
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from fl_app import training
from fl_app.config import compose, overrides_from_run_config, to_yaml
from fl_app.data import load_dataset
from fl_app.models import get_weights, num_parameters, set_weights
from fl_app.records import from_array_record, to_array_record
from fl_app.strategies import NotEnoughClientsError, PrivacyBudgetExhausted

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = compose(overrides_from_run_config(context.run_config))
    run(grid, cfg)


def run(grid: Grid, cfg: DictConfig) -> dict:
    """Run cfg.num_rounds rounds of federated training on `grid`; return the run summary."""
    started = time.time()
    training.setup_torch()
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    log(INFO, "fl_app: outputs in %s", out)

    federation_size = wait_for_clients(grid, cfg)
    with open_dict(cfg):  # null num_clients follows the federation; DP needs the population
        cfg.num_clients = cfg.num_clients or federation_size
    (out / "config.yaml").write_text(to_yaml(cfg))

    torch.manual_seed(cfg.seed)
    model = instantiate(cfg.model)
    test = load_dataset(cfg.dataset)
    strategy = instantiate(cfg.strategy)
    log(INFO, "fl_app: %s, %s (%d parameters), %s, %s partitions x %d clients, %d rounds",
        type(strategy).__name__, type(model).__name__, num_parameters(model), cfg.dataset.name,
        cfg.partitioner._target_.rsplit(".", 1)[-1], cfg.num_clients, cfg.num_rounds)

    def central_eval(arrays: dict[str, np.ndarray]) -> tuple[float, float]:
        set_weights(model, arrays)
        return training.evaluate(model, test.x_test, test.y_test)

    weights = get_weights(model)
    loss, acc = central_eval(weights)
    log(INFO, "[round 0] test loss %.4f, accuracy %.4f", loss, acc)
    history, stop_reason = [{"round": 0, "test_loss": loss, "test_accuracy": acc}], "num_rounds"
    for rnd in range(1, cfg.num_rounds + 1):
        t0 = time.time()
        try:
            weights, row = train_round(grid, strategy, cfg, rnd, weights)
        except PrivacyBudgetExhausted as err:
            stop_reason = str(err)
            log(WARNING, "fl_app: stopping before round %d: %s", rnd, err)
            break
        if cfg.fraction_evaluate > 0:
            row |= evaluate_round(grid, strategy, cfg, rnd, weights)
        row["test_loss"], row["test_accuracy"] = central_eval(weights)
        row["seconds"] = time.time() - t0
        history.append(row)
        _append_jsonl(out / "metrics.jsonl", row)
        log(INFO, "%s", progress_line(row, cfg.num_rounds, started))

    set_weights(model, weights)
    torch.save(model.state_dict(), out / "model.pt")
    final = history[-1]
    summary = {"rounds": final["round"], "test_accuracy": final["test_accuracy"],
               "test_loss": final["test_loss"], "stop_reason": stop_reason,
               "seconds": time.time() - started, "output_dir": str(out)}
    if "train_epsilon" in final:
        summary["epsilon"], summary["delta"] = final["train_epsilon"], final["train_delta"]
    for client_side in ("dpsgd_epsilon_max", "local_epsilon_max"):  # worst client's own ε
        if f"train_{client_side}" in final:
            summary[client_side] = final[f"train_{client_side}"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log(INFO, "fl_app: final test accuracy %.4f after %d rounds (%.1f s); outputs in %s",
        summary["test_accuracy"], summary["rounds"], summary["seconds"], out)
    return summary


def train_round(grid: Grid, strategy: Strategy, cfg: DictConfig, rnd: int,
                weights: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
    """One round of federated training: the new global weights and the round's metrics row."""
    messages = strategy.configure_train(rnd, to_array_record(weights), ConfigRecord(), grid)
    messages = expire_with_round(messages, cfg.round_timeout)
    replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
    _fail_if_all_failed(rnd, replies)
    lost = lost_nodes(rnd, messages, replies)
    # DPNoise samples by coin flips and has no minimum: only plain strategies enforce one.
    minimum = getattr(strategy, "min_train_nodes", 0)
    new, metrics = None, None
    if len(messages) - len(lost) < minimum:
        log(WARNING, "[round %d] only %d of %d sampled clients replied, below min_clients=%d",
            rnd, len(messages) - len(lost), len(messages), minimum)
    else:
        new, metrics = strategy.aggregate_train(rnd, replies)
    if new is None:
        log(WARNING, "[round %d] no usable client update: global model unchanged", rnd)
    row = {"round": rnd, "sampled": len(messages), "lost_nodes": lost,
           **{f"train_{k}": v for k, v in dict(metrics or {}).items()}}
    return (weights if new is None else from_array_record(new)), row


def evaluate_round(grid: Grid, strategy: Strategy, cfg: DictConfig, rnd: int,
                   weights: dict[str, np.ndarray]) -> dict:
    """Federated evaluation of the global model on the clients' held-out splits."""
    messages = strategy.configure_evaluate(rnd, to_array_record(weights), ConfigRecord(), grid)
    replies = grid.send_and_receive(expire_with_round(messages, cfg.round_timeout),
                                    timeout=cfg.round_timeout)
    metrics = strategy.aggregate_evaluate(rnd, replies)
    return {f"client_{k}": v for k, v in dict(metrics or {}).items()}


def output_dir(cfg: DictConfig) -> Path:
    """The run's absolute output folder: the ServerApp's working directory is the SuperLink's."""
    if cfg.output_dir:
        return Path(cfg.output_dir).expanduser().resolve()
    root = Path(os.environ.get("FL_APP_OUTPUTS", "~/fl_app_outputs")).expanduser().resolve()
    now = datetime.now()
    name = f"{now:%H-%M-%S}-{cfg.strategy._target_.rsplit('.', 1)[-1]}-{cfg.dataset.name}"
    return root / f"{now:%Y-%m-%d}" / name


def wait_for_clients(grid: Grid, cfg: DictConfig) -> int:
    """Wait for min_clients SuperNodes (and num_clients, if set); return how many are there."""
    wanted = max(cfg.min_clients, cfg.num_clients or 0)
    deadline = time.time() + cfg.node_wait_timeout
    while (connected := len(list(grid.get_node_ids()))) < wanted:
        if time.time() > deadline:
            raise NotEnoughClientsError(
                f"Only {connected} SuperNode(s) connected after {cfg.node_wait_timeout} s; the "
                f"run needs {wanted} (min_clients={cfg.min_clients}, "
                f"num_clients={cfg.num_clients}). Start more SuperNodes or raise num-supernodes "
                "(--federation-config 'num-supernodes=N'), or lower min_clients."
            )
        time.sleep(0.5)
    return connected


def expire_with_round(messages: Iterable[Message], round_timeout: float) -> list[Message]:
    """Give each message the round's lifetime instead of Flower's default 12 hours.

    A SuperNode that was away would otherwise work through a backlog of stale rounds after it
    rejoins and answer every current round too late.
    """
    messages = list(messages)
    for message in messages:
        message.metadata.ttl = float(round_timeout)
    return messages


def lost_nodes(rnd: int, messages: list[Message], replies: list[Message]) -> list[int]:
    """Sampled nodes that sent no usable reply this round (gone, timed out, or failed)."""
    answered = {r.metadata.src_node_id for r in replies if not r.has_error()}
    lost = sorted({m.metadata.dst_node_id for m in messages} - answered)
    if lost:
        log(WARNING, "[round %d] lost %d of %d sampled node(s): %s (no reply, an error reply, "
            "or past round_timeout)", rnd, len(lost), len(messages), lost)
    return lost


def progress_line(row: dict, num_rounds: int, started: float) -> str:
    rnd = row["round"]
    eta = (time.time() - started) / rnd * (num_rounds - rnd)
    parts = [f"[round {rnd}/{num_rounds}]", f"test acc {row['test_accuracy']:.4f}",
             f"loss {row['test_loss']:.4f}"]
    if "train_train_loss" in row:
        parts.append(f"train loss {row['train_train_loss']:.4f}")
    if "train_epsilon" in row:
        parts.append(f"ε {row['train_epsilon']:.3f} (δ={row['train_delta']:.1e})")
    if row.get("lost_nodes"):
        parts.append(f"lost {len(row['lost_nodes'])}/{row['sampled']} nodes")
    parts += [f"{row['seconds']:.2f} s", f"ETA {eta:.0f} s"]
    return " | ".join(parts)


def _fail_if_all_failed(rnd: int, replies: list[Message]) -> None:
    """A round where every client failed is a broken run, not a quiet no-op."""
    if replies and all(m.has_error() for m in replies):
        reasons = sorted({m.error.reason.strip().splitlines()[-1] for m in replies})
        raise RuntimeError(f"Round {rnd}: all {len(replies)} clients failed: {reasons}")


def _append_jsonl(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
