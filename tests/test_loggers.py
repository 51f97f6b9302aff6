"""logger=tensorboard mirrors each round's numbers as TensorBoard scalars; none writes nothing."""

import math
import subprocess
import sys

from hydra.utils import instantiate
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fl_app.config import CONF_DIR
from fl_app.loggers import NoLogger, TensorBoardLogger

ROWS = [
    {"round": 1, "test_accuracy": 0.5, "test_loss": 1.5, "train_train_loss": 2.0,
     "train_epsilon": 1.25, "client_accuracy": 0.375, "seconds": 0.75, "sampled": 3,
     "lost_nodes": []},
    {"round": 2, "test_accuracy": 0.75, "test_loss": 1.0, "train_train_loss": 1.0,
     "train_epsilon": 2.5, "client_accuracy": 0.625, "seconds": 0.5, "sampled": 3,
     "lost_nodes": [7]},
]


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a TensorBoard folder as {tag: [(step, value), ...]}."""
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_tensorboard_logger_writes_each_round_as_scalars_with_the_round_as_step(tmp_path):
    logger = TensorBoardLogger(str(tmp_path))
    for row in ROWS:
        logger.log_round(row)
    logger.close()

    logged = scalars(tmp_path / "tensorboard")
    assert logged["test/accuracy"] == [(1, 0.5), (2, 0.75)]
    assert logged["test/loss"] == [(1, 1.5), (2, 1.0)]
    assert logged["train/train_loss"] == [(1, 2.0), (2, 1.0)]
    assert logged["train/epsilon"] == [(1, 1.25), (2, 2.5)]
    assert logged["client/accuracy"] == [(1, 0.375), (2, 0.625)]  # values exact in float32
    assert logged["round/seconds"] == [(1, 0.75), (2, 0.5)]
    assert logged["round/sampled"] == [(1, 3), (2, 3)]


def test_only_finite_numbers_are_logged(tmp_path):
    logger = TensorBoardLogger(str(tmp_path))
    logger.log_round({"round": 1, "test_accuracy": 0.5, "test_loss": math.nan,
                      "train_epsilon": math.inf, "lost_nodes": [1, 2], "stop_reason": "x",
                      "client_loss": None, "train_flag": True})
    logger.close()

    assert set(scalars(tmp_path / "tensorboard")) == {"test/accuracy"}


def test_a_resumed_run_appends_to_the_same_folder(tmp_path):
    for rows in (ROWS[:1], ROWS[1:]):  # two processes' loggers, one after the other
        logger = TensorBoardLogger(str(tmp_path))
        for row in rows:
            logger.log_round(row)
        logger.close()

    assert scalars(tmp_path / "tensorboard")["test/accuracy"] == [(1, 0.5), (2, 0.75)]


def test_config_group_builds_each_logger_with_the_runs_output_folder(tmp_path):
    tensorboard = instantiate(OmegaConf.load(CONF_DIR / "logger" / "tensorboard.yaml"),
                              log_dir=str(tmp_path))
    none = instantiate(OmegaConf.load(CONF_DIR / "logger" / "none.yaml"), log_dir=str(tmp_path))
    tensorboard.close()

    assert isinstance(tensorboard, TensorBoardLogger)
    assert tensorboard.log_dir == tmp_path / "tensorboard"
    assert isinstance(none, NoLogger)


def test_no_logger_writes_nothing(tmp_path):
    logger = instantiate(OmegaConf.load(CONF_DIR / "logger" / "none.yaml"),
                         log_dir=str(tmp_path / "run"))
    for row in ROWS:
        logger.log_round(row)
    logger.close()

    assert list(tmp_path.iterdir()) == []


def test_importing_the_loggers_does_not_import_tensorboard():
    code = ("import sys, fl_app.loggers; "
            "print(sorted(m for m in sys.modules if 'tensorboard' in m or m == 'torch'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert proc.stdout.strip() == "[]"
