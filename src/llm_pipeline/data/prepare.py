"""``llm-pipeline data prepare``: download -> clean -> tokenizer -> pack from one config.

Each step's manifest records a fingerprint of its config section and its input's fingerprint; a step
whose fingerprint is unchanged is skipped, so re-running after editing e.g. ``pack`` re-packs only.
Steps on a Ray cluster (``clean.executor.kind: ray``, ``pack.executor: ray``) connect to it when they
run, so a ``prepare`` with nothing to do needs no cluster.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from llm_pipeline.config import save_config
from llm_pipeline.data.clean import clean, clean_fingerprint
from llm_pipeline.data.config import DataConfig
from llm_pipeline.data.manifest import is_up_to_date
from llm_pipeline.data.pack import pack, pack_fingerprint
from llm_pipeline.data.sources import download, source_fingerprint
from llm_pipeline.data.tokenizer import build_tokenizer, tokenizer_fingerprint

log = logging.getLogger(__name__)
STEPS = ("download", "clean", "tokenizer", "pack")


def prepare(cfg: DataConfig, *, force: bool = False, show_progress: bool = True) -> dict[str, str]:
    """Run the four steps in order, skipping up-to-date ones; returns {step: "ran" | "skipped"}."""
    save_config(cfg, cfg.output_dir / "data_config.yaml")
    plan: list[tuple[str, Any, Callable[[], str], Callable[[], Any]]] = [
        ("download", cfg.raw_dir, lambda: source_fingerprint(cfg), lambda: download(cfg, show_progress=show_progress)),
        ("clean", cfg.clean_dir, lambda: clean_fingerprint(cfg), lambda: clean(cfg, show_progress=show_progress)),
        (
            "tokenizer",
            cfg.tokenizer_dir,
            lambda: tokenizer_fingerprint(cfg),
            lambda: build_tokenizer(cfg, show_progress=show_progress),
        ),
        ("pack", cfg.packed_dir, lambda: pack_fingerprint(cfg), lambda: pack(cfg, show_progress=show_progress)),
    ]
    status: dict[str, str] = {}
    for name, directory, fp, run in plan:
        if not force and is_up_to_date(directory, fp()):
            log.info("%s: up to date (%s), skipped", name, directory)
            status[name] = "skipped"
            continue
        result = run()
        if result is None:  # Slurm: jobs submitted, later steps must wait for them
            log.info("%s: submitted to the cluster; run `data prepare` again when it finishes", name)
            status[name] = "submitted"
            break
        status[name] = "ran"
    return status
