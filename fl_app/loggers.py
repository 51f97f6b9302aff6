"""Per-round metric loggers for the ServerApp's round loop, picked by `logger=` (conf/logger/).

The round loop calls the same three things whatever the logger:

    round_logger = targets.build("logger", cfg.logger, log_dir=str(output_folder))
    round_logger.log_round(row)   # after each round: the metrics.jsonl row
    round_logger.close()          # at the end, also when the run fails

metrics.jsonl stays the record of a run; a logger only mirrors it somewhere easier to watch.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from pathlib import Path

# metrics.jsonl key prefix -> TensorBoard section; other keys (seconds, sampled, ...) go to round/.
SECTIONS = ("test", "train", "client")


class RoundLogger:
    """What every logger of the `logger` group is (conf/logger/*.yaml build one)."""

    def __init__(self, log_dir: str | None = None) -> None:
        pass

    def log_round(self, row: Mapping[str, object]) -> None:
        pass

    def close(self) -> None:
        pass


class NoLogger(RoundLogger):
    """Logs nothing (logger=none, the default)."""


class TensorBoardLogger(RoundLogger):
    """Writes each round's numeric metrics as TensorBoard scalars in `log_dir/subdir`.

    Tags are `test/accuracy`, `train/epsilon`, `client/...`, `round/seconds`, with the round as
    the step. A resumed run appends a new event file to the same folder.
    """

    def __init__(self, log_dir: str, subdir: str = "tensorboard", flush_secs: int = 10) -> None:
        # Imported here: it pulls in TensorBoard, which runs with the default logger never need.
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir) / subdir
        self.writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=flush_secs)

    def log_round(self, row: Mapping[str, object]) -> None:
        """Log every finite number in `row` at step row["round"]; skip lists, strings, None."""
        step = int(row["round"])
        for key, value in row.items():
            if key != "round" and is_finite_number(value):
                self.writer.add_scalar(tag(key), float(value), step)

    def close(self) -> None:
        self.writer.close()


def tag(key: str) -> str:
    """A metrics.jsonl key as a tag: test_accuracy -> test/accuracy, seconds -> round/seconds."""
    section, _, name = key.partition("_")
    return f"{section}/{name}" if section in SECTIONS and name else f"round/{key}"


def is_finite_number(value: object) -> bool:
    # bool is an int in Python but not a metric; NaN/inf would spoil TensorBoard's axis scaling.
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value))
