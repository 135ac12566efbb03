"""The spec's scripts and the CLI as a newcomer meets them: defaults, help, start-up cost, Slurm."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import _venv  # noqa: E402


def _env(**extra: str) -> dict[str, str]:
    src = str(REPO / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), **extra}


def test_data_scripts_default_to_the_production_config():
    assert _venv.with_default_config([], "configs/data.yaml") == ["--config", "configs/data.yaml"]
    assert _venv.with_default_config(["--config", "x.yaml"], "d") == ["--config", "x.yaml"]
    assert _venv.with_default_config(["--config=x.yaml", "--no-progress"], "d") == ["--config=x.yaml", "--no-progress"]
    for script in ("01_download_data.py", "02_clean_deduplicate.py", "02_clean_deduplicate_optimized.py"):
        assert '"configs/data.yaml")' in (REPO / "scripts" / script).read_text(), script
    assert "configs/data.yaml" in (REPO / "scripts" / "03_tokenize_and_pack.py").read_text()
    head = (REPO / "configs" / "data.yaml").read_text().split("output_dir:")[0]
    assert "Hugging Face hub" in head and "configs/demo/data.yaml" in head  # says where its data comes from


def test_stage_help_names_its_own_example_config():
    from llm_pipeline.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    expected = {"pretrain": "pretrain.yaml", "sft": "sft.yaml", "dpo": "dpo.yaml", "lora": "lora_finetune.yaml"}
    for kind, config in expected.items():
        text = " ".join(sub.choices[kind].format_help().split())
        assert f"e.g. configs/{config}" in text, kind


def test_logging_dir_set_with_output_dir_is_applied(tmp_path):
    """``--set training.logging_dir=X`` beside ``--output_dir`` is not replaced by ``<output_dir>/logs``."""
    from llm_pipeline.cli import build_parser
    from llm_pipeline.commands.train import stage_config_from_args

    demo = str(REPO / "configs" / "demo" / "sft.yaml")
    out, logs = str(tmp_path / "out"), str(tmp_path / "my_logs")
    args = build_parser().parse_args(
        ["sft", "--config", demo, "--output_dir", out, "--set", f"training.logging_dir={logs}"]
    )
    cfg = stage_config_from_args("sft", args)
    assert str(cfg.training.resolved_logging_dir) == logs
    args = build_parser().parse_args(["sft", "--config", demo, "--output_dir", out])
    assert stage_config_from_args("sft", args).training.resolved_logging_dir == tmp_path / "out" / "logs"


@pytest.mark.slow
def test_help_answers_without_importing_torch():
    code = (
        "import sys\nfrom llm_pipeline.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "for kind in ('pretrain', 'sft', 'data'):\n    try:\n        main([kind, '--help'])\n    except SystemExit:\n"
        "        pass\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    )
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("NO-TORCH")


@pytest.mark.slow
def test_script_help_is_their_own(tmp_path):
    pack = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "03_tokenize_and_pack.py"), "--help"],
        env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert pack.returncode == 0, pack.stderr
    text = " ".join(pack.stdout.split())
    assert "usage: scripts/03_tokenize_and_pack.py" in text and "data tokenizer`` then ``llm-pipeline data pack" in text
    bad = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "03_tokenize_and_pack.py"), "--nope"],
        env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "--nope" in bad.stderr

    full = subprocess.run(
        ["bash", str(REPO / "scripts" / "run_full_pipeline.sh"), "--help"],
        env=_env(PYTHON=sys.executable), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert full.returncode == 0, full.stderr
    assert "usage: bash scripts/run_full_pipeline.sh" in full.stdout and "--only" in full.stdout


def _fake_bin(folder: Path, name: str, body: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("#!/usr/bin/env bash\n" + body)
    (folder / name).chmod(0o755)


@pytest.mark.slow
def test_sbatch_script_makes_its_log_folder_and_runs_the_venv_python(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "scripts", repo / "scripts")
    bin_ = tmp_path / "bin"
    calls = tmp_path / "calls"
    _fake_bin(bin_, "sbatch", f'echo "sbatch $PWD $* logs=$([ -d logs ] && echo yes)" >> {calls}\n')
    # By hand: the log folder appears at the repo root and the script submits the multi-node one from there.
    r = subprocess.run(
        ["bash", str(repo / "scripts" / "pretrain_multinode.sbatch"), "--max_steps", "5"],
        cwd=tmp_path, env={**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}"}, capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (repo / "logs").is_dir()
    assert calls.read_text().split() == ["sbatch", str(repo), "scripts/multinode.sbatch", "pretrain", "--config",
                                         "configs/pretrain.yaml", "--max_steps", "5", "logs=yes"]  # fmt: skip

    # Under Slurm: every node's torchrun agent runs the checkout's .venv/bin/python with the config and flags.
    _fake_bin(repo / ".venv" / "bin", "python", f'echo "python $*" >> {calls}\n')
    _fake_bin(bin_, "srun", 'while [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    _fake_bin(bin_, "scontrol", "echo node1\n")
    spool = tmp_path / "spool" / "slurm_script"  # Slurm runs a copy of the script from its spool folder
    spool.parent.mkdir()
    shutil.copy(repo / "scripts" / "pretrain_multinode.sbatch", spool)
    slurm = {"SLURM_JOB_ID": "7", "SLURM_SUBMIT_DIR": str(repo), "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1",
             "SLURM_GPUS_ON_NODE": "1"}  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    r = subprocess.run(
        ["bash", str(spool), "--max_steps", "5"], cwd=tmp_path / "spool",
        env={**env, **slurm, "PATH": f"{bin_}:{os.environ['PATH']}"}, capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    line = calls.read_text().splitlines()[-1]
    assert line.startswith("python -m torch.distributed.run --nnodes 1 --nproc-per-node 1 ")
    assert line.endswith(
        "-m llm_pipeline pretrain --config configs/pretrain.yaml --max_steps 5 --resume_from_checkpoint auto"
    )


def test_multinode_sbatch_dry_run_prints_the_srun_and_torchrun_commands(tmp_path):
    """DRY_RUN=1: by hand, the sbatch command (and the log folder made); inside the job, per stage kind and for the
    pipeline, one srun task per node running a torchrun agent (c10d on the first node) with the project's Python."""
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "scripts", repo / "scripts")
    _fake_bin(repo / ".venv" / "bin", "python", "exit 1\n")  # found, never run
    _fake_bin(tmp_path / "bin", "scontrol", "echo gpu-a01; echo gpu-a02\n")  # `show hostnames` of the node list
    env = {k: v for k, v in os.environ.items() if k != "PYTHON" and not k.startswith("SLURM_")}
    env |= {"DRY_RUN": "1", "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SBATCH_ARGS": "--nodes=2"}

    def dry(*args: str, **slurm: str) -> list[str]:
        r = subprocess.run(["bash", str(repo / "scripts" / "multinode.sbatch"), *args], cwd=tmp_path,
                           env={**env, **slurm}, capture_output=True, text=True)  # fmt: skip
        assert r.returncode == 0, r.stderr
        return shlex.split(r.stdout)

    assert dry("sft", "--config", "configs/sft.yaml") == [
        "sbatch", "--nodes=2", "scripts/multinode.sbatch", "sft", "--config", "configs/sft.yaml"]  # fmt: skip
    assert (repo / "logs").is_dir()
    job = {"SLURM_JOB_ID": "42", "SLURM_SUBMIT_DIR": str(repo), "SLURM_JOB_NODELIST": "gpu-a[01-02]",
           "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8"}  # fmt: skip
    launch = [
        "srun", "--kill-on-bad-exit=1", "--nodes=2", "--ntasks-per-node=1",
        str(repo / ".venv" / "bin" / "python"), "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "8",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "gpu-a01:29500", "--rdzv-id", "42", "--max-restarts", "0",
        "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout", "600",
        "-m", "llm_pipeline",
    ]  # fmt: skip
    for kind in ("pretrain", "sft", "dpo", "lora"):  # every stage kind resumes its own checkpoints when requeued
        args = [kind, "--config", f"configs/{kind}.yaml", "--max_steps", "9"]
        assert dry(*args, **job) == [*launch, *args, "--resume_from_checkpoint", "auto"]
    explicit = ["sft", "--config", "c.yaml", "--resume_from_checkpoint", "runs/x/checkpoint-4"]
    assert dry(*explicit, **job) == [*launch, *explicit]  # not overridden
    pipeline = ["run", "--config", "configs/pipeline.yaml", "--set", "gates=g.yaml"]
    assert dry(*pipeline, **job) == [*launch, *pipeline]  # the pipeline resumes by itself
    assert dry("run", "--config", "p.yaml", **job, GPUS_PER_NODE="2")[9:11] == ["--nproc-per-node", "2"]
    r = subprocess.run(["bash", str(repo / "scripts" / "multinode.sbatch")], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "usage: bash scripts/multinode.sbatch <stage kind | run>" in r.stderr


def test_multinode_sbatch_passes_the_time_limit_signal_on_and_requeues(tmp_path):
    """Slurm's SIGUSR1 to the batch script (--signal=B:USR1@120) reaches srun (which hands it to the agents and
    they to every rank); once they have saved and exited, the job is requeued."""
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "scripts", repo / "scripts")
    _fake_bin(repo / ".venv" / "bin", "python", "exit 1\n")
    bin_, calls = tmp_path / "bin", tmp_path / "calls"
    _fake_bin(bin_, "scontrol", f'[ "$1" = requeue ] && echo "requeue $2" >> {calls} || echo node1\n')
    # srun: saves on SIGUSR1 and exits as the training processes do (75: state saved)
    _fake_bin(bin_, "srun", f"trap 'echo got-usr1 >> {calls}; exit 75' USR1\ntouch {tmp_path}/started\n"
                            "for i in $(seq 100); do sleep 0.1; done\nexit 0\n")  # fmt: skip
    job = {"SLURM_JOB_ID": "9", "SLURM_SUBMIT_DIR": str(repo), "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1"}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "DRY_RUN")}
    proc = subprocess.Popen(
        ["bash", str(repo / "scripts" / "multinode.sbatch"), "sft", "--config", "c.yaml"], cwd=tmp_path,
        env={**env, **job, "PATH": f"{bin_}:{os.environ['PATH']}"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    for _ in range(100):
        if (tmp_path / "started").exists():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert calls.read_text().split("\n")[:2] == ["got-usr1", "requeue 9"]
    assert "requeueing job 9" in out
