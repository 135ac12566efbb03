"""The data steps on a real Ray cluster, started the way a user starts one, equal the local executor's output.

A ``ray start --head`` process (its own temp folder and ports, 2 CPUs) is the cluster; ``llm-pipeline data
prepare`` runs as a separate process with ``clean.executor.kind: ray``, ``pack.executor: ray`` and
``clean.executor.ray_address`` pointing at it. The same corpus through the local executor must give the same
documents kept and dropped (and why), the same tokenizer and the same token shards byte for byte.

The cleaned ``*.jsonl.gz`` files are compared decompressed: their gzip headers carry the time they were
written (datatrove's writer sets no fixed mtime), so their compressed bytes differ between any two runs,
local or not; their contents may not.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from llm_pipeline.data.config import DataConfig
from llm_pipeline.data.manifest import read_manifest
from llm_pipeline.data.prepare import prepare

from .corpus import planted_duplicates_corpus, write_jsonl

pytestmark = pytest.mark.slow  # a Ray cluster and a CLI process: ~30 s
pytest.importorskip("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_command() -> list[str]:
    exe = Path(sys.executable).with_name("ray")  # the `ray` script of this environment, as a user runs it
    return [str(exe)] if exe.is_file() else [sys.executable, "-c", "from ray.scripts.scripts import main; main()"]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[tuple[str, Path]]:
    """A local Ray cluster: ``ray start --head --block`` in its own process group; yields (address, temp dir).

    Torn down by signalling that process (Ray drains and stops what it started) and then killing whatever is
    left of its process group, never with ``ray stop``: that ends every Ray process of this user on the
    machine, other runs' clusters included.
    """
    tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    port = _free_port()
    cmd = [
        *_ray_command(), "start", "--head", "--block", "--num-cpus", "2", "--port", str(port),
        "--disable-usage-stats", "--temp-dir", str(tmp), "--include-dashboard=false",
        "--dashboard-port", str(_free_port()), "--ray-client-server-port", str(_free_port()),
        "--dashboard-agent-listen-port", str(_free_port()),
    ]  # fmt: skip
    # no PYTHONPATH: the workers find this package through the job's runtime_env (data/ray_cluster.py)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    out = tmp / "ray_start.log"
    with out.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in out.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"`ray start --head` did not start (exit {proc.poll()}):\n{out.read_text()[-3000:]}")
            time.sleep(0.2)
        yield f"127.0.0.1:{port}", tmp
    finally:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=45)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # our group only: stragglers of this cluster
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def _config(root: Path, kind: str, address: str | None = None) -> dict:
    executor = {"kind": kind, "tasks": 2, "workers": 2, **({"ray_address": address} if address else {})}
    return {
        "output_dir": str(root / kind),
        "source": {"kind": "local", "paths": [str(root / "in")], "documents_per_shard": 10},
        "clean": {
            "filters": "none",
            "minhash": {"num_buckets": 56, "hashes_per_bucket": 2, "min_similarity": 0.3},
            "executor": executor,
        },
        "tokenizer": {"vocab_size": 300, "min_frequency": 2},
        "pack": {"val_fraction": 0.2, "workers": 2, "executor": kind},
    }


def _documents(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): gzip.decompress(p.read_bytes()) for p in sorted(folder.rglob("*.gz"))}


def _files(folder: Path, *, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    files = (p for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in files}


def test_data_steps_on_a_ray_cluster_equal_the_local_executor(ray_cluster, tmp_path):
    address, ray_tmp = ray_cluster
    records, planted = planted_duplicates_corpus(seed=3, n_unique=30, n_exact=4, n_near=4)
    write_jsonl(tmp_path / "in" / "a.jsonl", records)
    (tmp_path / "ray.yaml").write_text(yaml.safe_dump(_config(tmp_path, "ray", address)))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "llm_pipeline", "data", "prepare", "--config", str(tmp_path / "ray.yaml")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:  # the local run meanwhile, here
        local = DataConfig.model_validate(_config(tmp_path, "local"))
        assert prepare(local, show_progress=False) == dict.fromkeys(("download", "clean", "tokenizer", "pack"), "ran")
        output, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-4000:]
    assert "connected to the Ray cluster" in output
    remote = DataConfig.model_validate(yaml.safe_load((tmp_path / "ray.yaml").read_text()))

    # the work ran in the cluster's worker processes: datatrove's task actors and our pack tasks
    worker_logs = "".join(p.read_text() for p in ray_tmp.glob("session_*/logs/worker-*.out"))
    assert ":actor_name:RankWorker" in worker_logs and ":task_name:_pack_task" in worker_logs

    # the same documents kept, and the same ones dropped for the same reasons
    a, b = read_manifest(local.clean_dir), read_manifest(remote.clean_dir)
    keys = ("documents_in", "documents_kept", "documents_dropped", "dropped_by_reason", "balanced")
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    assert a["documents_in"] == len(records) and a["documents_dropped"] == len(planted) > 0
    for sub in ("output", "excluded"):
        assert _documents(local.clean_dir / sub) == _documents(remote.clean_dir / sub), sub
    # the same tokenizer and the same token shards, byte for byte
    assert _files(local.tokenizer_dir, skip=("manifest.json",)) == _files(remote.tokenizer_dir, skip=("manifest.json",))
    assert _files(local.packed_dir, skip=("manifest.json",)) == _files(remote.packed_dir, skip=("manifest.json",))
    assert read_manifest(local.packed_dir)["splits"] == read_manifest(remote.packed_dir)["splits"]
    # nothing left to do: every step is up to date and no connection is made
    assert prepare(remote, show_progress=False) == dict.fromkeys(("download", "clean", "tokenizer", "pack"), "skipped")
