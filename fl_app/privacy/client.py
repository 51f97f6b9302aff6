"""Client-side differential privacy: what a client does to its update before it leaves it.

Two choices (config group `privacy`), both independent of the server's strategy:

- `LocalDP` (`privacy=local`): the client clips its whole update (the weight delta for FedAvg,
  the gradient for FedSGD) to L2 norm C and adds N(0, sigma^2 C^2) noise from OS entropy to
  every coordinate. The reply carries the noisy result and nothing that could undo it: no
  clean norm, no seed, no training loss. Against the server itself each release is a Gaussian
  mechanism; any two local datasets can give updates up to 2C apart (replace-one), so the
  accountant sees noise multiplier sigma / 2, composed over the rounds this client took part in.
- `DPSGD` (`privacy=dpsgd`): example-level DP-SGD inside local training (Opacus: per-example
  clipping to `max_grad_norm`, Gaussian noise, Poisson-sampled batches). Its epsilon bounds what
  the client's released models reveal about any one of its training examples.

Each client reports its own epsilon (`local_epsilon` / `dpsgd_epsilon`: the tighter of the RDP and
PLD accountants', both beside it as `<key>_rdp` / `<key>_pld`) with its train metrics;
the state behind it (releases, Opacus' accountant history) survives the ClientApp's client
cache through `state()` / `load_state()`, which the ClientApp keeps in Flower's Context.state.
Without secure aggregation example counts are sent as they are (like Opacus, this treats local
dataset sizes as public); with it, a count is only in the secure sum, and DP-SGD's epsilon,
which depends on it, too (fl_app.secagg.client.PUBLIC_METRICS lists what stays in the clear).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
from omegaconf import DictConfig

from fl_app.privacy import settings

if TYPE_CHECKING:
    from fl_app.privacy.accounting import Epsilon


class LocalDP:
    """Clip a client's update to C and add N(0, (sigma C)^2) noise before it is sent.

    `rng` is for tests only; by default every client draws from fresh OS entropy, so nobody,
    the server included, can regenerate the noise.
    """

    name = "local"

    def __init__(self, clip_norm: float, noise_multiplier: float, delta: float,
                 num_clients: int, rng: np.random.Generator | None = None) -> None:
        for name, value, rule in (("privacy.clip_norm", clip_norm, settings.clip_norm(clip_norm)),
                                  ("privacy.noise_multiplier", noise_multiplier,
                                   settings.noise_multiplier(noise_multiplier)),
                                  ("privacy.delta", delta, settings.delta(delta, num_clients))):
            settings.require(name, value, rule)
        self.clip_norm, self.noise_multiplier = float(clip_norm), float(noise_multiplier)
        self.delta = float(delta)
        self.releases = 0
        self._rng = rng if rng is not None else np.random.default_rng()

    def privatize(self, update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The clipped, noised update (same dtypes); counts one release for the accountant."""
        clipped = {k: np.asarray(v, np.float64) for k, v in update.items()}
        norm = math.sqrt(sum(float(np.vdot(v, v)) for v in clipped.values()))
        if norm > self.clip_norm:
            clipped = {k: v * (self.clip_norm / norm) for k, v in clipped.items()}
        std = self.noise_multiplier * self.clip_norm
        noisy = {k: (v + self._rng.normal(0.0, std, v.shape)).astype(np.asarray(update[k]).dtype)
                 for k, v in clipped.items()}
        self.releases += 1
        return noisy

    def epsilons(self) -> Epsilon:
        """This client's epsilon against the server after its releases so far, RDP and PLD.

        Replace-one sensitivity is 2C, so the Gaussian mechanism's multiplier is sigma / 2;
        there is no sampling amplification (q = 1): the server knows who took part.
        """
        # Imported here: a deployed ClientApp process starts afresh per message, and the
        # accountant (dp_accounting, the strategies package) costs it about a second.
        from fl_app.privacy.accounting import epsilons

        return epsilons(self.noise_multiplier / 2, 1.0, self.releases, self.delta)

    def epsilon(self) -> float:
        """The tighter of `epsilons()`: what the client reports as its epsilon."""
        return self.epsilons().value

    def metrics(self) -> dict[str, float]:
        return {**self.epsilons().metrics("local_epsilon", "_"), "local_delta": self.delta,
                "local_noise_multiplier": self.noise_multiplier,
                "local_clip_norm": self.clip_norm}

    def state(self) -> dict[str, int]:
        return {"releases": self.releases}

    def load_state(self, state: dict) -> None:
        self.releases = int(state["releases"])


class DPSGD:
    """Settings and accountant state of example-level DP-SGD in a client's local training.

    `history` is Opacus' RDP accountant history: (noise_multiplier, sample_rate, steps) per
    stretch of training; `fl_app.training.train_dpsgd` extends it every round.
    """

    name = "dpsgd"

    def __init__(self, max_grad_norm: float, noise_multiplier: float, delta: float) -> None:
        for name, value, rule in (
                ("privacy.max_grad_norm", max_grad_norm, settings.max_grad_norm(max_grad_norm)),
                ("privacy.noise_multiplier", noise_multiplier,
                 settings.noise_multiplier(noise_multiplier)),
                ("privacy.delta", delta, settings.delta(delta, unit="(examples per client)"))):
            settings.require(name, value, rule)
        self.max_grad_norm, self.noise_multiplier = float(max_grad_norm), float(noise_multiplier)
        self.delta = float(delta)
        self.history: list[tuple[float, float, int]] = []

    def check_dataset_size(self, num_examples: int) -> None:
        """Example-level delta must be well below 1/(number of this client's examples). The
        error names no count: it is the client's error reply, which the server reads, and with
        secure aggregation a client's example count is not the server's to learn."""
        if self.delta >= 1.0 / num_examples:
            raise ValueError(
                f"privacy.delta = {self.delta:g} is >= 1/(this client's training examples): "
                "use a delta well below 1/(the largest client's number of training examples), "
                "e.g. 1e-6.")

    def epsilons(self) -> Epsilon:
        """This client's example-level epsilon: Opacus' RDP accountant and dp_accounting's
        PLD over the same steps (each a Poisson-sampled Gaussian)."""
        from fl_app.privacy.accounting import Epsilon, pld_epsilon_of_steps

        if not self.history:
            return Epsilon(0.0, 0.0)
        pld = pld_epsilon_of_steps(self.history, self.delta)
        return Epsilon(_opacus_epsilon(tuple(self.history), self.delta), pld,
                       None if pld is not None else "failed or too slow")

    def epsilon(self) -> float:
        """The tighter of `epsilons()`: what the client reports as its epsilon."""
        return self.epsilons().value

    def metrics(self) -> dict[str, float]:
        return {**self.epsilons().metrics("dpsgd_epsilon", "_"), "dpsgd_delta": self.delta,
                "dpsgd_noise_multiplier": self.noise_multiplier,
                "dpsgd_max_grad_norm": self.max_grad_norm}

    def state(self) -> dict[str, list]:
        sigmas, rates, steps = zip(*self.history, strict=True) if self.history else ((), (), ())
        return {"noise_multipliers": [float(s) for s in sigmas],
                "sample_rates": [float(r) for r in rates], "steps": [int(n) for n in steps]}

    def load_state(self, state: dict) -> None:
        self.history = [(float(s), float(r), int(n)) for s, r, n in zip(
            state["noise_multipliers"], state["sample_rates"], state["steps"], strict=True)]


# Opacus' RDP analysis takes ~0.4 s in pure Python; clients with the same history (same noise,
# rate and number of steps) are common in a population, so remember recent answers.
@lru_cache(maxsize=1024)
def _opacus_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    from opacus.accountants import RDPAccountant  # imports in ~2 s: only when used

    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta))


def from_config(privacy: DictConfig, num_clients: int) -> LocalDP | DPSGD | None:
    """The client-side privacy of the `privacy` config group (None for `privacy=none`)."""
    name = privacy.get("name", "none")
    if name == "none":
        return None
    if name == "local":
        return LocalDP(privacy.clip_norm, privacy.noise_multiplier, privacy.delta, num_clients)
    if name == "dpsgd":
        return DPSGD(privacy.max_grad_norm, privacy.noise_multiplier, privacy.delta)
    raise ValueError(f"Unknown privacy '{name}'. Choose one of {list(settings.CLIENT_PRIVACY)}.")
