"""The data steps' connection to a Ray cluster (``clean.executor.kind: ray``, ``pack.executor: ray``).

The user starts the cluster (``ray start --head`` on one node, ``ray start --address HEAD:PORT`` on the
others) and names it in ``clean.executor.ray_address``; datatrove's ``RayPipelineExecutor`` and the pack
step then submit their tasks to it from this process, which waits for them (like the local executor).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from llm_pipeline.config import ConfigError

log = logging.getLogger(__name__)


class RayUnavailable(ConfigError):
    """Ray is not installed; the message names the extra that installs it."""


def require_ray(what: str) -> None:
    if importlib.util.find_spec("ray") is None:
        raise RayUnavailable(
            f"{what} runs on Ray but the ray package is not installed: pip install 'llm-pipeline[ray]'"
        )


def worker_env() -> dict[str, str]:
    """Environment of the cluster's workers: this package's folder first on their import path, so a checkout
    on a filesystem every node sees works without installing the package on each node."""
    src = str(Path(__file__).resolve().parents[2])
    path = [src, *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != src)]
    return {"PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


@contextlib.contextmanager
def ray_connection(address: str | None, what: str = "clean.executor.kind=ray") -> Iterator[None]:
    """Connect this process to the cluster at ``address`` for the block (None: ``$RAY_ADDRESS``, else the
    cluster started on this machine, else a private local instance). Re-entrant: an outer connection (a
    caller's own ``ray.init``) is reused and left open."""
    require_ray(what)
    import ray

    if ray.is_initialized():
        yield
        return
    try:
        info = ray.init(
            address=address,
            runtime_env={"env_vars": worker_env()},
            logging_level=logging.WARNING,
            log_to_driver=False,  # the tasks' logs stay in the cluster's session folder and in clean/logs/
        )
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConfigError(
            f"cannot connect to the Ray cluster at {address or os.environ.get('RAY_ADDRESS') or 'this machine'} "
            f"(clean.executor.ray_address): {e}. Start it with `ray start --head` and give the address it prints."
        ) from None
    log.info("connected to the Ray cluster at %s", getattr(info, "address_info", {}).get("address", address))
    try:
        yield
    finally:
        ray.shutdown()
