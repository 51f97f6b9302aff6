"""Which classes a run config may build: the `_target_` allow-list.

A run config travels from whoever submits a run to the server and to every client, and
`hydra.utils.instantiate` calls whatever a `_target_` names: `model._target_=os.system` would
run a shell command everywhere. So a `_target_` may name only a class of one of the kinds a
run builds (a model, a strategy, a partitioner, a stopping rule, a round logger), defined in
fl_app or in the part of torch, Flower or flwr-datasets that provides that kind. Functions
(`torch.load` unpickles, `torch.hub.load` downloads and runs code, `builtins.eval`), classes
re-exported from elsewhere (`fl_app.config.Path` is pathlib's), and `_partial_` are refused.

`problem()` checks a whole config at compose time (fl_app.config); `build()` checks again
and instantiates, at every call site, so that no path builds an unchecked target.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

from omegaconf import DictConfig, OmegaConf

# The config key whose `_target_` builds each kind, and the base class every target under that
# key (nested ones too, e.g. DP's inner strategy) must extend. A new kind is one line here.
KINDS = {
    "strategy": "flwr.serverapp.strategy.Strategy",
    "model": "torch.nn.Module",
    "partitioner": "flwr_datasets.partitioner.Partitioner",
    "stopping": "fl_app.stopping.StoppingRule",
    "logger": "fl_app.loggers.RoundLogger",
}
# Where a target's class may be defined (its `__module__`, and the path the config names).
ALLOWED_MODULES = ("fl_app.", "flwr.serverapp.strategy.", "flwr_datasets.partitioner.",
                   "torch.nn.")
# Under those, modules whose classes need a process group, devices or a network: never from a
# run config.
DENIED_MODULES = ("torch.nn.parallel.", "fl_app.deploy.")
_DOTTED = re.compile(r"[A-Za-z]\w*(\.[A-Za-z]\w*)+")
_ALLOWED = ", ".join(m.rstrip(".") for m in ALLOWED_MODULES)


class TargetError(ValueError):
    """A config names a `_target_` that fl_app will not build; the message names the key."""


def problem(cfg: DictConfig | dict) -> str | None:
    """The first refused `_target_` (or `_partial_`) anywhere in `cfg`, as one line; None if
    every one is allowed."""
    tree = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    for key, node in _nodes(tree, ""):
        kind = key.split(".")[0]
        if error := _node_problem(key, node, kind):
            return error
    return None


def build(kind: str, node: DictConfig | dict, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate(node, **kwargs)` for the `kind` key, after the same check as at
    compose time: exactly the checked (resolved) config is built."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    tree = OmegaConf.to_container(node, resolve=True) if not isinstance(node, dict) else node
    for key, sub in _nodes(tree, kind):
        if error := _node_problem(key, sub, kind):
            raise TargetError(error)
    if "_target_" not in tree:
        raise TargetError(f"{kind}: no _target_ to build; conf/{kind}/*.yaml shows one.")
    try:
        return instantiate(tree, **kwargs)
    except InstantiationException as err:  # e.g. torch.nn.Linear given a model's arguments
        cause = err.__cause__ or err
        raise TargetError(f"{kind}._target_={tree['_target_']} could not be built from the "
                          f"{kind} settings: {type(cause).__name__}: "
                          f"{str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"
                          ) from None


def _nodes(tree: object, prefix: str) -> Iterator[tuple[str, dict]]:
    """Every mapping in `tree` holding a `_target_` or `_partial_`, with its dotted key."""
    if isinstance(tree, dict):
        if "_target_" in tree or "_partial_" in tree:
            yield prefix, tree
        for name, value in tree.items():
            yield from _nodes(value, f"{prefix}.{name}" if prefix else str(name))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _nodes(value, f"{prefix}[{i}]")


def _node_problem(key: str, node: dict, kind: str) -> str | None:
    where = f"{key}._target_" if key else "_target_"
    if "_partial_" in node:
        return (f"{key}._partial_ is refused: a run config builds objects, not partial "
                "functions; remove _partial_.")
    target = node["_target_"]
    if kind not in KINDS:
        return (f"{where}={target} is refused: nothing is built from '{kind}' (only "
                f"{', '.join(KINDS)} take a _target_).")
    if not isinstance(target, str):
        return f"{where}={target} is refused: it must be a dotted class path."
    return _target_problem(kind, target, where)


@lru_cache(maxsize=256)
def _target_problem(kind: str, target: str, where: str) -> str | None:
    base_path = KINDS[kind]
    refused = (f"{where}={target} is refused: a run config may build only a {kind} class "
               f"(a subclass of {base_path}) defined in {_ALLOWED}, e.g. "
               f"{_EXAMPLES[kind]}")
    # Checked on the string before anything is imported: nothing outside the allowed
    # packages is ever imported, and private names (torch._C, ...) are never reached.
    if (not _DOTTED.fullmatch(target) or not target.startswith(ALLOWED_MODULES)
            or target.startswith(DENIED_MODULES)):
        return refused + "."
    obj = _locate(target)
    if obj is None:
        return f"{where}={target} is refused: no such class (check the spelling)."
    if not inspect.isclass(obj):
        return refused + f": {target} is a {type(obj).__name__}, not a class."
    defined_in = f"{obj.__module__}."
    if not defined_in.startswith(ALLOWED_MODULES) or defined_in.startswith(DENIED_MODULES):
        return refused + f": {target} is {obj.__module__}.{obj.__qualname__}."
    base = _locate(base_path)
    if not issubclass(obj, base):
        return refused + f": {target} is not a {base_path}."
    return None


_EXAMPLES = {"strategy": "fl_app.strategies.WeightedFedAvg", "model": "fl_app.models.MLP",
             "partitioner": "flwr_datasets.partitioner.IidPartitioner",
             "stopping": "fl_app.stopping.TargetAccuracy",
             "logger": "fl_app.loggers.TensorBoardLogger"}


def _locate(path: str) -> object | None:
    """The object a dotted path names, importing its longest module prefix; None if none."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return None
            obj = getattr(obj, name)
        return obj
    return None
