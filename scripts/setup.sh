#!/usr/bin/env bash
# Create .venv and install fl_app with its exact pins (see pyproject.toml and ../shared/DESIGN.md).
#
# The environment itself lives outside the project and .venv is a symlink to it: `flwr run .`
# walks every file under the project before it applies .gitignore (51,000 files and ~7 s with
# a venv inside) but never enters a symlinked folder. FL_APP_VENV picks the folder; an existing
# .venv (folder or symlink) is reused as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -e .venv ]; then
    rm -f .venv  # a dangling symlink: its environment was deleted
    project_key=$(pwd -P | sha256sum | cut -c1-12)
    cache=${XDG_CACHE_HOME:-${HOME:+$HOME/.cache}}
    target=${FL_APP_VENV:-${cache:+$cache/fl_app/venv-$project_key}}
    if [ -n "$target" ] && mkdir -p "$(dirname "$target")" 2>/dev/null; then
        [ -x "$target/bin/python" ] || "$PYTHON" -m venv "$target"
        ln -s "$target" .venv
    else
        echo "fl_app: no folder for the environment outside the project (set FL_APP_VENV);" \
             "installing into .venv inside it: flwr run . will then walk it (fl-app does not)" >&2
    fi
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch and torchvision in one pip command, pinned exactly: anything else drags in a torch
# whose torchvision ops fail to import (see DESIGN.md).
python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
python -m pip install --quiet -e ".[test]"
python -c "import torch, torchvision, flwr, hydra; print('fl_app: installed torch', torch.__version__, 'flwr', flwr.__version__)"
