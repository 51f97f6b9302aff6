"""The integer vectors secure aggregation sums: encoding a client's reply, masking, decoding.

A client's vector, before masking (all integers in [0, modulus_range)):

    [ q_ratio, num_examples, clipped, quantize(ratio' · metrics), quantize(ratio' · update) ]

ratio = num_examples / max_weight (1 for an unweighted mean), q_ratio = round(ratio · Q) and
ratio' = q_ratio / Q, so the weights the sum divides by are exact. The first three entries are
added as they are; the rest are Flower's stochastic quantization of [-c, c] onto [0, Q].
Summed over n clients, the server decodes Σ ratio'·x with an error below n·Δ per coordinate
(Δ = 2c/Q: stochastic rounding errs by less than one level), Σ ratio' exactly, the total
number of examples, and how many values were clipped to [-c, c] (which the bound excludes).

Masks are AES-CTR keystreams (the `cryptography` package Flower's primitives are built on),
keyed by SHA-256 of a client's 15-byte private seed or of a pairwise ECDH key. Not Flower's
`pseudo_rand_gen`: it folds every seed into 32 bits for numpy's Mersenne Twister, so a mask
has at most 2**32 possible values a server could search, and it is 2-6x slower. Arithmetic is
on uint32, which wraps modulo 2**32, a multiple of every allowed modulus_range (a power of 2
up to 2**32); results are reduced to [0, modulus_range) at the end.
"""

from __future__ import annotations

import hashlib

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from fl_app.secagg.settings import SecAggSettings

HEADER = 3  # q_ratio, num_examples, clipped: integer entries, added without quantization


def encode(update: list[np.ndarray], metrics: list[float], ratio: float, num_examples: int,
           s: SecAggSettings, integers: np.ndarray | None = None) -> np.ndarray:
    """The client's unmasked vector (int64) for `ratio`-weighted `update` and `metrics`.

    `integers`: the update already encoded as integers in [0, modulus_range) by distributed
    DP (fl_app.privacy.distributed; `update` is then ignored): appended as they are."""
    q_ratio = round(ratio * s.quantization_range)
    scale = q_ratio / s.quantization_range
    values = np.concatenate([np.asarray(metrics, dtype=np.float64),
                             *(np.asarray(a, dtype=np.float64).ravel()
                               for a in (update if integers is None else ()))])
    values *= scale
    clipped = int(np.count_nonzero(np.abs(values) > s.clipping_range))
    quantized = quantize([values], s.clipping_range, s.quantization_range)[0]
    return np.concatenate([np.array([q_ratio, int(num_examples), clipped], dtype=np.int64),
                           quantized.astype(np.int64),
                           *(() if integers is None else (integers.astype(np.int64),))])


def prg(seed: bytes, length: int) -> np.ndarray:
    """`length` uniform uint32 values: the AES-256-CTR keystream keyed by SHA-256(seed). Seeds
    are fresh every round (new key pairs and private seeds), so a zero nonce never repeats a
    stream."""
    key = hashlib.sha256(seed).digest()
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(stream.update(bytes(4 * length)), dtype="<u4")


def mask(vector: np.ndarray, private_seed: bytes, pairwise: list[tuple[bytes, int]],
         s: SecAggSettings) -> np.ndarray:
    """vector + PRG(private seed) + Σ sign·PRG(pairwise key), mod modulus_range, as uint32.

    `pairwise`: (shared key, +1 or -1) per neighbour; the two ends of a pair use opposite
    signs, so the pairwise masks cancel in the sum."""
    masked = vector.astype(np.uint32)
    masked += prg(private_seed, len(vector))
    for key, sign in pairwise:
        (np.add if sign > 0 else np.subtract)(masked, prg(key, len(vector)), out=masked)
    masked &= np.uint32(s.modulus_range - 1)
    return masked


def decode(total: np.ndarray, num_clients: int, num_metrics: int, s: SecAggSettings,
           integers: bool = False) -> tuple[float, int, int, np.ndarray, np.ndarray]:
    """(Σ ratio', Σ num_examples, values clipped, Σ ratio'·metrics, Σ ratio'·update (flat))
    from the unmasked sum (uint32, wrapped) of `num_clients` vectors. `integers`: the update
    part was encoded by distributed DP and is returned as the summed integers mod
    modulus_range (int64), for fl_app.privacy.distributed to decode."""
    total = (total & np.uint32(s.modulus_range - 1)).astype(np.int64)
    weight = float(total[0]) / s.quantization_range
    quantized = total[HEADER:HEADER + num_metrics] if integers else total[HEADER:]
    # Each client's quantized value is (v + c)·Q/2c: the n shifts of c come off once.
    values = dequantize([quantized], s.clipping_range, s.quantization_range)[0]
    values -= (num_clients - 1) * s.clipping_range
    update = total[HEADER + num_metrics:] if integers else values[num_metrics:]
    return (weight, int(total[1]), int(total[2]), values[:num_metrics], update)
