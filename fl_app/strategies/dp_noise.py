"""DP-FedAvg's Gaussian noise, drawn while the clients train.

Drawing N(0, sigma² C²) for every parameter takes as long as averaging ~20 CNN replies; the
server is idle until the replies come, so `DPNoise.configure_train` draws it then and
`aggregate_train` starts the round's sum from it. Same generator, same order: the released model
is what drawing it later would give.

`PresampledNoise` is a part of `DPNoise` (dp.py); it reads its `inner` strategy,
`update_noise_multiplier`, `expected_clients` and noise generator `_noise_rng`.
"""

import numpy as np


class PresampledNoise:
    """The buffer a DP round's sum starts from: the noise, and the global model where it can."""

    # (round, C, global model's id, step a, buffer) of the next release, made while the
    # clients train. Class-level too, so that a strategy checkpointed by an earlier version
    # resumes.
    _next_start: tuple[int, float, int, float | None, dict[str, np.ndarray]] | None = None

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
        self._next_start = (server_round, self.clip_norm, id(self.inner.current),
                            *self._sum_start(self.clip_norm))

    def _take_sum_start(self, server_round: int,
                        clip: float) -> tuple[float | None, dict[str, np.ndarray]]:
        pending, self._next_start = self._next_start, None
        if pending is not None and pending[:3] == (server_round, clip, id(self.inner.current)):
            return pending[3], pending[4]
        return self._sum_start(clip)  # aggregate_train called without configure_train
