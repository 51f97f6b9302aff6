"""Attacks by a lying client on the server's train round (issue 22, items 4 and 5).

Each test performs the attack through `server_loop.train_round`, for every strategy family
where it applies, and checks the round ends with the model the honest replies give.
"""

import math

import numpy as np
import pytest
from flwr.app import Message
from flwr.serverapp.strategy import FedAvg
from strategy_helpers import set_task_identity, train_reply, unpack
from train_round_harness import (
    ALL_STRATEGIES,
    GLOBAL,
    MAX_EXAMPLES,
    NODES,
    OWN,
    WEIGHTED,
    ScriptedGrid,
    assert_same_model,
    attacked_and_clean,
    build_strategy,
    dropped,
    honest_arrays,
    honest_reply,
    lying_array,
    npy_bytes,
    reply_of,
    sent_model,
    strategy_config,
)

from fl_app.config import compose
from fl_app.data import partition_train_sizes
from fl_app.inprocess import InProcessGrid
from fl_app.privacy.central import DPNoise
from fl_app.records import to_array_record
from fl_app.server_loop import bound_client_counts
from fl_app.strategies import GradientAveraging, WeightedFedAvg
from fl_app.strategies import aggregation as averaging

ATTACKER = NODES[-1]


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    set_task_identity(monkeypatch)


def attacker_sends(make_reply):
    """Answers where ATTACKER replies with `make_reply(message)` and the others honestly."""
    def answer(message: Message) -> Message:
        if message.metadata.dst_node_id == ATTACKER:
            return make_reply(message)
        return honest_reply(message, rnd=1)
    return answer


def without_attacker(message: Message) -> Message | None:
    return None if message.metadata.dst_node_id == ATTACKER else honest_reply(message, rnd=1)


def with_w_replaced(array_of):
    """The attacker's reply: honest, except that array 'w' is `array_of(honest w)`."""
    def make(message: Message) -> Message:
        arrays = honest_arrays(message, np.random.default_rng(0))
        record = to_array_record(arrays)
        record["w"] = array_of(arrays["w"])
        return reply_of(message, record, {"num-examples": 50})
    return make


# --------------------------------------------------------------------------------------------
# Item 4: Arrays whose bytes hold something other than their header declares
# --------------------------------------------------------------------------------------------

LIES = {
    # declared (4, 3) float32; the bytes hold one value that numpy would broadcast everywhere
    "broadcastable (1,)": lambda w: lying_array(w, np.full(1, -499999.5, w.dtype)),
    # declared (4, 3); the bytes hold 20 values (once raised out of aggregate_train)
    "larger (20,)": lambda w: lying_array(w, np.full(20, 3.0, w.dtype)),
    "same size, other shape (3, 4)": lambda w: lying_array(w, w.reshape(3, 4)),
    "float64 bytes under a float32 header": lambda w: lying_array(w, w.astype(np.float64)),
    "int8 bytes under a float32 header": lambda w: lying_array(w, np.full(w.shape, 100,
                                                                          np.int8)),
    "complex bytes": lambda w: lying_array(w, w.astype(np.complex64)),
    "truncated bytes": lambda w: lying_array(w, npy_bytes(w)[:-5]),
    "header only": lambda w: lying_array(w, npy_bytes(w)[:128]),
    "not .npy at all": lambda w: lying_array(w, b"\x00garbage" * 8),
}


@pytest.mark.parametrize("lie", LIES, ids=list(LIES))
@pytest.mark.parametrize("name", ALL_STRATEGIES)
def test_reply_whose_bytes_contradict_its_header_is_dropped_with_a_reason(name, lie, caplog):
    cfg = strategy_config(name)
    attacked, clean = attacked_and_clean(cfg, build_strategy(cfg),
                                         attacker_sends(with_w_replaced(LIES[lie])),
                                         without_attacker)

    assert_same_model(attacked, clean)
    reasons = dropped(caplog)
    assert set(reasons) == {ATTACKER}
    assert "'w'" in reasons[ATTACKER]


def test_broadcast_attack_no_longer_sets_every_coordinate(caplog):
    """The reported attack: every coordinate of 'w' was set to -499999.5 by one client."""
    cfg = strategy_config("fedavg")
    attacked, _ = attacked_and_clean(cfg, build_strategy(cfg),
                                     attacker_sends(with_w_replaced(LIES["broadcastable (1,)"])),
                                     without_attacker)
    assert np.abs(attacked["w"] - GLOBAL["w"]).max() < 0.1
    assert "holds a float32 array of shape (1,)" in dropped(caplog)[ATTACKER]
    assert "declared float32 (4, 3)" in dropped(caplog)[ATTACKER]


# --------------------------------------------------------------------------------------------
# Item 4: any error while adding one reply drops that reply, never the run
# --------------------------------------------------------------------------------------------

POISON = 7777.0  # a reply whose 'b' starts with this cannot be added (see flaky_axpy)


@pytest.fixture
def flaky_axpy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Adding an array that starts with POISON fails, as a bug or memory error might."""
    real = averaging.axpy

    def axpy(acc: np.ndarray, weight: float, array: np.ndarray) -> None:
        if array.size and array.reshape(-1)[0] == POISON:
            raise MemoryError("simulated failure while adding")
        real(acc, weight, array)
    monkeypatch.setattr(averaging, "axpy", axpy)


@pytest.mark.parametrize("name", OWN)
def test_a_reply_that_fails_while_being_added_is_dropped_and_leaves_no_trace(name, flaky_axpy,
                                                                            caplog):
    def poisoned(message: Message) -> Message:
        arrays = honest_arrays(message, np.random.default_rng(0))
        arrays["b"] = np.full_like(arrays["b"], POISON)  # 'w' is added first, then this fails
        return reply_of(message, arrays, {"num-examples": 50})

    cfg = strategy_config(name)
    attacked, clean = attacked_and_clean(cfg, build_strategy(cfg), attacker_sends(poisoned),
                                         without_attacker)

    assert_same_model(attacked, clean)
    assert "cannot be added to the sum (MemoryError" in dropped(caplog)[ATTACKER]


@pytest.mark.parametrize("container", [list, iter], ids=["list", "stream"])
def test_fedavg_drops_a_reply_it_cannot_add_whether_replies_come_as_a_list_or_a_stream(
        container, flaky_axpy):
    strategy = WeightedFedAvg()
    strategy.set_current({"w": np.zeros(2), "b": np.zeros(2)})
    replies = [train_reply(1, {"w": np.array([1.0, 1.0]), "b": np.array([1.0, 1.0])}, 1),
               train_reply(2, {"w": np.array([3.0, 3.0]), "b": np.array([3.0, 3.0])}, 1),
               train_reply(3, {"w": np.array([9.0, 9.0]), "b": np.array([POISON, 0.0])}, 1)]
    arrays, metrics = strategy.aggregate_train(1, container(replies))

    assert unpack(arrays)["w"].tolist() == [2.0, 2.0]
    assert unpack(arrays)["b"].tolist() == [2.0, 2.0]
    assert (metrics["num-clients"], metrics["num-dropped"]) == (2, 1)


# --------------------------------------------------------------------------------------------
# Item 5: a client's weight is bounded
# --------------------------------------------------------------------------------------------

def claims(num_examples: float):
    """The attacker's reply: a large update (+5 everywhere) claiming `num_examples`."""
    def make(message: Message) -> Message:
        sent, mode = sent_model(message)
        shift = {k: np.full_like(v, 5.0) for k, v in sent.items()}
        arrays = shift if mode in ("delta", "gradient") else {k: sent[k] + 5 for k in sent}
        return reply_of(message, arrays, {"num-examples": num_examples})
    return make


@pytest.mark.parametrize("name", WEIGHTED)
def test_client_claiming_a_trillion_examples_counts_for_max_examples_per_client(name):
    cfg = strategy_config(name)
    attacked, capped = attacked_and_clean(cfg, build_strategy(cfg), attacker_sends(claims(1e12)),
                                          attacker_sends(claims(MAX_EXAMPLES)))
    assert_same_model(attacked, capped)


def test_fedavg_weight_of_a_lying_client_is_hand_computable():
    """Two honest clients (50 examples each) send 0 and 1; a liar claims 1e12 and sends 1000:
    it counts for 100 examples, so the mean is (0·50 + 1·50 + 1000·100) / 200."""
    strategy = WeightedFedAvg(max_examples_per_client=100)
    strategy.set_current({"w": np.zeros(1)})
    replies = [train_reply(1, {"w": np.array([0.0])}, 50),
               train_reply(2, {"w": np.array([1.0])}, 50),
               train_reply(3, {"w": np.array([1000.0])}, 1e12)]
    arrays, metrics = strategy.aggregate_train(1, replies)

    assert unpack(arrays)["w"][0] == pytest.approx((50 + 100_000) / 200)
    assert metrics["num-examples"] == 200


def test_without_a_bound_the_example_count_is_trusted():
    """max_examples_per_client=null (deployment default): the honest-count assumption."""
    strategy = WeightedFedAvg()
    strategy.set_current({"w": np.zeros(1)})
    arrays, _ = strategy.aggregate_train(1, [train_reply(1, {"w": np.array([0.0])}, 50),
                                             train_reply(2, {"w": np.array([1.0])}, 150)])
    assert unpack(arrays)["w"][0] == pytest.approx(0.75)


def test_max_examples_per_client_reaches_every_strategy_from_the_config():
    for name in ("fedavg", "fedsgd", "dp_fedavg", "dp_fedsgd", "fedprox", "krum"):
        strategy = build_strategy(strategy_config(name, "max_examples_per_client=321"))
        own = strategy.inner if isinstance(strategy, DPNoise) else strategy
        assert own.example_cap.limit == 321, name


@pytest.mark.parametrize("bad", [0, -5, 0.5, math.inf, math.nan, True, "100"])
def test_max_examples_per_client_must_be_null_or_at_least_one(bad):
    for make in (lambda: WeightedFedAvg(max_examples_per_client=bad),
                 lambda: GradientAveraging(max_examples_per_client=bad)):
        with pytest.raises(ValueError, match=r"max_examples_per_client must be null .* >= 1"):
            make()
    cfg = compose(["strategy=fedprox", "num_clients=4"])
    cfg.max_examples_per_client = bad
    with pytest.raises(ValueError, match="max_examples_per_client must be null"):
        bound_client_counts(FedAvg(), ScriptedGrid(lambda m: None), cfg)


def test_simulated_client_counts_for_at_most_the_partition_it_has():
    """In fl-app's in-process engine the server knows node i trains on partition i."""
    cfg = compose(["strategy=fedavg", "num_clients=4"])
    sizes = partition_train_sizes(cfg, 4)
    strategy = build_strategy(cfg)
    bound_client_counts(strategy, InProcessGrid([], 4), cfg)
    strategy.set_current({"w": np.zeros(1)})

    replies = [train_reply(0, {"w": np.array([1000.0])}, 1e12),
               train_reply(1, {"w": np.array([0.0])}, sizes[1])]
    arrays, metrics = strategy.aggregate_train(1, replies)

    assert metrics["num-examples"] == sizes[0] + sizes[1]
    assert unpack(arrays)["w"][0] == pytest.approx(1000.0 * sizes[0] / (sizes[0] + sizes[1]))


def test_in_flowers_simulation_every_client_counts_for_at_most_the_largest_partition():
    """Flower's engine keeps its node -> partition map: the largest partition bounds all."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid as FlowersGrid

    class InMemoryGrid(ScriptedGrid, FlowersGrid):  # what Flower's simulation hands the server
        pass

    cfg = compose(["strategy=fedprox", "num_clients=4"])
    strategy = build_strategy(cfg)
    bound_client_counts(strategy, InMemoryGrid(lambda m: None), cfg)
    assert strategy.example_cap.limit == max(partition_train_sizes(cfg, 4))
