#!/usr/bin/env bash
# Create .venv and install the package with its dev extras.
# Where no NVIDIA GPU is present, torch is pinned to the CPU build first so that pip does not pull a
# multi-GB CUDA wheel; with a GPU, the default (CUDA) build is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] NVIDIA GPU found: installing the CUDA build of torch"
    "${PIP[@]}" install -q "torch>=2.6"
  else
    echo "[setup] no NVIDIA GPU: installing the CPU build of torch"
    "${PIP[@]}" install -q "torch==${TORCH_CPU_VERSION:-2.13.0}"
  fi
fi
stamp="$VENV/.installed-$EXTRAS"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing llm-pipeline[$EXTRAS]"
  "${PIP[@]}" install -q -e ".[$EXTRAS]"
  touch "$stamp"
fi
