"""The pipeline runner under concurrency and crashes: one run per run folder (a second ``run``, ``--only``,
``--from``, a stage started on its own inside it, a ``ckpt`` verb: all refused at once, nothing touched), a
kill -9 between a retrained export and its gate, or in the middle of a promotion, and a base model changed
in place. Every promoted model, export and record survives each of them."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm_pipeline.checkpoint.manager import scan
from llm_pipeline.cli import main
from llm_pipeline.records import folder_fingerprint, load_summary, read_promotion
from stages.chat_pipeline import ChatPipeline, make_chat_pipeline

from .conftest import DRIVER, cli_env

MORE_STEPS = ("--set", "stages.sft.set=[training.max_steps=3]")


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _snapshot(folder: Path, *, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Every file below ``folder`` (but ``skip``ped subfolders) -> sha256 of its bytes."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.relative_to(folder).as_posix().startswith(skip)
    }


def _driver(p: ChatPipeline, args: list[str], fault: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(DRIVER), *args], env=cli_env(fault), cwd=p.root, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _assert_promoted_intact(p: ChatPipeline, weights: bytes, pointer: str) -> None:
    assert p.weights() == weights and p.pointer() == pointer
    record, problem = read_promotion(p.run_dir, "sft")
    assert record is not None and problem is None
    promoted = {e.name: e.promoted for e in scan(p.run_dir / "checkpoints") if e.kind == "export"}
    assert promoted["sft_final"] == "promoted/sft.json"
    assert all(v is None for k, v in promoted.items() if k != "sft_final"), promoted


@pytest.mark.slow
def test_a_second_run_a_stage_or_a_ckpt_verb_on_a_run_folder_in_use_is_refused_at_once(tmp_path, capsys):
    p = make_chat_pipeline(tmp_path, max_steps=3)
    release = tmp_path / "release"
    first = _driver(p, p.args(), f"pause-at-step:2:{release}")
    try:
        _wait_for(Path(f"{release}.ready"), first)
        before = _snapshot(p.run_dir)
        attempts = {
            "run": p.args(),
            "run --only": p.args("--only", "sft"),
            "run --from": p.args("--from", "sft"),
            "standalone sft": ["sft", "--config", str(p.sft_config), "--output_dir", str(p.run_dir / "checkpoints" /
                               "sft"), "--logging_dir", str(tmp_path / "other_logs")],
            "ckpt cleanup": ["ckpt", "cleanup", "sft", "0", "--root", str(p.run_dir / "checkpoints")],
        }  # fmt: skip
        for what, args in attempts.items():
            capsys.readouterr()
            t0 = time.monotonic()
            assert main(args) == 1, what
            err = capsys.readouterr().err
            assert f"pid {first.pid}" in err and "in use" in err and "Traceback" not in err, (what, err)
            assert time.monotonic() - t0 < 30, f"{what}: refused only after {time.monotonic() - t0:.0f} s"
            if what.startswith("run"):
                assert "(pipeline run:" in err and "kill" in err, err  # the holder and what to do
        assert _snapshot(p.run_dir) == before, "a refused command changed the run folder"
        assert not (tmp_path / "other_logs").exists()
    finally:
        release.touch()
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    record = load_summary(p.run_dir).stages["sft"]
    assert record.status == "promoted" and record.steps == 3
    assert read_promotion(p.run_dir, "sft")[1] is None
    assert not list(p.run_dir.glob("checkpoints/*.replaced-*"))


@pytest.mark.slow
def test_a_stage_started_on_its_own_in_the_run_folder_is_never_moved_by_a_pipeline_run(tmp_path, capsys):
    """The run's start model changed, so the pipeline would set the stage's checkpoints aside: with a stage
    command training in that folder, the pipeline is refused before it repacks, evaluates or moves anything."""
    from train.chat_fixtures import make_chat_model

    p = make_chat_pipeline(tmp_path)
    assert p.run() == 0
    weights, pointer = p.weights(), p.pointer()
    make_chat_model(p.base, p.base, seed=3)  # the base model changed in place
    release = tmp_path / "release"
    stage = _driver(p, ["sft", "--config", str(p.sft_config), "--output_dir", str(p.run_dir / "checkpoints" / "sft"),
                        "--logging_dir", str(tmp_path / "own_logs"), "--max_steps", "4",
                        "--resume_from_checkpoint", "auto", "--set", f"training.final_dir={tmp_path / 'own_final'}"],
                    f"pause-at-step:1:{release}")  # fmt: skip
    try:
        _wait_for(Path(f"{release}.ready"), stage)
        before = _snapshot(p.run_dir, skip=("checkpoints/sft/",))
        capsys.readouterr()
        assert p.run() == 1
        err = capsys.readouterr().err
        assert f"pid {stage.pid}" in err and "checkpoints/sft is in use" in err, err
        assert _snapshot(p.run_dir, skip=("checkpoints/sft/",)) == before
        assert not list(p.run_dir.glob("checkpoints/sft.replaced-*"))
    finally:
        release.touch()
        _, err = stage.communicate(timeout=300)
    assert stage.returncode == 0, err[-3000:]
    assert (p.run_dir / "checkpoints" / "sft" / "checkpoint-4").is_dir()
    _assert_promoted_intact(p, weights, pointer)


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault",
    [
        "kill-after-rename:sft_final",  # the retrained export is in place; evaluation and gate not yet run
        "kill-after-rename:sft_final.replaced",  # promotion: the old model moved aside, the new one not yet in
    ],
)
def test_a_kill_between_a_retrained_export_and_its_promotion_loses_nothing(tmp_path, fault):
    p = make_chat_pipeline(tmp_path)
    assert p.run() == 0
    weights, pointer = p.weights(), p.pointer()
    proc = _driver(p, p.args(*MORE_STEPS), fault)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -9, err[-3000:]
    candidate = p.export(suffix="_final_candidate")
    if fault.endswith("replaced"):
        (kept,) = p.run_dir.glob("checkpoints/sft_final.replaced-*")
        assert (kept / "model.safetensors").read_bytes() == weights  # the promoted model, moved aside whole
        assert read_promotion(p.run_dir, "sft")[1] is not None  # its pointer no longer vouches for sft_final
    else:
        _assert_promoted_intact(p, weights, pointer)
        assert load_summary(p.run_dir).stages["sft"].status is None  # killed before the pipeline recorded it
    new = (candidate / "model.safetensors").read_bytes()
    assert new != weights
    # The same command finishes the job: the candidate is evaluated, gated and promoted (after a kill before the
    # record was written, the stage resumes at its last step: nothing to train, the same export is written again).
    assert p.run(*MORE_STEPS) == 0
    assert p.weights() == new and not candidate.exists()
    (kept,) = p.run_dir.glob("checkpoints/sft_final.replaced-*")
    assert (kept / "model.safetensors").read_bytes() == weights
    record = load_summary(p.run_dir).stages["sft"]
    assert record.status == "promoted" and record.steps == 3
    assert read_promotion(p.run_dir, "sft")[1] is None
    assert read_promotion(p.run_dir, "sft")[0].fingerprint == folder_fingerprint(p.export())


def test_a_base_model_changed_in_place_retrains_without_touching_the_promoted_model(tmp_path, capsys):
    from train.chat_fixtures import make_chat_model

    p = make_chat_pipeline(tmp_path)
    assert p.run() == 0
    weights, pointer = p.weights(), p.pointer()
    old_ckpt = _snapshot(p.run_dir / "checkpoints" / "sft", skip=(".llm_pipeline.lock",))
    make_chat_model(p.base, p.base, seed=3)  # same folder, new weights
    assert p.run(gates=p.blocking) == 3
    _assert_promoted_intact(p, weights, pointer)
    (aside,) = p.run_dir.glob("checkpoints/sft.replaced-*")
    assert _snapshot(aside) == old_ckpt  # the checkpoints trained from the old base: kept whole
    assert "The promoted model stays" in capsys.readouterr().err
    assert p.run() == 0
    assert p.weights() != weights and read_promotion(p.run_dir, "sft")[1] is None
    (kept,) = p.run_dir.glob("checkpoints/sft_final.replaced-*")
    assert (kept / "model.safetensors").read_bytes() == weights
