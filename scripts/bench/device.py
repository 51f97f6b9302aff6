"""Issue 19: a round of the 2NN and of the CNN on the in-process engine, on the CPU and on a
GPU where torch sees one (`device=cpu` / `device=cuda`).

Each figure is the median of a run's rounds after its first (the first also builds the clients
and moves their data to the device): 10 clients of the embedded MNIST, E=1, B=10, every client
every round, central evaluation included, as `fl-app model=... device=...` runs them.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from bench.common import Part, Row, fmt_s, median

MODELS = {"2NN": "mlp", "CNN": "cnn"}


def _round_seconds(model: str, device: str, rounds: int, work: Path) -> list[float]:
    from fl_app import inprocess

    out = Path(tempfile.mkdtemp(prefix=f"{model}-{device.replace(':', '')}-", dir=work))
    inprocess.run([f"model={model}", f"device={device}", "num_clients=10",
                   f"num_rounds={rounds}", f"output_dir={out}"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["seconds"] for r in rows]


def run(work: Path, rounds_cnn: int, rounds_mlp: int) -> Part:
    work.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    part = Part(data={"gpu": gpu, "cpu threads": torch.get_num_threads()})
    for label, model in MODELS.items():
        rounds = max(2, rounds_cnn if model == "cnn" else rounds_mlp)
        figures = {}
        for device in ("cpu", "cuda") if gpu else ("cpu",):
            seconds = _round_seconds(model, device, rounds, work)
            part.data[f"{label} {device} round seconds"] = seconds
            figures[device] = median(seconds[1:])
        cpu = figures["cpu"]
        part.rows.append(Row(f"In-process round, {label} (10 clients, embedded MNIST, E=1, "
                             "B=10), CPU", fmt_s(cpu)))
        if gpu:
            cuda = figures["cuda"]
            part.rows.append(Row(f"  same, GPU ({gpu})", f"{fmt_s(cuda)} ({cpu / cuda:.1f}x "
                                                          "the CPU)"))
        else:
            part.rows.append(Row("  same, GPU", "no GPU here"))
    return part
