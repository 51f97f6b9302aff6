"""Issue 22, items 11 and 12: a run config is input from outside, and is treated as such.

A `_target_` builds only allowed classes, at compose time and at every call site: the attack
`model._target_=os.system`, with an argument that would create a file, never runs (through
fl-app, through the ServerApp's and the ClientApp's run config, and at `targets.build`). Every
key has a type and a range, and a bad value is refused with one line naming the key, what it
got and what it needs, before anything trains.
"""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, RecordDict
from omegaconf import OmegaConf

from fl_app import client_core, server_loop
from fl_app.config import CONF_DIR, ConfigError, available, compose, overrides_from_run_config

FL_APP = str(Path(sys.executable).parent / "fl-app")
TINY = ["dataset=digits", "model=logreg", "num_clients=3", "num_rounds=1"]


def os_system_attack(marker: Path) -> list[str]:
    """Overrides that, built by hydra.utils.instantiate, call os.system('touch MARKER')."""
    return ["model._target_=os.system", "~model.input_shape", "~model.num_classes",
            f"+model._args_=['touch {marker}']"]


def one_line(err: BaseException) -> str:
    message = str(err)
    assert "\n" not in message.strip(), message
    return message


# --- item 11: the _target_ allow-list ------------------------------------------------------

def test_os_system_as_model_target_is_refused_at_compose_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(ConfigError) as err:
        compose([*TINY, *os_system_attack(marker)])
    assert one_line(err.value).startswith("model._target_=os.system is refused")
    assert not marker.exists()


def test_os_system_through_fl_app_is_refused_with_one_line_and_creates_no_file(tmp_path):
    marker = tmp_path / "pwned"
    proc = subprocess.run([FL_APP, *TINY, "engine=inprocess", *os_system_attack(marker),
                           f"output_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 1
    assert "fl-app: error: model._target_=os.system is refused" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not marker.exists()


def test_os_system_through_the_run_config_is_refused_by_server_and_client(tmp_path):
    marker = tmp_path / "pwned"
    run_config = {"overrides": shlex.join([*TINY, *os_system_attack(marker)])}
    # The ServerApp: composes the run config before it touches the grid.
    with pytest.raises(ConfigError, match=r"^model\._target_=os\.system is refused"):
        server_loop.main(grid=None, context=Context(run_id=1, node_id=0, node_config={},
                                                    state=RecordDict(), run_config=run_config))
    # A ClientApp on a SuperNode, handed the same run config with a train message.
    context = Context(run_id=2, node_id=1, state=RecordDict(), run_config=run_config,
                      node_config={"partition-id": 0, "num-partitions": 3})
    with pytest.raises(ConfigError, match=r"^model\._target_=os\.system is refused"):
        client_core.handle("train", RecordDict({"config": ConfigRecord({})}), context)
    assert not marker.exists()


@pytest.mark.parametrize("kind,node,says", [
    ("model", {"_target_": "os.system", "_args_": ["touch MARKER"]}, "model._target_=os.system"),
    ("model", {"_target_": "builtins.eval", "_args_": ["open('MARKER', 'w')"]},
     "model._target_=builtins.eval"),
    ("model", {"_target_": "subprocess.Popen", "_args_": [["touch", "MARKER"]]},
     "model._target_=subprocess.Popen"),
    ("model", {"_target_": "torch.load", "_args_": ["MARKER"]}, "model._target_=torch.load is"),
    ("model", {"_target_": "torch.hub.load", "_args_": ["a/b", "c"]}, "model._target_=torch.hub"),
    ("model", {"_target_": "torch.nn.modules.module.torch.load"}, "not a class"),
    ("model", {"_target_": "fl_app.config.Path", "_args_": ["MARKER"]}, "is pathlib.Path"),
    ("model", {"_target_": "fl_app.cli.main"}, "a function, not a class"),
    ("model", {"_target_": "torch.nn.modules.module.torch.jit.ScriptModule"},
     "is torch.jit._script.ScriptModule"),
    ("model", {"_target_": "fl_app.strategies.WeightedFedAvg"}, "is not a torch.nn.Module"),
    ("strategy", {"_target_": "fl_app.models.MLP", "input_shape": [4], "num_classes": 2},
     "is not a flwr.serverapp.strategy.Strategy"),
    ("strategy", {"_target_": "fl_app.deploy.federation.LocalFederation"},
     "strategy._target_=fl_app.deploy.federation.LocalFederation is refused"),
    ("model", {"_target_": "fl_app.models.MLP", "_partial_": True}, "model._partial_"),
    ("model", {"_target_": "fl_app.models.MLP", "input_shape": [4], "num_classes": 2,
               "hidden": {"_target_": "os.system", "_args_": ["touch MARKER"]}},
     "model.hidden._target_=os.system"),
    ("model", {"_target_": "torch.nn.Sequential",
               "_args_": [{"_target_": "os.system", "_args_": ["touch MARKER"]}]},
     "model._args_[0]._target_=os.system"),
    ("strategy", {"_target_": "fl_app.privacy.central.DPNoise",
                  "strategy": {"_target_": "os.system", "_args_": ["touch MARKER"]}},
     "strategy.strategy._target_=os.system"),
    ("model", {"_target_": 7}, "model._target_=7 is refused"),
    ("logger", {"_target_": "fl_app.loggers.TensorBoardLogger.__init__"}, "refused"),
])
def test_a_dangerous_target_is_refused_at_the_call_site_too(kind, node, says, tmp_path,
                                                             monkeypatch):
    from fl_app import targets

    monkeypatch.chdir(tmp_path)
    with pytest.raises(targets.TargetError) as err:
        targets.build(kind, OmegaConf.create(node))
    assert says in one_line(err.value)
    assert not (tmp_path / "MARKER").exists()


def test_a_target_under_a_key_that_builds_nothing_is_refused():
    from fl_app import targets

    assert targets.problem({"dataset": {"_target_": "fl_app.models.MLP"}}).startswith(
        "dataset._target_=fl_app.models.MLP is refused: nothing is built from 'dataset'")


def test_an_allowed_class_given_the_wrong_settings_fails_in_one_line_naming_the_key():
    from fl_app import targets

    cfg = compose([*TINY, "model._target_=torch.nn.Linear"])  # torch's own: allowed
    with pytest.raises(targets.TargetError) as err:
        targets.build("model", cfg.model)
    assert one_line(err.value).startswith("model._target_=torch.nn.Linear could not be built")


@pytest.mark.parametrize("group", ["logger", "model", "partitioner", "stopping", "strategy"])
def test_every_shipped_target_is_allowed(group):
    from fl_app import targets

    for name in available(group):
        node = OmegaConf.load(CONF_DIR / group / f"{name}.yaml")
        tree = OmegaConf.to_container(node)
        tree.pop("defaults", None)
        if "_target_" in tree:
            assert targets.problem({group: tree}) is None, (group, name)


# --- item 12: a type and range for every key ------------------------------------------------

BAD_VALUES = [
    # the examples
    (["lr=abc"], "lr"), (["seed=abc"], "seed"), (["local_epochs=1.5"], "local_epochs"),
    (["num_clients=2.5"], "num_clients"), (["num_rounds=2.5"], "num_rounds"),
    (["lr=inf"], "lr"), (["lr=nan"], "lr"), (["round_timeout=0"], "round_timeout"),
    (["node_wait_timeout=-5"], "node_wait_timeout"),
    (["secagg=secaggplus", "secagg.max_weight=inf"], "secagg.max_weight"),
    (["secagg=secaggplus", "secagg.quantization_range=16"], "secagg.quantization_range"),
    # one per key family
    (["num_rounds=true"], "num_rounds"), (["fraction_train=2"], "fraction_train"),
    (["batch_size=0"], "batch_size"), (["val_fraction=1"], "val_fraction"),
    (["checkpoints=some"], "checkpoints"), (["client_pool=1.5"], "client_pool"),
    (["min_clients=abc"], "min_clients"), (["fraction_evaluate=-0.1"], "fraction_evaluate"),
    (["strategy=fedsgd", "strategy.server_lr=abc"], "strategy.server_lr"),
    (["strategy=fedsgd", "strategy.server_momentum=1"], "strategy.server_momentum"),
    (["strategy=fedsgd", "strategy.weighted=maybe"], "strategy.weighted"),
    (["strategy.min_train_nodes=0"], "strategy.min_train_nodes"),
    (["strategy=dp_fedavg", "strategy.noise_seed=-1"], "strategy.noise_seed"),
    (["strategy=dp_fedavg", "strategy.clip_norm=inf"], "strategy.clip_norm"),
    (["strategy=dp_fedavg", "strategy.clipping=sometimes"], "strategy.clipping"),
    (["strategy=dp_fedsgd", "strategy.strategy.server_lr=-1"], "strategy.strategy.server_lr"),
    (["strategy=fedadam", "strategy.tau=-1"], "strategy.tau"),
    (["strategy=fedyogi", "strategy.beta_2=1"], "strategy.beta_2"),
    (["strategy=krum", "strategy.num_malicious_nodes=1.5"], "strategy.num_malicious_nodes"),
    (["strategy=fedtrimmedavg", "strategy.beta=0.5"], "strategy.beta"),
    (["strategy=fedprox", "strategy.proximal_mu=nan"], "strategy.proximal_mu"),
    (["model.hidden=0"], "model.hidden"), (["model=logreg", "model.num_classes=1"],
                                           "model.num_classes"),
    (["dataset.input_shape=[0,28]"], "dataset.input_shape"),
    (["dataset.test_fraction=1"], "dataset.test_fraction"), (["dataset.name=nope"], "dataset.name"),
    (["partitioner=dirichlet", "partitioner.alpha=-1"], "partitioner.alpha"),
    (["partitioner.num_partitions=3"], "partitioner.num_partitions"),
    (["partitioner=shards", "partitioner.shuffle=maybe"], "partitioner.shuffle"),
    (["privacy=local", "privacy.delta=abc"], "privacy.delta"),
    (["privacy=dpsgd", "privacy.max_grad_norm=inf"], "privacy.max_grad_norm"),
    (["secagg=secaggplus", "secagg.timeout=0"], "secagg.timeout"),
    (["stopping=plateau", "stopping.patience=0.5"], "stopping.patience"),
    (["stopping=target_accuracy", "stopping.target=inf"], "stopping.target"),
    (["logger=tensorboard", "logger.subdir=../../elsewhere"], "logger.subdir"),
    (["logger=tensorboard", "logger.flush_secs=0"], "logger.flush_secs"),
    (["+strategy.no_such_setting=1"], "strategy.no_such_setting"),
]


@pytest.mark.parametrize("overrides,key", BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_a_bad_value_is_refused_in_one_line_naming_the_key_what_it_got_and_needs(overrides, key):
    with pytest.raises(ConfigError) as err:
        compose(["num_clients=10", *overrides])
    message = one_line(err.value)
    got = overrides[-1].split("=", 1)[1]
    assert message.startswith(f"{key}=")
    assert got.strip("[]").split(",")[0] in message.split(" is ")[0]
    assert "it must be" in message or "is not a setting fl_app knows" in message


def test_a_bad_value_in_the_run_config_is_refused_the_same_way():
    with pytest.raises(ConfigError, match=r"^num_rounds=2.5 is invalid: it must be an integer"):
        compose(overrides_from_run_config({"overrides": "num_rounds=2.5"}))


@pytest.mark.parametrize("value", ["abc", "inf"])
def test_fl_app_refuses_a_bad_lr_in_one_line_without_a_traceback(value, tmp_path):
    proc = subprocess.run([FL_APP, *TINY, f"lr={value}", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1
    assert f"fl-app: error: lr={value} is invalid: it must be a finite number > 0." in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


SHAKESPEARE = ("dataset=shakespeare", "model=char_lstm", "partitioner=natural")


def composed_configs():
    """One composed config per option of every group (and the experiment preset)."""
    for group in ("strategy", "model", "dataset", "partitioner", "privacy", "secagg",
                  "stopping", "logger"):
        for name in available(group):
            option = f"{group}={name}"
            extra = ["secagg=secaggplus", "strategy=fedavg"] if group == "secagg" else []
            if option in SHAKESPEARE:  # the character model and its data come together
                extra = [o for o in SHAKESPEARE if o != option]
            yield [f"{group}={name}", "num_clients=10", *extra]
    yield ["+experiment=hospitals"]


def test_every_key_of_every_config_group_has_a_type_and_range():
    from fl_app import schema

    uncovered = set()
    for overrides in composed_configs():
        tree = OmegaConf.to_container(compose(overrides), resolve=True)
        for key, value in schema.leaves(tree):
            rule = schema.rule_for(key)
            if rule is None:
                uncovered.add(key)
            else:
                assert rule.ok(value), (overrides, key, value)  # the shipped value passes
    assert not uncovered, f"keys without a rule in fl_app/schema.py: {sorted(uncovered)}"


def test_a_key_added_without_a_rule_is_refused_naming_it():
    from fl_app import schema

    tree = OmegaConf.to_container(compose(["num_clients=10"]), resolve=True)
    tree["model"]["dropout"] = 0.5
    assert schema.problem(tree) == ("model.dropout=0.5 is not a setting fl_app knows: check "
                                    "the spelling against conf/ (a new setting needs a line in "
                                    "fl_app/schema.py).")
