"""Issue 22, items 6-9: secure aggregation against malformed replies, a malicious server, small
Poisson cohorts and per-client leaks. Each test performs the attack."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.supercore.primitives.asymmetric import bytes_to_public_key
from hydra.utils import instantiate
from strategy_helpers import set_task_identity
from test_secagg import (
    S,
    StageGrid,
    fake_clients,
    mean_bound,
    plain_weighted_mean,
    run_sum,
    train_messages,
    trainer,
)

from fl_app import config as fl_config
from fl_app.config import compose
from fl_app.privacy.client import DPSGD
from fl_app.records import to_array_record
from fl_app.secagg import client, protocol, server, vectors
from fl_app.secagg import round as secagg_round
from fl_app.secagg.settings import SecAggError, SecAggSettings, share_plan


@pytest.fixture(autouse=True)
def _identity(monkeypatch):
    set_task_identity(monkeypatch)


def altering(stage, nodes, change):
    """An `alter` for StageGrid: `change(record dict, content)` on `nodes`' replies to `stage`."""
    def alter(at, nid, content):
        if at == stage and nid in nodes:
            change(content["secagg"], content)
    return alter


def assert_mean_of(result, clients, nodes):
    assert result.lost == sorted(set(clients) - set(nodes))
    for key in ("w", "b"):
        error = np.abs(result.update_sum[key] / result.weight
                       - plain_weighted_mean(clients, nodes, key))
        assert error.max() <= mean_bound(result, clients, nodes)


# Item 6: malformed setup and share replies are dropouts; an empty set is one clear error.

@pytest.mark.parametrize("stage,change", [
    ("setup", lambda rec, _: rec.pop("pk1")),
    ("setup", lambda rec, _: rec.__setitem__("pk2", b"\x04" + b"\x13" * 96)),
    ("setup", lambda rec, _: rec.__setitem__("pk1", 7)),
    ("share-keys", lambda rec, _: rec.__setitem__("ciphertexts", list(rec["ciphertexts"])[1:])),
    ("share-keys", lambda rec, _: rec.__setitem__("dsts", [*rec["dsts"], 99])),
    ("share-keys", lambda rec, _: rec.pop("seed-hash")),
], ids=["setup-missing-pk1", "setup-garbage-pk2", "setup-int-pk1", "share-fewer-ciphertexts",
        "share-unknown-dst", "share-no-commitment"])
def test_a_malformed_setup_or_share_reply_is_a_dropout_and_the_round_completes(
        stage, change, caplog):
    clients = fake_clients(5, seed=11)
    grid = StageGrid(range(5), trainer(clients), alter=altering(stage, {2}, change))
    result = run_sum(grid, range(5))
    assert_mean_of(result, clients, [0, 1, 3, 4])
    assert f"secagg {stage}: node 2's reply is malformed" in caplog.text


def test_a_public_key_copied_from_another_node_drops_both_not_the_round():
    clients = fake_clients(7, seed=12)
    copied = {}

    def copy_key(at, nid, content):
        if at == "setup" and nid in (1, 3):
            copied.setdefault("pk1", content["secagg"]["pk1"])
            content["secagg"]["pk1"] = copied["pk1"]

    result = run_sum(StageGrid(range(7), trainer(clients), alter=copy_key), range(7))
    assert_mean_of(result, clients, [0, 2, 4, 5, 6])


@pytest.mark.parametrize("stage", ["setup", "share-keys", "collect", "unmask"])
def test_when_every_reply_of_a_stage_is_malformed_the_round_fails_with_one_clear_error(stage):
    def wipe(at, nid, content):
        if at == stage:
            for name in list(content):
                del content[name]

    grid = StageGrid(range(4), trainer(fake_clients(4)), alter=wipe)
    with pytest.raises(SecAggError, match=f"stage {stage}: no client gave a usable reply") as err:
        run_sum(grid, range(4))
    assert "\n" not in str(err.value) and "global model unchanged" in str(err.value)


def test_an_altered_seed_share_of_the_right_length_is_caught_by_the_commitment(caplog):
    clients = fake_clients(5, seed=13)

    def flip(rec, _):
        shares = list(rec["shares"])
        shares[0] = shares[0][:-1] + bytes([shares[0][-1] ^ 0xFF])
        rec["shares"] = shares

    grid = StageGrid(range(5), trainer(clients), alter=altering("unmask", {1}, flip))
    result = run_sum(grid, range(5))
    assert_mean_of(result, clients, range(5))
    assert "were altered; its secret was rebuilt" in caplog.text


# Item 7: the clients check the share plan themselves.

def _malicious_round(threshold, num_nodes=5, target=0):
    """Play a server that sends t = `threshold` of `num_nodes` and then splits the target's
    share holders: half are told it survived (they reveal its mask seed b), half that it
    dropped (they reveal its key sk1). Returns (the target's true update, what the server
    rebuilt, None when its holders refused to reveal enough), or the error replies of the
    clients that refused the setup."""
    clients = fake_clients(num_nodes, size=50, seed=14)
    grid = StageGrid(range(num_nodes), trainer(clients))
    nodes = list(range(num_nodes))
    r = server._Round(1, nodes, S, grid.send_and_receive, None, 60)
    r.shares, r.threshold = num_nodes, threshold
    setup = r.request("setup", **protocol.settings_record(S, num_nodes, threshold))
    replies = grid.send_and_receive([Message(content=setup, dst_node_id=n,
                                             message_type="train.secagg") for n in nodes])
    if errors := [m.error.reason for m in replies if m.has_error()]:
        return errors
    keys = {m.metadata.src_node_id: m.content["secagg"] for m in replies}
    share = r.request("share-keys", **{"node-ids": nodes,
                                       "pk1s": [keys[i]["pk1"] for i in nodes],
                                       "pk2s": [keys[i]["pk2"] for i in nodes]})
    shared = {n: m.content["secagg"] for n, m in r.send(dict.fromkeys(nodes, share),
                                                        "share-keys").items()}
    contents = {}
    for n in nodes:
        srcs = [s for s in nodes if s != n]
        cts = [bytes(shared[s]["ciphertexts"][list(shared[s]["dsts"]).index(n)]) for s in srcs]
        content = train_messages([n], {"w": np.zeros(50, np.float32),
                                       "b": np.zeros(3, np.float32)})[0].content
        contents[n] = RecordDict({**content, **r.request("collect", srcs=srcs, ciphertexts=cts,
                                                         weighted=True)})
    masked = {n: m.content["masked"]["vector"].numpy() for n, m in r.send(contents,
                                                                         "collect").items()}
    others = [n for n in nodes if n != target]
    half = len(others) // 2
    told_alive, told_dead = others[:half], others[half:]
    asks = {}
    for n in told_alive:
        asks[n] = r.request("unmask", active=sorted({n, target, *told_alive}), dead=[])
    for n in told_dead:
        asks[n] = r.request("unmask", active=sorted({n, *told_dead}), dead=[target])
    revealed = r.send(asks, "unmask")
    seed_shares, sk1_shares = [], []
    for n, reply in revealed.items():
        rec = reply.content["secagg"]
        share_of = dict(zip(rec["node-ids"], rec["shares"], strict=True))
        (seed_shares if n in told_alive else sk1_shares).append(bytes(share_of[target]))
    update, n_examples, _ = clients[target]
    true = np.concatenate([update["w"], update["b"]]) * round(
        n_examples / S.max_weight * S.quantization_range) / S.quantization_range
    if not seed_shares or not sk1_shares:
        return true, None
    seed = combine_shares(seed_shares)
    sk1 = protocol.key_from_scalar(combine_shares(sk1_shares), keys[target]["pk1"])
    vector = masked[target].copy()
    vector -= vectors.prg(seed, len(vector))
    for n in others:
        key = generate_shared_key(sk1, bytes_to_public_key(keys[n]["pk1"]))
        (np.subtract if target > n else np.add)(vector, vectors.prg(key, len(vector)),
                                                out=vector)
    _, _, _, _, flat = vectors.decode(vector, 1, 1, S)
    return true, flat


def test_clients_refuse_a_server_that_sends_threshold_2_of_5():
    refused = _malicious_round(threshold=2)
    assert isinstance(refused, list) and len(refused) == 5
    assert all("threshold of 2 of 5 shares is unsafe" in reason for reason in refused)


def test_with_the_plan_check_off_threshold_2_of_5_gives_the_server_a_clients_update(
        monkeypatch):
    # The attack the check stops, performed: the server rebuilds client 0's weighted update.
    monkeypatch.setattr(client, "_check_plan", lambda request: None, raising=False)
    true, rebuilt = _malicious_round(threshold=2)
    assert np.abs(rebuilt - true).max() < 1e-4


def test_a_safe_plan_gives_the_splitting_server_garbage():
    true, rebuilt = _malicious_round(threshold=4)  # 4 + 4 shares > 5 holders
    assert rebuilt is None or np.abs(rebuilt - true).max() > 1.0


@pytest.mark.parametrize("shares,threshold", [(3, 2), (5, 3), (7, 4)])
def test_clients_refuse_a_small_ring_or_low_threshold_plan(shares, threshold):
    grid = StageGrid(range(9), trainer(fake_clients(9)))
    request = protocol.settings_record(S, shares, threshold) | {"stage": "setup", "round": 1}
    with pytest.raises(SecAggError, match=f"threshold of {threshold} of {shares} shares is "
                                          "unsafe"):
        client.answer(RecordDict({"secagg": ConfigRecord(request)}), grid.contexts[0],
                      lambda c: None)


def test_a_client_refuses_more_share_holders_than_the_plan_announced():
    grid = StageGrid(range(7), trainer(fake_clients(7)))
    setup = protocol.settings_record(S, 5, 4) | {"stage": "setup", "round": 1}
    keys = {n: client.answer(RecordDict({"secagg": ConfigRecord(setup)}), grid.contexts[n],
                             lambda c: None)["secagg"] for n in range(7)}
    ids = list(range(7))
    share = {"stage": "share-keys", "round": 1, "node-ids": ids,
             "pk1s": [keys[i]["pk1"] for i in ids], "pk2s": [keys[i]["pk2"] for i in ids]}
    with pytest.raises(SecAggError, match="lists 7 share holders, more than the 5"):
        client.answer(RecordDict({"secagg": ConfigRecord(share)}), grid.contexts[0],
                      lambda c: None)


def test_the_server_plans_no_ring_of_3_nor_a_threshold_of_3_of_5():
    with pytest.raises(ValueError, match=r"in \[4, 5\]"):
        share_plan(SecAggSettings(num_shares=5, reconstruction_threshold=3), 20)
    assert share_plan(SecAggSettings(num_shares=5), 20) == (5, 4)
    assert share_plan(SecAggSettings(reconstruction_threshold=0.51), 5) == (5, 4)


# Item 8: a Poisson round too small for a safe plan is skipped, not the end of the run.

def _dp_secagg(overrides=()):
    cfg = compose(["+experiment=hospitals", "strategy=dp_fedavg", "secagg=secaggplus",
                   "fraction_train=0.5", *overrides])
    strategy = instantiate(cfg.strategy)
    weights = {"w": np.full((2, 3), 0.25, np.float32), "b": np.zeros(2, np.float32)}
    strategy.inner.set_current(weights)
    return cfg, strategy, weights


def test_a_poisson_round_of_one_client_is_skipped_with_the_model_unchanged_and_counted():
    cfg, dp, weights = _dp_secagg()
    before = {k: v.copy() for k, v in weights.items()}
    one = train_messages([3], weights)
    new, row = secagg_round.secure_train_round(None, dp, cfg, 1, one, weights)
    assert all(np.array_equal(new[k], before[k]) for k in before)
    assert row["secagg_skipped"] == 1 and row["sampled"] == 1 and row["secagg_clients"] == 0
    assert dp.rounds_done == 1 and row["train_epsilon"] == pytest.approx(dp._epsilon_after(1))
    assert row["train_epsilon"] > 0


def test_compose_warns_when_poisson_rounds_are_often_too_small(caplog):
    fl_config._compose.cache_clear()
    _dp_secagg(["num_rounds=40", "fraction_train=0.3"])
    assert "a round samples too few clients for a safe share plan with chance" in caplog.text
    caplog.clear()
    fl_config._compose.cache_clear()
    compose(["+experiment=hospitals", "strategy=dp_fedavg", "secagg=secaggplus",
             "fraction_train=1.0"])
    assert "too few clients" not in caplog.text


# Item 9: nothing per client that the docs do not list as public.

def _dpsgd_trainer(clients, epsilon_of=lambda n: 1 + n / 1000, bad=None):
    def train(nid, content):
        update, n, loss = clients[nid]
        metrics = {"num-examples": n, "dpsgd_epsilon": epsilon_of(n), "dpsgd_delta": 1e-5,
                   "train_loss": float("nan") if nid == bad else loss}
        return RecordDict({"arrays": to_array_record(update), "metrics": MetricRecord(metrics)})
    return train


def test_with_secagg_dpsgd_epsilon_travels_only_inside_the_sum():
    clients = fake_clients(4, seed=15)
    grid = StageGrid(range(4), _dpsgd_trainer(clients))
    result = run_sum(grid, range(4))
    for reply in grid.received:
        if "metrics" in reply.content:
            assert set(reply.content["metrics"]) == {"dpsgd_delta"}
    metrics = secagg_round.result_metrics(result)
    expected = sum(c[1] * (1 + c[1] / 1000) for c in clients.values()) / sum(
        c[1] for c in clients.values())
    assert metrics["dpsgd_epsilon_mean"] == pytest.approx(expected, rel=1e-4)
    assert "dpsgd_epsilon" not in metrics  # never mistaken for the worst client's


def test_a_nan_training_metric_is_refused_by_its_client_not_summed():
    clients = fake_clients(5, seed=16)
    result = run_sum(StageGrid(range(5), _dpsgd_trainer(clients, bad=2)), range(5))
    assert result.lost == [2]
    loss = result.metric_sums["train_loss"] / result.weight
    kept = [0, 1, 3, 4]
    expected = sum(clients[n][1] * clients[n][2] for n in kept) / sum(
        clients[n][1] for n in kept)
    assert math.isfinite(loss) and loss == pytest.approx(expected, abs=1e-4)


def test_an_error_reply_about_too_many_examples_names_no_count():
    clients = fake_clients(4, seed=17)
    clients[1] = (clients[1][0], 4321, clients[1][2])
    grid = StageGrid(range(4), trainer(clients))
    result = run_sum(grid, range(4))
    reasons = [m.error.reason for m in grid.received if m.has_error()]
    assert result.lost == [1] and len(reasons) == 1
    assert "max_weight" in reasons[0] and "4321" not in reasons[0]


def test_dpsgd_delta_error_names_no_example_count():
    with pytest.raises(ValueError, match="training examples") as err:
        DPSGD(1.0, 1.0, delta=0.05).check_dataset_size(57)
    assert "57" not in str(err.value) and "0.0175" not in str(err.value)


def test_a_collect_reply_sending_a_private_metric_in_the_clear_is_dropped(caplog):
    clients = fake_clients(5, seed=18)

    def leak(rec, content):
        content["metrics"] = MetricRecord({"dpsgd_epsilon": 3.7})

    grid = StageGrid(range(5), trainer(clients), alter=altering("collect", {4}, leak))
    result = run_sum(grid, range(5))
    assert 4 in result.lost and "dpsgd_epsilon" not in result.clear_metrics
    assert "which are not public" in caplog.text


def test_a_masked_vector_of_the_wrong_dtype_is_a_dropout():
    clients = fake_clients(5, seed=19)

    def to_float(rec, content):
        vector = content["masked"]["vector"].numpy()
        content["masked"]["vector"] = Array(vector.astype(np.float32))

    grid = StageGrid(range(5), trainer(clients), alter=altering("collect", {0}, to_float))
    assert_mean_of(run_sum(grid, range(5)), clients, [1, 2, 3, 4])


# Issue 25, item 5: two exchanges per round. Round r + 1's setup rides on round r's collect and
# its share-keys on round r's unmask; each round keeps its own keys, seed and stage order.

def _keyed_ahead(num=5, seed=5):
    """Round 1 run with a session that keys round 2 for the same nodes: (grid, session,
    clients); every node's round 1 is at unmask, its round 2 at share-keys."""
    clients = fake_clients(num, size=50, seed=seed)
    grid = StageGrid(range(num), trainer(clients))
    session = server.SecAggSession()
    reference = {"w": np.zeros(50, np.float32), "b": np.zeros(3, np.float32)}
    server.secure_sum(1, train_messages(range(num), reference), S, grid.send_and_receive,
                      None, 60, session=session, next_cohort=list(range(num)))
    assert session.pending is not None and session.pending.rnd == 2
    return grid, session, clients


def _collect_ahead(session, nid, upcoming=None):
    """Round 2's collect for node `nid` from the keys agreed ahead, with `upcoming` as the
    piggybacked record."""
    r = session.pending
    srcs = sorted(r.forwards[nid])
    content = train_messages([nid], {"w": np.zeros(50, np.float32),
                                     "b": np.zeros(3, np.float32)})[0].content
    content = RecordDict({**content, **r.request(
        "collect", srcs=[s for s, _ in srcs], ciphertexts=[c for _, c in srcs], weighted=True)})
    if upcoming is not None:
        content[protocol.NEXT] = ConfigRecord(upcoming)
    return content


def _setup_record(rnd, stage="setup"):
    return {"stage": stage, "round": rnd, **protocol.settings_record(S, 5, 4)}


@pytest.mark.parametrize("upcoming", [
    _setup_record(4), _setup_record(2), _setup_record(1), _setup_record(3, "share-keys"),
    _setup_record(3, "collect"), _setup_record(3, "unmask")],
    ids=["setup-of-r+2", "setup-of-r", "setup-of-r-1", "share-keys-on-collect",
         "collect-ahead", "unmask-ahead"])
def test_a_piggybacked_stage_that_is_not_the_next_rounds_setup_is_refused_before_training(
        upcoming):
    grid, session, _ = _keyed_ahead()
    before = {k: dict(v) for k, v in grid.contexts[0].state.items()}
    trained = []
    with pytest.raises(SecAggError, match="only the next round's setup"):
        client.answer(_collect_ahead(session, 0, upcoming), grid.contexts[0],
                      lambda c: trained.append(c))
    assert trained == []  # refused before training: nothing computed, nothing revealed
    assert {k: dict(v) for k, v in grid.contexts[0].state.items()} == before
    # The same collect with round 3's setup is answered: the refusal was the piggyback's.
    reply = client.answer(_collect_ahead(session, 0, _setup_record(3)), grid.contexts[0],
                          lambda c: grid.train(0, c))
    assert {"pk1", "pk2"} <= set(reply[protocol.NEXT])


def _sent_to(grid, nid, rnd, stage, record="secagg"):
    return next(m.content for m in grid.sent if m.metadata.dst_node_id == nid
                and record in m.content and m.content[record]["stage"] == stage
                and m.content[record]["round"] == rnd)


@pytest.mark.parametrize("replay", ["unmask-with-share-keys", "share-keys-alone",
                                    "round-1-share-keys"])
def test_a_replayed_share_keys_is_refused_and_the_keyed_round_still_completes(replay):
    grid, session, clients = _keyed_ahead()
    if replay == "round-1-share-keys":
        message = _sent_to(grid, 0, 1, "share-keys")
    else:
        message = _sent_to(grid, 0, 2, "share-keys", protocol.NEXT)
        if replay == "share-keys-alone":  # its piggybacked share-keys, resent as its own stage
            message = RecordDict({"secagg": message[protocol.NEXT]})
    with pytest.raises(SecAggError, match="stale or reordered"):
        client.answer(message, grid.contexts[0], lambda c: None)
    result = server.secure_sum(2, train_messages(range(5), {"w": np.zeros(50, np.float32),
                                                            "b": np.zeros(3, np.float32)}),
                               S, grid.send_and_receive, None, 60, session=session)
    assert_mean_of(result, clients, range(5))


@pytest.mark.parametrize("reuse_seed", [False, True], ids=["fresh-seeds", "seed-reused"])
def test_shares_of_b_in_round_r_and_of_sk1_in_round_r_plus_1_give_the_server_garbage(
        monkeypatch, reuse_seed):
    """The server asks for node 0's b share in round 1 (it survived) and, across the
    piggybacked boundary, for its sk1 share in round 2 (a lie: "it dropped"), then unmasks its
    round-2 vector. Fresh b per round defeats it; a b reused across rounds would not."""
    if reuse_seed:
        monkeypatch.setattr(client.os, "urandom", lambda n: b"\x07" * n)
    grid, session, clients = _keyed_ahead(seed=8)
    target, r = 0, session.pending
    b_shares = [bytes(dict(zip(m.content["secagg"]["node-ids"], m.content["secagg"]["shares"],
                               strict=True))[target])
                for m in grid.received if "shares" in m.content.get("secagg", {})]
    masked = {n: m.content["masked"]["vector"].numpy() for n, m in r.send(
        {n: _collect_ahead(session, n) for n in range(5)}, "collect").items()}
    asks = {n: r.request("unmask", active=sorted(set(range(5)) - {target}), dead=[target])
            for n in range(1, 5)}
    sk1_shares = [bytes(dict(zip(m.content["secagg"]["node-ids"], m.content["secagg"]["shares"],
                                 strict=True))[target]) for m in r.send(asks, "unmask").values()]
    assert len(b_shares) == 5 and len(sk1_shares) == 4  # the clients revealed both
    sk1 = protocol.key_from_scalar(combine_shares(sk1_shares), r.pk1[target])
    vector = masked[target].copy()
    vector -= vectors.prg(combine_shares(b_shares), len(vector))
    for n in range(1, 5):
        key = generate_shared_key(sk1, bytes_to_public_key(r.pk1[n]))
        (np.subtract if target > n else np.add)(vector, vectors.prg(key, len(vector)),
                                                out=vector)
    _, _, _, _, rebuilt = vectors.decode(vector, 1, 1, S)
    update, n_examples, _ = clients[target]
    true = np.concatenate([update["w"], update["b"]]) * round(
        n_examples / S.max_weight * S.quantization_range) / S.quantization_range
    error = np.abs(rebuilt - true).max()
    assert (error < 1e-4) if reuse_seed else (error > 1.0)
