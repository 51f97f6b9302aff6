"""The `secagg` config group: its settings, the checks a run is refused on, and each round's
share plan (how many shares, how many needed to rebuild a secret).

No torch imports: `fl_app.config` checks these at compose time, and a strategy's own features
(fl_app.strategies.features) say whether secure aggregation can serve it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from fl_app.strategies import features

NAMES = ("none", "secaggplus")
# Who adds central DP's noise: the server to the unmasked sum ("central"), or each client to
# its own vector before masking, so that the unmasked sum is already noised ("distributed",
# fl_app.privacy.distributed).
NOISE_MODES = ("central", "distributed")

# The smallest ring: with k = num_shares share holders (the client itself included) a plan
# must satisfy 2t >= k + 2 (below) and should survive a dropout (t <= k - 1): k = 5, t = 4.
MIN_RING_SHARES = 5
# Share holders of one client that may collude with the server without it learning that
# client's update. A server that lies about who dropped asks some holders for the shares of
# the private mask seed b and the others for those of the key sk1; each honest holder reveals
# one of the two. With c colluding holders it gets both iff (k - c) + 2c >= 2t, so a plan is
# safe against c colluders iff 2t > k + c (Bell et al. 2020's condition that an honest
# client's corrupted neighbours stay below 2t - k). One colluder is the minimum we accept.
MIN_COLLUDERS = 1
# Compose time warns when Poisson sampling skips more rounds than this (see skip_chance).
SKIP_WARNING = 0.01

class SecAggError(RuntimeError):
    """Secure aggregation cannot complete a round (too few clients left, or bad protocol data);
    the message says which stage, what was missing and what to change."""


@dataclass(frozen=True)
class SecAggSettings:
    """The protocol's settings (see conf/secagg/secaggplus.yaml)."""

    num_shares: int | None = None
    reconstruction_threshold: float | int = 0.67
    clipping_range: float = 8.0
    quantization_range: int = 2**22
    modulus_range: int = 2**32
    max_weight: float = 1000.0
    timeout: float | None = None
    noise: str = "central"

    @classmethod
    def from_config(cls, section: Mapping) -> SecAggSettings:
        return cls(**{k: section[k] for k in cls.__dataclass_fields__ if k in section})

    @property
    def step(self) -> float:
        """Δ = 2c / Q: one quantization level; stochastic rounding errs by less than Δ."""
        return 2 * self.clipping_range / self.quantization_range


def min_threshold(shares: int) -> int:
    """The smallest safe threshold for `shares` holders: 2t >= k + MIN_COLLUDERS + 1."""
    return -(-(shares + MIN_COLLUDERS + 1) // 2)


def colluders_tolerated(shares: int, threshold: int) -> int:
    """How many of a client's share holders can collude with a lying server and still not
    rebuild both of its secrets: the largest c with 2t > k + c."""
    return 2 * threshold - shares - 1


def plan_problem(shares: object, threshold: object) -> str | None:
    """Why a share plan (t of k) is unsafe or impossible (None: it is fine). Both sides ask:
    the server before it sends the plan, each client before it shares its secrets."""
    if not (_is_int(shares) and _is_int(threshold)) or shares < 2:
        return (f"the share plan must be two integers, k >= 2 shares and a threshold t; got "
                f"k={shares!r}, t={threshold!r}")
    if not min_threshold(shares) <= threshold <= shares:
        return (f"a threshold of {threshold} of {shares} shares is unsafe or impossible: it must "
                f"be in [{min_threshold(shares)}, {shares}], so that 2t > k + "
                f"{MIN_COLLUDERS} (above half of num_shares, plus {MIN_COLLUDERS} colluding "
                "client: else a server that lies about dropouts rebuilds both secrets of a "
                "client) and t <= k")
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def settings_problem(s: SecAggSettings) -> str | None:
    """What is wrong with the settings on their own (None: nothing)."""
    t = s.reconstruction_threshold
    checks = [
        ("num_shares", s.num_shares is None or (
            _is_int(s.num_shares) and s.num_shares >= MIN_RING_SHARES),
         f"null (every sampled client) or an integer >= {MIN_RING_SHARES} (a smaller ring lets "
         "the server and a client's few neighbours rebuild its secrets)"),
        ("reconstruction_threshold", (_is_int(t) and t >= 2) or (
            isinstance(t, float) and 0.5 < t <= 1),
         "an integer >= 2 or a fraction of num_shares in (0.5, 1]"),
        ("clipping_range", isinstance(s.clipping_range, int | float)
         and math.isfinite(s.clipping_range) and s.clipping_range > 0, "a number > 0"),
        ("quantization_range", _is_int(s.quantization_range) and s.quantization_range >= 2,
         "an integer >= 2"),
        ("modulus_range", _is_int(s.modulus_range) and s.modulus_range > s.quantization_range
         and s.modulus_range <= 2**32 and bin(s.modulus_range).count("1") == 1,
         "a power of 2 above quantization_range and at most 2**32"),
        ("max_weight", isinstance(s.max_weight, int | float) and math.isfinite(s.max_weight)
         and s.max_weight > 0, "a finite number > 0"),
        # A weight num_examples / max_weight is sent as a multiple of 1/quantization_range: a
        # coarser grid rounds a small client's weight, or every weight, to 0 (a sum / 0).
        ("quantization_range", s.quantization_range >= s.max_weight,
         f"an integer >= max_weight = {s.max_weight:g}, so that a client of one example "
         "weighs at least one quantization step"),
        ("noise", s.noise in NOISE_MODES, " or ".join(NOISE_MODES)),
        ("timeout", s.timeout is None or (isinstance(s.timeout, int | float) and s.timeout > 0),
         "null (round_timeout) or > 0 seconds"),
    ]
    for key, ok, expected in checks:
        if not ok:
            return f"secagg.{key}={getattr(s, key)} is invalid: it must be {expected}."
    return None


def share_plan(s: SecAggSettings, num_sampled: int) -> tuple[int, int]:
    """(shares per secret k, threshold t) for a round of `num_sampled` clients; ValueError
    saying what to change when the cohort cannot be aggregated securely."""
    if num_sampled < 2:
        raise ValueError(f"secure aggregation needs at least 2 clients per round, the round "
                         f"samples {num_sampled}: raise fraction_train or min_clients.")
    # A cohort smaller than num_shares (Poisson sampling varies) shares with every client.
    shares = min(num_sampled, s.num_shares or num_sampled)
    if shares < num_sampled and shares % 2 == 0:
        raise ValueError(f"secagg.num_shares={shares} must be odd when below the cohort "
                         f"({num_sampled}): each client shares with (k-1)/2 ring neighbours "
                         "on either side.")
    t = s.reconstruction_threshold
    # A fraction is rounded up, and never below the safe minimum (small Poisson cohorts).
    threshold = (max(min_threshold(shares), math.ceil(t * shares)) if isinstance(t, float)
                 else t)
    if problem := plan_problem(shares, threshold):
        raise ValueError(f"secagg.reconstruction_threshold={t}: {problem}.")
    if num_sampled * s.quantization_range >= s.modulus_range:
        raise ValueError(
            f"{num_sampled} clients x secagg.quantization_range={s.quantization_range} reach "
            f"secagg.modulus_range={s.modulus_range}: the sum would wrap around. Lower "
            "quantization_range (coarser steps) or sample fewer clients per round.")
    return shares, threshold


def config_problem(cfg: Mapping) -> str | None:
    """Why a composed run config cannot use its `secagg` setting (None: it can).

    The cohort-size checks need num_clients; with num_clients=null they run each round."""
    section = cfg.get("secagg") or {}
    name = section.get("name", "none")
    if name not in NAMES:
        return f"secagg.name={name} is invalid: it must be one of {', '.join(NAMES)}."
    if name == "none":
        return None
    strategy = cfg["strategy"]
    short = str(strategy["_target_"]).rsplit(".", 1)[-1]
    supports = features.of_config(strategy)
    if (why := supports["needs_each_update"]) is not None:
        return (f"secagg=secaggplus cannot run with strategy {short}: {why}, and secure "
                "aggregation reveals only the sum. Use fedavg, fedsgd, fedprox, fedadam, "
                "fedyogi, dp_fedavg or dp_fedsgd, or secagg=none.")
    central_dp = supports["central_dp"]
    if section.get("noise", "central") == "distributed" and not central_dp:
        return (f"secagg.noise=distributed makes each client add its share of central DP's "
                f"noise, but strategy {short} adds no DP noise: use strategy=dp_fedavg or "
                "dp_fedsgd, or secagg.noise=central.")
    if central_dp and strategy.get("clipping", "fixed") != "fixed":
        return ("secagg=secaggplus cannot run with adaptive clipping (dp_fedavg_adaptive): it "
                "counts on the server the updates whose norm is below C, which needs each "
                "update's norm, and secure aggregation reveals only the sum. Use "
                "strategy.clipping=fixed, or secagg=none.")
    if cfg.get("client_pool") is not None:
        return ("secagg=secaggplus needs one SuperNode per client (each holds its own keys "
                "for the round), but client_pool serves several clients per node: set "
                "client_pool=null.")
    settings = SecAggSettings.from_config(section)
    if problem := settings_problem(settings):
        return problem
    if central_dp and settings.clipping_range < float(strategy["clip_norm"]):
        return (f"secagg.clipping_range={settings.clipping_range} is below strategy.clip_norm="
                f"{strategy['clip_norm']}: a clipped update's coordinates reach clip_norm, "
                "so raise clipping_range to at least clip_norm.")
    if cfg.get("num_clients"):
        try:
            share_plan(settings, expected_cohort(cfg))
        except ValueError as err:
            return str(err)
    return None


def expected_cohort(cfg: Mapping) -> int:
    """The clients a round samples: Flower's and fl_app's fraction rule, or for central DP's
    Poisson sampling the expected q·N (rounds then vary around it)."""
    n, fraction = int(cfg["num_clients"]), float(cfg["fraction_train"])
    if features.of_config(cfg["strategy"])["central_dp"]:
        return max(round(n * fraction), 1)
    return min(n, max(int(n * fraction), int(cfg["min_clients"])))


def can_aggregate(s: SecAggSettings, num_sampled: int) -> bool:
    """Whether a cohort of `num_sampled` clients has a safe share plan."""
    try:
        share_plan(s, num_sampled)
    except ValueError:
        return False
    return True


def skip_chance(s: SecAggSettings, num_clients: int, rate: float) -> float:
    """The chance that a Poisson-sampled round (each of `num_clients` in with probability
    `rate`) draws a cohort of 1 or more clients without a safe share plan: such a round is
    skipped. (An empty cohort is not skipped: central DP releases its noise.)"""
    return sum(math.comb(num_clients, j) * rate**j * (1 - rate) ** (num_clients - j)
               for j in range(1, num_clients + 1) if not can_aggregate(s, j))


def config_warning(cfg: Mapping) -> str | None:
    """A compose-time warning for a valid config (None: nothing to say): with central DP's
    Poisson sampling, how often a round samples too few clients to aggregate securely."""
    section = cfg.get("secagg") or {}
    strategy = cfg["strategy"]
    if (section.get("name", "none") == "none" or not cfg.get("num_clients")
            or not features.of_config(strategy)["central_dp"]):
        return None
    n, q = int(cfg["num_clients"]), float(cfg["fraction_train"])
    chance = skip_chance(SecAggSettings.from_config(section), n, q)
    if chance <= SKIP_WARNING:
        return None
    return (f"secagg with Poisson sampling (q=fraction_train={q:g} of {n} clients): a round "
            f"samples too few clients for a safe share plan with chance {chance:.1%}, about "
            f"{chance * int(cfg['num_rounds']):.1f} of num_rounds={cfg['num_rounds']} rounds. "
            "Such a round is skipped (model unchanged, epsilon still spent): raise "
            "fraction_train or num_clients.")
