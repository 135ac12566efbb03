"""Clean and deduplicate raw shards with datatrove (``llm-pipeline data clean``).

Stages (each a datatrove pipeline, run by its local, Slurm or Ray executor):

    filter:  read raw shards -> Unicode normalisation -> quality filters -> dedup signatures -> stage/
    dedup:   find exact and near duplicates (rensa backend: one task; datatrove backend: its 3 MinHash stages)
    apply:   stage/ -> drop duplicates -> output/
    report:  count kept and excluded documents by reason -> manifest.json (checks in = kept + dropped)

Every dropped document is written to ``excluded/<step>/`` with its reason, so nothing disappears.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import re
import shlex
import shutil
import sys
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.formatters.base import BaseFormatter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter

from llm_pipeline.config import config_to_dict
from llm_pipeline.data.config import CleanConfig, CodeFilterConfig, DataConfig
from llm_pipeline.data.dedup import DUPLICATES_FILE, DedupFilter, DedupSignatures, FindDuplicates
from llm_pipeline.data.manifest import MANIFEST, read_manifest, write_json
from llm_pipeline.data.progress import progress_bar
from llm_pipeline.data.ray_cluster import ray_connection
from llm_pipeline.hashing import stable_hash

log = logging.getLogger(__name__)


class UnicodeNormalizer(BaseFormatter):
    """NFC/NFKC normalisation, so visually identical texts hash (and dedup) identically."""

    name = "🔤 Unicode normalisation"

    def __init__(self, form: str = "NFC"):
        super().__init__()
        self.form = form

    def format(self, text: str) -> str:
        return unicodedata.normalize(self.form, text)  # type: ignore[arg-type]


_ENCODED = re.compile(r"[A-Za-z0-9+/=\\]{64,}")
_NOT_ALNUM = re.compile(r"[\W_]+")


class CodeQualityFilter(BaseFilter):
    """Code-aware quality filter: prose heuristics (stop words, terminal punctuation) would drop most code."""

    name = "🧑‍💻 code quality"

    def __init__(self, cfg: CodeFilterConfig | None = None, exclusion_writer: JsonlWriter | None = None):
        super().__init__(exclusion_writer)
        self.cfg = cfg or CodeFilterConfig()

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        text, c = doc.text, self.cfg
        if len(text) < c.min_chars:
            return False, "too_short"
        lengths = [len(line) for line in text.splitlines()] or [0]
        if max(lengths) > c.max_line_length:
            return False, "long_line"
        if sum(lengths) / len(lengths) > c.max_mean_line_length:
            return False, "mean_line_length"
        if len(_NOT_ALNUM.sub("", text)) / len(text) < c.min_alnum_fraction:
            return False, "alnum_fraction"
        if sum(len(m) for m in _ENCODED.findall(text)) / len(text) > c.max_encoded_fraction:
            return False, "encoded_data"
        return True


def _writer(folder: Path) -> JsonlWriter:
    return JsonlWriter(str(folder), output_filename="${rank}.jsonl.gz")


def build_filters(cfg: CleanConfig, excluded: Path) -> list[PipelineStep]:
    """Normaliser + the configured quality filter set, each with its own exclusion folder."""
    steps: list[PipelineStep] = []
    if cfg.normalize != "none":
        steps.append(UnicodeNormalizer(cfg.normalize))
    if cfg.filters == "code":
        steps.append(CodeQualityFilter(cfg.code, exclusion_writer=_writer(excluded / "code_quality")))
    elif cfg.filters == "prose":
        from datatrove.pipeline.filters import (
            C4QualityFilter,
            FineWebQualityFilter,
            GopherQualityFilter,
            GopherRepetitionFilter,
        )

        steps += [
            GopherRepetitionFilter(language=cfg.language, exclusion_writer=_writer(excluded / "gopher_repetition")),
            GopherQualityFilter(language=cfg.language, exclusion_writer=_writer(excluded / "gopher_quality")),
            C4QualityFilter(
                filter_no_terminal_punct=False, language=cfg.language, exclusion_writer=_writer(excluded / "c4")
            ),
            FineWebQualityFilter(language=cfg.language, exclusion_writer=_writer(excluded / "fineweb")),
        ]
    return steps


class CleanReport(PipelineStep):
    """Final single-task step: count kept and excluded documents by reason, check the books balance."""

    name = "📒 clean report"

    def __init__(self, cfg_json: dict[str, Any], fp: str):
        super().__init__()
        self.cfg_json, self.fp = cfg_json, fp

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if rank == 0:
            write_clean_manifest(DataConfig.model_validate(self.cfg_json), self.fp)
        yield from ()


def _count_docs(folder: Path) -> tuple[int, int, Counter[str]]:
    docs, nbytes, reasons = 0, 0, Counter[str]()
    for f in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            for line in fh:
                rec = json.loads(line)
                docs += 1
                nbytes += len(rec["text"].encode("utf-8", "surrogatepass"))
                reasons[(rec.get("metadata") or {}).get("filter_reason") or "dropped"] += 1
    return docs, nbytes, reasons


def write_clean_manifest(cfg: DataConfig, fp: str) -> dict[str, Any]:
    """Count what the pipeline kept and excluded by reason into ``manifest.json``."""
    root = cfg.clean_dir
    docs_in = read_manifest(cfg.raw_dir)["documents"]
    kept, kept_bytes, _ = _count_docs(root / "output")
    dropped: dict[str, int] = {}
    for step_dir in sorted(p for p in (root / "excluded").glob("*") if p.is_dir()):
        _, _, reasons = _count_docs(step_dir)
        for reason, n in sorted(reasons.items()):
            dropped[f"{step_dir.name}/{reason}"] = n
    n_dropped = sum(dropped.values())
    manifest = {
        "step": "clean",
        "fingerprint": fp,
        "documents_in": docs_in,
        "documents_kept": kept,
        "bytes_kept": kept_bytes,
        "documents_dropped": n_dropped,
        "dropped_by_reason": dropped,
        "balanced": docs_in == kept + n_dropped,
        "output": "output",
        "excluded": "excluded",
        "config": config_to_dict(cfg.clean),
    }
    write_json(root / MANIFEST, manifest)
    return manifest


def check_clean_manifest(manifest: dict[str, Any], root: Path) -> None:
    """Raise if documents went missing or none survived (run in the caller, not inside a worker)."""
    n_in, kept, n_dropped = manifest["documents_in"], manifest["documents_kept"], manifest["documents_dropped"]
    if not manifest["balanced"]:
        raise RuntimeError(f"clean: {n_in} documents in but {kept} kept + {n_dropped} dropped; see {root}")
    if kept == 0:
        raise ValueError(
            f"clean: no documents survived ({manifest['dropped_by_reason']}); the filters may not suit this corpus "
            f"(clean.filters=code for source code, none to disable); dropped documents are in {root / 'excluded'}"
        )


def clean_fingerprint(cfg: DataConfig) -> str:
    return stable_hash("clean", config_to_dict(cfg.clean), read_manifest(cfg.raw_dir)["fingerprint"])


def build_stages(cfg: DataConfig, fp: str) -> list[tuple[str, list[PipelineStep], int]]:
    """The clean pipelines as (name, steps, tasks), in the order they must run."""
    c, root, raw = cfg.clean, cfg.clean_dir, str(cfg.raw_dir)
    tasks = c.executor.tasks
    excluded = root / "excluded"
    mh = c.minhash
    dedup = c.exact_dedup or mh.enabled
    reader = JsonlReader(raw, glob_pattern="shard_*.jsonl.gz", text_key="text", id_key="id", add_file_path=False)
    first: list[PipelineStep] = [reader, *build_filters(c, excluded)]
    stages: list[tuple[str, list[PipelineStep], int]] = []
    if not dedup:
        stages.append(("filter", [*first, _writer(root / "output")], tasks))
    elif mh.backend == "rensa" or not mh.enabled:
        num_perm = mh.num_buckets * mh.hashes_per_bucket
        sigs = DedupSignatures(
            str(root / "signatures"), ngram_size=mh.ngram_size, num_perm=num_perm, seed=mh.seed, minhash=mh.enabled
        )
        stages.append(("filter", [*first, sigs, _writer(root / "stage")], tasks))
        find = FindDuplicates(
            str(root / "signatures"),
            str(root / DUPLICATES_FILE),
            num_buckets=mh.num_buckets,
            hashes_per_bucket=mh.hashes_per_bucket,
            min_similarity=mh.min_similarity,
            exact=c.exact_dedup,
            near=mh.enabled,
        )
        stages.append(("dedup", [find], 1))
        stages.append(("apply", [_stage_reader(root), _dedup_filter(root, excluded), _writer(root / "output")], tasks))
    else:  # datatrove's own MinHash: signatures -> buckets -> clusters -> filter (exact dups are MinHash dups here)
        from datatrove.pipeline.dedup import (
            MinhashDedupBuckets,
            MinhashDedupCluster,
            MinhashDedupFilter,
            MinhashDedupSignature,
        )
        from datatrove.pipeline.dedup.minhash import MinhashConfig as DTMinhashConfig

        dt_cfg = DTMinhashConfig(
            n_grams=mh.ngram_size, num_buckets=mh.num_buckets, hashes_per_bucket=mh.hashes_per_bucket, seed=mh.seed
        )
        stages.append(("filter", [*first, _writer(root / "stage")], tasks))
        sig_step = MinhashDedupSignature(str(root / "mh_sigs"), dt_cfg)
        bucket_step = MinhashDedupBuckets(str(root / "mh_sigs"), str(root / "mh_buckets"), config=dt_cfg)
        cluster_step = MinhashDedupCluster(str(root / "mh_buckets"), str(root / "mh_remove"), config=dt_cfg)
        stages.append(("signatures", [_stage_reader(root), sig_step], tasks))
        stages.append(("buckets", [bucket_step], mh.num_buckets))
        stages.append(("cluster", [cluster_step], 1))
        drop = MinhashDedupFilter(str(root / "mh_remove"), exclusion_writer=_writer(excluded / "minhash"))
        stages.append(("apply", [_stage_reader(root), drop, _writer(root / "output")], tasks))
    stages.append(("report", [CleanReport(config_to_dict(cfg), fp)], 1))
    return stages


def _stage_reader(root: Path) -> JsonlReader:
    return JsonlReader(str(root / "stage"), glob_pattern="*.jsonl.gz", add_file_path=False)


def _dedup_filter(root: Path, excluded: Path) -> DedupFilter:
    return DedupFilter(str(root / DUPLICATES_FILE), exclusion_writer=_writer(excluded / "dedup"))


def slurm_env_command() -> str:
    """The Slurm tasks' environment: this interpreter's ``bin/`` first on PATH (datatrove's
    ``launch_pickled_pipeline`` and ``merge_stats`` live there) and this package first on PYTHONPATH,
    so the jobs run the code and the environment that submitted them (the checkout's .venv)."""
    bin_dir = shlex.quote(str(Path(sys.executable).parent))
    src = shlex.quote(str(Path(__file__).resolve().parents[2]))
    return f'export PATH={bin_dir}:"$PATH" PYTHONPATH={src}"${{PYTHONPATH:+:$PYTHONPATH}}"'


def make_executor(cfg: DataConfig, name: str, steps: list[PipelineStep], tasks: int, depends: Any) -> Any:
    """datatrove executor for one stage, chained on the previous one (Slurm/Ray jobs wait on it)."""
    e = cfg.clean.executor
    logs = str(cfg.clean_dir / "logs" / name)
    if e.kind == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        s = e.slurm
        return SlurmPipelineExecutor(
            pipeline=steps,
            tasks=tasks,
            time=s.time,
            partition=s.partition,
            cpus_per_task=s.cpus_per_task,
            mem_per_cpu_gb=s.mem_per_cpu_gb,
            job_name=f"{s.job_name}-{name}",
            logging_dir=logs,
            sbatch_args=dict(s.sbatch_args) or None,
            depends=depends,
            env_command=s.env_command or slurm_env_command(),
        )
    if e.kind == "ray":
        from datatrove.executor import RayPipelineExecutor

        return RayPipelineExecutor(
            pipeline=steps,
            tasks=tasks,
            workers=e.workers,
            logging_dir=logs,
            depends=depends,
            cpus_per_task=e.ray_cpus_per_task,
        )
    return QuietLocalExecutor(
        pipeline=steps,
        tasks=tasks,
        workers=min(e.workers, tasks),
        logging_dir=logs,
        depends=depends,
    )


class QuietLocalExecutor(LocalPipelineExecutor):
    """datatrove's local executor, defined here so that its worker processes import this module (and so
    keep datatrove's per-task log and statistics out of the console) whatever the pipeline's steps are."""


def clean(cfg: DataConfig, *, show_progress: bool = True) -> dict[str, Any] | None:
    """Run the clean pipelines; returns the manifest (None when Slurm jobs were only submitted)."""
    read_manifest(cfg.raw_dir)  # fail early, naming the step to run
    fp = clean_fingerprint(cfg)
    root = cfg.clean_dir
    if root.exists():  # datatrove skips "completed" tasks: a re-run must start from an empty folder
        shutil.rmtree(root)
    root.mkdir(parents=True)
    # an empty (valid) shard, so the apply stage's reader finds a file even when every document was
    # filtered out; the report stage then says so clearly instead of datatrove's "No files found"
    (root / "stage").mkdir()
    (root / "stage" / "_empty.jsonl.gz").write_bytes(gzip.compress(b"", mtime=0))
    stages = build_stages(cfg, fp)
    if cfg.clean.executor.kind == "slurm":  # one job array per stage, each depending on the previous one
        executor = None
        for name, steps, tasks in stages:
            executor = make_executor(cfg, name, steps, tasks, executor)
        assert executor is not None
        executor.run()  # sbatch returns at once
        log.info("clean: Slurm jobs submitted; their report stage writes %s when they finish", root / MANIFEST)
        return None
    e = cfg.clean.executor
    engine = ray_connection(e.ray_address) if e.kind == "ray" else contextlib.nullcontext()
    with engine, progress_bar("clean (datatrove stages)", total=len(stages), enabled=show_progress) as bar:
        for name, steps, tasks in stages:  # local and Ray block until a stage is done
            make_executor(cfg, name, steps, tasks, None).run()
            bar.advance(1)
    manifest = read_manifest(root)
    check_clean_manifest(manifest, root)
    log.info(
        "clean: %d in, %d kept, dropped %s (datatrove's logs and statistics: %s)",
        manifest["documents_in"],
        manifest["documents_kept"],
        manifest["dropped_by_reason"],
        root / "logs",
    )
    return manifest


def _quiet_task_logger(logging_dir: Any, rank: int, local_rank: int = 0, node_rank: int = -1) -> Any:
    """datatrove's per-task logger with stderr at WARNING; the full log still goes to ``logs/<stage>/logs/``."""
    from loguru import logger

    logger.remove()
    logfile = logging_dir.open(f"logs/task_{rank:05d}.log", "w")
    fmt = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {name}:{function}:{line} - {message}"
    logger.add(sys.stderr, level="WARNING", format=fmt, colorize=False)
    logger.add(logfile, level="DEBUG", format=fmt, colorize=False)
    logger.info(f"Launching pipeline for {rank=}")
    return logfile


def _quiet_default_logger() -> None:
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING", colorize=False)


def _quiet_datatrove() -> None:
    """datatrove prints every task's stats at INFO; keep stderr to warnings (this module is imported in workers)."""
    import datatrove.executor.base as dt_base
    import datatrove.utils.logging as dt_logging

    dt_base.add_task_logger = _quiet_task_logger
    dt_logging.setup_default_logger = _quiet_default_logger
    _quiet_default_logger()


if os.environ.get("LLM_PIPELINE_DATATROVE_VERBOSE") != "1":
    _quiet_datatrove()
