"""The Gaussian noise of a DP release, and the generator it is drawn from.

The generator never leaves the process: whoever holds its state (or its seed) can regenerate
every later round's noise and subtract it from the released models. A checkpoint holds neither
(fl_app.checkpoint writes only what a strategy's `state_dict` returns), so a resumed run draws
from fresh OS entropy; `noise_seed` (tests only) makes each round's noise a function of
(noise_seed, round), so a resumed run seeded again from its config draws what the uninterrupted
run drew.
"""

from __future__ import annotations

import numpy as np


class GaussianNoise:
    """A noise generator: from OS entropy (None, what privacy needs), or for tests from
    (noise_seed, round). Every draw of a DP strategy (the update's noise, adaptive clipping's
    noised count) comes from the one instance it holds."""

    def __init__(self, noise_seed: int | None = None) -> None:
        self.reseed(noise_seed)

    def reseed(self, noise_seed: int | None) -> None:
        """Start afresh: from OS entropy, or with every round's noise drawn from (seed, round)."""
        self.noise_seed = None if noise_seed is None else int(noise_seed)
        self.rng = np.random.default_rng(self.noise_seed)

    def start_round(self, server_round: int) -> None:
        """With a noise_seed, the generator of `server_round`; from OS entropy, nothing to do."""
        if self.noise_seed is not None:
            self.rng = np.random.default_rng([self.noise_seed, server_round])

    def normal(self, std: float) -> float:
        """One draw of N(0, std²)."""
        return float(self.rng.normal(0.0, std))

    def like(self, arrays: dict[str, np.ndarray], std: float,
             divisor: float = 1.0) -> dict[str, np.ndarray]:
        """N(0, std²) / divisor for every element of `arrays`, in their dtypes."""
        noise = {}
        for key, array in arrays.items():
            draw = self.rng.normal(0.0, std, size=array.shape)
            draw /= divisor
            noise[key] = draw.astype(array.dtype, copy=False)
        return noise
