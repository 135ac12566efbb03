"""Which evals can run here: their data present locally, or on a hub this machine can reach.

Used before an evaluation starts (``llm-pipeline eval`` without a config, and the pre-flight), so an
eval that cannot run is named with the reason and the flag that fixes it, instead of failing after the
model has loaded (perplexity with nothing to score, MMLU looking for the hub on an offline machine).
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from llm_pipeline.eval.task import make_task

if TYPE_CHECKING:
    from llm_pipeline.eval.config import EvalConfig


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """The user told the HF libraries to stay offline."""
    return _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE")


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub's endpoint (cached for the process)."""
    if hub_offline():
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_cached(dataset: str) -> bool:
    """Whether ``owner/name`` is in the local ``datasets`` or hub cache (so it loads offline)."""
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", hf_home / "datasets"))
    hub_cache = Path(os.environ.get("HF_HUB_CACHE", hf_home / "hub"))
    owner_name = dataset.replace("/", "___")
    return (datasets_cache / owner_name).is_dir() or (hub_cache / f"datasets--{dataset.replace('/', '--')}").is_dir()


def missing_files(paths: list[str] | tuple[str, ...]) -> list[str]:
    """The given (non-empty) paths that do not exist."""
    return [p for p in paths if p and not Path(p).exists()]


def unavailable_reason(task: str, cfg: EvalConfig) -> str | None:
    """Why ``task`` cannot run with ``cfg`` on this machine, with the fix; None when it can."""
    return make_task(task, cfg.section(task)).unavailable()
