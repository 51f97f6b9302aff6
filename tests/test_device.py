"""The `device` setting: resolved on the machine that runs the code, refused in one line where
that GPU is missing, given to Flower's simulated clients as a GPU share; the CPU path learns,
and on a CUDA machine the same run ends at the same accuracy with the model on the GPU."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from fl_app import checkpoint, client_core, device, inprocess, training
from fl_app.cli import client_resources
from fl_app.config import ConfigError, check, compose
from fl_app.deploy import runner
from fl_app.models import get_weights
from fl_app.records import to_array_record

SMALL = ["dataset=digits", "num_clients=4", "num_rounds=3", "lr=0.1"]
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture
def gpus(monkeypatch):
    """Make torch report `n` CUDA GPUs (0: none) on this machine."""
    def set_count(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    return set_count


def test_auto_is_cuda_where_torch_sees_a_gpu_else_the_cpu(gpus):
    gpus(0)
    assert device.resolve("auto") == torch.device("cpu")
    gpus(1)
    assert device.resolve("auto") == torch.device("cuda")


def test_fl_app_device_sets_the_default_device(gpus, monkeypatch):
    gpus(0)
    monkeypatch.delenv("FL_APP_DEVICE")  # conftest's: the suite's expected values are the CPU's
    assert compose(SMALL).device == "auto"
    monkeypatch.setenv("FL_APP_DEVICE", "cuda:7")
    cfg = compose(SMALL)
    assert cfg.device == "cuda:7" and compose([*SMALL, "device=cpu"]).device == "cpu"
    with pytest.raises(ConfigError, match="device=cuda:7 is invalid: this machine"):
        device.resolve(cfg.device)  # also where it is used, whatever composed the config


def test_cpu_and_auto_need_no_gpu_and_cuda_n_names_that_gpu(gpus):
    gpus(0)
    assert device.problem("cpu") is None and device.problem("auto") is None
    assert device.resolve("cpu") == torch.device("cpu")
    gpus(2)
    assert device.resolve("cuda") == torch.device("cuda")
    assert device.resolve("cuda:1") == torch.device("cuda", 1)


@pytest.mark.parametrize("setting", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_stops_composing_in_one_line_naming_this_machine(gpus, setting):
    gpus(0)
    with pytest.raises(ConfigError) as err:
        compose([*SMALL, f"device={setting}"])
    message = str(err.value)
    assert message.startswith(f"device={setting} is invalid: this machine "
                              f"({socket.gethostname()}) has no CUDA GPU")
    assert "device=auto" in message and "\n" not in message


def test_cuda_index_beyond_the_gpu_count_names_the_valid_ones(gpus):
    gpus(2)
    cfg = compose(SMALL)  # checked by hand below: compose caches what it accepted
    cfg.device = "cuda:1"
    check(cfg)
    cfg.device = "cuda:2"
    with pytest.raises(ConfigError, match=r"device=cuda:2 is invalid: .* has 2 CUDA GPU\(s\), "
                                          r"numbered 0\.\.1: use device=cuda:0\.\.1"):
        check(cfg)


@pytest.mark.parametrize("setting", ["gpu", "cuda:x", "cuda:-1", "CUDA", "cuda0"])
def test_a_device_that_is_no_choice_names_the_choices(setting):
    with pytest.raises(ConfigError, match=rf"device={setting} is invalid: it must be auto, cpu, "
                                          r"cuda or cuda:N"):
        compose([*SMALL, f"device={setting}"])


def test_fl_app_with_a_gpu_it_does_not_have_stops_in_one_line(tmp_path):
    fl_app = str(Path(sys.executable).parent / "fl-app")
    proc = subprocess.run([fl_app, *SMALL, "device=cuda:99", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"fl-app: error: device=cuda:99 is invalid: this machine "
                                  f"({socket.gethostname()}) has ")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stdout + proc.stderr


def test_a_supernode_without_a_gpu_refuses_device_cuda_with_its_host_name(gpus):
    # The server's machine may have a GPU and a SuperNode's not: the client composes the run's
    # config itself, on its own machine, and says so in its error reply.
    gpus(0)
    client_core.clear_client_cache()
    context = Context(run_id=91, node_id=1, state=RecordDict(),
                      run_config={"overrides": "dataset=digits num_clients=2 device=cuda"},
                      node_config={"partition-id": 0, "num-partitions": 2})
    model = torch.nn.Linear(1, 1)
    content = RecordDict({"arrays": to_array_record(get_weights(model)),
                          "config": ConfigRecord({"server-round": 1})})
    with pytest.raises(ConfigError, match=rf"device=cuda is invalid: this machine "
                                          rf"\({socket.gethostname()}\) has no CUDA GPU"):
        client_core.handle("train", content, context)


def test_client_gpus_is_derived_from_the_device_unless_set(gpus):
    gpus(0)
    assert device.client_gpu_share(None, "auto") == 0.0
    assert device.client_gpu_share(None, "cpu") == 0.0
    assert device.client_gpu_share(0.5, "cpu") == 0.5
    gpus(1)
    assert device.client_gpu_share(None, "auto") == device.DEFAULT_GPU_SHARE == 0.1
    assert device.client_gpu_share(None, "cuda") == 0.1
    assert device.client_gpu_share(0.25, "cuda") == 0.25
    assert device.client_gpu_share(0, "auto") == 0.0  # clients on the CPU, as asked
    with pytest.raises(ConfigError, match="client_gpus=0 with device=cuda: Flower's simulation "
                                          "hides the GPUs"):
        device.client_gpu_share(0, "cuda")


@pytest.mark.parametrize("value", ["-0.5", "lots", "true"])
def test_a_negative_or_non_numeric_client_gpus_is_refused(value):
    with pytest.raises(ConfigError, match=rf"(?i)client_gpus={value} is invalid: it must be "
                                          r"null \(derived from device\) or a number >= 0"):
        compose([*SMALL, f"client_gpus={value}"])


def test_fl_app_passes_the_gpu_share_to_flowers_federation_config(gpus, monkeypatch, tmp_path):
    gpus(1)
    cfg = compose([*SMALL, "device=auto"])
    assert client_resources(cfg) == {"client_cpus": 1, "client_gpus": 0.1}
    cfg.client_gpus = 0.5
    assert client_resources(cfg) == {"client_cpus": 1, "client_gpus": 0.5}

    commands = []

    class FakeFlwrRun:  # what flwr_run starts: prints the run id, like `flwr run --stream`
        def __init__(self, cmd, **kwargs):
            commands.append(cmd)
            self.stdout = iter(["Successfully started run 7\n"])

        def wait(self, timeout=None):
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr(runner.subprocess, "Popen", FakeFlwrRun)
    monkeypatch.setattr(runner, "run_status", lambda *a, **k: "finished:completed")
    config_file = tmp_path / "run_config.toml"
    config_file.write_text("")
    assert runner.flwr_run(config_file, 3, {}, echo=False, **client_resources(cfg)).ok
    cfg.device, cfg.client_gpus = "cpu", None
    runner.flwr_run(config_file, 3, {}, echo=False, **client_resources(cfg))
    federation = [cmd[cmd.index("--federation-config") + 1] for cmd in commands]
    assert federation == [
        "num-supernodes=3 client-resources-num-cpus=1 client-resources-num-gpus=0.5",
        "num-supernodes=3 client-resources-num-cpus=1",  # no GPU share: Flower's default 0
    ]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _record_devices(monkeypatch) -> dict[str, set[str]]:
    """Wrap the training and evaluation loops to note where model and data were."""
    seen: dict[str, set] = {"train": set(), "evaluate": set(), "train_data": set(),
                            "train_calls": set()}

    def wrap(name: str):
        real = getattr(training, name)

        def recorded(model, x, y, *args, **kwargs):
            seen[name].add(f"{next(model.parameters()).device.type}/{x.device.type}/"
                           f"{y.device.type}")
            if name == "train":  # which tensors the loop was handed, and how often
                seen["train_data"].add((x.data_ptr(), y.data_ptr()))
                seen["train_calls"].add(len(seen["train_calls"]))
            return real(model, x, y, *args, **kwargs)
        monkeypatch.setattr(training, name, recorded)

    wrap("train")
    wrap("evaluate")
    return seen


def test_device_cpu_runs_end_to_end_in_process_and_learns(tmp_path, monkeypatch):
    seen = _record_devices(monkeypatch)
    summary = inprocess.run([*SMALL, "device=cpu", f"output_dir={tmp_path}"])
    rows = _rows(tmp_path)
    assert rows[-1]["test_loss"] < rows[0]["test_loss"]
    assert summary["test_accuracy"] > 0.6  # chance: 0.1
    assert seen["train"] == {"cpu/cpu/cpu"} and seen["evaluate"] == {"cpu/cpu/cpu"}
    # 4 clients x 3 rounds trained on 4 sets of tensors: built and moved once, then kept.
    assert len(seen["train_calls"]) == 12 and len(seen["train_data"]) == 4
    saved = torch.load(tmp_path / "model.pt")
    assert all(t.device.type == "cpu" for t in saved.values())
    # A run may go on elsewhere: on another device, with its files in another folder.
    checkpoint.check_resumable(tmp_path, compose([*SMALL, "device=auto", "data_root=/elsewhere",
                                                  "client_gpus=0.5", f"resume={tmp_path}"]))
    with pytest.raises(ConfigError, match="lr: run 0.1 vs now 0.2"):
        checkpoint.check_resumable(tmp_path, compose([*SMALL, "lr=0.2", f"resume={tmp_path}"]))


def test_device_auto_without_a_gpu_is_the_cpu_run_exactly(tmp_path, gpus):
    gpus(0)
    inprocess.run([*SMALL, "num_rounds=2", "device=cpu", f"output_dir={tmp_path / 'cpu'}"])
    inprocess.run([*SMALL, "num_rounds=2", "device=auto", f"output_dir={tmp_path / 'auto'}"])
    losses = [[r["test_loss"] for r in _rows(tmp_path / d)] for d in ("cpu", "auto")]
    assert losses[0] == losses[1]


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: torch sees none on this machine")
def test_the_same_run_on_cuda_ends_within_noise_of_the_cpu_run_with_the_model_on_the_gpu(
        tmp_path, monkeypatch):
    runs = {}
    for name in ("cpu", "cuda"):
        seen = _record_devices(monkeypatch)
        runs[name] = inprocess.run([*SMALL, "num_rounds=5", f"device={name}",
                                    f"output_dir={tmp_path / name}"])
        monkeypatch.undo()
        runs[name]["seen"] = seen
    seen = runs["cuda"]["seen"]
    assert seen["train"] == {"cuda/cuda/cuda"} and seen["evaluate"] == {"cuda/cuda/cuda"}
    assert len(seen["train_calls"]) == 20 and len(seen["train_data"]) == 4  # kept on the GPU
    # Same initial model and batch order on both; only floating-point summation order differs.
    assert runs["cpu"]["test_accuracy"] > 0.6
    assert abs(runs["cuda"]["test_accuracy"] - runs["cpu"]["test_accuracy"]) <= 0.02
    cpu_loss = [r["test_loss"] for r in _rows(tmp_path / "cpu")]
    cuda_loss = [r["test_loss"] for r in _rows(tmp_path / "cuda")]
    assert cuda_loss[0] == pytest.approx(cpu_loss[0], rel=1e-4)  # the same initial model
    assert cuda_loss == pytest.approx(cpu_loss, rel=0.05)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: torch sees none on this machine")
def test_fedsgd_gradients_and_dpsgd_run_on_cuda_like_on_the_cpu():
    cfg = compose(SMALL)
    clients = {}
    for name in ("cpu", "cuda"):
        cfg.device = name
        clients[name] = client_core.build_client(cfg, 0, 4)
    assert clients["cuda"].data.x_train.device.type == "cuda"
    params = clients["cpu"].get_parameters({})
    grads = {name: c.fit(params, {"mode": "gradient", "server-round": 1})[0]
             for name, c in clients.items()}
    for g_cpu, g_cuda in zip(grads["cpu"], grads["cuda"], strict=True):
        assert isinstance(g_cuda, np.ndarray)
        np.testing.assert_allclose(g_cuda, g_cpu, rtol=1e-3, atol=1e-5)

    client = clients["cuda"]
    x, y = client.data.x_train, client.data.y_train
    loss, history = training.train_dpsgd(client.model, x, y, epochs=1, batch_size=10, lr=0.1,
                                         noise_multiplier=1.0, max_grad_norm=1.0,
                                         accountant_history=[])
    assert np.isfinite(loss) and history
    assert all(p.device.type == "cuda" for p in client.model.parameters())
