"""The gated pipeline's operations: reruns skip what is done, --from/--only, a killed run resumes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from llm_pipeline.cli import main

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "tests" / "reliability" / "driver.py"


def _run(d: Path, run_dir: Path, *extra: str) -> int:
    return main(["run", "--config", str(d / "pipeline.yaml"), "--run-dir", str(run_dir), "--set", "generate=null",
                 *extra])  # fmt: skip


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_rerun_skips_finished_steps_and_reruns_only_what_changed(pipeline_files, caplog):
    d = pipeline_files
    run_dir = d / "skip"
    assert _run(d, run_dir) == 0
    ckpt = run_dir / "checkpoints" / "pretrain" / "checkpoint-24"
    before = ckpt.stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level("INFO"):
        assert _run(d, run_dir) == 0
    assert "stage pretrain: up to date" in caplog.text
    assert "eval pretrain_final: up to date" in caplog.text and "eval init_final: up to date" in caplog.text
    assert ckpt.stat().st_mtime_ns == before and _summary(run_dir)["stages"]["pretrain"]["status"] == "promoted"

    # A longer run: only the stage (resumed from its checkpoint) and its evaluation run again.
    caplog.clear()
    with caplog.at_level("INFO"):
        code = _run(d, run_dir, "--only", "pretrain", "--set", "stages.pretrain.set=[training.max_steps=26]")
    assert code == 0
    assert "resumed from" in caplog.text and "checkpoint-24" in caplog.text
    assert "eval pretrain_final: up to date" not in caplog.text
    assert _summary(run_dir)["stages"]["pretrain"]["steps"] == 26
    assert (run_dir / "promoted" / "pretrain.json").is_file()

    assert main(["run", "--config", str(d / "pipeline.yaml"), "--run-dir", str(run_dir), "--from", "sft"]) == 1


@pytest.mark.slow
def test_a_pipeline_killed_during_a_stage_resumes_it_and_finishes(pipeline_files, tmp_path):
    """kill -9 in the middle of pretraining (after its step-12 checkpoint); the same command finishes."""
    d = pipeline_files
    run_dir = tmp_path / "killed"
    env = {**os.environ, "RELIABILITY_FAULT": "signal-at-step:15:SIGKILL", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(sys.path)}  # fmt: skip
    cmd = [sys.executable, str(DRIVER), "run", "--config", str(d / "pipeline.yaml"), "--run-dir", str(run_dir),
           "--set", "generate=null"]  # fmt: skip
    if (d / "skip" / "data").is_dir():  # reuse the prepared corpus (its fingerprints make data prepare a no-op)
        shutil.copytree(d / "skip" / "data", run_dir / "data")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert _summary(run_dir)["stages"]["pretrain"].get("status") is None  # started, not finished
    assert _run(d, run_dir) == 0
    stage = _summary(run_dir)["stages"]["pretrain"]
    assert stage["status"] == "promoted" and stage["steps"] == 24
    steps = [json.loads(x)["step"] for x in (run_dir / "logs" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert 16 in steps and 24 in steps  # killed at step 15: the resumed run (from step 12) logged steps 16 and 24


@pytest.mark.slow
def test_a_stage_whose_start_model_changed_trains_from_it_instead_of_resuming(tmp_path):
    """Retraining a stage (here: more steps) changes the model the next stage starts from; the next stage's
    checkpoints were trained from the old one, so it must start over from the new model, not resume them."""
    from safetensors.torch import load_file

    from train.chat_fixtures import chat_records, make_chat_model, sft_config, train_chat_tokenizer, write_records

    tok = train_chat_tokenizer(tmp_path / "tok")
    base = make_chat_model(tmp_path / "base", tok)
    data = write_records(tmp_path / "chat.jsonl", chat_records(32, seed=1))
    cfg = sft_config(tmp_path, base, data, max_steps=2, logging_steps=2)
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True)))
    pipeline = {
        "run_dir": str(tmp_path / "run"),
        "report": False,
        "stages": [
            {"name": "a", "kind": "sft", "config": str(tmp_path / "sft.yaml"), "start_from": str(base)},
            {"name": "b", "kind": "sft", "config": str(tmp_path / "sft.yaml"), "start_from": "previous"},
        ],
    }
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    run = ["run", "--config", str(tmp_path / "pipeline.yaml")]
    b_final = tmp_path / "run" / "checkpoints" / "b_final" / "model.safetensors"
    assert main(run) == 0
    before = load_file(b_final)

    # a resumes for one more step: a new export, so b starts from another model
    assert main([*run, "--set", "stages.a.set=[training.max_steps=3]"]) == 0
    summary = _summary(tmp_path / "run")["stages"]
    assert summary["a"]["steps"] == 3 and summary["b"]["steps"] == 2
    after = load_file(b_final)
    assert any(not torch.equal(before[k], after[k]) for k in before), "b kept the weights it had trained from old a"
    assert len(list((tmp_path / "run" / "checkpoints").glob("b.replaced-*"))) == 1  # b's old checkpoints, kept


def test_a_gate_that_cannot_be_checked_stops_the_run_before_any_training(tmp_path, capsys):
    """A gate name missing from the gates file, or a gated stage that is not evaluated, is found at the start
    (exit 2, one line), not after the stage has trained."""
    gates = tmp_path / "gates.yaml"
    gates.write_text("stages:\n  pretrain:\n    rules:\n      - {metric: perplexity.perplexity, max: 100}\n")
    stage = {"name": "pretrain", "kind": "pretrain", "config": str(tmp_path / "pretrain.yaml"), "start_from": "config"}
    base = {"run_dir": str(tmp_path / "run"), "gates": str(gates), "eval": {"config": str(tmp_path / "eval.yaml")},
            "report": False}  # fmt: skip
    for change, says in (({"gate": "pretrian"}, "no gate 'pretrian' for stage pretrain"),
                         ({"gate": "pretrain", "evaluate": False}, "is not evaluated")):  # fmt: skip
        (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({**base, "stages": [{**stage, **change}]}))
        assert main(["run", "--config", str(tmp_path / "pipeline.yaml")]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err
        assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_a_stage_whose_config_change_cannot_be_resumed_trains_again(tmp_path, capsys):
    """A changed setting a resume cannot apply (here the data's max_seq_len) makes the pipeline train the stage
    again (its old checkpoints kept aside), instead of stopping with "start a new run in a fresh output_dir",
    a folder the pipeline chooses itself."""
    from train.chat_fixtures import chat_records, make_chat_model, sft_config, train_chat_tokenizer, write_records

    tok = train_chat_tokenizer(tmp_path / "tok")
    base = make_chat_model(tmp_path / "base", tok)
    data = write_records(tmp_path / "chat.jsonl", chat_records(32, seed=1))
    cfg = sft_config(tmp_path, base, data, max_steps=2, logging_steps=2)
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True)))
    stage = {"name": "sft", "kind": "sft", "config": str(tmp_path / "sft.yaml"), "start_from": str(base)}
    (tmp_path / "pipeline.yaml").write_text(
        yaml.safe_dump({"run_dir": str(tmp_path / "run"), "report": False, "stages": [stage]})
    )
    run = ["run", "--config", str(tmp_path / "pipeline.yaml")]
    assert main(run) == 0
    assert main([*run, "--set", "stages.sft.set=[data.max_seq_len=80]"]) == 0, capsys.readouterr().err
    saved = yaml.safe_load((tmp_path / "run" / "checkpoints" / "sft" / "checkpoint-2" / "config.yaml").read_text())
    assert saved["data"]["max_seq_len"] == 80
    assert len(list((tmp_path / "run" / "checkpoints").glob("sft.replaced-*"))) == 1


def _evals(run_dir: Path, ppl: dict[str, float]) -> None:
    """``evals/<stage>_final/results.json`` with a held-out perplexity per stage (LoRA's own domain metrics too)."""
    from llm_pipeline.eval.results import EvalResults, TaskResult

    for stage, value in ppl.items():
        res = EvalResults()
        res.record("perplexity", TaskResult(status="ok", metrics={}), {"perplexity": value})
        # the domain: 20% down after LoRA, so that rule passes whatever the baseline (perplexity decides)
        domain = 40.0 if stage == "lora" else 50.0
        res.record("domain_perplexity", TaskResult(status="ok", metrics={}), {"perplexity": domain})
        res.metrics["stage"] = {"ppl": 4.0, "start": {"ppl": 5.0}}
        (run_dir / "evals" / f"{stage}_final").mkdir(parents=True)
        res.save(run_dir / "evals" / f"{stage}_final" / "results.json")


@pytest.mark.parametrize(("with_rl", "baseline", "passed"), [(True, "rl", False), (False, "dpo", True)])
def test_the_lora_gate_compares_with_the_model_lora_started_from_with_or_without_rl(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], with_rl: bool, baseline: str, passed: bool
) -> None:
    """The demo pipeline with and without its optional rl stage: LoRA's gate (``baseline_stage: previous``)
    reads rl's results, or dpo's; never an ``evals/rl_final`` an earlier run left in the folder."""
    from llm_pipeline.config import save_config
    from llm_pipeline.gates import check_gate
    from llm_pipeline.pipeline import PipelineConfig, gate_baseline

    gates = ROOT / "configs" / "demo" / "promotion_gates.yaml"
    raw = yaml.safe_load((ROOT / "configs" / "demo" / "pipeline.yaml").read_text())
    raw |= {"run_dir": str(tmp_path / "run"), "gates": str(gates)}
    raw["stages"] = [s for s in raw["stages"] if with_rl or s["name"] != "rl"]
    cfg = PipelineConfig.model_validate(raw)
    lora = next(s for s in cfg.stages if s.name == "lora")
    # dpo 10.0, rl (this run's, or a stale one) 9.0, lora 10.3: +3% on dpo passes, +14% on rl does not
    _evals(cfg.run_dir, {"dpo": 10.0, "rl": 9.0, "lora": 10.3})
    assert gate_baseline(cfg, lora, "previous") == baseline
    verdict = check_gate("lora", cfg.run_dir / "evals" / "lora_final", config=gates, baseline_stage=baseline)
    assert verdict.passed is passed
    assert {r.baseline_of for r in verdict.results if r.metric == "perplexity.perplexity"} == {f"{baseline}_final"}

    # `llm-pipeline gates` resolves `previous` from the run's recorded pipeline, and without one says what to pass
    save_config(cfg, cfg.run_dir / "pipeline.resolved.yaml")
    assert main(["gates", "lora", "--run-dir", str(cfg.run_dir)]) == (0 if passed else 3)
    (cfg.run_dir / "pipeline.resolved.yaml").unlink()
    assert main(["gates", "lora", "--run-dir", str(cfg.run_dir), "--config", str(gates)]) != 0
    assert "baseline_stage 'previous'" in capsys.readouterr().err


def test_a_gate_baseline_the_pipeline_does_not_evaluate_first_stops_the_run_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``baseline_stage: rl`` with no rl stage would read nothing, or a stale run's evals/rl_final: refused."""
    gates = tmp_path / "gates.yaml"
    rule = "      - {metric: perplexity.perplexity, higher_is_better: false, max_regression_pct: 5.0}\n"
    gates.write_text(f"stages:\n  pretrain:\n    baseline_stage: rl\n    rules:\n{rule}")
    stage = {"name": "pretrain", "kind": "pretrain", "config": str(tmp_path / "pretrain.yaml"), "start_from": "config",
             "gate": "pretrain"}  # fmt: skip
    pipeline = {"run_dir": str(tmp_path / "run"), "gates": str(gates), "eval": {"config": str(tmp_path / "e.yaml")},
                "report": False, "stages": [stage]}  # fmt: skip
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    assert main(["run", "--config", str(tmp_path / "pipeline.yaml")]) == 2
    err = capsys.readouterr().err
    assert "baseline_stage 'rl' is not evaluated before pretrain" in err and "earlier: init" in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()
