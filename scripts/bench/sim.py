"""Items 1 (simulation round time and start-up): 20 clients, McMahan's CNN and 2NN on the
embedded MNIST, B = 10, E = 1, the same task code and seeds everywhere.

- plain loop: one Python process, `build_client` for each of the 20 partitions, then per round
  every client's `TorchClient.fit` on the global weights, the example-weighted mean, and the
  same central evaluation the ServerApp does (so a round is the same work as a Flower round);
- in-process app: `fl_app.inprocess` (the real ServerApp loop and ClientApp, Messages and
  strategy included, no SuperLink, no Ray), to split app overhead from Flower's transport;
- `fl-app` (in-process): the same, started as a user starts it (the command, Hydra, the
  outputs), for its round time and its first training step after the command starts;
- Flower simulation: `flwr run` with `num-supernodes=20` and Flower's default client resources
  (2 CPUs each), and with `client-resources-num-cpus=1`.

Steady state is the median of the rounds after the first. Start-up is read from the stamps
(scripts/bench/hook): when each process started, when the first training step ran.
"""

from __future__ import annotations

from pathlib import Path

from bench.common import (
    Part,
    RayHead,
    Row,
    SimRun,
    first,
    fl_app_default,
    fmt_s,
    median,
    process_starts,
    python_child,
    simulate,
    spans,
    stamp_env,
    verdict,
)
from fl_app.deploy.runner import free_port

NUM_CLIENTS = 20
TARGET_RATIO = 1.1
TARGET_FIRST_STEP = 10.0
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
        new, num, _ = c.fit(params, {"server-round": rnd})
        acc = [num * w for w in new] if acc is None else [a + num * w for a, w in zip(acc, new)]
        total += num
    weights = {k: a / total for k, a in zip(keys, acc)}
    set_weights(model, weights)
    loss, accuracy = training.evaluate(model, test.x_test, test.y_test)
    times.append(time.time() - t0)
print(json.dumps({"round_seconds": times, "first_step_after": first_step - t_start,
                  "accuracy": accuracy}))
"""

IN_PROCESS = r"""
import json, sys, time
t_start = time.time()
from fl_app.inprocess import run
model_name, rounds, n, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
summary = run([f"model={model_name}", f"num_rounds={rounds}", f"output_dir={out}"], n)
rows = [json.loads(r) for r in open(out + "/metrics.jsonl")]
print(json.dumps({"round_seconds": [r["seconds"] for r in rows],
                  "accuracy": summary["test_accuracy"]}))
"""


def _engine_run(model: str, rounds: int, work: Path) -> dict:
    """`fl-app` (in-process) on this part's 20 clients."""
    return fl_app_default(work / f"fl-app-inprocess-{model}",
                          [f"model={model}", f"num_clients={NUM_CLIENTS}", f"num_rounds={rounds}"])


def _child(code: str, *args: str, stamps: Path | None = None) -> dict:
    argv_code = f"import sys; sys.argv = {['bench', *args]!r}\n" + code
    return python_child(argv_code, env=stamp_env(stamps) if stamps else None,
                        timeout=900)


def plain_loop(model: str, rounds: int) -> dict:
    return _child(PLAIN_LOOP, model, str(rounds), str(NUM_CLIENTS))


def in_process(model: str, rounds: int, work: Path) -> dict:
    out = work / f"inprocess-{model}"
    return _child(IN_PROCESS, model, str(rounds), str(NUM_CLIENTS), str(out))


def flower(model: str, rounds: int, work: Path, cpus: str | None) -> SimRun:
    fed = {"client-resources-num-cpus": cpus} if cpus else {}
    run = simulate(work / f"sim-{model}-{cpus or 'default'}", [f"model={model}",
                   f"num_rounds={rounds}"], NUM_CLIENTS, federation=fed)
    if not run.ok:
        log = "".join(line for _, line in run.lines)
        raise RuntimeError(f"simulation {model} cpus={cpus} failed: {run.status}\n{log[-3000:]}")
    return run


def warm_starts(work: Path) -> dict[str, dict]:
    """First training step when Ray, then also the SuperLink, are already running: a Ray head
    started beforehand (`ray start --head`, reached through RAY_ADDRESS), a 1-round 2NN run
    from a fresh FLWR_HOME, then a second run on the SuperLink the first one left running.
    All their processes stamp into one file (the head's workers and the kept SuperLink keep
    the environment they were started with)."""
    out = {}
    work.mkdir(parents=True, exist_ok=True)
    home, ports = work / "warm-home", (free_port(), free_port())
    stamps = work / "warm-stamps.jsonl"
    with RayHead(env=stamp_env(stamps)) as head:
        for name, keep in (("Ray cluster already running", True),
                           ("Ray cluster and local SuperLink already running", False)):
            run = simulate(work / f"warm-{keep}", ["model=mlp", "num_rounds=1"], NUM_CLIENTS,
                           env={"RAY_ADDRESS": head.address}, home=home, ports=ports,
                           keep_superlink=keep, stamps=stamps)
            out[name] = run.timeline() | {"ok": run.ok}
    return out


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


def run(work: Path, rounds_cnn: int = 4, rounds_mlp: int = 5, variants=(None, "1"),
        startup_only: bool = False) -> tuple[Part, Part]:
    """Returns (simulation part, start-up part)."""
    sim, start = Part(), Part()
    rounds = {"cnn": rounds_cnn, "mlp": rounds_mlp}
    runs: dict[tuple[str, str | None], SimRun] = {}
    models = ("mlp",) if startup_only else ("cnn", "mlp")
    for model in models:
        if not startup_only:
            plain = plain_loop(model, rounds[model])
            inproc = in_process(model, rounds[model], work)
            plain_s = median(plain["round_seconds"][1:])
            sim.data[f"plain loop {model}"] = plain
            sim.data[f"in-process app {model}"] = inproc
            sim.rows.append(Row(f"{NAMES[model]}, 20 clients: plain PyTorch loop, steady round",
                                fmt_s(plain_s)))
            ratio_in = median(inproc["round_seconds"][1:]) / plain_s
            sim.rows.append(Row("  in-process ServerApp + ClientApp (no Flower transport)",
                                f"{ratio_in:.2f}× plain"))
            engine = _engine_run(model, rounds[model], work)
            sim.data[f"fl-app (in-process) {model}"] = engine
            ratio_engine = median(engine["round_seconds"][1:]) / plain_s
            ok_engine = ratio_engine <= TARGET_RATIO
            sim.rows.append(Row("  `fl-app` (its default engine, in-process), steady round vs "
                                "plain loop", f"{ratio_engine:.2f}× "
                                f"({fmt_s(median(engine['round_seconds'][1:]))})"
                                + verdict(ok_engine), f"≤ {TARGET_RATIO}×",
                                PLAIN_FLOWER[(model, None)], ok=ok_engine))
        for cpus in (variants if not startup_only else (None,)):
            run = flower(model, rounds[model], work, cpus)
            runs[(model, cpus)] = run
            sim.data[f"flower {model} cpus={cpus or 'default'}"] = {
                "rounds": run.rounds, "timeline": run.timeline(), "per_message": per_message(run)}
            print(f"  simulation {model} cpus={cpus or 'default'}: steady "
                  f"{run.steady_round():.2f} s/round", flush=True)
            if startup_only:
                continue
            ratio = run.steady_round() / plain_s
            label = "Flower defaults" if cpus is None else f"client-resources-num-cpus={cpus}"
            ok = ratio <= TARGET_RATIO if cpus is None else None
            pm = per_message(run)
            serial = pm and pm["overhead per message"] > 0  # one actor: messages in turn
            overhead = (f"; {pm['overhead per message'] * 1e3:.0f} ms per client message "
                        "beyond training" if serial else "; actors train in parallel")
            sim.rows.append(Row(f"  Flower simulation ({label}), steady round vs plain loop",
                                f"{ratio:.2f}× ({fmt_s(run.steady_round())}{overhead})"
                                + verdict(ok),
                                f"≤ {TARGET_RATIO}×" if cpus is None else "",
                                PLAIN_FLOWER[(model, cpus)], ok=ok))
            if cpus is None:
                accuracies = (plain["accuracy"], inproc["accuracy"],
                              run.rounds[-1]["test_accuracy"])
                sim.rows.append(Row("  same task, same seeds: final test accuracy, plain / "
                                    "in-process / Flower", " / ".join(f"{a:.4f}"
                                                                      for a in accuracies)))

    # Start-up, from the 2NN run with Flower's defaults (what a user gets without tuning).
    run = runs[("mlp", None)]
    tl = run.timeline()
    start.data["timeline"] = tl
    step = tl["first training step (first backward pass)"]
    ok = step is not None and step <= TARGET_FIRST_STEP
    plain_first = sim.data.get("plain loop mlp", {}).get("first_step_after")
    start.rows.append(Row("Start-up: first training step after `flwr run` starts (2NN, 20 "
                          "clients, defaults)", (fmt_s(step) if step else "?") + verdict(ok),
                          f"≤ {TARGET_FIRST_STEP:.0f} s", "~22 s", ok=ok))
    if plain_first is not None:
        start.rows.append(Row("  plain loop: first training step after the process starts",
                              fmt_s(plain_first), "", "~3 s"))
    engine = sim.data.get("fl-app (in-process) mlp") or _engine_run("mlp", 2, work)
    step = engine["first_step_after"]
    ok = step is not None and step <= TARGET_FIRST_STEP
    start.data["fl-app (in-process)"] = engine
    start.rows.append(Row("Start-up: first training step after `fl-app` (in-process) starts "
                          "(2NN, 20 clients)", (fmt_s(step) if step else "?") + verdict(ok),
                          f"≤ {TARGET_FIRST_STEP:.0f} s", "~22 s", ok=ok))
    previous = 0.0
    plain_marks = {"run submitted": "SuperLink ~4.5 s", "simulation process": "~8.7 s",
                   "server code (ServerApp main)": "~10.5 s",
                   "first training step (first backward pass)":
                       "Ray actors ~9 s more, inside round 1"}
    for name, t in sorted(((n, t) for n, t in tl.items() if t is not None),
                          key=lambda item: item[1]):
        if name == "last round ends":
            continue
        start.rows.append(Row(f"  at {t:5.1f} s: {name} (+{t - previous:.1f} s)", "", "",
                              plain_marks.get(name, "")))
        previous = max(previous, t)
    last = tl.get("last round ends")
    if last is not None and tl.get("flwr run exits") is not None:
        start.rows.append(Row("Tear-down: last round ends → `flwr run` exits",
                              fmt_s(tl["flwr run exits"] - last), "", "3–4 s"))
    for name, warm in warm_starts(work).items():
        start.data[f"timeline, {name}"] = warm
        step = warm.get("first training step (first backward pass)")
        start.rows.append(Row(f"  first training step, {name} (RAY_ADDRESS)",
                              fmt_s(step) if step else f"? (run ok: {warm['ok']})"))
    starts = process_starts(run.stamps, "")
    start.data["processes"] = [{"t": s["t"] - run.started, "pid": s["pid"], "argv": s["argv"]}
                               for s in starts]
    first_handler = first(run.stamps, "handler")
    first_train = first(run.stamps, "backward")
    if first_handler and first_train:
        start.rows.append(Row("  first message at the ClientApp → its first training step",
                              fmt_s(first_train - first_handler)))
    return sim, start
