"""The server's side of SecAgg+: four stages over the grid, ending in the sum of the round's
client vectors and nothing else. In steady state a round pays two exchanges, not four: the next
round's setup rides on this round's collect, its share-keys on this round's unmask
(`SecAggSession` keeps that round's keys until it starts; docs/privacy.md, "Two exchanges per
round").

    U1 = answered setup (public keys), U2 = answered share-keys (sent encrypted shares),
    U3 = answered collect (a masked vector: its update is in the sum), U4 = answered unmask.

Every client of U3 masked its vector with PRG(b_u) and, for each neighbour v of U2 whose shares
it received, ±PRG(s_uv). The pairwise masks of two clients of U3 cancel in the sum. From U4's
shares the server rebuilds b_u of every u in U3 and sk1_v of every v in U2 \\ U3 (which gives
s_uv with each u's public key), and takes those masks off. Each needs `threshold` shares
among the secret owner's neighbours in U4; fewer ends the round with SecAggError.

The server holds only masked vectors, encrypted shares it forwards, the shares U4 reveal and
the sum; it never reads a single client's update.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import Message, RecordDict
from flwr.common.logger import log
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.supercore.primitives.asymmetric import bytes_to_public_key

from fl_app.exchange import payload_bytes
from fl_app.privacy import distributed
from fl_app.privacy.distributed import ClientNoise
from fl_app.secagg import replies, vectors
from fl_app.secagg.protocol import (
    COHORT,
    COLLECT,
    MESSAGE_TYPE,
    NEXT,
    NOISE_MULTIPLIER,
    REQUEST,
    ROTATION_SEED,
    SCALAR_BYTES,
    SEED_BYTES,
    SETUP,
    SHARE_KEYS,
    UNMASK,
    config_record,
    key_from_scalar,
    settings_record,
)
from fl_app.secagg.settings import SecAggError, SecAggSettings, share_plan

Exchange = Callable[[Sequence[Message], float | None], list[Message]]


@dataclass
class SecureSum:
    """What the server learns from a round: sums over the clients of U3, and traffic."""

    weight: float                # Σ ratio' (the mean's denominator)
    num_examples: int            # Σ num_examples
    num_clipped: int             # values clipped to [-c, c] over all clients
    metric_sums: dict[str, float]  # Σ ratio'·metric
    update_sum: dict[str, np.ndarray]  # Σ ratio'·update, in the global model's shapes
    num_clients: int             # |U3|
    clear_metrics: dict[str, float] = field(default_factory=dict)  # max over clients
    lost: list[int] = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0
    noise: ClientNoise | None = None  # distributed DP: who noised the sum, and for what t


def _shamir_length(secret_bytes: int) -> int:
    # Flower's shares: a 4-byte index, then 16 bytes per 16-byte block of the padded secret.
    return 4 + 16 * (secret_bytes // 16 + 1)


class _Round:
    """One round's protocol state on the server (no client update is ever stored here).

    Its stages are split into the requests it sends and the replies it takes, so that the
    next round's setup and share-keys can ride in the same exchange as this round's collect
    and unmask (`secure_sum`)."""

    def __init__(self, rnd: int, sampled: list[int], s: SecAggSettings, exchange: Exchange,
                 timeout: float | None, ttl: float) -> None:
        self.rnd, self.s, self.exchange, self.timeout, self.ttl = rnd, s, exchange, timeout, ttl
        self.cohort = frozenset(sampled)
        try:
            self.shares, self.threshold = share_plan(s, len(sampled))
        except ValueError as err:
            raise SecAggError(f"[round {rnd}] {err}") from None
        order = list(sampled)
        random.SystemRandom().shuffle(order)  # the ring must not follow node ids
        half, n = self.shares // 2, len(order)
        self.neighbours = {nid: {order[(i + d) % n] for d in range(-half, half + 1)}
                           if self.shares < n else set(order) for i, nid in enumerate(order)}
        self.sent = self.received = 0
        self.keys: dict[int, tuple[bytes, bytes]] = {}  # U1's (pk1, pk2)
        self.pk1: dict[int, bytes] = {}
        self.seed_hashes: dict[int, bytes] = {}  # SHA-256(b) of each client of U2
        self.forwards: dict[int, list[tuple[int, bytes]]] = {}  # U2's ciphertexts, by recipient
        # The record each node's reply answers this round's stage in: NEXT where it rode on
        # the round before's collect or unmask.
        self.record: dict[int, str] = {}

    def send(self, contents: dict[int, RecordDict], stage: str) -> dict[int, Message]:
        """Send each node its content; the usable replies by node (error replies logged)."""
        messages = [Message(content=c, dst_node_id=nid, message_type=MESSAGE_TYPE,
                            group_id=str(self.rnd)) for nid, c in contents.items()]
        for message in messages:
            message.metadata.ttl = float(self.ttl)
        replies = self.exchange(messages, self.timeout)
        self.sent += payload_bytes(messages)
        usable = {}
        for reply in replies:
            src = reply.metadata.src_node_id
            try:
                self.received += payload_bytes([reply])
            except Exception:  # noqa: BLE001 - a record Flower cannot size (an empty list)
                pass
            if reply.has_error():
                log(WARNING, "[round %d] secagg %s: node %d failed: %s", self.rnd, stage, src,
                    reply.error.reason)
            elif src in contents:
                usable[src] = reply
        return usable

    def request(self, stage: str, **values: object) -> RecordDict:
        return RecordDict({REQUEST: config_record({"stage": stage, "round": self.rnd, **values})})

    def require(self, nodes: set[int], owners: set[int], stage: str) -> None:
        """Some node answered usably, and every owner has `threshold` of its share holders in
        `nodes`; else SecAggError."""
        if not nodes:
            raise SecAggError(
                f"[round {self.rnd}] secure aggregation failed at stage {stage}: no client gave "
                "a usable reply (see the warnings above for each one's reason). The round ends "
                "with the global model unchanged.")
        short = sorted(o for o in owners if len(self.neighbours[o] & nodes) < self.threshold)
        if short:
            raise SecAggError(
                f"[round {self.rnd}] secure aggregation failed at stage {stage}: only "
                f"{len(nodes)} client(s) answered, and node(s) {short[:5]} have fewer than "
                f"reconstruction_threshold={self.threshold} of their {self.shares} share "
                "holders left, so the sum cannot be unmasked. The round ends with the global "
                "model unchanged. Lower secagg.reconstruction_threshold, raise secagg.timeout "
                "(or round_timeout), or find why clients dropped.")

    # Stage 1: setup (fresh key pairs on every client).
    def setup_requests(self) -> dict[int, RecordDict]:
        setup = self.request(SETUP, **settings_record(self.s, self.shares, self.threshold))
        return dict.fromkeys(self.cohort, setup)

    def take_setup(self, answered: dict[int, Message]) -> None:
        self.keys = replies.without_shared_keys(self.rnd, replies.usable(
            self.rnd, SETUP, answered, lambda m, nid: replies.setup_keys(
                m, nid, self.record.get(nid, REQUEST))))
        u1 = set(self.keys)
        self.require(u1, u1, SETUP)
        self.pk1 = {nid: pk1 for nid, (pk1, _) in self.keys.items()}

    # Stage 2: share keys (each client's encrypted shares, for the server to forward).
    def share_keys_requests(self) -> dict[int, RecordDict]:
        u1, contents = set(self.keys), {}
        for nid in u1:
            ids = sorted(self.neighbours[nid] & u1)
            contents[nid] = self.request(SHARE_KEYS, **{"node-ids": ids,
                                                        "pk1s": [self.keys[i][0] for i in ids],
                                                        "pk2s": [self.keys[i][1] for i in ids]})
        return contents

    def take_share_keys(self, answered: dict[int, Message]) -> None:
        u1 = set(self.keys)
        shared = replies.usable(self.rnd, SHARE_KEYS, answered,
                                lambda m, nid: replies.share_ciphertexts(
                                    m, self.neighbours[nid] & u1 - {nid},
                                    self.record.get(nid, REQUEST)))
        u2 = set(shared)
        self.seed_hashes = {nid: commitment for nid, (_, commitment) in shared.items()}
        # Two clients mask with each other only if both sent the other its shares: a one-sided
        # pair (a malformed reply) would leave a pairwise mask in the sum that nothing cancels.
        self.forwards = {nid: [] for nid in u2}
        for src, (ciphertexts, _) in shared.items():
            for dst, ciphertext in ciphertexts.items():
                if dst in u2 and src in shared[dst][0]:
                    self.forwards[dst].append((src, ciphertext))
        self.require(u2, u2, SHARE_KEYS)


class SecAggSession:
    """The server's SecAgg+ state for a run: the next round's keys and shares, agreed during
    this round's collect and unmask exchanges, which let that round start at its collect."""

    def __init__(self) -> None:
        self.pending: _Round | None = None

    def take(self, rnd: int, cohort: set[int], s: SecAggSettings, exchange: Exchange,
             timeout: float | None, ttl: float) -> _Round | None:
        """The round keyed ahead for `rnd`, if it was keyed for exactly this cohort and these
        settings; None (a cold start) otherwise. Either way it is used at most once."""
        ahead, self.pending = self.pending, None
        if ahead is None or ahead.rnd != rnd or ahead.cohort != cohort or ahead.s != s:
            return None
        ahead.exchange, ahead.timeout, ahead.ttl = exchange, timeout, ttl
        ahead.record = {}
        return ahead


def _ride_along(contents: dict[int, RecordDict], ahead: _Round | None,
                ahead_contents: dict[int, RecordDict]) -> dict[int, RecordDict]:
    """`contents` with the next round's stage added: in the NEXT record of a node that gets a
    message of this round, alone (as a cold stage message) to a node that does not."""
    if ahead is None:
        return contents
    merged = dict(contents)
    for nid, content in ahead_contents.items():
        if nid in contents:
            merged[nid] = RecordDict({**contents[nid], NEXT: content[REQUEST]})
        else:
            merged[nid] = content
        ahead.record[nid] = NEXT if nid in contents else REQUEST
    return merged


def _advance(ahead: _Round | None, stage: Callable[[], None]) -> _Round | None:
    """`ahead` once `stage` succeeded on it; None (the next round starts cold) if it failed."""
    if ahead is None:
        return None
    try:
        stage()
    except SecAggError as err:
        log(WARNING, "%s: the next round starts with its own setup instead", err)
        return None
    return ahead


def secure_sum(rnd: int, train_messages: list[Message], s: SecAggSettings, exchange: Exchange,
               timeout: float | None, ttl: float, weighted: bool = True,
               clip_norm: float = 0.0, session: SecAggSession | None = None,
               next_cohort: Sequence[int] | None = None,
               noise_multiplier: float | None = None) -> SecureSum:
    """Run SecAgg+ over the clients `train_messages` go to; return the sum of their vectors.

    Each client trains on its train message's content (arrays, config) in the collect stage.
    `weighted`: weights num_examples / max_weight (else 1 each); `clip_norm` > 0: each client
    clips its update to it first (central DP). Every reply is checked (`replies`): a malformed
    one is a dropout. `noise_multiplier` (with clip_norm; secagg.noise=distributed): each
    client also adds its share of the noise (fl_app.privacy.distributed), so that the sum
    unmasked here is already private; the server then never holds an un-noised sum.

    With a `session` whose round was keyed ahead for exactly this cohort, the round starts at
    its collect: two exchanges instead of four. `next_cohort` (with a session): the nodes the
    next round will sample; its setup rides on this round's collect exchange and its
    share-keys on the unmask exchange."""
    by_node = {m.metadata.dst_node_id: m for m in train_messages}
    r = session.take(rnd, set(by_node), s, exchange, timeout, ttl) if session else None
    if r is None:
        r = _Round(rnd, list(by_node), s, exchange, timeout, ttl)
        r.take_setup(r.send(r.setup_requests(), SETUP))
        r.take_share_keys(r.send(r.share_keys_requests(), SHARE_KEYS))
    log(INFO, "[round %d] secagg: %d clients, %d shares per secret, threshold %d%s", rnd,
        len(by_node), r.shares, r.threshold, "" if r.sent else " (keyed in the round before)")
    ahead = None
    if session is not None and next_cohort:
        try:
            ahead = _Round(rnd + 1, list(next_cohort), s, exchange, timeout, ttl)
        except SecAggError as err:
            log(WARNING, "%s: the next round starts with its own setup", err)
    # Stage 3: collect masked vectors (the clients train here); the next round's setup rides.
    u2 = set(r.forwards)
    reference = by_node[next(iter(u2))].content["arrays"]
    shapes = {k: tuple(reference[k].shape) for k in reference}
    dims = sum(int(np.prod(shape)) for shape in shapes.values())
    noise, dp_request = None, {}
    if noise_multiplier is not None:  # the clients derive the same parameters from these
        dp_request = {NOISE_MULTIPLIER: float(noise_multiplier), COHORT: len(u2),
                      ROTATION_SEED: os.urandom(32)}
        try:
            noise = distributed.calibrate(clip_norm, noise_multiplier, dims, r.threshold,
                                          len(u2), s.modulus_range)
        except ValueError as err:
            raise SecAggError(f"[round {rnd}] {err}") from None
    contents, partners = {}, {}
    for nid in u2:
        srcs = sorted(r.forwards[nid])
        partners[nid] = {src for src, _ in srcs}
        train = by_node[nid].content
        contents[nid] = RecordDict({"arrays": train["arrays"], "config": train["config"],
                                    **r.request(COLLECT, srcs=[i for i, _ in srcs],
                                                ciphertexts=[c for _, c in srcs],
                                                weighted=weighted, **{"clip-norm": clip_norm},
                                                **dp_request)})
    length = dims if noise is None else noise.padded_dims  # of a vector's update part
    answered = r.send(_ride_along(contents, ahead, ahead.setup_requests() if ahead else {}),
                      COLLECT)
    ahead = _advance(ahead, lambda: ahead.take_setup(_of(answered, ahead.cohort)))
    collected = replies.usable(rnd, COLLECT, _of(answered, contents),
                               lambda m, nid: replies.masked_vector(
                                   m, lambda num_metrics: vectors.HEADER + num_metrics + length))
    total, names, clear, u3 = None, None, {}, set()
    for nid, (vector, reply_names, public) in collected.items():
        if names is not None and reply_names != names:
            log(WARNING, "[round %d] secagg collect: node %d reports metrics %s, others %s; it "
                "counts as dropped", rnd, nid, reply_names, names)
            continue
        names = reply_names
        total = vector.copy() if total is None else np.add(total, vector, out=total)
        for key, value in public.items():
            clear[key] = max(clear.get(key, value), value)
        u3.add(nid)
    r.require(u3, u3, COLLECT)
    # Stage 4: unmask; the next round's share-keys rides.
    contents = {nid: r.request(UNMASK, active=sorted((partners[nid] | {nid}) & u3),
                               dead=sorted(partners[nid] - u3)) for nid in u3}
    seed_shares: dict[int, list[bytes]] = {nid: [] for nid in u3}
    sk1_shares: dict[int, list[bytes]] = {nid: [] for nid in u2 - u3}

    def check_shares(reply: Message, nid: int) -> list[tuple[int, bytes]]:
        asked = contents[nid][REQUEST]
        active, dead = list(asked.get("active", [])), list(asked.get("dead", []))
        return replies.unmask_shares(reply, nid, active, dead, lambda owner: _shamir_length(
            SEED_BYTES if owner in active else SCALAR_BYTES))

    answered = r.send(_ride_along(contents, ahead, ahead.share_keys_requests() if ahead else {}),
                      UNMASK)
    ahead = _advance(ahead, lambda: ahead.take_share_keys(_of(answered, ahead.keys)))
    if session is not None:
        session.pending = ahead
    revealed = replies.usable(rnd, UNMASK, _of(answered, contents), check_shares)
    for shares in revealed.values():
        for owner, share in shares:
            (seed_shares if owner in seed_shares else sk1_shares)[owner].append(share)
    u4 = set(revealed)
    r.require(u4, u3 | (u2 - u3), UNMASK)
    total = _unmask(r, total, seed_shares, sk1_shares, partners)
    weight, examples, clipped, metric_values, flat = vectors.decode(
        total, len(u3), len(names), s, integers=noise is not None)
    del total
    if noise is not None:  # the clients' noise is in it: un-rotate and rescale only
        flat = distributed.server_decode(flat, noise, dp_request[ROTATION_SEED])
    update, start = {}, 0
    for key, shape in shapes.items():
        size = int(np.prod(shape))
        update[key] = flat[start:start + size].reshape(shape)
        start += size
    if clipped:
        log(WARNING, "[round %d] secagg: %d value(s) exceeded clipping_range=%g and were "
            "clipped: raise secagg.clipping_range", rnd, clipped, s.clipping_range)
    return SecureSum(weight, examples, clipped, dict(zip(names, metric_values.tolist(),
                                                         strict=True)),
                     update, len(u3), clear, sorted(set(by_node) - u3), r.sent, r.received,
                     None if noise is None else ClientNoise(tuple(sorted(u3)), r.threshold,
                                                            len(u2)))


def _of(answered: dict[int, Message], nodes: Iterable[int]) -> dict[int, Message]:
    """The replies of `nodes` among `answered`."""
    return {nid: answered[nid] for nid in nodes if nid in answered}


def _unmask(r: _Round, total: np.ndarray, seed_shares: dict[int, list[bytes]],
            sk1_shares: dict[int, list[bytes]], partners: dict[int, set[int]]) -> np.ndarray:
    """The sum with every private mask and every dropped client's pairwise masks taken off."""
    length = len(total)
    for owner, shares in seed_shares.items():
        seed = _combine(shares, r, owner, lambda b, o=owner: (
            hashlib.sha256(b).digest() == r.seed_hashes[o]))
        total -= vectors.prg(seed, length)
    for owner, shares in sk1_shares.items():
        scalar = _combine(shares, r, owner, lambda b, o=owner: _is_key_of(b, r.pk1[o]))
        sk1 = key_from_scalar(scalar, r.pk1[owner])
        for survivor, its_partners in partners.items():
            if owner in its_partners and survivor in seed_shares:
                key = generate_shared_key(sk1, bytes_to_public_key(r.pk1[survivor]))
                # The survivor added PRG(key) if its id was larger, else subtracted it.
                undo = np.subtract if survivor > owner else np.add
                undo(total, vectors.prg(key, length), out=total)
    return total


def _is_key_of(scalar: bytes, public_key: bytes) -> bool:
    try:
        key_from_scalar(scalar, public_key)
    except ValueError:
        return False
    return True


# Subsets of t shares tried when the whole set rebuilds a wrong secret (an altered share).
MAX_SUBSETS = 256


def _combine(shares: list[bytes], r: _Round, owner: int, genuine: Callable[[bytes], bool]
             ) -> bytes:
    """The secret of `owner`'s shares that `genuine` accepts (its commitment or public key):
    from all of them, else from the first subset of t that gives it; SecAggError if none."""
    if len(shares) < r.threshold:
        raise SecAggError(f"[round {r.rnd}] secure aggregation failed: {len(shares)} share(s) "
                          f"of node {owner} came back, below reconstruction_threshold="
                          f"{r.threshold}; the global model stays unchanged.")
    candidates = itertools.chain([shares], itertools.islice(
        itertools.combinations(shares, r.threshold), MAX_SUBSETS))
    for subset in candidates:
        try:
            secret = combine_shares(list(subset))
        except ValueError:
            continue
        if genuine(secret):
            if len(subset) < len(shares):
                log(WARNING, "[round %d] secagg unmask: some shares of node %d were altered; "
                    "its secret was rebuilt from %d others", r.rnd, owner, len(subset))
            return secret
    raise SecAggError(f"[round {r.rnd}] secure aggregation failed: the shares of node {owner} "
                      "do not rebuild its secret (altered shares); the global model stays "
                      "unchanged.")
