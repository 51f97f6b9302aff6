"""The type and range of every config key, in one table (`SCHEMA`), checked at compose time.

A key of conf/ (config.yaml or any group's yaml) without an entry here is refused, and
`tests/test_attacks_config.py` composes every group to keep the table complete: a new key is
one new line below. Rules that relate several keys (min_clients <= num_clients, DP's delta
below 1/num_clients, ...) stay with their feature (`fl_app.config.check`, the feature's
`config_problem`); this table says what each key is on its own.

Without it, `lr=abc` or `num_clients=2.5` failed deep inside torch or numpy without naming the
key, `num_rounds=2.5` "ran all 2.5 rounds", and `lr=inf` trained to chance accuracy and exited 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fl_app.privacy import settings as dp

MISSING = "???"  # OmegaConf's mandatory value, which fl_app fills in itself


@dataclass(frozen=True)
class Rule:
    """What a key's value must be: `need` (as the error says it) and the test `ok`."""

    need: str
    ok: Callable[[object], bool]

    def nullable(self) -> Rule:
        """The same rule, or null."""
        return Rule(f"null or {self.need}", lambda v: v is None or self.ok(v))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def integer(ge: int | None = None) -> Rule:
    """An int (not a bool, not 2.5), at least `ge`."""
    return Rule("an integer" + ("" if ge is None else f" >= {ge}"),
                lambda v: _is_int(v) and (ge is None or v >= ge))


def number(gt: float | None = None, ge: float | None = None, lt: float | None = None,
           le: float | None = None, need: str | None = None) -> Rule:
    """A finite int or float within the bounds given (never inf or nan)."""
    low = f"({gt:g}" if gt is not None else f"[{ge:g}" if ge is not None else None
    high = f"{lt:g})" if lt is not None else f"{le:g}]" if le is not None else None
    if low and high:
        text = f"a number in {low}, {high}"
    elif low:
        text = f"a finite number {'>' if gt is not None else '>='} {low[1:]}"
    elif high:
        text = f"a finite number {'<' if lt is not None else '<='} {high[:-1]}"
    else:
        text = "a finite number"

    def ok(v: object) -> bool:
        return _is_number(v) and ((gt is None or v > gt) and (ge is None or v >= ge)
                                  and (lt is None or v < lt) and (le is None or v <= le))
    return Rule(need or text, ok)


def choice(*names: str) -> Rule:
    """One of `names`."""
    return Rule(", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0],
                lambda v: v in names)


def _is_relative_name(v: object) -> bool:
    return isinstance(v, str) and bool(v) and not v.startswith(("/", "~")) \
        and ".." not in v.replace("\\", "/").split("/")


FLAG = Rule("true or false", lambda v: isinstance(v, bool))
TEXT = Rule("a string", lambda v: isinstance(v, str) and v != "")
# A folder setting: null, or a path ('' counts as unset, as `resume=` on a command line).
FOLDER = Rule("null or a folder path", lambda v: v is None or isinstance(v, str))
SHAPE = Rule("a list of integers >= 1, e.g. [1, 28, 28]",
             lambda v: isinstance(v, list) and bool(v) and all(_is_int(d) and d >= 1 for d in v))
TARGET = Rule("a class path (see fl_app.targets)", lambda v: isinstance(v, str))
NODE = Rule("a strategy (a mapping with a _target_)", lambda v: isinstance(v, dict))
SET_BY_FL_APP = Rule("left as ??? (fl_app sets it to the number of clients)",
                     lambda v: v == MISSING)
SUBDIR = Rule("a folder name inside the run's output folder (relative, no '..')",
              _is_relative_name)
def dp_rule(rule: Callable[[object], str | None]) -> Rule:
    """A DP setting's rule from fl_app.privacy.settings (its one check) as a table row."""
    return Rule(rule(math.nan) or "valid", lambda v: rule(v) is None)


FRACTION_OPEN = number(gt=0, lt=1)
POSITIVE = number(gt=0)
COUNT = integer(ge=1)
SEED = integer(ge=0)
SECONDS = number(gt=0, need="a finite number of seconds > 0")

SCHEMA: dict[str, Rule] = {
    # conf/config.yaml
    "num_rounds": COUNT,
    "engine": choice("auto", "flower", "inprocess"),
    "num_clients": COUNT.nullable(),
    "client_pool": COUNT.nullable(),
    "fraction_train": number(gt=0, le=1),
    "fraction_evaluate": number(ge=0, le=1),
    "min_clients": COUNT,
    "max_examples_per_client": Rule(
        "null (trust each client's count) or a finite number >= 1: the most examples one "
        "reply counts for", number(ge=1).nullable().ok),
    "local_epochs": COUNT,
    "batch_size": Rule("null (full set) or an integer >= 1", COUNT.nullable().ok),
    "lr": POSITIVE,
    "val_fraction": number(ge=0, lt=1),
    "seed": SEED,
    "device": TEXT,  # which devices exist is checked by fl_app.device
    "client_gpus": Rule("null (derived from device) or a number >= 0: the GPUs each "
                        "simulated client reserves, e.g. 0.1 for ten clients per GPU",
                        number(ge=0).nullable().ok),
    "data_root": FOLDER,
    "node_wait_timeout": SECONDS,
    "round_timeout": SECONDS,
    "output_dir": FOLDER,
    "resume": FOLDER,
    "checkpoints": choice("last", "all"),
    # conf/strategy/ (DP's inner strategy, strategy.strategy.*, takes the same keys)
    "strategy._target_": TARGET,
    "strategy.strategy": NODE,
    "strategy.fraction_train": number(gt=0, le=1),
    "strategy.fraction_evaluate": number(ge=0, le=1),
    "strategy.min_train_nodes": COUNT,
    "strategy.min_evaluate_nodes": COUNT,
    "strategy.min_available_nodes": COUNT,
    "strategy.node_wait_timeout": SECONDS,
    "strategy.seed": SEED,
    "strategy.server_lr": POSITIVE,
    "strategy.server_momentum": number(ge=0, lt=1),
    "strategy.local_epochs": COUNT,
    "strategy.weighted": FLAG,
    "strategy.max_examples_per_client": Rule("null or a finite number >= 1",
                                             number(ge=1).nullable().ok),
    "strategy.batch_size": Rule("null (the whole local set) or an integer >= 1",
                                COUNT.nullable().ok),
    # central DP: each rule is fl_app.privacy.settings' own (written once, asked by all)
    "strategy.clip_norm": dp_rule(dp.clip_norm),
    "strategy.noise_multiplier": dp_rule(dp.noise_multiplier),
    "strategy.num_clients": COUNT.nullable(),
    "strategy.delta": dp_rule(dp.delta).nullable(),
    "strategy.max_epsilon": dp_rule(dp.max_epsilon),
    "strategy.noise_seed": SEED.nullable(),
    "strategy.clipping": dp_rule(dp.clipping),
    "strategy.target_quantile": dp_rule(dp.target_quantile),
    "strategy.clip_lr": dp_rule(dp.positive),
    "strategy.clipped_count_stddev": dp_rule(dp.positive).nullable(),
    "strategy.eta": POSITIVE,
    "strategy.eta_l": POSITIVE,
    "strategy.beta_1": number(ge=0, lt=1),
    "strategy.beta_2": number(ge=0, lt=1),
    "strategy.tau": POSITIVE,
    "strategy.proximal_mu": number(ge=0),
    "strategy.beta": number(ge=0, lt=0.5),
    "strategy.num_malicious_nodes": integer(ge=0),
    # conf/model/
    "model._target_": TARGET,
    "model.input_shape": SHAPE,
    "model.num_classes": integer(ge=2),
    "model.hidden": COUNT,
    "model.hidden_layers": COUNT,
    "model.embedding_dim": COUNT,
    "model.layers": COUNT,
    "model.tokens": FLAG,
    # conf/dataset/ (which names exist: fl_app.config.check)
    "dataset.name": TEXT,
    "dataset.input_shape": SHAPE,
    "dataset.num_classes": integer(ge=2),
    "dataset.test_fraction": FRACTION_OPEN,
    "dataset.root": FOLDER,
    "dataset.download": FLAG,
    "dataset.tokens": FLAG,
    "dataset.natural_partition": FLAG,
    "dataset.train_fraction": FRACTION_OPEN,
    "dataset.min_samples": COUNT,
    "dataset.roles": COUNT.nullable(),
    "dataset.test_limit": COUNT.nullable(),
    # conf/partitioner/
    "partitioner._target_": TARGET,
    "partitioner.num_partitions": SET_BY_FL_APP,
    "partitioner.partition_by": TEXT,
    "partitioner.alpha": POSITIVE,
    "partitioner.min_partition_size": integer(ge=0),
    "partitioner.self_balancing": FLAG,
    "partitioner.shuffle": FLAG,
    "partitioner.seed": SEED.nullable(),
    "partitioner.num_classes_per_partition": COUNT,
    "partitioner.class_assignment_mode": choice("random", "deterministic",
                                                "first-deterministic"),
    "partitioner.num_shards_per_partition": COUNT,
    # conf/privacy/ (what each name needs: fl_app.privacy.settings.client_rules)
    "privacy.name": choice(*dp.CLIENT_PRIVACY),
    "privacy.clip_norm": dp_rule(dp.clip_norm),
    "privacy.noise_multiplier": dp_rule(dp.noise_multiplier),
    "privacy.delta": dp_rule(dp.delta),
    "privacy.max_grad_norm": dp_rule(dp.max_grad_norm),
    # conf/secagg/ (how the keys relate: fl_app.secagg.settings)
    "secagg.name": choice("none", "secaggplus"),
    "secagg.num_shares": integer(ge=5).nullable(),  # the safe-plan minimum: secagg.settings
    "secagg.reconstruction_threshold": Rule(
        "an integer >= 2 or a fraction of num_shares in (0.5, 1]",
        lambda v: (_is_int(v) and v >= 2) or (isinstance(v, float) and 0.5 < v <= 1)),
    "secagg.clipping_range": POSITIVE,
    "secagg.quantization_range": integer(ge=2),
    "secagg.modulus_range": integer(ge=4),
    "secagg.max_weight": POSITIVE,
    "secagg.timeout": SECONDS.nullable(),
    "secagg.noise": choice("central", "distributed"),
    # conf/stopping/
    "stopping._target_": TARGET,
    "stopping.target": number(gt=0, le=1),
    "stopping.patience": COUNT,
    "stopping.min_delta": number(ge=0),
    # conf/logger/
    "logger._target_": TARGET,
    "logger.subdir": SUBDIR,
    "logger.flush_secs": POSITIVE,
}
# Group nodes, in the order they are checked: dataset before the model that interpolates it.
GROUP_NODES = ("dataset", "model", "strategy", "partitioner", "privacy", "secagg", "stopping",
               "logger")


def rule_for(key: str) -> Rule | None:
    """The rule of a dotted key; DP's inner strategy (strategy.strategy.x) takes strategy.x's."""
    if key.startswith("strategy.strategy."):
        key = "strategy." + key[len("strategy.strategy."):]
    return SCHEMA.get(key)


def leaves(tree: dict, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(dotted key, value) of every setting in a resolved config; group nodes are descended
    into, and DP's inner strategy too, while any other value (lists included) is one setting.
    A node's own settings come before its groups', and dataset before model: `seed=abc` is
    reported as seed, not as the strategy.seed that interpolates it."""
    groups = []
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and (key in GROUP_NODES or key == "strategy.strategy"):
            groups.append((key, value))
        else:
            yield key, value
    order = {key: i for i, key in enumerate(GROUP_NODES)}
    for key, value in sorted(groups, key=lambda group: order.get(group[0], len(order))):
        yield from leaves(value, key + ".")


def problem(tree: dict) -> str | None:
    """The first key of a resolved config that is unknown or breaks its rule, as one line."""
    for key, value in leaves(tree):
        rule = rule_for(key)
        if rule is None:
            return (f"{key}={_shown(value)} is not a setting fl_app knows: check the spelling "
                    "against conf/ (a new setting needs a line in fl_app/schema.py).")
        if not rule.ok(value):
            return f"{key}={_shown(value)} is invalid: it must be {rule.need}."
    return None


def _shown(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return "''" if value == "" else str(value)
