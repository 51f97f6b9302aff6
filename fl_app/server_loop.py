"""The ServerApp's work: compose the config, build strategy and model, run the rounds, save
outputs. `fl_app.server_app` is the thin ServerApp Flower loads; it imports this module when a
run starts."""

from __future__ import annotations

import json
import os
import random
import time
from datetime import datetime
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from omegaconf import DictConfig, open_dict

from fl_app import checkpoint, device, targets, training
from fl_app.config import ConfigError, compose, num_supernodes, overrides_from_run_config, to_yaml
from fl_app.data import load_dataset, natural_clients, partition_train_sizes
from fl_app.exchange import exchange, expire_with_round, is_flower_simulation, payload_bytes
from fl_app.models import get_weights, num_parameters, set_weights
from fl_app.privacy.accounting import PrivacyBudgetExhausted
from fl_app.privacy.central import DPNoise
from fl_app.privacy.noise_warning import noise_warning
from fl_app.records import from_array_record, to_array_record
from fl_app.run_files import open_private, private_folder, private_umask, write_private
from fl_app.strategies import NotEnoughClientsError, SampledStrategy
from fl_app.strategies.flower_adapter import load_state, state_of, usable_replies
from fl_app.strategies.replies import ExampleCap


def main(grid: Grid, context: Context) -> None:
    cfg = compose(overrides_from_run_config(context.run_config))
    if cfg.engine == "inprocess":
        raise ConfigError(
            f"engine={cfg.engine} is fl-app's own runner (`fl-app engine={cfg.engine} ...`); "
            "`flwr run` and deployments always run on Flower: drop engine= from the run config.")
    run(grid, cfg, run_config=dict(context.run_config))


def run(grid: Grid, cfg: DictConfig, run_config: dict | None = None) -> dict:
    """Run (or, with cfg.resume, continue) federated training; return the run summary.

    `run_config` (what `flwr run` was given) is saved so that `fl-app resume=FOLDER` can
    start the same run again.
    """
    started = time.time()
    training.setup_torch()
    out = private_folder(output_dir(cfg))  # 0700, its files 0600 (run_files.py)
    log(INFO, "fl_app: outputs in %s", out)

    federation_size = wait_for_clients(grid, cfg)
    with open_dict(cfg):  # null num_clients follows the federation; DP needs the population
        cfg.num_clients = cfg.num_clients or federation_size
    if (roles := natural_clients(cfg)) is not None and cfg.num_clients != roles:
        raise ConfigError(
            f"partitioner=natural runs one client per role: dataset={cfg.dataset.name} has "
            f"{roles}, this run {cfg.num_clients} (num_clients, or the federation's SuperNodes). "
            f"Set num_clients={roles} (fl-app does when it is null) and, with flwr run, "
            f"--federation-config 'num-supernodes={roles}' or client_pool=K.")
    if cfg.resume:
        checkpoint.check_resumable(out, cfg)
    write_private(out / "config.yaml", to_yaml(cfg))
    if run_config is not None:
        write_private(out / "run_config.json", json.dumps(run_config, indent=2))

    on = device.resolve(cfg.get("device", "auto"))
    torch.manual_seed(cfg.seed)  # initialised on the CPU: the same model on every device
    model = targets.build("model", cfg.model).to(on)
    test = load_dataset(cfg.dataset)
    x_test, y_test = test.x_test.to(on), test.y_test.to(on)  # once, not per round
    strategy = targets.build("strategy", cfg.strategy)
    if cfg.secagg.get("noise", "central") == "distributed":  # checked: strategy is DPNoise
        strategy.add_noise_on_clients(sum(a.size for a in get_weights(model).values()),
                                      int(cfg.secagg.modulus_range))
    resumed = None
    if cfg.resume:  # checked against the model built from the config: array names and shapes
        resumed = checkpoint.load(out, model=get_weights(model))
        try:
            load_state(strategy, resumed.strategy_state)
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"Cannot resume {out}: its strategy state does not fit "
                              f"{type(strategy).__name__} ({err!r}).") from err
        log(INFO, "fl_app: resuming after round %d from %s", resumed.round, out)
    if resumed and hasattr(strategy, "seed_noise"):  # a checkpoint holds no noise generator
        strategy.seed_noise(cfg.strategy.get("noise_seed"))
    if cfg.client_pool is not None:
        strategy.use_client_pool(cfg.num_clients)
    bound_client_counts(strategy, grid, cfg)
    stop_rule = targets.build("stopping", cfg.stopping)
    secagg_session = None  # secure aggregation's state across rounds: the next round's keys
    if cfg.secagg.name != "none":
        from fl_app.secagg.server import SecAggSession

        secagg_session = SecAggSession()
    with private_umask():  # a logger's own files (TensorBoard's) are the run's too
        round_logger = targets.build("logger", cfg.logger, log_dir=str(out))
    log(INFO, "fl_app: %s, %s (%d parameters), %s, %s partitions x %d clients, %d rounds, "
        "server on %s", type(strategy).__name__, type(model).__name__, num_parameters(model),
        cfg.dataset.name, cfg.partitioner._target_.rsplit(".", 1)[-1], cfg.num_clients,
        cfg.num_rounds, on)
    if warning := noise_warning(cfg, num_parameters(model)):  # needs the model's size
        log(WARNING, "%s", warning)

    def central_eval(arrays: dict[str, np.ndarray]) -> tuple[float, float]:
        set_weights(model, arrays)
        return training.evaluate(model, x_test, y_test)

    if resumed:
        weights, history, elapsed = resumed.weights, resumed.history, resumed.elapsed
        _truncate_jsonl(out / "metrics.jsonl", after_round=resumed.round)
    else:
        weights, elapsed = get_weights(model), 0.0
        loss, acc = central_eval(weights)
        log(INFO, "[round 0] test loss %.4f, accuracy %.4f", loss, acc)
        history = [{"round": 0, "test_loss": loss, "test_accuracy": acc}]
        (out / "metrics.jsonl").unlink(missing_ok=True)
    try:
        stop_reason = stop_rule.check(history) if len(history) > 1 else None
        while stop_reason is None:
            rnd = history[-1]["round"] + 1
            if rnd > cfg.num_rounds:
                stop_reason = f"num_rounds: all {cfg.num_rounds} rounds run"
                break
            t0 = time.time()
            try:
                weights, row = train_round(grid, strategy, cfg, rnd, weights, secagg_session)
            except PrivacyBudgetExhausted as err:
                stop_reason = f"privacy_budget: {err}"
                break
            if cfg.fraction_evaluate > 0:
                row = _merge(row, evaluate_round(grid, strategy, cfg, rnd, weights))
            row["test_loss"], row["test_accuracy"] = central_eval(weights)
            row["seconds"] = time.time() - t0
            history.append(row)
            _append_jsonl(out / "metrics.jsonl", row)
            checkpoint.save(out, checkpoint.Checkpoint(
                rnd, weights, state_of(strategy), history, elapsed + time.time() - started),
                keep_all=cfg.checkpoints == "all")
            round_logger.log_round(row)
            log(INFO, "%s", progress_line(row, cfg.num_rounds, history))
            stop_reason = stop_rule.check(history)
    finally:
        round_logger.close()
    log(INFO, "fl_app: stopped after round %d: %s", history[-1]["round"], stop_reason)

    set_weights(model, weights)
    # CPU tensors: model.pt loads on a machine without the GPU too.
    with open_private(out / "model.pt", "wb") as f:
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, f)
    summary = run_summary(history, stop_reason, elapsed + time.time() - started, out)
    write_private(out / "summary.json", json.dumps(summary, indent=2))
    log(INFO, "fl_app: final test accuracy %.4f after %d rounds (%.1f s); outputs in %s",
        summary["test_accuracy"], summary["rounds"], summary["seconds"], out)
    return summary


def run_summary(history: list[dict], stop_reason: str, seconds: float, out: Path) -> dict:
    """What summary.json holds: the final and best accuracy, why and when the run stopped."""
    final = history[-1]
    best = max(history, key=lambda row: row["test_accuracy"])
    summary = {"rounds": final["round"], "test_accuracy": final["test_accuracy"],
               "test_loss": final["test_loss"], "best_accuracy": best["test_accuracy"],
               "best_round": best["round"], "stop_reason": stop_reason, "seconds": seconds,
               "bytes_sent": sum(row.get("bytes_sent", 0) for row in history),
               "bytes_received": sum(row.get("bytes_received", 0) for row in history),
               "output_dir": str(out)}
    if "train_epsilon" in final:
        summary["epsilon"], summary["delta"] = final["train_epsilon"], final["train_delta"]
    for client_side in ("dpsgd_epsilon_max", "local_epsilon_max"):  # worst client's own ε
        if f"train_{client_side}" in final:
            summary[client_side] = final[f"train_{client_side}"]
    return summary


def train_round(grid: Grid, strategy: Strategy, cfg: DictConfig, rnd: int,
                weights: dict[str, np.ndarray], secagg_session: object | None = None
                ) -> tuple[dict[str, np.ndarray], dict]:
    """One round of federated training: the new global weights and the round's metrics row.
    `secagg_session`: secure aggregation's state for the run (fl_app.secagg.server)."""
    ours = isinstance(strategy, (SampledStrategy, DPNoise))
    if not ours:  # Flower's own sampling would wait forever for nodes that are gone
        wait_for_clients(grid, cfg, wanted=getattr(strategy, "min_available_nodes", 1))
    random.seed(cfg.seed * 1_000_003 + rnd)  # Flower's built-in strategies sample with `random`
    messages = strategy.configure_train(rnd, to_array_record(weights), ConfigRecord(), grid)
    messages = expire_with_round(messages, cfg.round_timeout)
    if cfg.secagg.name != "none":  # the server learns only the sum of the updates
        from fl_app.secagg.round import secure_train_round

        return secure_train_round(grid, strategy, cfg, rnd, messages, weights, secagg_session)
    replies = exchange(grid, messages, cfg.round_timeout)
    _fail_if_all_failed(rnd, replies)
    if not ours:  # fl_app's strategies screen replies themselves; Flower's average NaN in
        replies = usable_replies(rnd, replies, weights, getattr(strategy, "example_cap", None))
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
           "bytes_sent": payload_bytes(messages), "bytes_received": payload_bytes(replies),
           **{f"train_{k}": v for k, v in dict(metrics or {}).items()}}
    return (weights if new is None else from_array_record(new)), row


def bound_client_counts(strategy: Strategy, grid: Grid, cfg: DictConfig) -> None:
    """Bound the num-examples each reply counts for by `max_examples_per_client` and, in
    simulation, by the examples its client really has.

    A simulated client trains on a partition of this very config, so the server can size the
    partitions itself: every client is bounded by the largest, and where the server knows
    which partition a node holds (fl-app's in-process engine, one node per client) by its own.
    Flower's engine keeps its node -> partition map to itself. In a deployment the server
    cannot know what a SuperNode holds: only max_examples_per_client bounds it there.
    """
    per_node, largest = {}, None
    simulated = hasattr(grid, "partition_ids") or is_flower_simulation(grid)
    if simulated and cfg.num_clients:
        sizes = partition_train_sizes(cfg, cfg.num_clients)
        largest = max(sizes)
        if hasattr(grid, "partition_ids") and cfg.client_pool is None:
            per_node = {node: sizes[part] for node, part in grid.partition_ids().items()
                        if 0 <= part < len(sizes)}
    if isinstance(strategy, (SampledStrategy, DPNoise)):
        strategy.know_client_sizes(per_node, largest)
    else:  # Flower's strategies: usable_replies applies it (as an attribute, checkpointed)
        cap = ExampleCap(cfg.get("max_examples_per_client"))
        cap.know_sizes(per_node, largest)
        strategy.example_cap = cap


def evaluate_round(grid: Grid, strategy: Strategy, cfg: DictConfig, rnd: int,
                   weights: dict[str, np.ndarray]) -> dict:
    """Federated evaluation of the global model on the clients' held-out splits."""
    random.seed(cfg.seed * 1_000_003 + rnd + 500_009)  # an evaluation stream of its own
    messages = strategy.configure_evaluate(rnd, to_array_record(weights), ConfigRecord(), grid)
    messages = expire_with_round(messages, cfg.round_timeout)
    replies = exchange(grid, messages, cfg.round_timeout)
    metrics = strategy.aggregate_evaluate(rnd, replies)
    return {"bytes_sent": payload_bytes(messages), "bytes_received": payload_bytes(replies),
            **{f"client_{k}": v for k, v in dict(metrics or {}).items()}}


def output_dir(cfg: DictConfig) -> Path:
    """The run's absolute output folder: the ServerApp's working directory is the SuperLink's.

    A resumed run writes on into the folder of the run it continues."""
    if cfg.resume:
        return Path(cfg.resume).expanduser().resolve()
    if cfg.output_dir:
        return Path(cfg.output_dir).expanduser().resolve()
    root = Path(os.environ.get("FL_APP_OUTPUTS", "~/fl_app_outputs")).expanduser().resolve()
    now = datetime.now()
    name = f"{now:%H-%M-%S}-{cfg.strategy._target_.rsplit('.', 1)[-1]}-{cfg.dataset.name}"
    return root / f"{now:%Y-%m-%d}" / name


def wait_for_clients(grid: Grid, cfg: DictConfig, wanted: int | None = None) -> int:
    """Wait for `wanted` SuperNodes (default: min_clients, and client_pool or num_clients if
    set); return how many are there, or raise NotEnoughClientsError after node_wait_timeout."""
    wanted = wanted or max(cfg.min_clients, num_supernodes(cfg) or 0)
    deadline = time.time() + cfg.node_wait_timeout
    while (connected := len(list(grid.get_node_ids()))) < wanted:
        if time.time() > deadline:
            raise NotEnoughClientsError(
                f"Only {connected} SuperNode(s) connected after {cfg.node_wait_timeout} s; the "
                f"run needs {wanted} (min_clients={cfg.min_clients}, "
                f"num_clients={cfg.num_clients}, client_pool={cfg.client_pool}). Start more "
                "SuperNodes or raise num-supernodes "
                "(--federation-config 'num-supernodes=N'), or lower min_clients."
            )
        time.sleep(0.5)
    return connected


def lost_nodes(rnd: int, messages: list[Message], replies: list[Message]) -> list[int]:
    """Sampled nodes that sent no usable reply this round (gone, timed out, or failed)."""
    answered = {r.metadata.src_node_id for r in replies if not r.has_error()}
    lost = sorted({m.metadata.dst_node_id for m in messages} - answered)
    if lost:
        log(WARNING, "[round %d] lost %d of %d sampled node(s): %s (no reply, an error reply, "
            "or past round_timeout)", rnd, len(lost), len(messages), lost)
    return lost


def progress_line(row: dict, num_rounds: int, history: list[dict]) -> str:
    """One line per round: metrics, round time, and an ETA from the mean round time so far."""
    rnd = row["round"]
    timed = [r["seconds"] for r in history if "seconds" in r]
    eta = sum(timed) / len(timed) * (num_rounds - rnd)
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


def _merge(train_row: dict, evaluate_row: dict) -> dict:
    merged = train_row | evaluate_row
    for key in ("bytes_sent", "bytes_received"):
        merged[key] = train_row[key] + evaluate_row[key]
    return merged


def _truncate_jsonl(path: Path, after_round: int) -> None:
    """Drop rows past the checkpoint: a kill between a row and its checkpoint repeats a round."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["round"] <= after_round]
        write_private(path, "".join(line + "\n" for line in rows))


def _append_jsonl(path: Path, row: dict) -> None:
    with open_private(path, "a") as f:
        f.write(json.dumps(row) + "\n")
