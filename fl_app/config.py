"""The one place that turns a run config or command-line overrides into a composed DictConfig.

`flwr run` hands the apps a flat run config (`strategy`, `model`, `dataset`, `partitioner`,
`privacy`, `secagg`, `overrides`); `fl-app` hands Hydra's own overrides. Both end in
`compose()`, so every entry point validates names and overrides the same way and fails with
the same clear messages.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache
from logging import WARNING
from pathlib import Path

from flwr.common.logger import log
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fl_app import device, schema, targets
from fl_app.errors import ConfigError
from fl_app.privacy import settings as privacy_settings
from fl_app.secagg.settings import config_problem as secagg_problem
from fl_app.secagg.settings import config_warning as secagg_warning
from fl_app.strategies import features

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("strategy", "model", "dataset", "partitioner", "privacy", "secagg")


def available(group: str) -> list[str]:
    """Names a user can pick in a config group, e.g. available("strategy")."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def overrides_from_run_config(run_config: Mapping[str, object]) -> list[str]:
    """Hydra overrides equivalent to a `flwr run --run-config` mapping."""
    unknown = set(run_config) - {*GROUPS, "overrides"}
    if unknown:
        raise ConfigError(
            f"Unknown run-config key(s) {sorted(unknown)}. The run config takes "
            f"{[*GROUPS, 'overrides']}; put any other setting in overrides, e.g. "
            "--run-config \"overrides='num_rounds=5 strategy.server_lr=0.5'\"."
        )
    overrides = [f"{g}={run_config[g]}" for g in GROUPS if run_config.get(g)]
    return overrides + shlex.split(str(run_config.get("overrides", "") or ""))


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose conf/config.yaml with Hydra overrides; raise ConfigError on any bad input."""
    return _compose(tuple(overrides)).copy()


@lru_cache(maxsize=16)
def _compose(overrides: tuple[str, ...]) -> DictConfig:
    for item in overrides:
        group, _, name = item.lstrip("+~").partition("=")
        if group in GROUPS and name and name not in available(group):
            raise ConfigError(
                f"Unknown {group} '{name}'. Choose one of {available(group)} "
                f"(files in {CONF_DIR / group})."
            )
    try:
        with _outside_running_hydra(), initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose("config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(
            f"Bad override in {list(overrides)}: {_first_line(err)}. Overrides look like "
            "key=value for existing keys (see conf/config.yaml), or +key=value to add one."
        ) from None
    check(cfg)
    return cfg


@contextmanager
def _outside_running_hydra() -> Iterator[None]:
    # Inside `fl-app engine=inprocess`, Hydra's app is running, and Hydra refuses a second
    # initialisation: set it aside while composing, then put it back.
    running = GlobalHydra.instance()
    if not running.is_initialized():
        yield
        return
    app = running.hydra
    running.clear()
    try:
        yield
    finally:
        current = GlobalHydra.instance()  # `initialize_config_dir` restores a copy, not ours
        current.clear()
        current.initialize(app)


def check(cfg: DictConfig) -> None:
    """Refuse settings that would fail later, deep inside a library, or train nonsense: every
    `_target_` (fl_app.targets), every key's type and range (fl_app.schema), then the rules
    that relate keys."""
    try:
        tree = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"Cannot resolve the config: {_first_line(err)}.") from None
    # Targets first: `model._target_=os.system` is named as such, whatever else it brings.
    if problem := targets.problem(tree) or schema.problem(tree):
        raise ConfigError(problem)
    rules = [
        ("dataset.name", cfg.dataset.name in available("dataset"),
         f"one of {available('dataset')}"),
        *_strategy_rules(cfg),
        *_data_rules(cfg),
    ]
    for key, ok, expected in rules:
        if not ok:
            raise ConfigError(
                f"{key}={OmegaConf.select(cfg, key)} is invalid: it must be {expected}.")
    # Checked on the machine that composes: the server, a SuperNode, a simulation actor.
    if error := device.invalid(cfg.get("device", "auto")):
        raise ConfigError(error)
    if cfg.num_clients is not None and cfg.min_clients > cfg.num_clients:
        raise ConfigError(
            f"min_clients={cfg.min_clients} exceeds num_clients={cfg.num_clients}: "
            "lower min_clients or add clients."
        )
    if cfg.get("client_pool") is not None:
        _check_client_pool(cfg)
    if problem := privacy_settings.config_problem(
            cfg, features.of_config(cfg.strategy)["mode"], bool(cfg.model.get("tokens", False))):
        raise ConfigError(problem)
    if problem := secagg_problem(cfg):
        raise ConfigError(problem)
    if warning := secagg_warning(cfg):
        log(WARNING, "%s", warning)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def num_supernodes(cfg: DictConfig) -> int | None:
    """How many SuperNodes a run of `cfg` serves its clients with: the client pool's size, one
    per client (num_clients), or None (whatever the federation has)."""
    return cfg.get("client_pool") or cfg.num_clients


def _check_client_pool(cfg: DictConfig) -> None:
    pool = cfg.client_pool
    problem = None
    if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
        problem = "it must be null or an integer >= 1 (the number of SuperNodes to run)"
    elif cfg.num_clients is None and "num_partitions" in cfg.partitioner.keys():
        # (a natural partitioner's population is the dataset's: fl-app fills num_clients in)
        problem = "a pool serves a population of num_clients clients: set num_clients too"
    elif cfg.num_clients is not None and pool > cfg.num_clients:
        problem = f"it exceeds num_clients={cfg.num_clients}: use null (one SuperNode each)"
    elif cfg.min_clients > pool:
        problem = f"min_clients={cfg.min_clients} of its SuperNodes can never connect"
    elif not features.of_config(cfg.strategy)["client_pool"]:
        problem = ("Flower's built-in strategies sample SuperNodes, not clients: use one of "
                   "fl_app's (fedavg, fedsgd, dp_fedavg, dp_fedavg_adaptive, dp_fedsgd)")
    if problem:
        raise ConfigError(f"client_pool={pool} is invalid: {problem}.")


def _data_rules(cfg: DictConfig) -> list[tuple[str, bool, str]]:
    """The model reads what the dataset holds; a natural partition needs the data's owners."""
    tokens = bool(cfg.dataset.get("tokens", False))
    rules = [("model._target_", bool(cfg.model.get("tokens", False)) == tokens,
              "a model for character ids with dataset=shakespeare (model=char_lstm), one for "
              "images or features (mlp, cnn, logreg, tabular_mlp) with the other datasets"),
             ("partitioner._target_", "num_partitions" in cfg.partitioner.keys()
              or bool(cfg.dataset.get("natural_partition", False)),
              "one that splits into num_clients partitions (iid, dirichlet, shards, "
              "pathological): only dataset=shakespeare has natural clients (its roles)")]
    if cfg.dataset.name == "shakespeare":
        roles, limit = cfg.dataset.get("roles"), cfg.dataset.get("test_limit")
        rules += [("dataset.train_fraction", 0 < cfg.dataset.train_fraction < 1, "in (0, 1)"),
                  ("dataset.min_samples", cfg.dataset.min_samples >= 2, "an integer >= 2"),
                  ("dataset.roles", roles is None or roles >= 1, "null (all) or >= 1"),
                  ("dataset.test_limit", limit is None or limit >= 1, "null (all) or >= 1")]
    return rules


def _strategy_rules(cfg: DictConfig) -> list[tuple[str, bool, str]]:
    """How Flower's built-in strategies' hyperparameters relate to the rest of the config
    (each key's own range: fl_app.schema); Flower itself checks neither."""
    strategy, rules = cfg.strategy, []
    if "proximal_mu" in strategy:
        rules.append(("strategy.proximal_mu", 0 <= strategy.proximal_mu * cfg.lr < 2,
                      f">= 0 and below 2/lr = {2 / cfg.lr:g} (local SGD on the proximal term "
                      "diverges beyond; 0.001-1 is typical)"))
    if "num_malicious_nodes" in strategy:
        f = strategy.num_malicious_nodes
        if cfg.num_clients:
            per_round = max(int(cfg.num_clients * cfg.fraction_train), cfg.min_clients)
            rules.append(("strategy.num_malicious_nodes", per_round > 2 * f + 2,
                          f"below (clients per round - 2) / 2: Krum needs more than 2f + 2 "
                          f"replies, and a round samples {per_round}"))
    return rules


def to_yaml(cfg: DictConfig) -> str:
    """The fully resolved config, as written to every run's output folder."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def _first_line(err: BaseException) -> str:
    while not str(err).strip() and err.__cause__ is not None:  # Hydra wraps the real cause
        err = err.__cause__
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
