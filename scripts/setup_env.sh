#!/usr/bin/env bash
# Create .venv and install the package with its dev extras.
# Where no NVIDIA GPU is present, torch's CPU build is installed first, so that pip does not pull a
# multi-GB CUDA wheel; with a GPU, the default (CUDA) build is installed. The CPU build is looked for
# in this order, stopping at the first that works:
#   1. torch==VERSION+cpu from the indexes pip is already configured with (a local mirror or wheel
#      folder; works offline where the mirror has it);
#   2. on Linux, the same from PyTorch's CPU index, https://download.pytorch.org/whl/cpu (PyPI itself
#      only has the CUDA build for Linux);
#   3. plain torch==VERSION (macOS and Windows: PyPI's wheel is the CPU build there).
# TORCH_CPU_VERSION picks the version; TORCH_CPU_INDEX another CPU index (e.g. a company mirror).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS-dev}  # EXTRAS= (empty): the package alone, as `make demo` installs it
TORCH_CPU_VERSION=${TORCH_CPU_VERSION:-2.13.0}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

install_cpu_torch() {
  local cpu="torch==${TORCH_CPU_VERSION}+cpu"
  if "${PIP[@]}" install -q "$cpu" 2>/dev/null; then
    echo "[setup] installed $cpu"
  elif [ "$(uname -s)" = Linux ] && "${PIP[@]}" install -q "$cpu" --extra-index-url "$TORCH_CPU_INDEX"; then
    echo "[setup] installed $cpu from $TORCH_CPU_INDEX"
  else
    echo "[setup] no +cpu build found: installing torch==$TORCH_CPU_VERSION (the CPU build on macOS/Windows)"
    "${PIP[@]}" install -q "torch==$TORCH_CPU_VERSION"
  fi
}

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] NVIDIA GPU found: installing the CUDA build of torch"
    "${PIP[@]}" install -q "torch>=2.6"
  else
    echo "[setup] no NVIDIA GPU: installing the CPU build of torch"
    install_cpu_torch
  fi
fi
spec=".${EXTRAS:+[$EXTRAS]}"
stamp="$VENV/.installed-${EXTRAS:-base}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing llm-pipeline$spec"
  "${PIP[@]}" install -q -e "$spec"
  touch "$stamp"
fi
