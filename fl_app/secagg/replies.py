"""What the server accepts from each SecAgg+ stage's reply, checked before it is used.

A reply that is malformed in any way (a missing key, a wrong type, lists of different lengths,
bytes that are not a public key, a vector of the wrong dtype or length, a metric that is not
public) is a dropout with its reason logged: the round goes on without that client, or, when
too few are left, ends with one SecAggError and the model unchanged. Nothing a client sends
reaches the round as an exception of its own.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from logging import WARNING
from typing import TypeVar

import numpy as np
from flwr.app import Message, MetricRecord
from flwr.common.logger import log
from flwr.supercore.primitives.asymmetric import bytes_to_public_key

from fl_app.secagg.protocol import MASKED, PUBLIC_METRICS, REQUEST, SEED_HASH

T = TypeVar("T")


class BadReply(ValueError):
    """A stage reply the server cannot use; the message says what is wrong with it."""


def usable(rnd: int, stage: str, replies: dict[int, Message],
           parse: Callable[[Message, int], T]) -> dict[int, T]:
    """`parse(reply, node)` of every reply; a reply it fails on is logged and left out."""
    parsed = {}
    for nid, reply in replies.items():
        try:
            parsed[nid] = parse(reply, nid)
        except Exception as err:  # noqa: BLE001 - whatever a client sent, it is one dropout
            reason = str(err) if isinstance(err, BadReply) else f"{type(err).__name__}: {err}"
            log(WARNING, "[round %d] secagg %s: node %d's reply is malformed (%s); it counts "
                "as dropped", rnd, stage, nid, reason)
    return parsed


def _record(reply: Message, name: str = REQUEST) -> dict:
    if not reply.has_content() or name not in reply.content:
        raise BadReply(f"no {name!r} record")
    return dict(reply.content[name])


def _bytes(value: object, what: str) -> bytes:
    if not isinstance(value, bytes) or not value:
        raise BadReply(f"{what} is {type(value).__name__}, not non-empty bytes")
    return value


def _int_list(value: object, what: str) -> list[int]:
    if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise BadReply(f"{what} is not a list of integers")
    return value


def setup_keys(reply: Message, nid: int, record_name: str = REQUEST) -> tuple[bytes, bytes]:
    """(pk1, pk2): two distinct public keys on Flower's curve, from the reply's `record_name`
    record (NEXT where the setup rode on a collect)."""
    record = _record(reply, record_name)
    keys = tuple(_bytes(record.get(name), name) for name in ("pk1", "pk2"))
    for name, key in zip(("pk1", "pk2"), keys, strict=True):
        try:
            bytes_to_public_key(key)
        except Exception:  # noqa: BLE001 - the library's many ways of refusing bytes
            raise BadReply(f"{name} is not a public key ({len(key)} bytes)") from None
    if keys[0] == keys[1]:
        raise BadReply("pk1 and pk2 are the same key")
    return keys


def without_shared_keys(rnd: int, keys: dict[int, tuple[bytes, bytes]]
                        ) -> dict[int, tuple[bytes, bytes]]:
    """`keys` less every node whose key another node also sent (a copied key: the honest
    clients would refuse the whole list)."""
    counts = Counter(key for pair in keys.values() for key in pair)
    copied = sorted(nid for nid, pair in keys.items() if any(counts[k] > 1 for k in pair))
    if copied:
        log(WARNING, "[round %d] secagg setup: nodes %s sent a public key another node also "
            "sent; they count as dropped", rnd, copied)
    return {nid: pair for nid, pair in keys.items() if nid not in copied}


def share_ciphertexts(reply: Message, neighbours: set[int], record_name: str = REQUEST
                      ) -> tuple[dict[int, bytes], bytes]:
    """({destination: its encrypted shares}, the commitment SHA-256(b)): one ciphertext per
    destination, every destination one of `neighbours` (from `record_name`, as setup_keys)."""
    record = _record(reply, record_name)
    dsts = _int_list(record.get("dsts", []), "dsts")
    ciphertexts = record.get("ciphertexts", [])
    if not isinstance(ciphertexts, list) or len(ciphertexts) != len(dsts):
        raise BadReply(f"{len(dsts)} dsts but "
                       f"{len(ciphertexts) if isinstance(ciphertexts, list) else 'no list of'} "
                       "ciphertexts")
    if len(set(dsts)) != len(dsts) or not set(dsts) <= neighbours:
        raise BadReply(f"dsts {sorted(dsts)[:8]} repeat a node or name one that is not a "
                       "neighbour")
    commitment = _bytes(record.get(SEED_HASH), SEED_HASH)
    if len(commitment) != 32:
        raise BadReply(f"{SEED_HASH} is {len(commitment)} bytes, not 32")
    return ({d: _bytes(c, f"the ciphertext for node {d}") for d, c in
             zip(dsts, ciphertexts, strict=True)}, commitment)


def masked_vector(reply: Message, length: Callable[[int], int]
                  ) -> tuple[np.ndarray, list[str], dict[str, float]]:
    """(the masked vector, its metric names, the public clear metrics) of a collect reply.
    `length(number of metrics)`: the vector's expected length."""
    if not reply.has_content() or MASKED not in reply.content:
        raise BadReply(f"no {MASKED!r} record")
    names = _record(reply).get("metric-names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or (
            names != sorted(set(names))):
        raise BadReply("metric-names is not a sorted list of distinct names")
    vector = reply.content[MASKED]["vector"].numpy()
    if vector.dtype != np.uint32 or vector.shape != (length(len(names)),):
        raise BadReply(f"the masked vector is {vector.dtype}{list(vector.shape)}, not "
                       f"uint32[{length(len(names))}]")
    clear = reply.content.get("metrics", MetricRecord({}))
    if not isinstance(clear, MetricRecord):
        raise BadReply("its clear metrics are not a MetricRecord")
    if extra := sorted(set(clear) - PUBLIC_METRICS):
        raise BadReply(f"it sends {extra[:5]} in the clear, which are not public")
    values = {}
    for key, value in clear.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
                value):
            raise BadReply(f"its clear metric {key} is not a finite number")
        values[key] = float(value)
    return vector, names, values


def unmask_shares(reply: Message, nid: int, active: list[int], dead: list[int],
                  length: Callable[[int], int]) -> list[tuple[int, bytes]]:
    """(owner, share) pairs of node `nid`'s reply: exactly the shares asked for, each of
    `length(owner)` bytes."""
    record = _record(reply)
    owners = _int_list(record.get("node-ids", []), "node-ids")
    shares = record.get("shares", [])
    if owners != active + dead:
        raise BadReply(f"it returned shares of {owners[:8]}, asked for {(active + dead)[:8]}")
    if not isinstance(shares, list) or len(shares) != len(owners):
        raise BadReply(f"{len(owners)} node-ids but not as many shares")
    for owner, share in zip(owners, shares, strict=True):
        if len(_bytes(share, f"the share of node {owner}")) != length(owner):
            raise BadReply(f"node {nid}'s share of node {owner} is {len(share)} bytes, not "
                           f"{length(owner)} (altered or truncated)")
    return list(zip(owners, shares, strict=True))
