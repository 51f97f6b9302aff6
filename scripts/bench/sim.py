"""Item 1 (simulation round time): 20 clients, McMahan's CNN and 2NN on the embedded MNIST,
B = 10, E = 1, the same task code and seeds everywhere.

- plain loop: one Python process, `build_client` for each of the 20 partitions, then per round
  every client's `TorchClient.fit` on the global weights, the example-weighted mean, and the
  same central evaluation the ServerApp does (so a round is the same work as a Flower round);
- `fl-app` (its default engine, in-process: the real ServerApp loop and ClientApp, Messages and
  strategy included, no SuperLink, no Ray), started as a user starts it;
- Flower simulation: `flwr run` with `num-supernodes=20` and Flower's default client resources
  (2 CPUs each), and with `client-resources-num-cpus=1` (what `fl-app engine=flower` sets).

Steady state is the median of the rounds after the first. The start-up part (startup.py)
reads its time line from this part's 2NN run with Flower's defaults.
"""

from __future__ import annotations

from pathlib import Path

from bench.common import (
    Part,
    Row,
    SimRun,
    fl_app_default,
    fmt_s,
    median,
    python_child,
    simulate,
    spans,
    verdict,
)

NUM_CLIENTS = 20
TARGET_RATIO = 1.1
PLAIN_FLOWER = {  # the measurements of plain Flower on this machine
    ("cnn", None): "1.26×", ("mlp", None): "2.2× (~25 ms per client message)",
    ("cnn", "1"): "0.90×", ("mlp", "1"): "1.07×",
}
NAMES = {"cnn": "CNN", "mlp": "2NN"}

PLAIN_LOOP = r"""
import json, sys, time
t_start = time.time()
import numpy as np, torch
from hydra.utils import instantiate
from fl_app import training
from fl_app.client_core import build_client
from fl_app.config import compose
from fl_app.data import load_dataset
from fl_app.messages import SERVER_ROUND
from fl_app.models import get_weights, set_weights

model_name, rounds, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = compose([f"model={model_name}", f"num_clients={n}"])
training.setup_torch()
clients = [build_client(cfg, i, n) for i in range(n)]
torch.manual_seed(cfg.seed)
model = instantiate(cfg.model)
test = load_dataset(cfg.dataset)
weights = get_weights(model)
keys = list(weights)
times, first_step = [], None
for rnd in range(1, rounds + 1):
    t0 = time.time()
    params = [weights[k] for k in keys]
    total, acc = 0, None
    for c in clients:
        if first_step is None:
            first_step = time.time()
        new, num, _ = c.fit(params, {SERVER_ROUND: rnd})
        acc = [num * w for w in new] if acc is None else [a + num * w for a, w in zip(acc, new)]
        total += num
    weights = {k: a / total for k, a in zip(keys, acc)}
    set_weights(model, weights)
    loss, accuracy = training.evaluate(model, test.x_test, test.y_test)
    times.append(time.time() - t0)
print(json.dumps({"round_seconds": times, "first_step_after": first_step - t_start,
                  "accuracy": accuracy}))
"""


def fl_app_run(model: str, rounds: int, work: Path) -> dict:
    """`fl-app` (in-process) on this part's 20 clients."""
    return fl_app_default(work / f"fl-app-inprocess-{model}",
                          [f"model={model}", f"num_clients={NUM_CLIENTS}", f"num_rounds={rounds}"])


def plain_loop(model: str, rounds: int) -> dict:
    argv = f"import sys; sys.argv = {['bench', model, str(rounds), str(NUM_CLIENTS)]!r}\n"
    return python_child(argv + PLAIN_LOOP, timeout=900)


def flower(model: str, rounds: int, work: Path, cpus: str | None) -> SimRun:
    fed = {"client-resources-num-cpus": cpus} if cpus else {}
    run = simulate(work / f"sim-{model}-{cpus or 'default'}", [f"model={model}",
                   f"num_rounds={rounds}"], NUM_CLIENTS, federation=fed)
    if not run.ok:
        log = "".join(line for _, line in run.lines)
        raise RuntimeError(f"simulation {model} cpus={cpus} failed: {run.status}\n{log[-3000:]}")
    return run


def per_message(run: SimRun) -> dict:
    """Steady-state rounds: how much of the round the ClientApps spent training, and the rest
    divided by the number of messages (Flower's transport, Ray, the ClientApp bridge)."""
    rounds = spans(run.stamps, "round")[1:]
    trains = spans(run.stamps, "train")
    out = []
    for _, r0, r1 in rounds:
        inside = [(t1 - t0) for _, t0, t1 in trains if r0 <= t0 and t1 <= r1]
        if inside:
            out.append({"round": r1 - r0, "training": sum(inside), "messages": len(inside)})
    if not out:
        return {}
    rnd, train = median([o["round"] for o in out]), median([o["training"] for o in out])
    msgs = out[0]["messages"]
    return {"round (train_round only)": rnd, "training inside it": train,
            "overhead per message": (rnd - train) / msgs, "messages": msgs}


def run(work: Path, rounds_cnn: int = 4, rounds_mlp: int = 5,
        variants=(None, "1")) -> tuple[Part, SimRun]:
    """Returns the part and its 2NN run with Flower's defaults (the start-up part reads it)."""
    sim = Part()
    rounds = {"cnn": rounds_cnn, "mlp": rounds_mlp}
    startup_run = None
    for model in ("cnn", "mlp"):
        plain = plain_loop(model, rounds[model])
        plain_s = median(plain["round_seconds"][1:])
        sim.data[f"plain loop {model}"] = plain
        sim.rows.append(Row(f"{NAMES[model]}, 20 clients: plain PyTorch loop, steady round",
                            fmt_s(plain_s)))
        engine = fl_app_run(model, rounds[model], work)
        sim.data[f"fl-app (in-process) {model}"] = engine
        ratio_engine = median(engine["round_seconds"][1:]) / plain_s
        ok_engine = ratio_engine <= TARGET_RATIO
        sim.rows.append(Row("  `fl-app` (its default engine, in-process), steady round vs "
                            "plain loop", f"{ratio_engine:.2f}× "
                            f"({fmt_s(median(engine['round_seconds'][1:]))})"
                            + verdict(ok_engine), f"≤ {TARGET_RATIO}×",
                            PLAIN_FLOWER[(model, None)], ok=ok_engine))
        for cpus in variants:
            run = flower(model, rounds[model], work, cpus)
            if (model, cpus) == ("mlp", None):
                startup_run = run
            pm = per_message(run)
            sim.data[f"flower {model} cpus={cpus or 'default'}"] = {
                "rounds": run.rounds, "timeline": run.timeline(), "per_message": pm}
            print(f"  simulation {model} cpus={cpus or 'default'}: steady "
                  f"{run.steady_round():.2f} s/round", flush=True)
            ratio = run.steady_round() / plain_s
            label = "Flower defaults" if cpus is None else f"client-resources-num-cpus={cpus}"
            ok = ratio <= TARGET_RATIO if cpus is None else None
            serial = pm and pm["overhead per message"] > 0  # one actor: messages in turn
            overhead = (f"; {pm['overhead per message'] * 1e3:.0f} ms per client message "
                        "beyond training" if serial else "; actors train in parallel")
            sim.rows.append(Row(f"  Flower simulation ({label}), steady round vs plain loop",
                                f"{ratio:.2f}× ({fmt_s(run.steady_round())}{overhead})"
                                + verdict(ok),
                                f"≤ {TARGET_RATIO}×" if cpus is None else "",
                                PLAIN_FLOWER[(model, cpus)], ok=ok))
            if cpus is None:
                accuracies = (plain["accuracy"], engine["accuracy"],
                              run.rounds[-1]["test_accuracy"])
                sim.rows.append(Row("  same task, same seeds: final test accuracy, plain / "
                                    "fl-app / Flower", " / ".join(f"{a:.4f}"
                                                                  for a in accuracies)))
    return sim, startup_run
