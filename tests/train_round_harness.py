"""One server train round (`server_loop.train_round`, as `run` drives it) of any configured
strategy, fed scripted replies: the harness the reply attack and fuzz tests share.

A round is run twice from the same strategy state: once with the attacker's replies, once
with only the replies that should count. The server holds against the attack when both give
the same global model.
"""

from __future__ import annotations

import copy
import io
import re
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from hydra.utils import instantiate
from omegaconf import DictConfig

from fl_app.config import compose
from fl_app.records import from_array_record, to_array_record
from fl_app.server_loop import bound_client_counts, train_round

# Every strategy the app offers: fl_app's own (they screen replies themselves) and the Flower
# built-ins it wraps (server_loop screens their replies before Flower sees them).
OWN = ["fedavg", "fedsgd", "dp_fedavg", "dp_fedavg_adaptive", "dp_fedsgd"]
BUILT_IN = ["fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum"]
ALL_STRATEGIES = OWN + BUILT_IN
# Those whose mean weighs each reply by its num-examples.
WEIGHTED = ["fedavg", "fedsgd", "fedprox", "fedadam", "fedyogi"]

NODES = [101, 102, 103, 104, 105, 106, 107, 108]
MAX_EXAMPLES = 1000  # max_examples_per_client in these rounds
GLOBAL = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3),
          "b": np.array([0.5, -0.5, 0.25], np.float32)}

Answer = Callable[[Message], "Message | None"]


def strategy_config(name: str, *overrides: str) -> DictConfig:
    """The composed config of `strategy=name` for NODES clients (seeded DP noise)."""
    seeded = ["strategy.noise_seed=0"] if name.startswith("dp_") else []
    return compose([f"strategy={name}", f"num_clients={len(NODES)}", "min_clients=2",
                    f"max_examples_per_client={MAX_EXAMPLES}", "node_wait_timeout=1",
                    *seeded, *overrides])


class ScriptedGrid:
    """Nodes NODES answer each message with `answer(message)` (None: no reply)."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer

    def get_node_ids(self) -> list[int]:
        return list(NODES)

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        return [r for m in messages if (r := self.answer(m)) is not None]


def build_strategy(cfg: DictConfig):
    """The strategy as `server_loop.run` builds it (its example counts bounded)."""
    strategy = instantiate(cfg.strategy)
    bound_client_counts(strategy, ScriptedGrid(lambda m: None), cfg)
    return strategy


def sent_model(message: Message) -> tuple[dict[str, np.ndarray], str]:
    """The global model a train message carries and the reply mode it asks for."""
    config = message.content["config"]
    return from_array_record(message.content["arrays"]), str(config.get("mode", "weights"))


def honest_arrays(message: Message, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """What a well-behaved client sends: its small update, or its weights (sent + update)."""
    sent, mode = sent_model(message)
    update = {k: (0.01 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in sent.items()}
    return update if mode in ("delta", "gradient") else {k: sent[k] + update[k] for k in sent}


def reply_of(message: Message, arrays: ArrayRecord | dict, metrics: dict) -> Message:
    record = arrays if isinstance(arrays, ArrayRecord) else to_array_record(arrays)
    return Message(RecordDict({"arrays": record, "metrics": MetricRecord(metrics)}),
                   reply_to=message)


def honest_reply(message: Message, rnd: int) -> Message:
    """A node's honest reply, the same whenever asked (seeded by round and node)."""
    node = message.metadata.dst_node_id
    rng = np.random.default_rng([rnd, node])
    return reply_of(message, honest_arrays(message, rng),
                    {"num-examples": int(rng.integers(10, 100)), "train_loss": rng.random()})


def npy_bytes(array: np.ndarray) -> bytes:
    """The .npy bytes of `array` (header and data), as a Flower Array holds them."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def lying_array(declared: np.ndarray, data: bytes | np.ndarray) -> Array:
    """An Array whose header declares `declared`'s dtype and shape and whose bytes are `data`
    (an array's .npy bytes, or raw bytes)."""
    raw = data if isinstance(data, bytes) else npy_bytes(data)
    return Array(dtype=str(declared.dtype), shape=tuple(declared.shape),
                 stype="numpy.ndarray", data=raw)


def run_round(cfg: DictConfig, strategy, answer: Answer, rnd: int = 1,
              weights: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """One train round of `strategy` whose nodes answer with `answer`: the new global model."""
    new, _ = train_round(ScriptedGrid(answer), strategy, cfg, rnd, weights or GLOBAL)
    return new


def twin_of(cfg: DictConfig, strategy):
    """A copy of `strategy` that draws the same DP noise: a copy, like a checkpoint, carries no
    noise generator, so both are seeded again from the config's noise_seed."""
    twin = copy.deepcopy(strategy)
    if hasattr(twin, "seed_noise"):
        for each in (strategy, twin):
            each.seed_noise(cfg.strategy.get("noise_seed"))
    return twin


def attacked_and_clean(cfg: DictConfig, strategy, attack: Answer, clean: Answer,
                       rnd: int = 1, weights: dict[str, np.ndarray] | None = None):
    """The models one round gives from the same strategy state with the `attack` answers and
    with the `clean` ones (what the attacked round should amount to)."""
    twin = twin_of(cfg, strategy)
    return (run_round(cfg, strategy, attack, rnd, weights),
            run_round(cfg, twin, clean, rnd, weights))


_DROPPED = re.compile(r"dropping reply from node (\d+): (.+)")


def dropped(caplog: pytest.LogCaptureFixture) -> dict[int, str]:
    """node id -> reason, for every reply the server logged as dropped."""
    found = {}
    for rec in caplog.records:
        if match := _DROPPED.search(rec.getMessage()):
            found[int(match.group(1))] = match.group(2)
    return found


def assert_same_model(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for key, value in got.items():
        assert np.all(np.isfinite(value)), f"'{key}' is not finite"
        np.testing.assert_allclose(value, want[key], rtol=1e-5, atol=1e-6, err_msg=key)
