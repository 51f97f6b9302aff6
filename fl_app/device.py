"""Which torch device a run trains and evaluates on: the `device` setting, resolved on the
machine that runs the code.

The server, every SuperNode and a simulation's actors each resolve it for themselves: in a
deployment the machines may differ, so `auto` (CUDA where torch sees one, else the CPU) is the
setting for a federation where only some have a GPU, and `cuda` / `cuda:N` stop, on a machine
without that GPU, with one line that names the machine.

torch is imported only when a setting names CUDA: `fl_app.config` checks the setting on every
compose, also in processes that never train.
"""

from __future__ import annotations

import re
import socket
from typing import TYPE_CHECKING

from fl_app.errors import ConfigError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N (N: a GPU index)"
_CUDA = re.compile(r"cuda(?::(\d+))?")


def problem(setting: object) -> str | None:
    """Why `setting` cannot be used on this machine, or None when it can."""
    setting = str(setting)
    if setting in ("auto", "cpu"):
        return None
    match = _CUDA.fullmatch(setting)
    if match is None:
        return f"it must be {DEVICE_CHOICES}"
    import torch

    where = f"this machine ({socket.gethostname()})"
    if not torch.cuda.is_available():
        return (f"{where} has no CUDA GPU that torch can use (torch {torch.__version__}, "
                f"CUDA build {torch.version.cuda or 'none'}): use device=auto (CUDA where "
                "there is one, else the CPU) or device=cpu")
    count = torch.cuda.device_count()
    if match.group(1) is not None and int(match.group(1)) >= count:
        return (f"{where} has {count} CUDA GPU(s), numbered 0..{count - 1}: use "
                f"device=cuda:0..{count - 1}, device=cuda or device=auto")
    return None


def invalid(setting: object) -> str | None:
    """The one-line error for a `device` setting this machine cannot use, or None."""
    reason = problem(setting)
    return None if reason is None else f"device={setting} is invalid: {reason}."


def resolve(setting: object) -> torch.device:
    """The torch.device of a `device` setting on this machine; ConfigError if there is none."""
    import torch

    if error := invalid(setting):
        raise ConfigError(error)
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(str(setting))


def client_gpu_share(client_gpus: float | None, setting: object) -> float:
    """GPUs per simulated client for Flower's engine (`client-resources-num-gpus`).

    `client_gpus` null derives it: 0 where the clients train on the CPU, else DEFAULT_GPU_SHARE,
    so that Ray runs that many clients on one GPU at a time (and gives each actor the GPU:
    Ray hides GPUs from actors that reserve none).
    """
    on = resolve(setting)
    if client_gpus is None:
        return 0.0 if on.type == "cpu" else DEFAULT_GPU_SHARE
    if float(client_gpus) == 0 and str(setting).startswith("cuda"):
        raise ConfigError(f"client_gpus=0 with device={setting}: Flower's simulation hides the "
                          "GPUs from clients that reserve none, so none could train on CUDA. "
                          f"Set client_gpus=null ({DEFAULT_GPU_SHARE:g}) or a share such as "
                          "0.25, or device=auto to train on the CPU there.")
    return float(client_gpus)


DEFAULT_GPU_SHARE = 0.1  # ten clients per GPU: the models here need ~10-100 MB each
