"""FedSGD / gradient averaging: clients send gradients, the server takes the (momentum) SGD step."""

from collections.abc import Mapping
from logging import INFO

import numpy as np
from flwr.common.logger import log

from fl_app.messages import BATCH_SIZE, GRADIENT
from fl_app.strategies.aggregation import axpy
from fl_app.strategies.base import SampledStrategy


class GradientAveraging(SampledStrategy):
    """Server-side SGD on the average of the clients' gradients.

    Each sampled client replies with the gradient of its loss at the current global model
    (`mode = GRADIENT`), over its whole local set or one batch of `batch_size`. The server
    averages them (weighted by num-examples, which for
    full-batch gradients of mean losses gives the gradient over the union of the data, or
    uniformly 1/C) and steps

        v <- mu * v + g_avg;   W <- W - lr * v      (plain W <- W - lr * g_avg when mu = 0).

    The velocity v is strategy state: `state_dict()` returns it for checkpoints.
    """

    mode = GRADIENT

    def __init__(
        self,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        weighted: bool = True,
        batch_size: int | None = None,
        **sampling: float,
    ) -> None:
        """`sampling`: SampledStrategy's arguments (fractions, minimum nodes, timeout, seed)."""
        if not server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {server_lr!r}.")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be null (the whole local set) or >= 1, "
                             f"got {batch_size!r}.")
        if not 0.0 <= server_momentum < 1.0:
            raise ValueError(f"server_momentum must be in [0, 1), got {server_momentum!r}.")
        super().__init__(**sampling)
        self.server_lr = float(server_lr)
        self.server_momentum = float(server_momentum)
        self.weighted = bool(weighted)
        self.batch_size = batch_size
        self.velocity: dict[str, np.ndarray] | None = None

    def client_config(self) -> dict[str, int]:
        """The clients' gradient batch: 0 means the whole local set (∇ of 1/N Σ L)."""
        return {BATCH_SIZE: self.batch_size or 0}

    def update_offset(self) -> None:
        """None: the reply itself is the client's gradient (what DP-FedSGD clips)."""
        return None

    def update_step(self) -> float | None:
        """-lr without momentum (W - lr·g); None with it (the step depends on the velocity)."""
        return -self.server_lr if self.server_momentum == 0.0 else None

    def apply_update(self, mean_update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One (momentum) SGD step on the averaged gradient."""
        current = self._require_current()
        if self.server_momentum == 0.0:
            step = mean_update
        else:
            if self.velocity is None or any(
                k not in self.velocity or self.velocity[k].shape != v.shape
                for k, v in current.items()
            ):
                self.velocity = {k: np.zeros_like(v) for k, v in current.items()}
            for key, velocity in self.velocity.items():
                velocity *= self.server_momentum
                velocity += mean_update[key]
            step = self.velocity
        # In place, one pass per array: `current` is this strategy's own copy of the model it
        # sent (set_current), which nothing else holds.
        for key, weights in current.items():
            axpy(weights, -self.server_lr, step[key])
        return self.commit(current)

    def state_dict(self) -> dict:
        """The base's state and the momentum velocity (None before the first momentum step)."""
        velocity = self.velocity and {k: v.copy() for k, v in self.velocity.items()}
        return {**super().state_dict(), "velocity": velocity}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore what `state_dict` returned."""
        super().load_state_dict(state)
        velocity = state.get("velocity")
        self.velocity = None if velocity is None else {k: np.array(v) for k, v in velocity.items()}

    def summary(self) -> None:
        """Log the configuration, including the server optimizer."""
        super().summary()
        log(INFO, "\t└──> server step: lr=%g, momentum=%g", self.server_lr, self.server_momentum)
