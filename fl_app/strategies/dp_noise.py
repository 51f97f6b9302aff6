"""DP-FedAvg's Gaussian noise, drawn while the clients train.

Drawing N(0, sigma² C²) for every parameter takes as long as averaging ~20 CNN replies; the
server is idle until the replies come, so `DPNoise.configure_train` draws it then and
`aggregate_train` starts the round's sum from it. Same generator, same order: the released model
is what drawing it later would give.

The noise generator never leaves the process: whoever holds its state (or its seed) can
regenerate every later round's noise and subtract it from the released models. A pickled
strategy (checkpoint.pkl) carries neither, and an unpickled one draws from fresh OS entropy;
`noise_seed` (tests only) makes each round's noise a function of (noise_seed, round), so a
resumed run seeded again from its config draws what the uninterrupted run drew.

`PresampledNoise` is a part of `DPNoise` (dp.py); it reads its `inner` strategy,
`update_noise_multiplier`, `expected_clients` and `adaptive_clip`.
"""

import numpy as np

# Attributes that are, or regenerate, secret noise: never pickled.
_SECRET = ("_noise_rng", "noise_seed", "_next_start")


class PresampledNoise:
    """The buffer a DP round's sum starts from: the noise, and the global model where it can."""

    # (round, C, global model's id, step a, buffer) of the next release, made while the
    # clients train. Class-level too, so that a strategy checkpointed by an earlier version
    # resumes.
    _next_start: tuple[int, float, int, float | None, dict[str, np.ndarray]] | None = None
    noise_seed: int | None = None

    def seed_noise(self, noise_seed: int | None) -> None:
        """Start the noise afresh: from OS entropy (None, what privacy needs), or, for tests,
        with every round's noise drawn from (noise_seed, round)."""
        self.noise_seed = None if noise_seed is None else int(noise_seed)
        self._use_generator(np.random.default_rng(noise_seed))

    def _use_generator(self, rng: np.random.Generator) -> None:
        self._noise_rng = rng
        if getattr(self, "adaptive_clip", None) is not None:  # the noised count: same generator
            self.adaptive_clip.rng = rng

    def _start_round(self, server_round: int) -> None:
        if self.noise_seed is not None:
            self._use_generator(np.random.default_rng([self.noise_seed, server_round]))

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in _SECRET}

    def __setstate__(self, state: dict) -> None:
        # A checkpoint written before this held the generator: it is dropped, never used.
        self.__dict__.update({k: v for k, v in state.items() if k not in _SECRET})
        self.seed_noise(None)

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

    def presample_noise(self, server_round: int) -> None:
        """Draw the noise of `server_round`'s release now, at this round's C."""
        self._start_round(server_round)
        self._next_start = (server_round, self.clip_norm, id(self.inner.current),
                            *self._sum_start(self.clip_norm))

    def _take_sum_start(self, server_round: int,
                        clip: float) -> tuple[float | None, dict[str, np.ndarray]]:
        pending, self._next_start = self._next_start, None
        if pending is not None and pending[:3] == (server_round, clip, id(self.inner.current)):
            return pending[3], pending[4]
        self._start_round(server_round)  # aggregate_train called without configure_train
        return self._sum_start(clip)
