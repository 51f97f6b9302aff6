"""Secure aggregation (secagg=secaggplus): the server learns the sum, and only the sum."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    encrypt,
)
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat
from strategy_helpers import set_task_identity

from fl_app import client_core, server_loop
from fl_app.config import ConfigError, compose, overrides_from_run_config
from fl_app.inprocess import InProcessGrid
from fl_app.privacy.central import DPNoise
from fl_app.records import from_array_record, to_array_record
from fl_app.secagg import client, protocol, server, vectors
from fl_app.secagg.settings import SecAggError, SecAggSettings, share_plan
from fl_app.strategies import WeightedFedAvg

S = SecAggSettings()


@pytest.fixture(autouse=True)
def _identity(monkeypatch):
    set_task_identity(monkeypatch)


class StageGrid:
    """Nodes that answer secagg stage messages with the real client code; `train(nid, content)`
    stands in for local training. `drop[stage]`: nodes that never answer that stage;
    `alter(stage, nid, content)`: change a reply's content before the server sees it.
    `catch`: the client exceptions that become error replies (a ClientApp turns any into one)."""

    def __init__(self, node_ids, train, drop=None, alter=None, catch=SecAggError):
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(),
                                    run_config={}) for n in node_ids}
        self.train, self.drop, self.alter, self.catch = train, drop or {}, alter, catch
        self.sent: list[Message] = []  # every message the server sent
        self.received: list[Message] = []  # every reply the server was given

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        self.sent += messages
        for msg in messages:
            nid, stage = msg.metadata.dst_node_id, msg.content["secagg"]["stage"]
            if nid in self.drop.get(stage, ()):
                continue
            try:
                content = client.answer(msg.content, self.contexts[nid],
                                        lambda c, nid=nid: self.train(nid, c))
            except self.catch as err:
                replies.append(Message(Error(code=0, reason=str(err)), reply_to=msg))
                continue
            if self.alter:
                self.alter(stage, nid, content)
            replies.append(Message(content, reply_to=msg))
        self.received += replies
        return replies


def fake_clients(num, size=300, seed=0):
    """Per node: an update, an example count and a train loss."""
    rng = np.random.default_rng(seed)
    return {n: ({"w": rng.normal(0, 0.5, size).astype(np.float32),
                 "b": rng.normal(0, 0.5, 3).astype(np.float32)},
                int(rng.integers(20, 900)), float(rng.uniform(0.1, 2))) for n in range(num)}


def trainer(clients):
    def train(nid, content):
        update, n, loss = clients[nid]
        return RecordDict({"arrays": to_array_record(update),
                           "metrics": MetricRecord({"num-examples": n, "train_loss": loss})})
    return train


def train_messages(node_ids, arrays):
    content = RecordDict({"arrays": to_array_record(arrays),
                          "config": ConfigRecord({"mode": "weights", "server-round": 1})})
    return [Message(content=content, dst_node_id=n, message_type="train") for n in node_ids]


def run_sum(grid, node_ids, s=S, **kwargs):
    update = grid.train(0, None)["arrays"]
    reference = {k: np.zeros(update[k].shape, np.float32) for k in update}
    return server.secure_sum(1, train_messages(node_ids, reference), s, grid.send_and_receive,
                             timeout=None, ttl=60, **kwargs)


def plain_weighted_mean(clients, nodes, key):
    total = sum(clients[n][1] for n in nodes)
    return sum(clients[n][1] * clients[n][0][key].astype(np.float64) for n in nodes) / total


def mean_bound(result, clients, nodes, s=S):
    """|secure mean - plain weighted mean| per coordinate is below n(2c + max|x|) / (Q R):
    stochastic rounding of n values errs by < n·2c/Q on the sum, and rounding each weight
    n_i / max_weight to a multiple of 1/Q moves the mean by <= n·max|x| / (Q R)."""
    largest = max(float(np.abs(clients[n][0][k]).max()) for n in nodes for k in ("w", "b"))
    n = len(nodes)
    return n * (2 * s.clipping_range + largest) / (s.quantization_range * result.weight)


def test_secure_mean_equals_the_plain_weighted_mean_within_the_quantization_bound():
    clients = fake_clients(5)
    grid = StageGrid(range(5), trainer(clients))
    result = run_sum(grid, range(5))
    bound = mean_bound(result, clients, range(5))
    assert bound < 1e-4
    for key in ("w", "b"):
        error = np.abs(result.update_sum[key] / result.weight
                       - plain_weighted_mean(clients, range(5), key))
        assert error.max() <= bound
    assert result.num_examples == sum(c[1] for c in clients.values())
    expected_loss = sum(c[1] * c[2] for c in clients.values()) / result.num_examples
    assert abs(result.metric_sums["train_loss"] / result.weight - expected_loss) < 1e-4
    assert result.num_clients == 5 and result.lost == [] and result.num_clipped == 0


def test_the_server_receives_masked_vectors_and_shares_never_an_update(monkeypatch):
    clients = fake_clients(4, size=3000)
    unmasked = []
    real_encode = vectors.encode
    monkeypatch.setattr(vectors, "encode", lambda *a, **k: unmasked.append(
        real_encode(*a, **k)) or unmasked[-1])
    grid = StageGrid(range(4), trainer(clients))
    run_sum(grid, range(4))
    assert len(unmasked) == 4
    updates = [np.concatenate([c[0]["w"], c[0]["b"]]) for c in clients.values()]
    masked = []
    for reply in grid.received:
        assert "arrays" not in reply.content  # no reply carries model arrays
        for name, record in reply.content.items():
            if name == "masked":
                masked.append(record["vector"].numpy())
            elif name == "metrics":
                assert dict(record) == {}  # no clear metric without client-side DP
            else:
                assert set(record) <= {"pk1", "pk2", "dsts", "ciphertexts", "seed-hash",
                                       "metric-names", "node-ids", "shares"}
    assert len(masked) == 4
    for vector in masked:
        assert vector.dtype == np.uint32
        # A masked vector is uniform on [0, 2**32): unrelated to any client's vector.
        assert abs(vector.mean() / 2**32 - 0.5) < 0.03
        for plain in unmasked:
            assert np.mean(vector.astype(np.int64) == plain) < 0.01
            assert abs(np.corrcoef(vector[3:].astype(float), plain[3:].astype(float))[0, 1]) < 0.2
        for update in updates:  # nor the update itself, at any scale the encoding uses
            assert abs(np.corrcoef(vector[4:].astype(float), update.astype(float))[0, 1]) < 0.2


def test_server_side_hands_the_strategy_only_the_mean(monkeypatch):
    cfg = compose(["+experiment=hospitals", "secagg=secaggplus", "num_rounds=1"])
    grid = InProcessGrid(["+experiment=hospitals", "secagg=secaggplus"], 5)
    client_core.clear_client_cache()
    strategy = WeightedFedAvg(min_train_nodes=2, min_available_nodes=2, seed=0)
    seen = []
    real = strategy.aggregate_train
    monkeypatch.setattr(strategy, "aggregate_train",
                        lambda rnd, replies: seen.append(list(replies)) or real(rnd, seen[-1]))
    trained = []
    real_handle = client_core.handle
    monkeypatch.setattr(client_core, "handle", lambda *a: trained.append(real_handle(*a))
                        or trained[-1])
    from hydra.utils import instantiate

    from fl_app.models import get_weights
    weights = get_weights(instantiate(cfg.model))
    new, row = server_loop.train_round(grid, strategy, cfg, 1, weights)
    assert len(seen) == 1 and len(seen[0]) == 1  # one reply: the mean
    updates = [(from_array_record(t["arrays"]), t["metrics"]["num-examples"]) for t in trained]
    assert len(updates) == 5
    total = sum(n for _, n in updates)
    for key in weights:
        plain = sum(n * u[key].astype(np.float64) for u, n in updates) / total
        assert np.abs(new[key] - plain).max() < 1e-4
        for update, _ in updates:  # the strategy never held a single client's update
            assert not np.allclose(from_array_record(seen[0][0].content["arrays"])[key],
                                   update[key])
    assert row["sampled"] == 5 and row["lost_nodes"] == [] and row["bytes_received"] > 0
    assert row["secagg_clients"] == 5


@pytest.mark.parametrize("stage", ["collect", "unmask"])
def test_a_client_dropping_after_sharing_its_keys_does_not_fail_the_round(stage):
    clients = fake_clients(5, seed=1)
    grid = StageGrid(range(5), trainer(clients), drop={stage: {3}})
    result = run_sum(grid, range(5))
    in_sum = [0, 1, 2, 4] if stage == "collect" else list(range(5))
    assert result.lost == ([3] if stage == "collect" else [])
    bound = mean_bound(result, clients, in_sum)
    for key in ("w", "b"):
        error = np.abs(result.update_sum[key] / result.weight
                       - plain_weighted_mean(clients, in_sum, key))
        assert error.max() <= bound


def test_a_share_keys_reply_missing_a_neighbour_leaves_that_pair_unmasked_not_the_sum_wrong():
    clients = fake_clients(5, seed=5)

    def forget_node_0(stage, nid, content):
        if stage == "share-keys" and nid == 1:
            record = content["secagg"]
            keep = [i for i, dst in enumerate(record["dsts"]) if dst != 0]
            record["dsts"] = [record["dsts"][i] for i in keep]
            record["ciphertexts"] = [record["ciphertexts"][i] for i in keep]

    grid = StageGrid(range(5), trainer(clients), alter=forget_node_0)
    result = run_sum(grid, range(5))
    error = np.abs(result.update_sum["w"] / result.weight
                   - plain_weighted_mean(clients, range(5), "w"))
    assert error.max() <= mean_bound(result, clients, range(5))


def test_ring_neighbourhoods_survive_a_dropout_too():
    clients = fake_clients(9, seed=2)
    s = SecAggSettings(num_shares=5, reconstruction_threshold=4)
    grid = StageGrid(range(9), trainer(clients), drop={"collect": {4}})
    result = run_sum(grid, range(9), s=s)
    survivors = [n for n in range(9) if n != 4]
    error = np.abs(result.update_sum["w"] / result.weight
                   - plain_weighted_mean(clients, survivors, "w"))
    assert error.max() <= mean_bound(result, clients, survivors, s)
    # each client shares keys with its 4 ring neighbours (and itself) only
    key_lists = [list(m.content["secagg"]["node-ids"]) for m in grid.sent
                 if m.content["secagg"]["stage"] == "share-keys"]
    assert len(key_lists) == 9 and all(len(ids) == 5 for ids in key_lists)


def test_fewer_survivors_than_the_threshold_end_the_round_with_the_model_unchanged():
    cfg = compose(["+experiment=hospitals", "secagg=secaggplus"])
    inner = InProcessGrid(["+experiment=hospitals", "secagg=secaggplus"], 5)
    client_core.clear_client_cache()

    class DropsAtCollect:
        def get_node_ids(self):
            return inner.get_node_ids()

        def send_and_receive(self, messages, timeout=None):
            messages = [m for m in messages if not (m.content["secagg"]["stage"] == "collect"
                                                    and m.metadata.dst_node_id in {0, 1, 2})]
            return inner.send_and_receive(messages, timeout)

    strategy = WeightedFedAvg(min_train_nodes=2, min_available_nodes=2, seed=0)
    weights = {k: np.full(v.shape, 0.25, v.dtype) for k, v in
               from_array_record(to_array_record(_logreg_weights(cfg))).items()}
    before = {k: v.copy() for k, v in weights.items()}
    with pytest.raises(SecAggError, match=r"stage collect.*reconstruction_threshold=4.*"
                                          r"global model unchanged"):
        server_loop.train_round(DropsAtCollect(), strategy, cfg, 1, weights)
    assert all(np.array_equal(weights[k], before[k]) for k in weights)
    assert strategy.current is None or all(
        np.array_equal(strategy.current[k], before[k]) for k in before)


def _logreg_weights(cfg):
    from hydra.utils import instantiate

    from fl_app.models import get_weights
    return get_weights(instantiate(cfg.model))


def _keys_shared(num=3):
    """Contexts and share-keys replies of `num` nodes, as the collect stage starts."""
    clients = fake_clients(num)
    grid = StageGrid(range(num), trainer(clients))
    r = server._Round(1, list(range(num)), S, grid.send_and_receive, None, 60)
    setup = r.request("setup", **protocol.settings_record(S, r.shares, r.threshold))
    keys = {n: m.content["secagg"] for n, m in r.send(dict.fromkeys(range(num), setup),
                                                      "setup").items()}
    ids = list(range(num))
    share = r.request("share-keys", **{"node-ids": ids, "pk1s": [keys[i]["pk1"] for i in ids],
                                       "pk2s": [keys[i]["pk2"] for i in ids]})
    replies = r.send(dict.fromkeys(ids, share), "share-keys")
    return grid, r, clients, replies


def _collect(grid, r, nid, srcs, ciphertexts):
    content = train_messages([nid], {"w": np.zeros(300, np.float32),
                                     "b": np.zeros(3, np.float32)})[0].content
    content = RecordDict({**content, **r.request("collect", srcs=srcs, ciphertexts=ciphertexts,
                                                 weighted=True)})
    return client.answer(content, grid.contexts[nid], lambda c: grid.train(nid, c))


def _ciphertext(replies, src, dst):
    record = replies[src].content["secagg"]
    return bytes(record["ciphertexts"][list(record["dsts"]).index(dst)])


def test_a_tampered_share_ciphertext_is_rejected_by_its_recipient():
    grid, r, _, replies = _keys_shared()
    good = _ciphertext(replies, 1, 0)
    tampered = good[:-5] + bytes([good[-5] ^ 1]) + good[-4:]
    with pytest.raises(SecAggError, match="ciphertext from node 1 fails authentication"):
        _collect(grid, r, 0, [1, 2], [tampered, _ciphertext(replies, 2, 0)])


def test_a_wrong_length_share_is_rejected_by_its_recipient():
    grid, r, _, replies = _keys_shared()
    sender = dict(grid.contexts[1].state["secagg"])
    key = sender["channel-keys"][list(sender["channel-ids"]).index(0)]  # node 1 -> node 0
    short = encrypt(key, share_keys_plaintext_concat(1, 0, b"\x01" * 30, b"\x02" * 68))
    with pytest.raises(SecAggError, match="a share from node 1 is 30 bytes, not 20"):
        _collect(grid, r, 0, [1, 2], [short, _ciphertext(replies, 2, 0)])


def test_a_wrong_length_share_in_unmask_is_not_used_and_the_sum_still_unmasks(caplog):
    clients = fake_clients(5, seed=3)

    def truncate(stage, nid, content):
        if stage == "unmask" and nid == 2:
            record = content["secagg"]
            record["shares"] = [bytes(record["shares"][0])[:-3], *record["shares"][1:]]

    grid = StageGrid(range(5), trainer(clients), alter=truncate)
    result = run_sum(grid, range(5))
    assert "node 2's share of node" in caplog.text and "altered or truncated" in caplog.text
    error = np.abs(result.update_sum["w"] / result.weight
                   - plain_weighted_mean(clients, range(5), "w"))
    assert error.max() <= mean_bound(result, clients, range(5))


def test_a_stage_out_of_order_is_refused():
    grid, r, _, _ = _keys_shared()
    unmask = r.request("unmask", active=[0, 1, 2])
    with pytest.raises(SecAggError, match="stage 'unmask' of round 1 came after stage "
                                          "'share-keys'"):
        client.answer(unmask, grid.contexts[0], lambda c: None)


def test_a_client_with_a_non_finite_update_refuses_to_mask_it():
    clients = fake_clients(4)
    clients[2][0]["w"][5] = np.nan
    grid = StageGrid(range(4), trainer(clients))
    result = run_sum(grid, range(4))
    assert result.lost == [2]
    assert all(np.isfinite(v).all() for v in result.update_sum.values())


def test_dp_clipping_on_the_client_keeps_the_quantized_update_within_clip_norm():
    rng = np.random.default_rng(4)
    update = [rng.normal(0, 1, 5000)]
    clipped, scaled = client.clip_for_dp(update, 1.0, S)
    assert scaled
    for _ in range(3):
        vector = vectors.encode(clipped, [], 1.0, 1, S)
        _, _, _, _, flat = vectors.decode(vector, 1, 0, S)
        assert np.linalg.norm(flat) <= 1.0
    small = [np.full(10, 0.01)]
    assert client.clip_for_dp(small, 1.0, S)[1] is False


def test_dp_noise_on_the_secure_sum_has_the_calibrated_std():
    sigma, clip, q, num_clients = 0.5, 0.2, 0.5, 4
    size = 20_000
    dp = DPNoise(WeightedFedAvg(fraction_train=q, seed=0), clip_norm=clip,
                 noise_multiplier=sigma, num_clients=num_clients, noise_seed=7)
    current = {"w": np.zeros(size, np.float32)}
    dp.inner.set_current(current)
    zero = {n: ({"w": np.zeros(size, np.float32)}, 50, 1.0) for n in range(3)}
    grid = StageGrid(range(3), trainer(zero))
    result = server.secure_sum(1, train_messages(range(3), current), S, grid.send_and_receive,
                               None, 60, weighted=False, clip_norm=clip)
    assert result.weight == 3  # unweighted: each client counts once
    new, metrics = dp.release_secure_sum(1, result.update_sum, 3, 150, 0, MetricRecord({}))
    noise = from_array_record(new)["w"].astype(np.float64)
    expected_std = sigma * clip / (q * num_clients)
    assert abs(noise.std() / expected_std - 1) < 0.03
    assert abs(noise.mean()) < 5 * expected_std / math.sqrt(size)
    assert metrics["epsilon"] == pytest.approx(dp._epsilon_after(1)) and dp.rounds_done == 1


def test_dp_with_secagg_releases_the_model_plain_dp_releases_up_to_quantization():
    cfg = compose(["+experiment=hospitals", "strategy=dp_fedavg", "secagg=secaggplus",
                   "strategy.noise_multiplier=1e-6", "strategy.noise_seed=1",
                   "fraction_train=1.0"])
    from hydra.utils import instantiate
    weights = _logreg_weights(cfg)
    models, rows = [], []
    for secagg in ("secaggplus", "none"):
        cfg.secagg.name = secagg
        client_core.clear_client_cache()
        grid = InProcessGrid(["+experiment=hospitals", "strategy=dp_fedavg"], 5)
        strategy = instantiate(cfg.strategy)
        new, row = server_loop.train_round(grid, strategy, cfg, 1, dict(weights))
        models.append(new)
        rows.append(row)
        assert row["train_epsilon"] > 0
    for key in weights:
        # clients clip to C - Δ·sqrt(d) instead of C: a relative change below 1e-4 here
        assert np.abs(models[0][key] - models[1][key]).max() < 1e-4
    # The same metrics, but for replies the server screened out: under secagg it sees none
    # (a client with a non-finite update refuses, and counts in lost_nodes).
    # FedNova's num-steps is not sent under secagg (which cannot serve FedNova).
    plain_keys = {k for k in rows[1] if k.startswith("train_")} - {"train_num-dropped",
                                                                    "train_num-steps"}
    assert plain_keys - set(rows[0]) == set()
    for key in ("train_epsilon", "train_num-clients", "train_num-examples", "train_num-clipped"):
        assert rows[0][key] == pytest.approx(rows[1][key])


@pytest.mark.parametrize("strategy,why", [
    ("fedmedian", "median needs every client's values"),
    ("fedtrimmedavg", "trimmed mean sorts every client's values"),
    ("krum", "Krum scores each client's update"),
    ("dp_fedavg_adaptive", "adaptive clipping"),
])
def test_strategies_that_need_individual_updates_refuse_secagg(strategy, why):
    with pytest.raises(ConfigError, match=why) as err:
        compose([f"strategy={strategy}", "secagg=secaggplus", "num_clients=10"])
    assert "\n" not in str(err.value) and "secure aggregation reveals only the sum" in str(
        err.value)


@pytest.mark.parametrize("overrides,named", [
    (["secagg.reconstruction_threshold=2", "num_clients=5"], "above half of num_shares"),
    (["secagg.num_shares=6", "num_clients=9"], "must be odd"),
    (["secagg.num_shares=3", "num_clients=9"], "an integer >= 5"),
    (["secagg.reconstruction_threshold=11", "num_clients=10"], r"in \[6, 10\]"),
    (["secagg.reconstruction_threshold=0.4"], "fraction of num_shares in (0.5, 1]"),
    (["secagg.modulus_range=1000"], "a power of 2"),
    (["client_pool=2", "num_clients=10"], "client_pool serves several clients"),
    (["strategy=dp_fedavg", "strategy.clip_norm=20", "num_clients=10"],
     "below strategy.clip_norm"),
])
def test_bad_secagg_settings_are_refused_with_one_line_naming_them(overrides, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(")", r"\)")) as err:
        compose(["secagg=secaggplus", *overrides])
    assert "\n" not in str(err.value)


def test_share_plan_resolves_a_threshold_fraction_of_the_shares():
    assert share_plan(SecAggSettings(), 10) == (10, 7)
    assert share_plan(SecAggSettings(num_shares=5, reconstruction_threshold=4), 100) == (5, 4)
    assert share_plan(SecAggSettings(num_shares=11), 4) == (4, 3)  # capped at the cohort
    with pytest.raises(ValueError, match="at least 2 clients"):
        share_plan(SecAggSettings(), 1)


def test_secagg_is_a_run_config_key_like_the_other_groups():
    assert "secagg=secaggplus" in overrides_from_run_config({"secagg": "secaggplus"})
    assert compose(overrides_from_run_config({"secagg": "secaggplus"})).secagg.name == "secaggplus"
    assert compose([]).secagg.name == "none"
