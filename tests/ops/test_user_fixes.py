"""What a new user tripped on, each fixed: the spec's scripts run as documented, without surprises."""

from __future__ import annotations

import json
import os
import random
import runpy
import sys
from pathlib import Path

import pytest
import yaml

from llm_pipeline.cli import main

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"


def _script(name: str, argv: list[str], monkeypatch) -> int:
    """Run scripts/<name> in this process, as `python scripts/<name> ARGS` would (its exit code)."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS / name), *argv])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(SCRIPTS / name), run_name="__main__")
    return int(done.value.code or 0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A debug model with a small BPE tokenizer (what eval needs), built in a second."""
    from llm_pipeline.checkpoint.hf import save_pretrained
    from llm_pipeline.data.tokenizer import save_tokenizer, train_tokenizer
    from llm_pipeline.model import get_preset
    from llm_pipeline.model.llama import build_model

    rng = random.Random(0)
    words = ["def", "return", "value", "list", "items", "python", "code", "write", "if", "else", "for", "in"]
    tok = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_tokenizer([" ".join(rng.choices(words, k=50)) for _ in range(60)], vocab_size=400), tok)
    return save_pretrained(build_model(get_preset("debug")), tmp_path_factory.mktemp("m") / "model", tokenizer_dir=tok)


# --------------------------------------------------------------------------------------------
# scripts/11_evaluate.py CKPT, nothing else
# --------------------------------------------------------------------------------------------


def test_evaluate_with_only_a_checkpoint_runs_what_can_run_offline(model_dir, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = yaml.safe_load((ROOT / "configs" / "eval.yaml").read_text())  # the shipped file, made quick
    config |= {"limit": 2, "device": "cpu"}
    config["humaneval"] |= {"max_new_tokens": 8, "workers": 1}
    config["safety"] |= {"max_new_tokens": 8}
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "eval.yaml").write_text(yaml.safe_dump(config))
    assert _script("11_evaluate.py", [str(model_dir)], monkeypatch) == 0
    err = capsys.readouterr().err
    assert "eval: no --config: using configs/eval.yaml" in err
    assert "eval: skipping perplexity: no held-out data to score (runs/data/packed has no packed shards): pass " \
        "--packed-data DIR" in err  # fmt: skip
    assert "eval: skipping mmlu: cais/mmlu is on the HF hub, HF_HUB_OFFLINE is set and it is not in the local " \
        "cache: pass --mmlu DIR (the CSV release) or --mmlu builtin:python" in err  # fmt: skip
    results = json.loads((tmp_path / "evals" / "model" / "results.json").read_text())
    assert {name: t["status"] for name, t in results["tasks"].items()} == {
        "perplexity": "unavailable", "mmlu": "unavailable", "humaneval": "ok", "safety": "ok"}  # fmt: skip
    assert "HF_HUB_OFFLINE is set" in results["tasks"]["mmlu"]["error"]


def test_a_model_inside_a_run_is_scored_on_that_runs_held_out_data(tmp_path, monkeypatch) -> None:
    from llm_pipeline.eval.config import EvalConfig
    from llm_pipeline.eval.plan import plan_tasks

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tmp_path / "runs" / "demo"
    (run / "data" / "packed").mkdir(parents=True)
    (run / "data" / "packed" / "manifest.json").write_text("{}")
    (run / "pipeline.resolved.yaml").write_text("run_dir: runs/demo\n")
    cfg, unavailable = plan_tasks(EvalConfig(), run / "checkpoints" / "pretrain_final")
    assert cfg.perplexity.packed_data == str((run / "data" / "packed").resolve())
    assert list(unavailable) == ["mmlu"]  # mmlu (hub, offline) skipped
    with pytest.raises(ValueError, match="no evaluation can run here"):  # outside a run, nothing to score
        plan_tasks(EvalConfig(tasks=["perplexity", "mmlu"]), tmp_path / "elsewhere")


# --------------------------------------------------------------------------------------------
# --help, init, deprecated scripts
# --------------------------------------------------------------------------------------------


def test_demo_pretrain_help_prepares_nothing(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert _script("demo_pretrain.py", ["--help"], monkeypatch) == 0
    out = capsys.readouterr().out
    assert "CPU demo pretraining" in out and "usage: llm-pipeline pretrain" in out and "--max_steps" in out
    assert list(tmp_path.iterdir()) == []  # no data folder, no runs/


def test_init_without_arguments_refuses_a_7b_model_that_cannot_fit(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("llm_pipeline.hardware.host_available_memory", lambda: 24 * 2**30)
    assert _script("04_init_model.py", [], monkeypatch) == 1  # would allocate 27.5 GiB of fp32 weights
    err = capsys.readouterr().err
    assert err.count("error:") == 1
    assert "7,391,678,464 parameters in float32 need ~33.5 GiB of RAM" in err and "--preset tiny" in err
    assert not (tmp_path / "checkpoints").exists()
    assert _script("04_init_model.py", ["--preset", "debug", "-o", "m"], monkeypatch) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "script,says",
    [
        ("production_pretrain.py", "deprecated: use scripts/05_pretrain.py --fp8"),
        ("full_model_pretrain.py", "deprecated: use scripts/05_pretrain.py (the full model, GPUs) or "
                                   "scripts/demo_pretrain.py"),
    ],
)  # fmt: skip
def test_deprecated_scripts_say_where_to_go_and_forward(script, says, monkeypatch, capsys) -> None:
    forwarded: list[list[str]] = []
    monkeypatch.setattr("llm_pipeline.cli.main", lambda argv: forwarded.append(argv) or 0)
    assert _script(script, ["--max_steps", "5"], monkeypatch) == 0
    assert says in capsys.readouterr().err
    fp8 = ["--fp8"] if "production" in script else []
    assert forwarded == [["pretrain", *fp8, "--config", "configs/pretrain.yaml", "--max_steps", "5"]]


@pytest.mark.slow
def test_clean_step_alias_and_shell_python_picker(monkeypatch) -> None:
    forwarded: list[list[str]] = []
    monkeypatch.setattr("llm_pipeline.cli.main", lambda argv: forwarded.append(argv) or 0)
    assert _script("02_clean_deduplicate.py", ["--config", "c.yaml"], monkeypatch) == 0
    assert _script("02_clean_deduplicate_optimized.py", ["--config", "c.yaml"], monkeypatch) == 0
    assert forwarded[0] == forwarded[1] == ["data", "clean", "--config", "c.yaml"]
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    probe = 'source scripts/_python.sh; echo "$PYTHON|$PYTHONPATH"'
    out = subprocess.run(["bash", "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True).stdout.strip()
    expected = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else "python3"
    assert out.split("|")[0] == expected and out.split("|")[1].startswith(str(ROOT / "src"))


# --------------------------------------------------------------------------------------------
# gates after run_full_pipeline.sh
# --------------------------------------------------------------------------------------------


def _run_with_evals(run: Path, metrics: dict[str, dict], gates: Path, mtime: float) -> None:
    for stage, m in metrics.items():
        (run / "evals" / f"{stage}_final").mkdir(parents=True)
        (run / "evals" / f"{stage}_final" / "results.json").write_text(json.dumps({"metrics": m}))
    (run / "pipeline.resolved.yaml").write_text(yaml.safe_dump({"run_dir": str(run), "gates": str(gates)}))
    for p in (run, run / "evals", run / "pipeline.resolved.yaml"):
        os.utime(p, (mtime, mtime))


def test_gates_find_the_runs_evals_and_gates_file(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    gates = tmp_path / "g.yaml"
    gates.write_text(yaml.safe_dump({"stages": {
        "pretrain": {"rules": [{"metric": "perplexity.perplexity", "max": 50, "higher_is_better": False}]},
        "sft": {"baseline_stage": "pretrain", "rules": [{"metric": "perplexity.perplexity", "max_regression": 1,
                                                         "higher_is_better": False}]}}}))  # fmt: skip
    ok, bad = {"perplexity": {"status": "ok", "perplexity": 40.0}}, {"perplexity": {"status": "ok", "perplexity": 60.0}}
    _run_with_evals(tmp_path / "runs" / "old", {"pretrain": ok}, gates, 1_000_000)
    _run_with_evals(tmp_path / "runs" / "new", {"pretrain": bad}, gates, 2_000_000)
    assert main(["gates", "pretrain"]) == 3  # the newest run, not ./evals, and the gates file it ran with
    out = capsys.readouterr()
    assert "using runs/new (the newest run that evaluated pretrain" in out.err and "BLOCKED" in out.out
    assert main(["gates", "pretrain", "--run-dir", "runs/old"]) == 0
    # a gate whose stage was never evaluated names the stage's folder, not its baseline's
    assert main(["gates", "sft", "--run-dir", "runs/old"]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "runs/old/evals/sft_final: no evaluation results" in err
    assert "pretrain_final" not in err


# --------------------------------------------------------------------------------------------
# the clean step's console
# --------------------------------------------------------------------------------------------


def test_clean_console_keeps_to_the_projects_lines(tmp_path, capfd) -> None:
    from llm_pipeline.data.clean import clean
    from llm_pipeline.data.config import DataConfig
    from llm_pipeline.data.sources import download

    rng = random.Random(0)
    lines = [f"def f{i}(x):\n    return x + {i}  # " + " ".join(rng.choices("abcdefgh", k=30)) for i in range(40)]
    docs = ["\n".join(lines[j : j + 20]) + f"\n# doc {j}" for j in range(30)]
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"id": str(i), "text": d}) + "\n" for i, d in enumerate(docs))
    )
    cfg = DataConfig.model_validate({
        "output_dir": str(tmp_path / "out"),
        "source": {"kind": "local", "paths": [str(tmp_path / "in.jsonl")], "documents_per_shard": 10},
        "clean": {"filters": "code", "executor": {"tasks": 2, "workers": 2}},
    })  # fmt: skip
    download(cfg, show_progress=False)
    capfd.readouterr()
    manifest = clean(cfg, show_progress=False)  # workers are separate processes: capfd sees their stderr too
    out, err = capfd.readouterr()
    for noise in ("Stats: Task", "PIPELINE", "📉", "Launching pipeline", "tasks completed", "Processing done"):
        assert noise not in out + err, f"datatrove's {noise!r} reached the console:\n{err[-2000:]}"
    assert manifest is not None and manifest["documents_in"] == 30
    logs = cfg.clean_dir / "logs"
    assert (logs / "apply" / "stats.json").is_file()  # the statistics went to the log files instead
    assert "Stats" in (logs / "apply" / "logs" / "task_00000.log").read_text()


# --------------------------------------------------------------------------------------------
# production start and resume
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_production_start_runs_the_preflight_and_stops_on_a_blocker(tmp_path) -> None:
    import subprocess

    (tmp_path / "a_file").write_text("the run folder cannot go below a file")
    stage = tmp_path / "pretrain.yaml"
    stage.write_text(yaml.safe_dump({
        "model": {"preset": "debug"}, "data": {"path": str(tmp_path / "packed")},
        "training": {"max_steps": 2, "global_batch_tokens": 128, "micro_batch_size": 2},
        "parallel": {"device": "cpu"}, "curriculum": [{"step": 0, "seq_len": 64}],
    }))  # fmt: skip
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "a_file" / "run"),
        "stages": [{"name": "pretrain", "kind": "pretrain", "config": str(stage), "start_from": "config"}],
    }))  # fmt: skip
    log = tmp_path / "production_training.log"
    env = {**os.environ, "PYTHON": sys.executable, "CONFIG": str(pipeline), "LOG": str(log)}
    done = subprocess.run(["bash", str(ROOT / "START_PRODUCTION_TRAINING.sh")], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    text = log.read_text()
    assert text == done.stdout  # everything the terminal showed is in the log, for `tail -f`
    assert "START_PRODUCTION_TRAINING: " + str(pipeline) in text and "BLOCKER" in text
    assert "is a file, not a folder" in text and "pre-flight failed (exit 1): not starting" in text
    assert not (tmp_path / "a_file" / "run").exists()


@pytest.mark.slow
def test_resume_script_needs_a_stage(tmp_path) -> None:
    import subprocess

    env = {**os.environ, "PYTHON": sys.executable, "LOG": str(tmp_path / "log")}
    done = subprocess.run(["bash", str(SCRIPTS / "resume_pipeline.sh")], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "usage: bash scripts/resume_pipeline.sh STAGE" in done.stderr


# --------------------------------------------------------------------------------------------
# the new commands' bad inputs
# --------------------------------------------------------------------------------------------


def test_bad_inputs_to_the_new_commands_end_in_one_line(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "garbage.tar.gz").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "broken.yaml").write_text("stages: [unclosed\n")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty").mkdir()
    cases = [
        (["ckpt", "restore", "garbage.tar.gz", "--to", "out"], 1, "garbage.tar.gz"),
        (["ckpt", "verify", "garbage.tar.gz"], 1, "corrupted or truncated"),
        (["ckpt", "restore", "missing.tar.gz"], 1, "missing.tar.gz"),
        (["ckpt", "archive", "missing"], 1, "no such checkpoint or export folder"),
        (["ckpt", "archive", "empty", "-o", "empty/inside.tar.gz"], 1, "outside the folder it archives"),
        (["ckpt", "cleanup", "pretrain", "2", "--root", "empty"], 1, "no checkpoints of stage 'pretrain'"),
        (["ckpt", "list", "--root", "a_file"], 1, "no such checkpoints folder"),
        (["ckpt", "cleanup", "pretrain", "2"], 1, "pass --root DIR or set CKPT_ROOT"),  # list: an empty list, 0
        (["preflight", "--config", "broken.yaml"], 2, "invalid YAML"),
        (["preflight", "--config", "missing.yaml"], 2, "config file not found"),
        (["preflight", "--config", str(ROOT / "configs" / "eval.yaml")], 2, "neither a pipeline config"),
        (["report", "a_file"], 1, "no such run folder"),
        (["report"], 1, "no run folder found"),
        (["gates", "sft", "--run-dir", "missing"], 1, "missing: no such run folder"),
    ]
    for argv, code, says in cases:
        assert main(argv) == code, argv
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and says in lines[0] and "Traceback" not in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "broken.yaml", "empty", "garbage.tar.gz"]
