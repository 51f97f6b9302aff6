"""When a run stops: after num_rounds, or earlier once it has converged (the `stopping` group).

A rule looks only at the run's history (one metrics row per round), so a resumed run, whose
history comes back from its checkpoint, stops exactly where the uninterrupted run would have.
"""

from __future__ import annotations

import math


class StoppingRule:
    """What every rule of the `stopping` group is (conf/stopping/*.yaml build one)."""

    def check(self, history: list[dict]) -> str | None:
        """Why the run stops after the last row of `history`; None to go on."""
        raise NotImplementedError


class FixedRounds(StoppingRule):
    """No early stop: the run ends after num_rounds."""

    def check(self, history: list[dict]) -> str | None:
        return None


class TargetAccuracy(StoppingRule):
    """Stop once the centralized test accuracy of the global model reaches `target`."""

    def __init__(self, target: float) -> None:
        if not 0 < target <= 1:
            raise ValueError(f"stopping.target must be in (0, 1], got {target!r}.")
        self.target = float(target)

    def check(self, history: list[dict]) -> str | None:
        accuracy = history[-1]["test_accuracy"]
        if accuracy >= self.target:
            return (f"target_accuracy: test accuracy {accuracy:.4f} reached the target "
                    f"{self.target:g} in round {history[-1]['round']}")
        return None


class LossPlateau(StoppingRule):
    """Stop when the centralized test loss has not improved by `min_delta` for `patience` rounds.

    Improvement is measured against the best loss so far (as Keras' and Lightning's early
    stopping do), so slow drifts below the threshold do not keep a run alive forever.
    """

    def __init__(self, patience: int, min_delta: float = 0.0) -> None:
        if patience < 1:
            raise ValueError(f"stopping.patience must be an integer >= 1, got {patience!r}.")
        if min_delta < 0:
            raise ValueError(f"stopping.min_delta must be >= 0, got {min_delta!r}.")
        self.patience, self.min_delta = int(patience), float(min_delta)

    def check(self, history: list[dict]) -> str | None:
        best, since_best = math.inf, 0
        for row in history:
            if row["test_loss"] < best - self.min_delta:
                best, since_best = row["test_loss"], 0
            else:
                since_best += 1
        if since_best >= self.patience:
            return (f"loss_plateau: test loss has not improved by {self.min_delta:g} on its best "
                    f"({best:.4f}) for {since_best} rounds (patience {self.patience})")
        return None
