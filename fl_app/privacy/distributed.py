"""Distributed DP with the Skellam mechanism: each client noises its own integer vector, so the
sum secure aggregation unmasks is already private (numpy only: both sides import it).

A client clips its update to L2 norm C, scales it by gamma, pads it to a power of 2 and rotates
it with a randomized Hadamard transform (random signs from the round's public rotation seed,
then the normalised Walsh-Hadamard transform: an honest update's coordinates come out near
gamma*C/sqrt(d') each; the wrap bound below does not count on it, see there).
It rounds each coordinate up or down at random (unbiased) and retries until the rounded
vector's norm is <= Delta_2 (conditional randomized rounding, Kairouz, Liu, Steinke 2021,
arXiv 2102.06387, Thm. 4.1), adds symmetric Skellam noise Sk = Poisson(v/2) - Poisson(v/2)
(variance v per coordinate) and reduces modulo the group size. Sums of Skellams are Skellam, so
the unmasked sum of s survivors' vectors carries Skellam noise of variance s*v. Each client
adds v = (z*Delta_2)**2 / t: any t survivors reach the target std z*Delta_2; more survivors
add more noise; fewer than t are less private (and the accountant says how much).

Privacy: neighbouring federations differ in one participating client's update, zeroed (its
noise share carries no data and stays). Zero rounds to zero exactly, so the sensitivities are
Delta_2 and Delta_1 of the rounded vector, exactly (not w.h.p.). Skellam RDP (Agarwal, Kairouz,
Liu 2021, arXiv 2110.04995, Thm. 3.5, written with the variance mu = 2*lambda):
    eps(a) <= a*D2**2/(2 mu) + min(((2a - 1)*D2**2 + 6*D1)/(4 mu**2), 3*D1/(2 mu)).
Poisson subsampling (`subsampled_rdp`: a bound for any mechanism, both directions) amplifies
it only against whoever does not know whether the client took part: the server knows its
cohort, so against the server the guarantee is the un-subsampled one over the rounds the
client was in (`sample_rate=1`). The noise level of a sum also tells its number of survivors.

Modular wrap (`wrap_probability`): the centred sum leaves [-m/2, m/2) only if, in some of the
d' coordinates, |data| + |rounding| + |noise| > m/2 - 1. The data bound is deterministic: a
coordinate of the rotated sum of n clipped updates is at most its norm, n*gamma*C, whatever the
updates and the seed (clients see the public seed before encoding, so a rotation-based bound
would not hold against one who aligns its update with a coordinate). Rounding moves each
client's coordinate by < 1, so by < n in all. The summed noise (variance V = n*v) obeys
Bernstein's bound P(|X| >= a) <= 2 exp(-a**2 / (2 (V + a/3))) (a Skellam is a limit of sums of
independent steps in {-1, 0, 1}); a union bound over the d' coordinates with
a = m/2 - 1 - n - n*gamma*C is the stated probability. `calibrate` picks the largest gamma
whose bound at max_clients stays <= `WRAP_PROBABILITY`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

WRAP_PROBABILITY = 1e-9  # the most chance `calibrate` accepts that a coordinate of a sum wraps
BETA = math.exp(-0.5)  # conditional rounding's bound fails with prob. <= beta per attempt
MAX_ROUNDING_ATTEMPTS = 1000  # each attempt fails w.p. <= beta ~ 0.61: 1000 never all fail
# numpy's Poisson sampler (PTRS, in float64) keeps its variance up to here; at rate 1e16 it
# drew 42% too much variance, at 1e15 3.5% (measured): `calibrate` keeps each rate below this.
MAX_POISSON_RATE = 2.0**36
RDP_ORDERS = tuple(range(2, 257))  # integer orders: the subsampling bound needs them
_MIN_MODULUS, _MAX_MODULUS = 2**8, 2**32  # secure aggregation's arithmetic is on uint32


@dataclass(frozen=True)
class DistributedParams:
    """Everything both sides derive from a round's settings (see `calibrate`)."""

    clip_norm: float  # C: each update's L2 bound, original units
    noise_multiplier: float  # z: t survivors' noise std is z * l2_bound per coordinate (scaled)
    dims: int  # d: the update's length
    padded_dims: int  # d': the next power of 2 (Hadamard rotation)
    threshold: int  # t: fewest clients whose vectors can be in an unmasked sum
    max_clients: int  # n_max: most clients one sum can hold
    modulus: int  # m: the group size, a power of 2
    scale: float  # gamma: update * gamma before rounding
    l2_bound: float  # Delta_2 of a rounded vector (scaled units)
    l1_bound: float  # Delta_1 <= min(sqrt(d') * Delta_2, Delta_2**2)
    client_variance: float  # per-coordinate Skellam variance each client adds
    beta: float = BETA  # conditional rounding's failure probability per attempt

    @property
    def sensitivity_inflation(self) -> float:
        """Delta_2 / (gamma * C): how much rounding inflates the sensitivity (1 = none)."""
        return self.l2_bound / (self.scale * self.clip_norm)

    def noise_std(self, survivors: int) -> float:
        """Per-coordinate std, in original units, of the noise in a sum of `survivors` vectors."""
        return math.sqrt(survivors * self.client_variance) / self.scale


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_positive(value: object) -> bool:
    return (isinstance(value, int | float | np.number) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def _settings_problem(clip_norm: object, noise_multiplier: object, dims: object,
                      threshold: object, max_clients: object, modulus: object,
                      beta: object) -> str | None:
    """What is wrong with the settings `calibrate` is given, or None."""
    if not _is_positive(clip_norm):
        return f"clip_norm must be a positive finite number (the L2 bound C), got {clip_norm!r}"
    if not _is_positive(noise_multiplier):
        return (f"noise_multiplier must be a positive finite number (without noise there is no "
                f"differential privacy; around 1.0 is a common start), got {noise_multiplier!r}")
    if not _is_int(dims) or dims < 1:
        return f"dims must be a positive integer (the update's length), got {dims!r}"
    if not _is_int(threshold) or threshold < 1:
        return f"threshold must be a positive integer (fewest clients in a sum), got {threshold!r}"
    if not _is_int(max_clients) or max_clients < threshold:
        return (f"max_clients must be an integer >= threshold = {threshold} (a sum holds at "
                f"least t and at most n_max clients), got {max_clients!r}")
    if (not _is_int(modulus) or not _MIN_MODULUS <= modulus <= _MAX_MODULUS
            or modulus & (modulus - 1)):
        return (f"modulus must be a power of 2 between 2**8 and 2**32 (secure aggregation "
                f"sums in uint32), got {modulus!r}")
    if not _is_positive(beta) or beta >= 1:
        return f"beta must be in (0, 1) (e.g. exp(-0.5)), got {beta!r}"
    return None


def _rounding_l2_bound(scaled_clip: float, padded_dims: int, beta: float) -> float:
    """KLS21's bound on the rounded vector's norm: min(c^2 + d'/4 + sqrt(2 ln(1/beta)) *
    (c + sqrt(d')/2), (c + sqrt(d'))^2) under the square root, c = gamma * C."""
    c, d = scaled_clip, padded_dims
    squared = min(c * c + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (c + math.sqrt(d) / 2),
                  (c + math.sqrt(d)) ** 2)
    return math.sqrt(squared)


def derive_params(clip_norm: float, noise_multiplier: float, dims: int, threshold: int,
                  max_clients: int, modulus: int, beta: float, scale: float) -> DistributedParams:
    """The parameters that follow from the settings and a scale gamma (unchecked: `calibrate`
    checks and picks gamma; a client can derive the rest from a server's settings itself)."""
    padded = 1 << (dims - 1).bit_length()
    l2 = _rounding_l2_bound(scale * clip_norm, padded, beta)
    return DistributedParams(
        clip_norm=float(clip_norm), noise_multiplier=float(noise_multiplier), dims=int(dims),
        padded_dims=padded, threshold=int(threshold), max_clients=int(max_clients),
        modulus=int(modulus), scale=float(scale), l2_bound=l2,
        l1_bound=min(math.sqrt(padded) * l2, l2 * l2),
        client_variance=(noise_multiplier * l2) ** 2 / threshold, beta=float(beta))


def wrap_probability(params: DistributedParams, num_clients: int) -> float:
    """The stated bound on the chance that any coordinate of the centred sum of `num_clients`
    vectors leaves [-modulus/2, modulus/2) (then the decoded sum is wrong there), for any
    updates within the clip norm and any rotation seed."""
    if not _is_int(num_clients) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    n = num_clients
    margin = params.modulus / 2 - 1 - n - n * params.scale * params.clip_norm
    if margin <= 0:
        return 1.0
    variance = n * params.client_variance
    log_tail = math.log(2 * params.padded_dims) - margin * margin / (2 * (variance + margin / 3))
    return math.exp(min(0.0, log_tail))


def calibrate(clip_norm: float, noise_multiplier: float, dims: int, threshold: int,
              max_clients: int, modulus: int = 2**32, beta: float = BETA,
              max_wrap_probability: float = WRAP_PROBABILITY) -> DistributedParams:
    """The parameters with the largest scale gamma whose sum of `max_clients` vectors wraps
    with probability <= `max_wrap_probability` (the bound of `wrap_probability`) and whose
    noise the sampler draws exactly (Poisson rates <= `MAX_POISSON_RATE`).

    Raises ValueError naming the setting when a value is invalid or no gamma fits.
    """
    problem = _settings_problem(clip_norm, noise_multiplier, dims, threshold, max_clients,
                                modulus, beta)
    if problem:
        raise ValueError(f"Distributed DP: {problem}.")
    if not 0 < max_wrap_probability < 1:
        raise ValueError(f"max_wrap_probability must be in (0, 1), got {max_wrap_probability!r}")

    def fits(scale: float) -> bool:
        p = derive_params(clip_norm, noise_multiplier, dims, threshold, max_clients, modulus, beta,
                    scale)
        return (p.client_variance / 2 <= MAX_POISSON_RATE
                and wrap_probability(p, max_clients) <= max_wrap_probability)

    low = 1e-6 / clip_norm  # gamma * C this small: the rounding, not the data, sets the noise
    if not fits(low):
        raise ValueError(
            f"Distributed DP: no scale fits {max_clients} clients' noised vectors of {dims} "
            f"values in modulus {modulus} (the sum would wrap with probability above "
            f"{max_wrap_probability:g}). Lower max_clients or noise_multiplier "
            f"({noise_multiplier:g}), raise threshold ({threshold}), or use a larger modulus.")
    high = low
    while fits(high * 2):
        high *= 2
    high *= 2
    for _ in range(60):  # log-space bisection: gamma to ~1e-6 relative
        mid = math.sqrt(low * high)
        low, high = (mid, high) if fits(mid) else (low, mid)
        if high / low < 1 + 1e-6:
            break
    return derive_params(clip_norm, noise_multiplier, dims, threshold, max_clients, modulus, beta,
                   low)


def params_problem(params: object, *, dims: int | None = None,
                   min_noise_multiplier: float | None = None, min_threshold: int | None = None,
                   max_wrap_probability: float = WRAP_PROBABILITY) -> str | None:
    """What a client should refuse in a server's request, or None when it may obey.

    Checks that the derived values follow from the settings (a server cannot claim a larger
    noise than the variance it asks for, nor a looser rounding bound), that the sum of
    max_clients vectors does not wrap, and the client's own expectations: its update length
    `dims`, and the least noise multiplier and threshold it agreed to.
    """
    if not isinstance(params, DistributedParams):
        return f"expected DistributedParams, got {type(params).__name__}"
    p = params
    problem = _settings_problem(p.clip_norm, p.noise_multiplier, p.dims, p.threshold,
                                p.max_clients, p.modulus, p.beta)
    if problem:
        return problem
    if not _is_positive(p.scale):
        return f"scale must be a positive finite number, got {p.scale!r}"
    expected = derive_params(p.clip_norm, p.noise_multiplier, p.dims, p.threshold, p.max_clients,
                       p.modulus, p.beta, p.scale)
    for name in ("padded_dims", "l2_bound", "l1_bound", "client_variance"):
        got, want = getattr(p, name), getattr(expected, name)
        if not (isinstance(got, int | float) and math.isclose(got, want, rel_tol=1e-9)):
            return f"{name} is {got!r}, but the settings give {want!r}"
    if dims is not None and p.dims != dims:
        return f"dims is {p.dims}, but this client's update has {dims} values"
    if min_noise_multiplier is not None and p.noise_multiplier < min_noise_multiplier:
        return (f"noise_multiplier {p.noise_multiplier:g} is below the {min_noise_multiplier:g} "
                "this client agreed to")
    if min_threshold is not None and p.threshold < min_threshold:
        return f"threshold {p.threshold} is below the {min_threshold} this client agreed to"
    if p.client_variance / 2 > MAX_POISSON_RATE:
        return (f"client_variance {p.client_variance:g} needs Poisson rates above "
                f"{MAX_POISSON_RATE:g}, where the sampler is inexact: the scale is too large")
    wrap = wrap_probability(p, p.max_clients)
    if wrap > max_wrap_probability:
        return (f"a sum of {p.max_clients} vectors would wrap with probability {wrap:.3g} "
                f"(above {max_wrap_probability:g}): the scale {p.scale:g} is too large")
    return None


def _signs(rotation_seed: bytes, padded_dims: int) -> np.ndarray:
    if not isinstance(rotation_seed, bytes) or len(rotation_seed) < 8:
        raise ValueError("rotation_seed must be at least 8 bytes of the round's public "
                         f"randomness, got {rotation_seed!r:.40}")
    rng = np.random.default_rng(int.from_bytes(rotation_seed, "big"))
    return rng.integers(0, 2, size=padded_dims).astype(np.float64) * 2 - 1


def _hadamard(x: np.ndarray) -> np.ndarray:
    """The normalised Walsh-Hadamard transform of a power-of-2-long vector (its own inverse)."""
    n = x.shape[0]
    y = x.astype(np.float64, copy=True)
    h = 1
    while h < n:
        y = y.reshape(-1, 2, h)
        y = np.concatenate([y[:, 0] + y[:, 1], y[:, 0] - y[:, 1]], axis=1)
        h *= 2
    return y.reshape(n) / math.sqrt(n)


def rotate(vector: np.ndarray, rotation_seed: bytes) -> np.ndarray:
    """H D x: random signs from the seed, then the normalised Hadamard transform."""
    return _hadamard(vector * _signs(rotation_seed, vector.shape[0]))


def unrotate(vector: np.ndarray, rotation_seed: bytes) -> np.ndarray:
    """D H y, the inverse of `rotate` (H and D are orthogonal and symmetric)."""
    return _hadamard(vector) * _signs(rotation_seed, vector.shape[0])


def conditional_round(x: np.ndarray, l2_bound: float, rng: np.random.Generator) -> np.ndarray:
    """Round each coordinate up with probability equal to its fractional part, retrying until
    the result's L2 norm is <= `l2_bound` (so the sensitivity holds always, not w.h.p.)."""
    floor = np.floor(x)
    fraction = x - floor
    base = floor.astype(np.int64)
    limit = math.floor(l2_bound * l2_bound)
    for _ in range(MAX_ROUNDING_ATTEMPTS):
        rounded = base + (rng.random(x.shape[0]) < fraction)
        if int(rounded @ rounded) <= limit:
            return rounded
    raise RuntimeError(f"conditional rounding found no vector of norm <= {l2_bound:g} in "
                       f"{MAX_ROUNDING_ATTEMPTS} attempts: the norm before rounding is "
                       f"{float(np.linalg.norm(x)):g}, above the clip the bound was set for")


def skellam(variance: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """Symmetric Skellam noise: Poisson(v/2) - Poisson(v/2), variance v per coordinate."""
    rate = variance / 2
    if rate > MAX_POISSON_RATE:
        raise ValueError(f"Skellam variance {variance:g} is above what the sampler draws "
                         f"exactly ({2 * MAX_POISSON_RATE:g}): calibrate a smaller scale")
    return rng.poisson(rate, size) - rng.poisson(rate, size)


def client_encode(update: Sequence[np.ndarray], params: DistributedParams,
                  rotation_seed: bytes, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """The client's noised vector (int64 in [0, modulus), length padded_dims), and whether
    clipping scaled the update down. `rng` is the client's private noise source."""
    values = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in update])
    if values.shape[0] != params.dims:
        raise ValueError(f"the update has {values.shape[0]} values, the round's parameters "
                         f"expect dims = {params.dims}")
    if not np.all(np.isfinite(values)):
        raise ValueError("the update holds NaN or infinite values: it cannot be clipped")
    norm = float(np.linalg.norm(values))
    clipped = norm > params.clip_norm
    if clipped:
        values *= params.clip_norm / norm
    padded = np.zeros(params.padded_dims)
    padded[:params.dims] = values * params.scale
    rounded = conditional_round(rotate(padded, rotation_seed), params.l2_bound, rng)
    noised = rounded + skellam(params.client_variance, params.padded_dims, rng)
    return np.mod(noised, params.modulus), clipped


def server_decode(total: np.ndarray, params: DistributedParams,
                  rotation_seed: bytes) -> np.ndarray:
    """The noised sum of the clipped updates (float64, length dims, original units) from the
    sum modulo `modulus` of the clients' vectors (any integer dtype)."""
    total = np.asarray(total)
    if total.shape != (params.padded_dims,) or not np.issubdtype(total.dtype, np.integer):
        raise ValueError(f"the sum must be an integer vector of length padded_dims = "
                         f"{params.padded_dims}, got {total.dtype}{list(total.shape)}")
    if np.issubdtype(total.dtype, np.unsignedinteger):  # uint64 above 2**63 would not fit int64
        reduced = (total.astype(np.uint64) & np.uint64(params.modulus - 1)).astype(np.int64)
    else:
        reduced = np.mod(total.astype(np.int64), params.modulus)
    centred = np.where(reduced >= params.modulus // 2, reduced - params.modulus, reduced)
    return unrotate(centred.astype(np.float64), rotation_seed)[:params.dims] / params.scale


def skellam_rdp(l2: float, l1: float, variance: float, orders: Sequence[float]) -> np.ndarray:
    """AKL21 Thm. 3.5's RDP of the Skellam mechanism at each order, with `variance` the
    per-coordinate variance of the noise (= twice each Poisson's rate)."""
    a = np.asarray(orders, dtype=np.float64)
    mu = float(variance)
    return a * l2 * l2 / (2 * mu) + np.minimum(((2 * a - 1) * l2 * l2 + 6 * l1) / (4 * mu * mu),
                                                3 * l1 / (2 * mu))


def round_rdp(params: DistributedParams, survivors: int,
              orders: Sequence[float] = RDP_ORDERS) -> np.ndarray:
    """RDP of one round whose unmasked sum holds `survivors` clients' noise shares."""
    if not _is_int(survivors) or survivors < 1:
        raise ValueError(f"survivors must be a positive integer, got {survivors!r}")
    return skellam_rdp(params.l2_bound, params.l1_bound, survivors * params.client_variance,
                       orders)


def _log_binomials(top: int) -> np.ndarray:
    """log C(a, l) for 0 <= l <= a <= top (-inf above the diagonal)."""
    log_factorial = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, top + 1)))])
    a, k = np.arange(top + 1)[:, None], np.arange(top + 1)[None, :]
    with np.errstate(invalid="ignore"):
        table = log_factorial[a] - log_factorial[k] - log_factorial[np.maximum(a - k, 0)]
    return np.where(k <= a, table, -np.inf)


def subsampled_rdp(rdp_of_order: Callable[[int], float] | Sequence[float], sample_rate: float,
                   orders: Sequence[int] = RDP_ORDERS) -> np.ndarray:
    """RDP, at each integer order a, of a mechanism run on a Poisson sample (rate q) of clients,
    for any mechanism whose RDP is eps(l) in both directions (P||Q and Q||P).

    Neighbours give the mixture M = (1-q) Q + q P against Q, both ways; with r = P/Q:
    - D_a(M||Q): E_Q[(1 - q + q r)^a] = sum_l C(a,l) (1-q)^(a-l) q^l e^((l-1) eps_l) (every
      coefficient is positive, so eps_l's upper bounds give an upper bound; the Gaussian's
      exact value when eps is the Gaussian's, Mironov et al. 2019);
    - D_a(Q||M): E_Q[g(u)] with g(u) = (1 + u)^-(a-1), u = q (r - 1) >= -q. For u >= 0,
      g(u) <= 1 - (a-1) u + C(a,2) u^2 (Taylor, the cubic remainder is negative); on
      [-q, 0), g(u) - 1 + (a-1) u is a power series in -u with positive coefficients, so it
      is <= c u^2 with c = ((1-q)^-(a-1) - 1 - (a-1) q) / q^2 >= C(a,2). With E_Q[u] = 0
      and E_Q[u^2] = q^2 (e^eps_2 - 1): E_Q[g] <= 1 + ((1-q)^-(a-1) - 1 - (a-1) q) (e^eps_2 - 1).
    The result is the smaller of max(those two) and Zhu & Wang 2019's general bound (Thm. 6:
    the first sum with the l >= 3 terms tripled), capped by eps(a) itself (sampling never
    hurts). `rdp_of_order` is a function of the order, or the values at `orders`, which must
    then hold every integer from 2 up.
    """
    order_list = [int(a) for a in orders]
    if any(a != b or a < 2 for a, b in zip(order_list, orders, strict=True)):
        raise ValueError(f"orders must be integers >= 2, got {list(orders)[:5]}...")
    top = max(order_list)
    if callable(rdp_of_order):
        eps = {a: float(rdp_of_order(a)) for a in range(2, top + 1)}
    else:
        eps = dict(zip(order_list, (float(e) for e in rdp_of_order), strict=True))
        missing = sorted(set(range(2, top + 1)) - eps.keys())
        if missing:
            raise ValueError(f"rdp values are needed at every integer order from 2; missing "
                             f"{missing[:5]}: pass a function of the order instead")
    if not (isinstance(sample_rate, int | float) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    unsampled = np.array([eps[a] for a in order_list])
    q = float(sample_rate)
    if q == 1:
        return unsampled
    a = np.array(order_list, dtype=np.float64)
    ls = np.arange(top + 1, dtype=np.float64)
    # (l - 1) eps_l, with E_Q[r^0] = E_Q[r^1] = 1.
    moment = np.array([0.0, 0.0] + [(k - 1) * eps[k] for k in range(2, top + 1)])
    terms = (_log_binomials(top)[order_list] + ls * math.log(q)
             + (a[:, None] - ls) * math.log1p(-q) + moment)  # -inf where l > a
    removal = np.logaddexp.reduce(terms, axis=1)
    tripled = np.where(ls >= 3, math.log(3), 0.0)
    zhu_wang = np.logaddexp.reduce(terms + tripled, axis=1)
    with np.errstate(over="ignore"):  # an infinite bound is still a bound (the min drops it)
        second = np.expm1(eps[2])
        addition = np.log1p(((1 - q) ** -(a - 1) - 1 - (a - 1) * q) * second)
    bound = np.minimum(np.maximum(removal, addition), zhu_wang) / (a - 1)
    return np.minimum(bound, unsampled)


@lru_cache(maxsize=256)
def _subsampled_round(params: DistributedParams, survivors: int, sample_rate: float,
                      orders: tuple[int, ...]) -> np.ndarray:
    curve = round_rdp(params, survivors, range(2, max(orders) + 1))
    return subsampled_rdp(curve, sample_rate, orders)


def epsilon_spent(params: DistributedParams, survivors_per_round: Sequence[int],
                  sample_rate: float, delta: float) -> float:
    """epsilon at `delta` after rounds whose sums held these many clients' noise each.

    Rounds compose by adding RDP; dp_accounting converts the total to (epsilon, delta). Use
    sample_rate = 1 (and the rounds the client took part in) for the guarantee against the
    server, which knows the cohort; q < 1 holds against those who see only the models.
    """
    if not (isinstance(delta, float | int) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if not survivors_per_round:
        return 0.0
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    total = np.zeros(len(RDP_ORDERS))
    for survivors in survivors_per_round:
        if not _is_int(survivors) or survivors < 1:
            raise ValueError(f"each round's survivors must be a positive integer, got "
                             f"{survivors!r}")
        total += _subsampled_round(params, int(survivors), float(sample_rate), RDP_ORDERS)
    return float(compute_epsilon(RDP_ORDERS, total, delta)[0])


# ------------------------------------------------------------------------------------------
# The server's account of a run whose noise the clients add (DPNoise with
# secagg.noise=distributed): which rounds released what noise, and so what epsilon.
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientNoise:
    """How the clients noised one round's secure sum: the `survivors` whose vectors (and so
    noise) are in it, the threshold `t` they calibrated for, and the `cohort` the round's
    scale allowed for (calibrate's max_clients)."""

    survivors: tuple[int, ...]  # their node ids
    threshold: int
    cohort: int


class DistributedAccount:
    """epsilon of the rounds released so far, from the noise their survivors actually added.

    `epsilon` (Poisson-subsampled at rate q) is the guarantee of the released models, the one
    `max_epsilon` budgets, as for central DP. `epsilon_vs_server` is the guarantee against
    the server, which knows each cohort: no subsampling, over the rounds the most exposed
    client survived. A round that released nothing (skipped) or the round a budget check looks
    ahead to counts at the least noise a completed round can carry: t survivors of t.
    """

    def __init__(self, clip_norm: float, noise_multiplier: float, dims: int,
                 sample_rate: float, delta: float, modulus: int, expected_cohort: int) -> None:
        self.settings = (float(clip_norm), float(noise_multiplier), int(dims), int(modulus))
        self.sample_rate, self.delta = float(sample_rate), float(delta)
        self.expected_cohort = int(expected_cohort)
        self.rounds: list[ClientNoise | None] = []
        self._params(self.expected_cohort, self.expected_cohort)  # refuse bad settings now

    def _params(self, threshold: int, cohort: int) -> DistributedParams:
        return _calibrated(*self.settings, int(threshold), int(cohort))

    def _rounds_rdp(self, rounds: Sequence[ClientNoise | None], rate: float) -> np.ndarray:
        total = np.zeros(len(RDP_ORDERS))
        for noised in rounds:
            if noised is None:  # the least noise a completed round carries
                n = t = cohort = self.expected_cohort
            else:
                n, t, cohort = len(noised.survivors), noised.threshold, noised.cohort
            total += _subsampled_round(self._params(t, cohort), n, rate, RDP_ORDERS)
        return total

    def _epsilon(self, rdp: np.ndarray) -> float:
        if not rdp.any():
            return 0.0
        from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

        return float(compute_epsilon(RDP_ORDERS, rdp, self.delta)[0])

    def record(self, noised: ClientNoise | None) -> None:
        """Account one released round (None: a round that released nothing but counts)."""
        self.rounds.append(noised)

    def epsilon(self, lookahead: int = 0) -> float:
        """epsilon of the released models after the recorded rounds (and `lookahead` more at
        the least noise)."""
        return self._epsilon(self._rounds_rdp([*self.rounds, *[None] * lookahead],
                                              self.sample_rate))

    def epsilon_vs_server(self) -> float:
        """The largest epsilon of one client against the server: its rounds, unsampled."""
        taken: dict[int, list[ClientNoise]] = {}
        for noised in self.rounds:
            for node in () if noised is None else noised.survivors:
                taken.setdefault(node, []).append(noised)
        patterns = {tuple(id(r) for r in rounds): rounds for rounds in taken.values()}
        return max((self._epsilon(self._rounds_rdp(rounds, 1.0))
                    for rounds in patterns.values()), default=0.0)

    def check_budget(self, max_epsilon: float, num_clients: int) -> None:
        """Raise PrivacyBudgetExhausted when one more round could take epsilon above
        `max_epsilon` (the next round counted at the least noise it can carry)."""
        from fl_app.privacy.accounting import PrivacyBudgetExhausted

        after = self.epsilon(lookahead=1)
        if after > max_epsilon:
            raise PrivacyBudgetExhausted(
                f"Privacy budget exhausted after {len(self.rounds)} round(s) of distributed "
                f"DP: epsilon is {self.epsilon():.4g} now and could be {after:.4g} after the "
                f"next, above max_epsilon = {max_epsilon:g} (delta = {self.delta:g}). For more "
                f"rounds raise noise_multiplier (now {self.settings[1]:g}), lower "
                f"fraction_train (now {self.sample_rate:g}), train with more clients "
                f"(num_clients, now {num_clients}), or raise max_epsilon.")

    def last_metrics(self) -> dict[str, float]:
        """The last round's noise, for its metrics row."""
        last = self.rounds[-1] if self.rounds else None
        metrics = {"epsilon-vs-server": self.epsilon_vs_server()}
        if last is not None:
            params = self._params(last.threshold, last.cohort)
            metrics |= {"noise-survivors": len(last.survivors),
                        "noise-threshold": last.threshold,
                        "noise-std": params.noise_std(len(last.survivors))}
        return metrics

    def state(self) -> list:
        """The rounds as JSON-able lists (a checkpoint's): [survivor ids, t, cohort] or []."""
        return [[] if r is None else [list(r.survivors), r.threshold, r.cohort]
                for r in self.rounds]

    def load_state(self, state: Sequence) -> None:
        """Restore what `state` returned."""
        self.rounds = [None if not r else ClientNoise(tuple(int(i) for i in r[0]), int(r[1]),
                                                      int(r[2])) for r in state]


@lru_cache(maxsize=256)
def _calibrated(clip_norm: float, noise_multiplier: float, dims: int, modulus: int,
                threshold: int, cohort: int) -> DistributedParams:
    return calibrate(clip_norm, noise_multiplier, dims, threshold, cohort, modulus)
