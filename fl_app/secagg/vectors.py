"""The integer vectors secure aggregation sums: encoding a client's reply, masking, decoding.

A client's vector, before masking (all integers in [0, modulus_range)):

    [ q_ratio, num_examples, clipped, quantize(ratio' · metrics), quantize(ratio' · update) ]

ratio = num_examples / max_weight (1 for an unweighted mean), q_ratio = round(ratio · Q) and
ratio' = q_ratio / Q, so the weights the sum divides by are exact. The first three entries are
added as they are; the rest are Flower's stochastic quantization of [-c, c] onto [0, Q].
Summed over n clients, the server decodes Σ ratio'·x with an error below n·Δ per coordinate
(Δ = 2c/Q: stochastic rounding errs by less than one level), Σ ratio' exactly, the total
number of examples, and how many values were clipped to [-c, c] (which the bound excludes).
"""

from __future__ import annotations

import numpy as np
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

from fl_app.secagg.settings import SecAggSettings

HEADER = 3  # q_ratio, num_examples, clipped: integer entries, added without quantization


def encode(update: list[np.ndarray], metrics: list[float], ratio: float, num_examples: int,
           s: SecAggSettings) -> np.ndarray:
    """The client's unmasked vector (int64) for `ratio`-weighted `update` and `metrics`."""
    q_ratio = round(ratio * s.quantization_range)
    scale = q_ratio / s.quantization_range
    values = np.concatenate([np.asarray(metrics, dtype=np.float64),
                             *(np.asarray(a, dtype=np.float64).ravel() for a in update)])
    values *= scale
    clipped = int(np.count_nonzero(np.abs(values) > s.clipping_range))
    quantized = quantize([values], s.clipping_range, s.quantization_range)[0]
    return np.concatenate([np.array([q_ratio, int(num_examples), clipped], dtype=np.int64),
                           quantized.astype(np.int64)])


def prg(seed: bytes, length: int, s: SecAggSettings) -> np.ndarray:
    """The mask a seed expands to (Flower's SecAgg+ generator), int64 in [0, modulus_range)."""
    return pseudo_rand_gen(seed, s.modulus_range, [(length,)])[0]


def mask(vector: np.ndarray, private_seed: bytes, pairwise: list[tuple[bytes, int]],
         s: SecAggSettings) -> np.ndarray:
    """vector + PRG(private seed) + Σ sign·PRG(pairwise seed), mod modulus_range, as uint32.

    `pairwise`: (shared seed, +1 or -1) per neighbour; the two ends of a pair use opposite
    signs, so the pairwise masks cancel in the sum."""
    masked = vector + prg(private_seed, len(vector), s)
    for seed, sign in pairwise:
        masked += sign * prg(seed, len(vector), s)
    return np.mod(masked, s.modulus_range).astype(np.uint32)


def decode(total: np.ndarray, num_clients: int, num_metrics: int, s: SecAggSettings
           ) -> tuple[float, int, int, np.ndarray, np.ndarray]:
    """(Σ ratio', Σ num_examples, values clipped, Σ ratio'·metrics, Σ ratio'·update (flat))
    from the unmasked sum of `num_clients` vectors."""
    total = np.mod(total, s.modulus_range)
    weight = float(total[0]) / s.quantization_range
    # Each client's quantized value is (v + c)·Q/2c: the n shifts of c come off once.
    values = dequantize([total[HEADER:]], s.clipping_range, s.quantization_range)[0]
    values -= (num_clients - 1) * s.clipping_range
    return (weight, int(total[1]), int(total[2]), values[:num_metrics], values[num_metrics:])
