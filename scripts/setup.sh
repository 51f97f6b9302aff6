#!/usr/bin/env bash
# Create .venv and install fl_app with its exact pins (see pyproject.toml and ../shared/DESIGN.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch and torchvision in one pip command, pinned exactly: anything else drags in a torch
# whose torchvision ops fail to import (see DESIGN.md).
python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
python -m pip install --quiet -e ".[test]"
python -c "import torch, torchvision, flwr, hydra; print('fl_app: installed torch', torch.__version__, 'flwr', flwr.__version__)"
