"""Experiment trackers: W&B (offline), MLflow (local file store) and trackio (local SQLite store) receive the
same metrics, step for step, as metrics.jsonl, with the run's config and stage; a crash still finishes their
runs, a resume continues them; a missing package is a one-line error naming the extra, before training.

Each backend is read back with its own reader: MLflow's ``MlflowClient``, trackio's ``SQLiteStorage``, and for
W&B the offline run's ``.wandb`` file, parsed with wandb's own protobuf ``Record`` (wandb 0.31 dropped its
Python reader; the framing is LevelDB's log format, https://github.com/google/leveldb/blob/main/doc/log_format.md,
with W&B's 7-byte file header). No test touches the network: every client is offline and any socket connection
to a non-local address fails the test.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import socket
import struct
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from llm_pipeline.config import ConfigError, validate_config
from llm_pipeline.train.config import PretrainConfig, TrainingConfig
from llm_pipeline.train.metrics import StepLogger
from llm_pipeline.train.pretrain import run_pretraining
from llm_pipeline.train.trackers import TRACKERS, TrackerUnavailable, TrackingConfig, require_tracker_packages

from .conftest import source, tiny_config

OPTIONAL = ("wandb", "mlflow", "trackio")
History = dict[tuple[int, str], float]  # (step, "split/metric") -> value


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


needs = {n: pytest.mark.skipif(not _installed(n), reason=f"{n} not installed (pip install 'llm-pipeline[{n}]')")
         for n in OPTIONAL}  # fmt: skip


# --------------------------------------------------------------------------------------------
# No network, every client offline and writing under tmp
# --------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection to a non-local address raises (wandb talks to its local service over a local socket)."""
    real = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> Any:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            if host not in ("127.0.0.1", "::1", "localhost"):
                raise AssertionError(f"a tracker test tried to reach the network: {address}")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture(scope="module")
def trackio_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """trackio reads TRACKIO_DIR when it is imported: set it (and the modules already loaded) for this file."""
    path = tmp_path_factory.mktemp("trackio")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRACKIO_DIR", str(path))
        for name, module in list(sys.modules.items()):
            if name.startswith("trackio") and hasattr(module, "TRACKIO_DIR"):
                mp.setattr(module, "TRACKIO_DIR", path)
        yield path


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, trackio_dir: Path) -> Path:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_root"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # unreachable, in case anything ever tried
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this opt-in
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TRACKIO_SPACE_ID", raising=False)
    monkeypatch.delenv("TRACKIO_SERVER_URL", raising=False)
    return tmp_path


# --------------------------------------------------------------------------------------------
# Readers: metrics.jsonl and each backend's own store
# --------------------------------------------------------------------------------------------


def jsonl_history(log_dir: Path) -> tuple[History, list[tuple[int, str]]]:
    """Finite values by (step, split/metric), and the non-finite ones (kept in metrics.jsonl only)."""
    finite, other = {}, []
    for line in (log_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for k, v in row.items():
            if k in ("step", "split", "time"):
                continue
            key = (row["step"], f"{row['split']}/{k}")
            (finite.__setitem__(key, v) if math.isfinite(v) else other.append(key))
    return finite, other


def wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf records of an offline run file (LevelDB log framing: 32 KiB blocks, 7-byte chunk headers
    ``crc32 (of type + data), length, type``; FULL=1, FIRST=2, MIDDLE=3, LAST=4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), "not a W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if (crc, n, kind) == (0, 0, 0):
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + n]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at {pos}"
        pos += 7 + n
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def wandb_runs(root: Path, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Each offline run under ``root`` (oldest first): id, name, job type, config, history, exit code.

    ``run.finish()`` can return before wandb's service has flushed the run file (its writer closes with the
    run's stream, a moment later): wait until every file holds its exit record.
    """
    deadline = time.monotonic() + timeout
    while True:
        runs = _read_wandb_runs(root)
        if (runs and all(r["exit_code"] is not None for r in runs)) or time.monotonic() > deadline:
            return runs
        time.sleep(0.1)


def _read_wandb_runs(root: Path) -> list[dict[str, Any]]:
    runs = []
    for f in sorted(root.glob("wandb/offline-run-*/run-*.wandb")):
        run: dict[str, Any] = {"history": {}, "exit_code": None, "preempting": False}
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run |= {"id": r.run.run_id, "name": r.run.display_name, "project": r.run.project,
                        "job_type": r.run.job_type,
                        "config": {i.key: json.loads(i.value_json) for i in r.run.config.update}}  # fmt: skip
            elif kind == "history":
                step = r.history.step.num
                for item in r.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if not key.startswith("_"):
                        run["history"][(step, key)] = float(json.loads(item.value_json))
            elif kind == "exit":
                run["exit_code"] = r.exit.exit_code
            elif kind == "preempting":
                run["preempting"] = True
        runs.append(run)
    return runs


def mlflow_run(tracking_uri: str, run_id: str) -> tuple[Any, History]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    history = {(m.step, key): m.value for key in run.data.metrics for m in client.get_metric_history(run_id, key)}
    return run, history


def trackio_run(project: str, run_id: str) -> tuple[dict[str, Any], History]:
    from trackio.sqlite_storage import SQLiteStorage

    history = {}
    for row in SQLiteStorage.get_logs(project, run_id=run_id):
        for k, v in row.items():
            if k not in ("step", "timestamp") and isinstance(v, (int, float)):
                history[(row["step"], k)] = float(v)
    return SQLiteStorage.get_run_config(project, run_id=run_id) or {}, history


def read_back(backend: str, root: Path, state: dict[str, Any]) -> tuple[History, dict[str, Any]]:
    """The backend's history (all its runs' segments together) and what it recorded about the run."""
    if backend == "wandb":
        runs = wandb_runs(root / "wandb_root")
        assert runs and {r["id"] for r in runs} == {state["wandb"]["id"]}, "a resume continues the same W&B run"
        history = {k: v for r in runs for k, v in r["history"].items()}
        last = runs[-1]
        return history, {"config": last["config"], "stage": last["job_type"], "name": last["name"],
                         "exit_codes": [r["exit_code"] for r in runs]}  # fmt: skip
    if backend == "mlflow":
        run, history = mlflow_run(state["mlflow"]["tracking_uri"], state["mlflow"]["run_id"])
        return history, {"params": run.data.params, "stage": run.data.tags["stage"], "status": run.info.status,
                         "name": run.info.run_name}  # fmt: skip
    config, history = trackio_run(state["trackio"]["project"], state["trackio"]["id"])
    return history, {"config": config, "stage": config.get("stage"), "name": state["trackio"]["name"]}


# --------------------------------------------------------------------------------------------
# The StepLogger with synthetic metrics: two segments (a crash, then a resume)
# --------------------------------------------------------------------------------------------

RUN_CONFIG = {"model": {"preset": "debug"}, "training": {"learning_rate": 0.003, "max_steps": 8}}


def step_metrics(step: int, *, nan: bool = False) -> dict[str, Any]:
    loss = float("nan") if nan else 5.0 / step
    return {"loss": loss, "ce": 4.0 / step, "grad_norm": 1.0 + step / 10, "lr": 1e-3 * step, "tokens": 128,
            "flops": 1e6, "units": 100, "seq_len": 32, "micro_batch_size": 2, "accum_steps": 1,
            "step_time_s": 0.01, "data_time_s": 0.001, "skipped": nan}  # fmt: skip


def logger(log_dir: Path, trackers: list[str], tracking: TrackingConfig, stage: str = "sft") -> StepLogger:
    return StepLogger(
        log_dir=log_dir, enabled=True, max_steps=8, logging_steps=2, device=torch.device("cpu"), world_size=1,
        precision="fp32", fp8=False, perplexity_of="ce", trackers=trackers, tracking=tracking, stage=stage,
        run_config=RUN_CONFIG,
    )  # fmt: skip


def counters(step: int) -> dict[str, int]:
    return {"skipped_steps": int(step >= 4) * 2, "empty_batches": 0, "oom_events": 0, "tokens_seen": 128 * step}


def log_two_segments(log_dir: Path, trackers: list[str], tracking: TrackingConfig) -> None:
    """Steps 1-5 then a crash (the window of steps 3-4 is all non-finite); a resume from step 4 logs 5-8."""
    first = logger(log_dir, trackers, tracking)
    with pytest.raises(RuntimeError, match="boom"), first.opened(start_step=0) as m:
        m.eval(0, {"loss": 6.0, "ppl": math.exp(6.0)})
        for step in range(1, 6):
            m.step(step, step_metrics(step, nan=step in (3, 4)), counters(step))
        raise RuntimeError("boom")
    second = logger(log_dir, trackers, tracking)
    with second.opened(start_step=4) as m:
        for step in range(5, 9):
            m.step(step, step_metrics(step), counters(step))
            if step == 8:
                m.eval(step, {"loss": 4.5, "ppl": math.exp(4.5)})


@pytest.mark.parametrize("backend", [pytest.param(n, marks=needs[n]) for n in OPTIONAL])
def test_tracker_gets_the_jsonl_metrics_step_for_step_across_a_crash_and_a_resume(backend, offline):
    log_dir = offline / "logs"
    options = {"trackio": {"project": offline.name}} if backend == "trackio" else {}  # one trackio store per file
    tracking = TrackingConfig.model_validate({"run_name": f"sft-{backend}", **options})
    log_two_segments(log_dir, ["jsonl", backend], tracking)

    expected, non_finite = jsonl_history(log_dir)
    assert (4, "train/loss") in non_finite and (2, "train/loss") in expected and (8, "eval/loss") in expected
    assert {s for s, _ in expected} == {0, 2, 4, 6, 8}
    state = json.loads((log_dir / "trackers.json").read_text())
    history, recorded = read_back(backend, offline, state)
    assert history == pytest.approx(expected, rel=1e-12, abs=0.0)  # same keys, steps and values
    assert not set(non_finite) & set(history)
    assert recorded["stage"] == "sft" and recorded["name"] == f"sft-{backend}"
    if backend == "mlflow":
        assert recorded["params"]["stage"] == "sft" and recorded["params"]["training.learning_rate"] == "0.003"
        assert recorded["status"] == "FINISHED"  # the resumed segment finished the run the crash had FAILED
    else:
        assert recorded["config"]["stage"] == "sft" and recorded["config"]["training"]["learning_rate"] == 0.003
    if backend == "wandb":
        assert recorded["exit_codes"] == [1, 0]  # the crashed segment finished with a failure, the resume cleanly


@needs["mlflow"]
def test_crash_and_preemption_finish_the_tracker_run_with_their_status(offline):
    """Closing runs on every way out: a crash marks the MLflow run FAILED with its lines flushed; a preempted
    run (the trainer's stop signal) is KILLED; a diverged one FAILED."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(offline / "mlruns").as_uri())
    for outcome, status in (("crash", "FAILED"), ("preempted", "KILLED"), ("diverged", "FAILED")):
        log_dir = offline / outcome
        m = logger(log_dir, ["jsonl", "mlflow"], TrackingConfig())
        with pytest.raises(RuntimeError) if outcome == "crash" else contextlib.nullcontext(), m.opened(start_step=0):
            m.step(1, step_metrics(1), counters(1))
            m.step(2, step_metrics(2), counters(2))
            if outcome == "crash":
                raise RuntimeError("boom")
            m.outcome = outcome
        run_id = json.loads((log_dir / "trackers.json").read_text())["mlflow"]["run_id"]
        assert client.get_run(run_id).info.status == status, outcome
        assert [x.step for x in client.get_metric_history(run_id, "train/loss")] == [2]


@needs["wandb"]
def test_a_preempted_wandb_run_is_marked_preempting(offline, monkeypatch):
    monkeypatch.delenv("WANDB_DIR")  # without WANDB_DIR or tracking.wandb.dir the run goes beside metrics.jsonl
    m = logger(offline / "logs", ["jsonl", "wandb"], TrackingConfig())
    with m.opened(start_step=0):
        m.step(1, step_metrics(1), counters(1))
        m.step(2, step_metrics(2), counters(2))
        m.outcome = "preempted"
    (run,) = wandb_runs(offline / "logs")
    assert run["preempting"] and run["exit_code"] == 0 and (2, "train/loss") in run["history"]


def test_only_rank_0_writes_anything(offline):
    m = StepLogger(
        log_dir=offline / "logs", enabled=False, max_steps=2, logging_steps=1, device=torch.device("cpu"),
        world_size=2, precision="fp32", fp8=False, perplexity_of=None, trackers=["jsonl", "tensorboard", *OPTIONAL],
    )  # fmt: skip
    with m.opened(start_step=0):
        m.step(1, step_metrics(1), counters(1))
    assert not (offline / "logs").exists() and not (offline / "wandb_root").exists()
    assert not (offline / "mlruns").exists()


def test_a_tracker_that_fails_mid_run_is_switched_off_and_the_run_goes_on(offline, caplog):
    """A tracker server going down must not stop a week-long run: a warning, and metrics.jsonl keeps every line."""
    from llm_pipeline.train.trackers import TensorBoardTracker

    calls = []

    def broken(self, step, split, metrics, when):
        calls.append(step)
        raise ConnectionError("server gone")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TensorBoardTracker, "log", broken)
        m = logger(offline / "logs", ["jsonl", "tensorboard"], TrackingConfig())
        with m.opened(start_step=0):
            for step in range(1, 7):
                m.step(step, step_metrics(step), counters(step))
    assert calls == [2]  # switched off after its first failure
    assert "tensorboard: logging failed (ConnectionError: server gone)" in caplog.text
    assert {s for s, _ in jsonl_history(offline / "logs")[0]} == {2, 4, 6}

    def broken_close(self, outcome):
        raise ConnectionError("server gone at the end")

    with pytest.MonkeyPatch.context() as mp:  # finishing fails: a warning, the finished run stays finished
        mp.setattr(TensorBoardTracker, "close", broken_close)
        m = logger(offline / "logs2", ["jsonl", "tensorboard"], TrackingConfig())
        with m.opened(start_step=0):
            m.step(2, step_metrics(2), counters(2))
    assert "tensorboard: closing failed (ConnectionError: server gone at the end)" in caplog.text


# --------------------------------------------------------------------------------------------
# Config: chosen by name, strict; a missing package is one line naming the extra
# --------------------------------------------------------------------------------------------


def _training(**kw: Any) -> TrainingConfig:
    return validate_config(TrainingConfig, kw, "cfg.yaml")


def test_trackers_are_chosen_by_name_and_unknown_ones_are_refused():
    assert _training().trackers == ["jsonl", "tensorboard"]
    t = _training(trackers=["jsonl", "wandb", "mlflow", "trackio"], tracking={"wandb": {"project": "x"}})
    assert t.tracking.wandb.project == "x"
    with pytest.raises(ConfigError) as e:
        _training(trackers=["jsonl", "wandbb"])
    assert "cfg.yaml: trackers: Value error, unknown tracker 'wandbb' (did you mean 'wandb'?); known trackers: " \
        "jsonl, tensorboard, wandb, mlflow, trackio" in str(e.value)  # fmt: skip
    with pytest.raises(ConfigError, match=r"keep 'jsonl' in training\.trackers"):
        _training(trackers=["tensorboard"])
    with pytest.raises(ConfigError, match="listed twice: wandb"):
        _training(trackers=["jsonl", "wandb", "wandb"])
    with pytest.raises(ConfigError, match=r"training.tracking.mlflow is set but 'mlflow' is not in training.trackers"):
        _training(tracking={"mlflow": {"experiment": "e"}})
    with pytest.raises(ConfigError, match="unknown key 'projct'"):
        _training(trackers=["jsonl", "trackio"], tracking={"trackio": {"projct": "x"}})


def test_a_resolved_config_with_trackers_validates_again(tmp_path):
    """config.yaml holds every default (also of unused trackers' options): it must load again (resume, export)."""
    from llm_pipeline.config import config_to_dict

    cfg = tiny_config(tmp_path, trackers=["jsonl", "mlflow"], tracking={"mlflow": {"experiment": "e"}})
    again = PretrainConfig.model_validate(config_to_dict(cfg))
    assert again.training.trackers == ["jsonl", "mlflow"] and again.training.tracking.mlflow.experiment == "e"


def test_changing_trackers_on_resume_is_no_change_to_the_run(tmp_path):
    """Adding a tracker to a finished or resumed stage changes where metrics go, not what trains: a resume neither
    refuses nor reports it (so a pipeline's finished stage stays up to date)."""
    import yaml

    from llm_pipeline.config import config_to_dict
    from llm_pipeline.train.resume import check_resume_config

    cfg = tiny_config(tmp_path)
    (tmp_path / "ckpt-1").mkdir()
    (tmp_path / "ckpt-1" / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    again = tiny_config(tmp_path, trackers=["jsonl", "wandb"], tracking={"wandb": {"project": "x"}})
    assert check_resume_config(tmp_path / "ckpt-1", again) == []
    assert check_resume_config(tmp_path / "ckpt-1", tiny_config(tmp_path, learning_rate=1e-3)) != []


@pytest.mark.parametrize("backend", OPTIONAL)
def test_a_missing_package_is_one_line_naming_the_extra_before_training(backend, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, TRACKERS[backend].package, None)  # as if not installed
    cfg = tiny_config(tmp_path, trackers=["jsonl", "tensorboard", backend])
    with pytest.raises(TrackerUnavailable) as e:
        run_pretraining(cfg, train_source=source(cfg))
    assert str(e.value) == (f"training.trackers lists {backend!r} but the {backend} package is not installed: "
                            f"pip install 'llm-pipeline[{backend}]'")  # fmt: skip
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "logs").exists()  # nothing ran, nothing written
    require_tracker_packages(["jsonl", "tensorboard"])  # the built-in ones need nothing optional


def test_preflight_names_a_missing_tracker_package_as_a_blocker(tmp_path, monkeypatch):
    import yaml

    from llm_pipeline.preflight import run_preflight

    monkeypatch.setitem(sys.modules, "trackio", None)
    cfg = {"model": {"preset": "debug"}, "parallel": {"device": "cpu"},
           "training": {"output_dir": str(tmp_path / "ckpt"), "trackers": ["jsonl", "trackio"]}}  # fmt: skip
    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump(cfg))
    (check,) = [c for c in run_preflight(tmp_path / "pretrain.yaml") if c.name.startswith("trackers:")]
    assert check.status == "BLOCKER" and "pip install 'llm-pipeline[trackio]'" in check.detail


# --------------------------------------------------------------------------------------------
# One real training run writing to every backend at once
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not all(_installed(n) for n in OPTIONAL), reason="needs wandb, mlflow and trackio")
def test_a_training_run_writes_the_same_metrics_to_every_tracker(offline, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")  # the config's options, not the environment, keep these offline and local
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    tracking = {"wandb": {"mode": "offline"}, "mlflow": {"tracking_uri": (offline / "mlruns").as_uri()},
                "trackio": {"project": f"{offline.name}-run"}}  # fmt: skip
    trackers = ["jsonl", "tensorboard", *OPTIONAL]
    cfg = tiny_config(offline, max_steps=4, eval_steps=2, trackers=trackers, tracking=tracking)
    result = run_pretraining(cfg, train_source=source(cfg), val_source=source(cfg, seed=1), export=False)
    assert result.status == "completed"
    log_dir = offline / "logs"
    expected, _ = jsonl_history(log_dir)
    assert {(s, k) for s, k in expected if k in ("train/loss", "eval/loss")} == {
        (0, "eval/loss"), (2, "train/loss"), (2, "eval/loss"), (4, "train/loss"), (4, "eval/loss")
    }  # fmt: skip
    state = json.loads((log_dir / "trackers.json").read_text())
    for backend in OPTIONAL:
        history, recorded = read_back(backend, offline, state)
        assert history == pytest.approx(expected, rel=1e-12, abs=0.0), backend
        assert recorded["stage"] == "pretrain" and recorded["name"] == "pretrain", backend
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(log_dir))
    tb.Reload()
    tb_loss = {(e.step, "train/loss"): e.value for e in tb.Scalars("train/loss")}
    assert tb_loss == pytest.approx({k: v for k, v in expected.items() if k[1] == "train/loss"}, rel=1e-6)
    _, mlflow_recorded = read_back("mlflow", offline, state)
    assert mlflow_recorded["params"]["model.preset"] == "debug" and mlflow_recorded["status"] == "FINISHED"
