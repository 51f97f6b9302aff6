"""A client's side of SecAgg+: answer the server's four stage messages ("train.secagg").

    setup        make two key pairs (pk1: pairwise masks, pk2: encrypting shares); send the
                 public keys
    share-keys   given the neighbours' public keys: draw a private mask seed b, split b and
                 sk1 into Shamir shares, send each neighbour its pair, encrypted to it
    collect      decrypt the neighbours' shares; train; send the update, weighted, quantized
                 and masked with PRG(b) and one pairwise mask per neighbour
    unmask       for each neighbour the server says survived, its share of b; for each that
                 dropped, its share of sk1 (never both for one node)

The secrets between stages live in the node's `Context.state` (Flower keeps a node's Context
for the run: in simulation, in deployment, and in fl-app's in-process engine): the round now
running and, once the server keys the next round ahead (two exchanges per round), that round's
keys and shares beside it; each has its stage and round, which refuse messages out of order.
Key agreement, Shamir sharing and authenticated encryption are Flower's
(`flwr.common.secure_aggregation`, `flwr.supercore.primitives.asymmetric`); the masks are AES-CTR
keystreams (`vectors.prg`).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from logging import WARNING

import numpy as np
from cryptography.fernet import InvalidToken
from flwr.app import Array, ArrayRecord, Context, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from fl_app.messages import NUM_STEPS
from fl_app.privacy import distributed
from fl_app.secagg import vectors
from fl_app.secagg.protocol import (
    COHORT,
    COLLECT,
    DP_CLIPPED,
    MASKED,
    NEXT,
    NOISE_FLOOR,
    NOISE_MULTIPLIER,
    PIGGYBACK,
    PUBLIC_METRICS,
    REQUEST,
    ROTATION_SEED,
    SEED_BYTES,
    SEED_HASH,
    SETTINGS,
    SETUP,
    SHARE_KEYS,
    UNMASK,
    config_record,
)
from fl_app.secagg.settings import SecAggError, SecAggSettings, plan_problem, settings_problem

STATE = "secagg"  # the node's Context.state entry: the round now running
NEXT_STATE = "secagg-next"  # ... and the next round's keys and shares, agreed ahead (NEXT)

Train = Callable[[RecordDict], RecordDict]


def answer(content: RecordDict, context: Context, train: Train) -> RecordDict:
    """The reply content to one stage message; `train` answers a plain train message's
    content (arrays, config) and is called in the collect stage only.

    A collect or unmask message may carry the next round's setup or share-keys (NEXT): it is
    checked before anything is computed, answered in the reply's NEXT record, and its secrets
    kept apart from this round's (NEXT_STATE), each round with its own strict stage order."""
    request = dict(content[REQUEST])
    stage, node_id = str(request["stage"]), int(context.node_id)
    upcoming_request = dict(content[NEXT]) if NEXT in content else None
    if upcoming_request is not None:
        _check_piggyback(request, upcoming_request, node_id)
    current, upcoming = (dict(context.state[key]) if key in context.state else {}
                         for key in (STATE, NEXT_STATE))
    if stage == SETUP:  # a cold start: whatever an earlier round left is dropped
        reply, current, upcoming = *setup(request), {}
    elif stage in _EXPECTED_BEFORE:
        if current.get("round") != request.get("round") == upcoming.get("round"):
            current, upcoming = upcoming, {}  # the round keyed ahead begins; the one before ends
        _check_order(current, request, stage, node_id)
        if stage == SHARE_KEYS:
            reply, current = share_keys(current, request, node_id)
        elif stage == COLLECT:
            reply, current = collect(current, request, node_id, content, train,
                                     _noise_floor(context, node_id))
        else:
            reply, current = unmask(current, request, node_id)
    else:
        raise SecAggError(f"Unknown secure aggregation stage {stage!r}: the server runs another "
                          "fl_app version than this SuperNode.")
    out = reply if isinstance(reply, RecordDict) else RecordDict({REQUEST: config_record(reply)})
    if upcoming_request is not None:
        if upcoming_request["stage"] == SETUP:
            ahead, upcoming = setup(upcoming_request)
        else:
            _check_order(upcoming, upcoming_request, SHARE_KEYS, node_id)
            ahead, upcoming = share_keys(upcoming, upcoming_request, node_id)
        out[NEXT] = config_record(ahead)
    # Stored only once every part succeeded: a refused message changes neither round.
    context.state[STATE] = config_record(current)
    context.state[NEXT_STATE] = config_record(upcoming)
    return out


_EXPECTED_BEFORE = {SHARE_KEYS: SETUP, COLLECT: SHARE_KEYS, UNMASK: COLLECT}


def _check_piggyback(request: dict, upcoming: dict, node_id: int) -> None:
    """Only round r + 1's setup on round r's collect, and its share-keys on round r's unmask:
    never a stage that reveals anything (collect, unmask) ahead of its own round."""
    stage, rnd = request.get("stage"), request.get("round")
    ahead = upcoming.get("stage")
    if PIGGYBACK.get(stage) != ahead or not isinstance(rnd, int) or upcoming.get(
            "round") != rnd + 1:
        raise SecAggError(
            f"Node {node_id}: stage {stage!r} of round {rnd} carries stage {ahead!r} of round "
            f"{upcoming.get('round')}; only the next round's setup (on collect) or share-keys "
            "(on unmask) may ride along: refusing the message.")


def _check_order(state: dict, request: dict, stage: str, node_id: int) -> None:
    before = _EXPECTED_BEFORE[stage]
    if state.get("stage") != before or state.get("round") != request.get("round"):
        raise SecAggError(
            f"Node {node_id}: secure aggregation stage {stage!r} of round {request.get('round')} "
            f"came after stage {state.get('stage')!r} of round {state.get('round')}, not after "
            f"{before!r} of that round: a stale or reordered message; refusing it.")


def _check_plan(request: dict) -> None:
    """Refuse a setup whose share plan or settings are unsafe: a client does not take the
    server's word that t of k protects it."""
    shares, threshold = request.get("num_shares"), request.get("reconstruction_threshold")
    problem = plan_problem(shares, threshold)
    if problem is None:
        try:
            settings = SecAggSettings.from_config({k: request[k] for k in SETTINGS})
        except KeyError as err:
            problem = f"the setup message lacks {err}"
        else:
            problem = settings_problem(SecAggSettings(**{**settings.__dict__,
                                                          "num_shares": None}))
    if problem is not None:
        raise SecAggError(f"Refusing the server's secure aggregation setup: {problem}.")


def setup(request: dict) -> tuple[dict, dict]:
    """Two fresh key pairs per round, once the plan is checked; the public halves are the
    reply."""
    _check_plan(request)
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    state = {k: request[k] for k in ("round", *SETTINGS)}
    state |= {"stage": SETUP, "sk1": private_key_to_bytes(sk1), "pk1": public_key_to_bytes(pk1),
              "sk2": private_key_to_bytes(sk2), "pk2": public_key_to_bytes(pk2)}
    return {"pk1": state["pk1"], "pk2": state["pk2"]}, state


def share_keys(state: dict, request: dict, node_id: int) -> tuple[dict, dict]:
    """Shares of b and sk1 for every neighbour (this node included), each encrypted to it."""
    ids = [int(i) for i in request.get("node-ids", [])]
    pk1s, pk2s = list(request.get("pk1s", [])), list(request.get("pk2s", []))
    threshold = int(state["reconstruction_threshold"])
    if not len(ids) == len(pk1s) == len(pk2s):
        raise SecAggError(f"Node {node_id}: the server sent {len(ids)} node ids with "
                          f"{len(pk1s)} and {len(pk2s)} public keys.")
    if len(ids) < threshold:
        raise SecAggError(f"Node {node_id}: only {len(ids)} neighbours (itself included) "
                          f"remain, below reconstruction_threshold={threshold}.")
    if len(ids) > int(state["num_shares"]):  # more holders for the same t: an unsafe plan
        raise SecAggError(f"Node {node_id}: the server lists {len(ids)} share holders, more "
                          f"than the {state['num_shares']} of its setup: refusing to share.")
    if node_id not in ids or (pk1s[ids.index(node_id)], pk2s[ids.index(node_id)]) != (
            state["pk1"], state["pk2"]):
        raise SecAggError(f"Node {node_id}: the server's key list does not hold this node's own "
                          "public keys: refusing to share secrets with it.")
    if len(set(pk1s + pk2s)) != 2 * len(ids):
        raise SecAggError(f"Node {node_id}: the server's key list repeats public keys.")
    seed = os.urandom(SEED_BYTES)
    seed_shares = create_shares(seed, threshold, len(ids))
    sk1_shares = create_shares(private_scalar(state["sk1"]), threshold, len(ids))
    sk2 = bytes_to_private_key(state["sk2"])
    dsts, ciphertexts, channel_keys = [], [], []
    for nid, pk2, seed_share, sk1_share in zip(ids, pk2s, seed_shares, sk1_shares, strict=True):
        if nid == node_id:
            state |= {"own-seed-share": seed_share, "own-sk1-share": sk1_share}
            continue
        key = generate_shared_key(sk2, bytes_to_public_key(pk2))
        channel_keys.append(key)  # kept for opening this neighbour's shares in collect
        dsts.append(nid)
        ciphertexts.append(encrypt(key, share_keys_plaintext_concat(
            node_id, nid, seed_share, sk1_share)))
    state |= {"stage": SHARE_KEYS, "seed": seed, "node-ids": ids, "pk1s": pk1s,
              "channel-ids": dsts, "channel-keys": channel_keys}
    return {"dsts": dsts, "ciphertexts": ciphertexts,
            SEED_HASH: hashlib.sha256(seed).digest()}, state


def _open_shares(state: dict, request: dict, node_id: int) -> tuple[list[int], list[bytes],
                                                                     list[bytes]]:
    """(sources, their b shares, their sk1 shares) from the forwarded ciphertexts, each
    authenticated and checked to be from its sender, for this node, of the right length."""
    srcs = [int(i) for i in request.get("srcs", [])]
    ciphertexts = list(request.get("ciphertexts", []))
    ids = list(state.get("node-ids", []))
    channels = dict(zip(state.get("channel-ids", []), state.get("channel-keys", []),
                        strict=True))
    seed_shares, sk1_shares = [], []
    for src, ciphertext in zip(srcs, ciphertexts, strict=True):
        if src not in ids or src == node_id:
            raise SecAggError(f"Node {node_id}: the server forwarded shares from node {src}, "
                              "which is not one of this node's neighbours.")
        try:
            plaintext = decrypt(channels[src], ciphertext)
        except InvalidToken:
            raise SecAggError(
                f"Node {node_id}: the share ciphertext from node {src} fails authentication: "
                f"it was altered or not encrypted for node {node_id}; refusing to mask with "
                "it.") from None
        actual_src, dst, seed_share, sk1_share = share_keys_plaintext_separate(plaintext)
        if (actual_src, dst) != (src, node_id):
            raise SecAggError(f"Node {node_id}: a ciphertext said to be from node {src} holds "
                              f"shares from node {actual_src} for node {dst}.")
        for share, own in ((seed_share, state["own-seed-share"]),
                           (sk1_share, state["own-sk1-share"])):
            if len(share) != len(own):
                raise SecAggError(f"Node {node_id}: a share from node {src} is {len(share)} "
                                  f"bytes, not {len(own)}: refusing it.")
        seed_shares.append(seed_share)
        sk1_shares.append(sk1_share)
    return srcs, seed_shares, sk1_shares


def collect(state: dict, request: dict, node_id: int, content: RecordDict,
            train: Train, noise_floor: float | None = None) -> tuple[RecordDict, dict]:
    """Train, then reply with the masked vector (and the metric names and clear metrics).

    `noise_floor` (the node's own `min-noise-multiplier`): refuse to send an update unless it
    carries distributed DP noise of at least that multiplier."""
    s = SecAggSettings.from_config(state)
    asked = request.get(NOISE_MULTIPLIER)
    if noise_floor is not None and not (isinstance(asked, float) and asked >= noise_floor):
        raise SecAggError(
            f"Node {node_id}: this node sends updates only with distributed DP noise of "
            f"noise_multiplier >= {noise_floor:g} (its node config {NOISE_FLOOR}), and the "
            f"server asks for {'none' if asked is None else asked}: refusing before training.")
    srcs, seed_shares, sk1_shares = _open_shares(state, request, node_id)
    if len(srcs) + 1 < int(state["reconstruction_threshold"]):
        raise SecAggError(f"Node {node_id}: shares came from {len(srcs)} neighbours, below "
                          f"reconstruction_threshold={state['reconstruction_threshold']} - 1.")
    received = content["arrays"]
    reply = train(RecordDict({"arrays": received, "config": content["config"]}))
    arrays, metrics = reply["arrays"], dict(reply["metrics"])
    num_examples = int(metrics.pop("num-examples"))
    update = [arrays[k].numpy() for k in received]  # the server's array order
    if not all(np.isfinite(a).all() for a in update):  # it would corrupt the sum unseen
        raise SecAggError(f"Node {node_id}: the local update holds NaN or Inf; not sending it.")
    integers = None
    if NOISE_MULTIPLIER in request:  # distributed DP: this client adds its share of the noise
        integers, scaled = noise_share(update, request, state, node_id, s)
        metrics[DP_CLIPPED] = float(scaled)
    elif float(request.get("clip-norm", 0.0)) > 0:  # central DP: the server cannot clip
        update, scaled = clip_for_dp(update, float(request["clip-norm"]), s)
        metrics[DP_CLIPPED] = float(scaled)  # summed: the round's count of clipped updates
    ratio = num_examples / s.max_weight if request.get("weighted", True) else 1.0
    if ratio > 1:  # the count stays here: the error reply goes to the server
        log(WARNING, "secagg: this client's %d examples exceed secagg.max_weight=%g",
            num_examples, s.max_weight)
        raise SecAggError(f"Node {node_id}: this client's example count exceeds secagg."
                          f"max_weight={s.max_weight:g}: raise max_weight above the largest "
                          "client (the count is in the client's log).")
    # FedNova's step count: secure aggregation cannot serve FedNova (it needs each client's
    # steps), and a count of steps would overflow the metrics' clipping range.
    metrics.pop(NUM_STEPS, None)
    clear = {k: v for k, v in metrics.items() if k in PUBLIC_METRICS}
    names = sorted(k for k, v in metrics.items() if k not in clear
                   and isinstance(v, int | float) and not isinstance(v, bool))
    if bad := [k for k in names if not math.isfinite(float(metrics[k]))]:
        raise SecAggError(f"Node {node_id}: the training metric(s) {bad} are NaN or Inf; "
                          "masked, they would corrupt the round's mean unseen: not sending.")
    vector = vectors.encode(update, [float(metrics[k]) for k in names], ratio, num_examples, s,
                            integers)
    sk1 = bytes_to_private_key(state["sk1"])
    ids, pk1s = list(state.get("node-ids", [])), list(state.get("pk1s", []))
    pairwise = [(generate_shared_key(sk1, bytes_to_public_key(pk1s[ids.index(src)])),
                 1 if node_id > src else -1) for src in srcs]
    masked = vectors.mask(vector, state["seed"], pairwise, s)
    del vector, update
    state = {k: v for k, v in state.items()
             if k not in ("seed", "sk2", "channel-ids", "channel-keys")}
    state |= {"stage": COLLECT, "holders": [node_id, *srcs],
              "seed-shares": [state.pop("own-seed-share"), *seed_shares],
              "sk1-shares": [state.pop("own-sk1-share"), *sk1_shares]}
    out = RecordDict({MASKED: ArrayRecord({"vector": Array(masked)}),
                      REQUEST: config_record({"metric-names": names}),
                      "metrics": MetricRecord(clear)})
    return out, state


def noise_share(update: list[np.ndarray], request: dict, state: dict, node_id: int,
                s: SecAggSettings) -> tuple[np.ndarray, bool]:
    """This client's update clipped, scaled, rotated, rounded and noised with its share of the
    Skellam noise (fl_app.privacy.distributed), as integers mod modulus_range; and whether
    clipping scaled it. The parameters are derived here from the round's settings, with the
    threshold of this node's own checked setup: the server sends none of the derived values,
    and nothing of the noise's randomness (it comes from this machine's OS entropy)."""
    seed = request.get(ROTATION_SEED)
    if not isinstance(seed, bytes) or len(seed) < 16:
        raise SecAggError(f"Node {node_id}: the distributed DP request has no 16-byte rotation "
                          "seed: refusing it.")
    try:
        params = distributed.calibrate(
            float(request["clip-norm"]), float(request[NOISE_MULTIPLIER]),
            sum(a.size for a in update), int(state["reconstruction_threshold"]),
            int(request[COHORT]), s.modulus_range)
    except (KeyError, TypeError, ValueError) as err:
        raise SecAggError(f"Node {node_id}: refusing the server's distributed DP request: "
                          f"{err}") from None
    rng = np.random.default_rng(int.from_bytes(os.urandom(32), "big"))
    return distributed.client_encode(update, params, seed, rng)


def _noise_floor(context: Context, node_id: int) -> float | None:
    """The node operator's least noise multiplier (node config `min-noise-multiplier`)."""
    value = context.node_config.get(NOISE_FLOOR)
    if value is None:
        return None
    try:
        floor = float(value)
    except (TypeError, ValueError):
        floor = math.nan
    if not floor > 0 or not math.isfinite(floor):
        raise SecAggError(f"Node {node_id}: node config {NOISE_FLOOR}={value!r} must be a "
                          "positive number (the least DP noise multiplier this node accepts).")
    return floor


def clip_for_dp(update: list[np.ndarray], clip_norm: float, s: SecAggSettings
                ) -> tuple[list[np.ndarray], bool]:
    """The update scaled to L2 norm <= C - Δ·sqrt(d): stochastic rounding then moves each of the
    d coordinates by less than Δ, so the quantized update's norm stays <= C, the sensitivity
    central DP's noise is calibrated to. Also whether it had to be scaled."""
    dims = sum(a.size for a in update)
    bound = clip_norm - s.step * math.sqrt(dims)
    if bound <= 0:
        raise SecAggError(f"secagg's quantization step {s.step:g} over {dims} values can move "
                          f"an update by up to {s.step * math.sqrt(dims):g}, above clip_norm="
                          f"{clip_norm:g}: raise secagg.quantization_range or clip_norm.")
    norm = math.sqrt(sum(float(np.dot(a.ravel(), a.ravel())) for a in update))
    scale = 1.0 if norm <= bound else bound / norm
    return [np.asarray(a, dtype=np.float64) * scale for a in update], scale < 1.0


def private_scalar(private_key: bytes) -> bytes:
    """The private key's secret number alone (48 bytes on Flower's curve, P-384): what is
    Shamir-shared, instead of its 306-byte serialization (20 blocks of sharing work, not 4)."""
    key = bytes_to_private_key(private_key)
    return key.private_numbers().private_value.to_bytes((key.curve.key_size + 7) // 8, "big")


def unmask(state: dict, request: dict, node_id: int) -> tuple[dict, dict]:
    """Shares of b for the survivors, of sk1 for the dropped; then forget the round."""
    active = [int(i) for i in request.get("active", [])]
    dead = [int(i) for i in request.get("dead", [])]
    holders = [int(i) for i in state.get("holders", [])]
    threshold = int(state["reconstruction_threshold"])
    if set(active) & set(dead) or node_id not in active:
        raise SecAggError(f"Node {node_id}: the server lists nodes both as survived and as "
                          "dropped (or this node as dropped): refusing to reveal shares.")
    if unknown := sorted(set(active + dead) - set(holders)):
        raise SecAggError(f"Node {node_id}: asked for shares of nodes {unknown}, of which this "
                          "node holds none.")
    if len(active) < threshold:
        raise SecAggError(f"Node {node_id}: only {len(active)} neighbours survived, below "
                          f"reconstruction_threshold={threshold}.")
    seed_shares, sk1_shares = list(state.get("seed-shares", [])), list(state.get("sk1-shares", []))
    shares = ([seed_shares[holders.index(n)] for n in active]
              + [sk1_shares[holders.index(n)] for n in dead])
    return {"node-ids": active + dead, "shares": shares}, {"stage": UNMASK,
                                                          "round": state["round"]}
