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
from urllib.parse import urlparse

from llm_pipeline.eval.config import EvalConfig
from llm_pipeline.eval.multiple_choice import BUILTIN_PREFIX, looks_like_local_path

HUB_DEFAULTS = {"mmlu": "cais/mmlu", "arc": "allenai/ai2_arc", "hellaswag": "Rowan/hellaswag"}
LOCAL_FLAG = {"mmlu": "--mmlu DIR (the CSV release) or --mmlu builtin:python", "arc": "--set arc.source=FILE.jsonl",
              "hellaswag": "--set hellaswag.source=FILE.jsonl"}  # fmt: skip


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


def _missing(paths: list[str] | tuple[str, ...]) -> list[str]:
    return [p for p in paths if p and not Path(p).exists()]


def unavailable_reason(task: str, cfg: EvalConfig) -> str | None:
    """Why ``task`` cannot run with ``cfg`` on this machine, with the fix; None when it can."""
    if task == "perplexity":
        pc = cfg.perplexity
        if missing := _missing(pc.files):
            return f"text file(s) not found: {', '.join(missing)}"
        if pc.files:
            return None
        if pc.packed_data and (Path(pc.packed_data) / "manifest.json").is_file():
            return None
        where = f" ({pc.packed_data} has no packed shards)" if pc.packed_data else ""
        return f"no held-out data to score{where}: pass --packed-data DIR (a data run's packed/) or --text FILE"
    if task in HUB_DEFAULTS:
        source = getattr(cfg, task).source or HUB_DEFAULTS[task]
        if source.startswith(BUILTIN_PREFIX) or Path(source).exists():
            return None
        if looks_like_local_path(source):
            return f"{source}: not found"
        if hub_cached(source) or hub_reachable():
            return None
        why = "HF_HUB_OFFLINE is set" if hub_offline() else "the hub is not reachable from here"
        return f"{source} is on the HF hub, {why} and it is not in the local cache: pass {LOCAL_FLAG[task]}"
    if task == "humaneval":
        he = cfg.humaneval
        return f"not found: {', '.join(m)}" if (m := _missing([he.samples or "", he.problems or ""])) else None
    if task == "safety":
        sc = cfg.safety
        return f"not found: {', '.join(m)}" if (m := _missing([sc.harmful or "", sc.benign or ""])) else None
    return f"unknown eval {task!r}"
