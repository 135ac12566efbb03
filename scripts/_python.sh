# Sourced by the shell entry points: the project's interpreter, with no virtual environment to activate.
# $PYTHON wins when set; else the checkout's .venv (what `make setup` / scripts/setup_env.sh create);
# else python3 from PATH. The checkout's own src/ comes first on the import path, so a script always runs
# the code of the folder it lives in.
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO_ROOT/.venv/bin/python" ]; then PYTHON="$REPO_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$REPO_ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
