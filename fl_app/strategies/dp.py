"""Central, user-level differential privacy (DP-FedAvg, McMahan et al. 2018) around any strategy.

Each round: every connected client is sampled independently with probability q (Poisson
sampling); each usable reply's update (the delta for FedAvg, the gradient for FedSGD: whatever
the inner strategy says the update is) is clipped to L2 norm <= C over all arrays together; the
clipped updates are summed, Gaussian noise N(0, sigma^2 C^2) is added to every coordinate of the
sum, and the sum is divided by the *expected* number of clients m = q * num_clients. Adding or
removing one client changes the sum by at most C, and the fixed denominator means the number of
replies itself reveals nothing, so every round is exactly the sampled Gaussian mechanism that
`accounting.epsilon_spent` accounts for.

With `clipping="adaptive"` C is not fixed: it follows a target quantile of the update norms
(Andrew et al. 2019, `adaptive_clipping.py`) from a noised count of unclipped clients that is
released every round too. `noise_multiplier` is then the multiplier of the two releases together,
the one the accountant is given; the update's own noise is raised to
(sigma^-2 - (2 sigma_b)^-2)^-1/2 so that the pair costs exactly that.

The server is trusted (central DP): it sees individual updates; what is protected is everything
released from it (the global models). The aggregated client metrics it logs (train loss, ...)
are not noised and are not covered by the guarantee.
"""

import math
from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp.grid import Grid
from flwr.serverapp.strategy import Strategy

from fl_app.strategies.accounting import epsilon_spent, update_noise_multiplier
from fl_app.strategies.adaptive_clipping import QuantileClipNorm
from fl_app.strategies.averaging import axpy, update_and_squared_norm
from fl_app.strategies.base import MetricAverager, SampledStrategy

_ROUNDS_DONE = "dp.rounds-done"
_CLIP_NORM = "dp.clip-norm"
CLIPPING_MODES = ("fixed", "adaptive")
_INNER = "inner."


class PrivacyBudgetExhausted(RuntimeError):
    """The next round would push epsilon past `max_epsilon`; the server should stop here."""


def clip_scale(norm: float, clip_norm: float) -> float:
    """min(1, C / ||u||): the factor that brings an update of L2 norm `norm` within C."""
    return 1.0 if norm <= clip_norm else clip_norm / norm


class DPNoise(Strategy):
    """User-level central DP with fixed or adaptive clipping and Poisson sampling.

    Parameters
    ----------
    strategy : the inner strategy (WeightedFedAvg or GradientAveraging). Its `fraction_train`
        is the sampling probability q; its `seed` seeds the sampling.
    clip_norm : C, the L2 bound on each client's whole update (the initial C when adaptive).
    noise_multiplier : sigma, what the accountant is given; the noise std on the sum is
        sigma * C (fixed clipping) or sigma_u * C with the larger sigma_u (adaptive).
    num_clients : the population size N the sampling draws from (the number of SuperNodes,
        or with a client pool the number of clients).
    delta : the DP delta; default 1 / (10 N). Must be below 1 / N.
    max_epsilon : optional budget; `configure_train` raises `PrivacyBudgetExhausted` before a
        round that would exceed it.
    noise_seed : seed of the noise RNG. Leave it None (OS entropy) for real privacy: a known
        seed lets anyone regenerate and subtract the noise. Set it only for tests.
    clipping : "fixed" (C stays clip_norm) or "adaptive" (Andrew et al. 2019).
    target_quantile, clip_lr : adaptive only: gamma, the fraction of updates to leave
        unclipped, and eta, the step of the geometric update C <- C exp(-eta (b~ - gamma)).
    clipped_count_stddev : adaptive only: sigma_b, the noise std on the count of unclipped
        clients; default max(m / 20, sigma) with m = q * num_clients (Andrew et al.: m / 20).
    """

    # Class-level too, so that a strategy checkpointed by an earlier version resumes.
    _next_start = None

    def __init__(
        self,
        strategy: SampledStrategy,
        clip_norm: float,
        noise_multiplier: float,
        num_clients: int,
        delta: float | None = None,
        max_epsilon: float | None = None,
        noise_seed: int | None = None,
        clipping: str = "fixed",
        target_quantile: float = 0.5,
        clip_lr: float = 0.2,
        clipped_count_stddev: float | None = None,
    ) -> None:
        if not isinstance(strategy, SampledStrategy):
            raise TypeError(
                f"DPNoise wraps an fl_app SampledStrategy (WeightedFedAvg or GradientAveraging), "
                f"got {type(strategy).__name__}: it needs update_offset/apply_update."
            )
        if isinstance(num_clients, bool) or int(num_clients) != num_clients or num_clients < 1:
            raise ValueError(
                f"num_clients must be a positive integer (the number of clients sampled from), "
                f"got {num_clients!r}. Set it to the number of SuperNodes / partitions."
            )
        num_clients = int(num_clients)
        if not math.isfinite(clip_norm) or clip_norm <= 0:
            raise ValueError(
                f"clip_norm must be a positive finite number, got {clip_norm!r}. It bounds each "
                "client's update norm; pick it near the typical update norm (e.g. 0.1 - 1.0)."
            )
        if not math.isfinite(noise_multiplier) or noise_multiplier <= 0:
            raise ValueError(
                f"noise_multiplier must be a positive finite number, got {noise_multiplier!r}. "
                "Without noise there is no privacy; use e.g. 1.0 (more noise, smaller epsilon)."
            )
        if delta is None:
            delta = 1.0 / (10 * num_clients)
        if not 0 < delta < 1:
            raise ValueError(
                f"delta must be strictly between 0 and 1, got {delta!r}. Leave it unset for "
                f"the default 1/(10*num_clients) = {1.0 / (10 * num_clients):g}."
            )
        if delta >= 1.0 / num_clients:
            raise ValueError(
                f"delta = {delta:g} is >= 1/num_clients = {1.0 / num_clients:g}: a mechanism "
                "that publishes one client's data outright would satisfy that. Use a delta "
                f"well below 1/num_clients, e.g. {1.0 / (10 * num_clients):g} (the default)."
            )
        if max_epsilon is not None and (not math.isfinite(max_epsilon) or max_epsilon <= 0):
            raise ValueError(
                f"max_epsilon must be a positive finite number or None (no budget), "
                f"got {max_epsilon!r}."
            )
        if not 0 < strategy.fraction_train <= 1:
            raise ValueError(
                f"fraction_train of the wrapped strategy is the client sampling rate q and must "
                f"be in (0, 1], got {strategy.fraction_train!r}."
            )
        # Clients form their own update (a FedAvg client its delta), so the server only clips
        # and sums: a round's critical path reads each reply twice instead of three times.
        strategy.reply_with_updates()
        self.inner = strategy
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.num_clients = num_clients
        self.delta = float(delta)
        self.max_epsilon = None if max_epsilon is None else float(max_epsilon)
        self.sample_rate = float(strategy.fraction_train)
        self.rounds_done = 0
        self.epsilon = 0.0
        self._noise_rng = np.random.default_rng(noise_seed)
        # Where the next release's sum starts, made while the clients train (see _sum_start):
        # (round, C, global model's id, step a, buffer).
        self._next_start: tuple[int, float, int, float | None, dict[str, np.ndarray]] | None = None
        if clipping not in CLIPPING_MODES:
            raise ValueError(f"clipping must be one of {CLIPPING_MODES}, got {clipping!r}.")
        self.clipping = clipping
        self.adaptive_clip: QuantileClipNorm | None = None
        # The multiplier of the update's noise: sigma itself, unless the count shares the budget.
        self.update_noise_multiplier = self.noise_multiplier
        if clipping == "adaptive":
            if clipped_count_stddev is None:
                clipped_count_stddev = max(self.expected_clients / 20, self.noise_multiplier)
            self.adaptive_clip = QuantileClipNorm(
                self.clip_norm, target_quantile, clip_lr, clipped_count_stddev,
                self.expected_clients, self._noise_rng)
            self.update_noise_multiplier = update_noise_multiplier(
                self.noise_multiplier, clipped_count_stddev)

    def use_client_pool(self, population: int) -> None:
        """Sample from `population` clients served by a pool of nodes (see SampledStrategy)."""
        self.inner.use_client_pool(population)

    @property
    def expected_clients(self) -> float:
        """m = q * num_clients: the fixed denominator of the noisy mean."""
        return self.sample_rate * self.num_clients

    @property
    def current(self) -> dict[str, np.ndarray] | None:
        """The inner strategy's current global model."""
        return self.inner.current

    @property
    def last_dropped(self) -> list[str]:
        """Reasons for the replies dropped in the last aggregated round."""
        return self.inner.last_dropped

    def _epsilon_after(self, rounds: int) -> float:
        return epsilon_spent(self.noise_multiplier, self.sample_rate, rounds, self.delta)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Check the budget, then Poisson-sample clients and send them the global model."""
        if self.max_epsilon is not None:
            next_epsilon = self._epsilon_after(self.rounds_done + 1)
            if next_epsilon > self.max_epsilon:
                raise PrivacyBudgetExhausted(
                    f"Privacy budget exhausted after {self.rounds_done} round(s): epsilon is "
                    f"{self.epsilon:.4g} now and would be {next_epsilon:.4g} after round "
                    f"{server_round}, above max_epsilon = {self.max_epsilon:g} "
                    f"(delta = {self.delta:g}). For more rounds within the budget raise "
                    f"noise_multiplier (now {self.noise_multiplier:g}), lower the sampling "
                    f"fraction fraction_train (now {self.sample_rate:g}), train with more "
                    f"clients (num_clients, now {self.num_clients}), or raise max_epsilon."
                )
        # The connected nodes, or with a client pool the population's client ids.
        candidates = self.inner.candidates(grid, self.inner.min_available_nodes)
        if len(candidates) != self.num_clients:
            log(WARNING, "DP: %d clients can be sampled but num_clients = %d; the privacy "
                "accounting and the noise scale assume %d.", len(candidates), self.num_clients,
                self.num_clients)
        # Poisson sampling, as the accountant assumes: each client in with probability q,
        # independently; the cohort size varies from round to round and may be zero.
        rng = np.random.default_rng([self.inner.seed, server_round])
        chosen = [n for n, u in zip(candidates, rng.random(len(candidates)), strict=True)
                  if u < self.sample_rate]
        log(INFO, "configure_train (DP): Poisson-sampled %d of %d clients (q = %g)",
            len(chosen), len(candidates), self.sample_rate)
        messages = self.inner.build_train_messages(server_round, arrays, config, chosen)
        # Drawing N(0, sigma² C²) for every parameter takes as long as averaging ~20 CNN
        # replies; the server is idle until the replies come, so it is drawn now. Same
        # generator, same order: the released model is what drawing it later would give.
        self._next_start = (server_round, self.clip_norm, id(self.inner.current),
                            *self._sum_start(self.clip_norm))
        return messages

    def _draw_noise(self, clip: float) -> dict[str, np.ndarray]:
        """N(0, (sigma_u C)²) / m for every parameter, in the model's float dtypes."""
        std = self.update_noise_multiplier * clip
        noise = {}
        for key, weights in self.inner.current.items():
            draw = self._noise_rng.normal(0.0, std, size=weights.shape)
            draw /= self.expected_clients
            noise[key] = draw.astype(weights.dtype, copy=False)
        return noise

    def _sum_start(self, clip: float) -> tuple[float | None, dict[str, np.ndarray]]:
        """(a, the buffer the round's sum starts from): W + a·noise/m when the inner
        strategy's step is W + a·u, so the sum is the new model and applying it costs no pass
        after the replies; (None, noise/m) otherwise. Adding the updates to W rather than to a
        sum of their own rounds each to W's float32 spacing (~4e-9 for weights near 0.05), far
        below the noise's std."""
        noise = self._draw_noise(clip)
        step = self.inner.update_step()
        if step is not None:
            for key, weights in self.inner.current.items():
                noise[key] *= step
                noise[key] += weights
        return step, noise

    def _take_sum_start(self, server_round: int,
                        clip: float) -> tuple[float | None, dict[str, np.ndarray]]:
        pending, self._next_start = self._next_start, None
        if pending is not None and pending[:3] == (server_round, clip, id(self.inner.current)):
            return pending[3], pending[4]
        return self._sum_start(clip)  # aggregate_train called without configure_train

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip each update, sum, add N(0, sigma^2 C^2) noise, divide by q*N, apply.

        The noisy update is released even when no client replied: the round still counts
        in the accounting, and skipping it would reveal that nobody took part. With adaptive
        clipping the noised fraction of unclipped updates then moves C for the next round.
        """
        current = self.inner.current
        if current is None:
            raise RuntimeError("DPNoise.aggregate_train called before configure_train.")
        clip = self.clip_norm  # this round's C (adaptive clipping changes it afterwards)
        offset = self.inner.update_offset()  # update = reply - offset
        # The sum starts from this round's noise (drawn while the clients trained, used once),
        # and from W too where the step allows: no zero-filled buffer and no extra pass to add
        # the noise, or to apply the sum, afterwards.
        step, total = self._take_sum_start(server_round, clip)
        weight = (1.0 if step is None else step) / self.expected_clients
        averager = MetricAverager(self.inner.client_epsilon_max)
        # Each update's norm is taken in one pass, chunk by chunk; then a·s_i / m times it is
        # added to the sum while it is still in cache. Replies of weights (a strategy resumed
        # from an older checkpoint) are first turned into updates in one reused scratch buffer.
        # Memory: the sum (and the scratch), whatever the number of replies.
        scratch = {} if offset is None else {k: np.empty_like(v) for k, v in current.items()}
        num_clipped = 0
        for msg, arrays, num_examples, metrics in self.inner.screen(
                server_round, replies, check_values=False):
            update, squared = update_and_squared_norm(arrays, offset, scratch)
            if not math.isfinite(squared):  # NaN or Inf in the reply: it cannot be clipped
                self.inner.drop(server_round, msg, "its update contains NaN or Inf")
                continue
            scale = clip_scale(math.sqrt(squared), clip)
            num_clipped += int(scale < 1.0)
            for key, acc in total.items():
                axpy(acc, scale * weight, update[key])
            averager.add(num_examples, metrics)

        new_global = (self.inner.apply_update(total) if step is None
                      else self.inner.commit(total))

        self.rounds_done += 1
        self.epsilon = self._epsilon_after(self.rounds_done)
        metrics_out = averager.record()
        metrics_out["num-dropped"] = len(self.inner.last_dropped)
        metrics_out["num-clipped"] = num_clipped
        metrics_out["epsilon"] = self.epsilon
        metrics_out["delta"] = self.delta
        metrics_out["clip-norm"] = clip
        metrics_out["noise-multiplier"] = self.noise_multiplier
        metrics_out["update-noise-multiplier"] = self.update_noise_multiplier
        if self.adaptive_clip is not None:
            num_unclipped = averager.num_clients - num_clipped
            fraction = self.adaptive_clip.update(num_unclipped, averager.num_clients)
            self.clip_norm = self.adaptive_clip.value
            metrics_out["unclipped-fraction"] = fraction  # noised: part of the DP release
            metrics_out["clipped-count-stddev"] = self.adaptive_clip.count_stddev
        log(INFO, "DP round %s: %d update(s), %d clipped; epsilon = %.4g (delta = %g)",
            server_round, averager.num_clients, num_clipped, self.epsilon, self.delta)
        return self.inner.to_record(new_global), metrics_out

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegated to the inner strategy."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegated to the inner strategy."""
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """Log the inner strategy's summary and the DP settings."""
        self.inner.summary()
        log(INFO, "\t└──> DP (central, user-level, Poisson sampling): clip_norm=%g, "
            "noise_multiplier=%g, q=%g, num_clients=%d, delta=%g, max_epsilon=%s",
            self.clip_norm, self.noise_multiplier, self.sample_rate, self.num_clients,
            self.delta, self.max_epsilon)
        if self.adaptive_clip is not None:
            clip = self.adaptive_clip
            log(INFO, "\t    adaptive clipping: target_quantile=%g, clip_lr=%g, "
                "clipped_count_stddev=%g, update noise multiplier=%g", clip.target_quantile,
                clip.learning_rate, clip.count_stddev, self.update_noise_multiplier)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Rounds already released (epsilon follows from them) plus the inner strategy's state."""
        state = {_ROUNDS_DONE: np.asarray(self.rounds_done), _CLIP_NORM: np.asarray(self.clip_norm)}
        state.update({_INNER + k: v for k, v in self.inner.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore `state_dict` output; epsilon is recomputed from the rounds done."""
        self.rounds_done = int(state[_ROUNDS_DONE])
        if _CLIP_NORM in state and self.adaptive_clip is not None:
            self.clip_norm = self.adaptive_clip.value = float(state[_CLIP_NORM])
        self.epsilon = self._epsilon_after(self.rounds_done)
        self.inner.load_state_dict(
            {k[len(_INNER):]: v for k, v in state.items() if k.startswith(_INNER)}
        )
