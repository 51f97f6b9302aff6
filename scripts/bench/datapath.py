"""Item 5: the client's data path, from a train Message arriving at the ClientApp to the first
training step, in a fresh process (as every deployment message without fl-app-executor gets)
and for a client the process already holds (as a simulation actor or an executor serving many
messages has).

Each measurement is a fresh interpreter of this venv calling the real `fl_app.client_app.app`
with a CNN train Message twice, with stamps on (scripts/bench/hook): `backward` at the
process's first backward pass (the first training step really running), `train-start` when a
later message enters the training loop. With an empty data cache ($FL_APP_CACHE) the first
message also parses the embedded MNIST's CSV and partitions it; with a filled one it reads
.npz files.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.common import Part, Row, first, fmt_s, python_child, read_stamps, stamp_env

CHILD = r"""
import json, time
import fl_app.client_app as ca
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from fl_app.inprocess import _set_identity
from fl_app.config import compose
from fl_app.messages import ARRAYS, CONFIG, REPLY, SERVER_ROUND, WEIGHTS
from fl_app.models import get_weights
from fl_app.records import to_array_record
from hydra.utils import instantiate
import torch

_set_identity()
n = 20
run_config = {"model": "cnn", "overrides": f"num_clients={n}"}
torch.manual_seed(0)
arrays = to_array_record(get_weights(instantiate(compose(["model=cnn"]).model)))
out = {"messages": []}
for _ in range(2):  # a new client, then the same client again
    ctx = Context(run_id=1, node_id=1, state=RecordDict(), run_config=run_config,
                  node_config={"partition-id": 0, "num-partitions": n})
    msg = Message(RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord(
        {SERVER_ROUND: 1, REPLY: WEIGHTS})}), dst_node_id=1, message_type=MessageType.TRAIN)
    out["messages"].append({"called": time.time()})
    ca.app(msg, ctx)
print(json.dumps(out))
"""


def _measure(work: Path, cache: Path) -> list[float]:
    """Seconds from each message's call to its first training step, in one fresh process."""
    stamps = work / "stamps.jsonl"
    stamps.unlink(missing_ok=True)
    result = python_child(CHILD, env={**stamp_env(stamps), "FL_APP_CACHE": str(cache)})
    st = read_stamps(stamps)
    # The first backward pass is stamped once per process; later messages enter the loop.
    return [(first(st, "backward", after=m["called"]) or first(st, "train-start",
                                                              after=m["called"])) - m["called"]
            for m in result["messages"]]


def run(work: Path) -> Part:
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix="cache", dir=work))
    cold = _measure(work, cache)  # empty cache: CSV parsed, partitions computed, both stored
    fresh, cached = _measure(work, cache)  # what every later process sees
    return Part(
        rows=[Row("Client data path (CNN, 20 partitions): Message at the ClientApp → first "
                  "training step, fresh process, data cache on disk", fmt_s(fresh)),
              Row("  same, first process ever (empty cache: parse the CSV, partition, store)",
                  fmt_s(cold[0]), "", "CSV parse ~2.8 s per process"),
              Row("  same process, same partition again (client cached in the process)",
                  fmt_s(cached), "cached per process")],
        data={"empty cache": cold, "filled cache": [fresh, cached]})
