"""Imported first by every Python entry point: run under the checkout's .venv without activating it.

``python3 scripts/05_pretrain.py`` (a system interpreter without the project's packages) re-executes
itself with ``.venv/bin/python`` when that exists, so the README's set-up is all a user needs.
"""

import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
_VENV = _ROOT / ".venv" / "bin" / "python"

try:
    import llm_pipeline  # noqa: F401
except ImportError:
    if _VENV.is_file() and Path(sys.prefix).resolve() != _VENV.parent.parent.resolve():
        os.execv(str(_VENV), [str(_VENV), *sys.argv])
    sys.exit(
        "error: the llm_pipeline package is not importable by this Python: run `make setup` (or "
        "scripts/setup_env.sh) and use .venv/bin/python, or activate .venv"
    )


def with_default_config(argv: list[str], default_config: str) -> list[str]:
    """``argv`` with ``--config default_config`` in front unless it names a config itself."""
    if "--config" in argv or any(a.startswith("--config=") for a in argv):
        return argv
    return ["--config", default_config, *argv]


def run(command: str, default_config: str | None = None) -> None:
    """``llm-pipeline <command>`` (e.g. ``"sft"`` or ``"data download"``) with this script's arguments;
    ``--config`` defaults to the spec's file."""
    from llm_pipeline.cli import main

    argv = sys.argv[1:]
    if default_config is not None:
        argv = with_default_config(argv, default_config)
    sys.exit(main([*command.split(), *argv]))
