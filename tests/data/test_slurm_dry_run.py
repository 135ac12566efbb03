"""The Slurm executor as far as it goes without Slurm: ``data prepare`` with ``clean.executor.kind: slurm``
against a stand-in ``sbatch`` that records each job script and prints a job id, as the real one does.

Checks the job chain (one array job per stage, each ``afterok`` on the previous one, plus datatrove's
stats-merging job), the ``#SBATCH`` options from the config, and that every job runs this environment's
interpreter and package (datatrove's default would rely on whatever ``launch_pickled_pipeline`` is on the
compute node's PATH).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from llm_pipeline.data.config import DataConfig
from llm_pipeline.data.prepare import prepare

from .corpus import planted_duplicates_corpus, write_jsonl

FAKE_SBATCH = """#!/bin/bash
# records the job (its options and its script) and answers like sbatch
n=$(ls "{jobs}" | wc -l)
mkdir -p "{jobs}/$n" && cp "${{@: -1}}" "{jobs}/$n/script.sh" && printf '%s\\n' "$@" > "{jobs}/$n/args"
echo "Submitted batch job $((1000 + n))"
"""


def test_clean_on_slurm_submits_a_dependent_job_chain_in_this_environment(tmp_path, monkeypatch):
    records, _ = planted_duplicates_corpus(seed=4, n_unique=12, n_exact=2, n_near=0)
    write_jsonl(tmp_path / "in.jsonl", records)
    jobs, bin_dir = tmp_path / "jobs", tmp_path / "bin"
    jobs.mkdir()
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(jobs=jobs))
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path('/usr/bin')}:{Path('/bin')}")
    cfg = DataConfig.model_validate(
        {
            "output_dir": str(tmp_path / "out"),
            "source": {"kind": "local", "paths": [str(tmp_path / "in.jsonl")], "documents_per_shard": 5},
            "clean": {
                "filters": "none",
                "executor": {
                    "kind": "slurm",
                    "tasks": 3,
                    "slurm": {
                        "partition": "cpu",
                        "time": "01:00:00",
                        "job_name": "dc",
                        "sbatch_args": {"account": "a1"},
                    },
                },
            },
        }
    )
    assert prepare(cfg, show_progress=False) == {"download": "ran", "clean": "submitted"}

    submitted = [
        {
            "args": (jobs / str(i) / "args").read_text().split("\n")[:-1],
            "script": (jobs / str(i) / "script.sh").read_text(),
        }
        for i in range(len(list(jobs.iterdir())))
    ]
    main = [j for j in submitted if "launch_pickled_pipeline" in j["script"]]
    merge = [j for j in submitted if "merge_stats" in j["script"]]
    assert len(main) == 4 and len(merge) == 4  # filter, dedup, apply, report: one array job + one stats job each
    ids = {id(j): 1000 + i for i, j in enumerate(submitted)}
    names = ["dc-filter", "dc-dedup", "dc-apply", "dc-report"]
    tasks = [3, 1, 3, 1]
    previous = None
    for job, name, n in zip(main, names, tasks, strict=True):
        s = job["script"]
        assert f"#SBATCH --job-name={name}" in s and f"#SBATCH --array=0-{n - 1}" in s
        assert "#SBATCH --partition=cpu" in s and "#SBATCH --time=01:00:00" in s and "#SBATCH --account=a1" in s
        # this interpreter's bin/ (launch_pickled_pipeline, merge_stats) and this package, before anything runs
        assert f"export PATH={Path(sys.executable).parent}:" in s
        assert f"PYTHONPATH={Path(__file__).resolve().parents[2] / 'src'}" in s
        pik = cfg.clean_dir / "logs" / name.removeprefix("dc-") / "executor.pik"
        assert f"launch_pickled_pipeline {pik}" in s and pik.is_file()
        dependency = [a for a in job["args"] if a.startswith("--dependency=")]
        assert dependency == ([] if previous is None else [f"--dependency=afterok:{ids[id(previous)]}"])
        previous = job
    saved = json.loads((cfg.clean_dir / "logs" / "filter" / "executor.json").read_text())
    assert saved["tasks"] == 3 and saved["partition"] == "cpu"
    assert not (cfg.clean_dir / "manifest.json").exists()  # written by the report job, once it has run
