"""The reliability suite's shared setup: a tiny packed corpus, CLI training runs in subprocesses, and
the checks every fault scenario ends with (same losses and weights as an undisturbed run, nothing
left behind, every checkpoint that looks valid is valid).

Training is driven through the command line (``tests/reliability/driver.py`` wraps
``llm-pipeline`` and injects the fault), so these tests hold whatever the trainer looks like inside.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("driver.py")
MAX_STEPS = 8
CHECKPOINT_FILES = {".metadata", "__0_0.distcp", "rank_0.pt", "trainer_state.pt", "config.yaml", "meta.json"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("filterwarnings", "ignore:torch.distributed is disabled:UserWarning")


@pytest.fixture(scope="session")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """~0.4 MB of stdlib source, a 512-token BPE (the debug preset's vocabulary), packed train/val shards."""
    from llm_pipeline.data.config import SourceConfig
    from llm_pipeline.data.pack import pack_documents
    from llm_pipeline.data.sources import iter_source
    from llm_pipeline.data.tokenizer import save_tokenizer, train_tokenizer

    tmp = tmp_path_factory.mktemp("corpus")
    src = SourceConfig(kind="stdlib", include_docs=False, held_out_modules=[])
    docs = []
    for item in iter_source(src):
        if item.text and len(item.text) > 4000:
            docs.append({"id": item.doc_id, "text": item.text, "metadata": {}})
        if len(docs) == 24:
            break
    (tmp / "clean").mkdir()
    with gzip.open(tmp / "clean" / "00000.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    save_tokenizer(train_tokenizer((d["text"] for d in docs), vocab_size=512), tmp / "tokenizer")
    pack_documents(tmp / "clean", tmp / "packed", tmp / "tokenizer", val_fraction=0.1, show_progress=False)
    return tmp / "packed", tmp / "tokenizer"


@dataclass
class Run:
    """One training run folder: ``ckpt/`` (checkpoints), ``ckpt_final/`` (HF export), ``logs/``."""

    root: Path
    config: Path

    @property
    def training(self) -> dict:
        return yaml.safe_load(self.config.read_text())["training"]

    @property
    def out(self) -> Path:
        return Path(self.training["output_dir"])

    @property
    def final(self) -> Path:
        return self.out.with_name(self.out.name + "_final")

    @property
    def logs(self) -> Path:
        return Path(self.training["logging_dir"])

    def command(self, *extra: str) -> list[str]:
        return [sys.executable, str(DRIVER), "pretrain", "--config", str(self.config), *extra]

    def cli(self, *extra: str, fault: str = "", timeout: float = 180, prefix: list[str] | None = None):
        """Run ``llm-pipeline pretrain`` on this folder (with an injected fault); returns the CompletedProcess."""
        return subprocess.run(
            [*(prefix or []), *self.command(*extra)],
            env=cli_env(fault),
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def popen(self, *extra: str, fault: str = "") -> subprocess.Popen:
        return subprocess.Popen(
            self.command(*extra), env=cli_env(fault), cwd=self.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip

    def losses(self) -> list[tuple[int, float]]:
        """Every training-loss line the run's processes logged, in order (a resumed step appears twice)."""
        path = self.logs / "metrics.jsonl"
        if not path.is_file():
            return []
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [(r["step"], r["loss"]) for r in rows if r.get("split") == "train"]


def cli_env(fault: str = "") -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    env["RELIABILITY_FAULT"] = fault
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"  # a debug model needs no threads; halves the CPU time on a shared machine
    return env


def make_run(
    root: Path, packed: tuple[Path, Path], *, data: dict[str, object] | None = None, **training: object
) -> Run:
    """A debug-preset run of MAX_STEPS steps, checkpoint every 2 (keep 2), curriculum 32 -> 64 at step 4.

    ``data`` adds keys to the data section (e.g. a mixture's ``sources``); ``training`` overrides training keys.
    """
    path_, tok = packed
    cfg = {
        "model": {"preset": "debug"},
        "data": {"path": str(path_), "tokenizer_dir": str(tok), **(data or {})},
        "training": {
            "max_steps": MAX_STEPS, "global_batch_tokens": 256, "micro_batch_size": 4, "learning_rate": 3e-3,
            "warmup_steps": 2, "precision": "fp32", "logging_steps": 1, "eval_steps": 0, "save_steps": 2,
            "save_total_limit": 2, "output_dir": str(root / "ckpt"), "logging_dir": str(root / "logs"),
            "resume_from_checkpoint": "auto", **training,
        },
        "parallel": {"device": "cpu"},
        "curriculum": [{"step": 0, "seq_len": 32}, {"step": 4, "seq_len": 64}],
    }  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    path = root / "pretrain.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return Run(root, path)


@dataclass
class Reference:
    """The undisturbed run every fault scenario must reproduce exactly."""

    run: Run
    losses: dict[int, float]
    weights: bytes
    events: int  # file-system events + optimizer steps of a whole run (see driver.py)


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory, packed: tuple[Path, Path]) -> Reference:
    run = make_run(tmp_path_factory.mktemp("reference"), packed)
    count = run.root / "events.txt"
    proc = run.cli(fault=f"count-events:{count}")
    assert proc.returncode == 0, proc.stderr
    losses = dict(run.losses())
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    return Reference(run, losses, (run.final / "model.safetensors").read_bytes(), int(count.read_text()))


def copy_run(src: Run, dst_root: Path) -> Run:
    """A copy of a finished run's folders under ``dst_root``, with its config pointing there."""
    for path, name in ((src.out, "ckpt"), (src.final, "ckpt_final"), (src.logs, "logs")):
        if path.exists():
            shutil.copytree(path, dst_root / name, symlinks=True)
    cfg = yaml.safe_load(src.config.read_text())
    cfg["training"]["output_dir"] = str(dst_root / "ckpt")
    cfg["training"]["logging_dir"] = str(dst_root / "logs")
    (dst_root / "pretrain.yaml").write_text(yaml.safe_dump(cfg))
    return Run(dst_root, dst_root / "pretrain.yaml")


def assert_reproduces(run: Run, ref: Reference) -> None:
    """Bit-identical: every loss any of the run's processes logged, and the exported final weights."""
    logged = run.losses()
    assert {s for s, _ in logged} == set(ref.losses), f"steps logged: {sorted({s for s, _ in logged})}"
    for step, loss in logged:
        assert loss == ref.losses[step], f"step {step}: loss {loss!r} != {ref.losses[step]!r} of the undisturbed run"
    assert (run.final / "model.safetensors").read_bytes() == ref.weights, "final weights differ"


def leftovers(run: Run) -> list[str]:
    """Temp, half-pruned or moved-aside folders and lock files a crash could leave behind."""
    found = [
        p.name
        for p in run.out.iterdir()
        if p.name.startswith((".tmp-", ".pruned-", ".old-")) or p.name == ".llm_pipeline.lock"
    ]
    found += [p.name for p in run.out.parent.iterdir() if p.name.startswith(f".{run.final.name}.")]
    return sorted(found)


def assert_checkpoints_valid(run: Run) -> list[int]:
    """Every folder that counts as a checkpoint is complete and loads; returns their steps."""
    from llm_pipeline.checkpoint.dcp import list_checkpoints, load_model_from_checkpoint

    steps = []
    for step, path in list_checkpoints(run.out):
        missing = CHECKPOINT_FILES - {p.name for p in path.iterdir()}
        assert not missing, f"{path.name} counts as committed but lacks {sorted(missing)}"
        load_model_from_checkpoint(path)  # raises on damage
        steps.append(step)
    return steps


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int = 1) -> str:
    """The CLI failed with ``code`` and exactly one ``error:`` line, no traceback; returns that line."""
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


_MOUNT_PROBE = "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d && umount $d && rmdir $d"


@functools.cache
def private_mount_prefix() -> tuple[str, ...] | None:
    """A command prefix that runs its command in a private mount namespace where it may mount a tmpfs
    (as root, or through an unprivileged user namespace); None where the platform allows neither."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return None
    for prefix in (
        ("unshare", "--mount", "--propagation", "private"),
        ("unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"),
    ):
        probe = subprocess.run([*prefix, "sh", "-c", _MOUNT_PROBE], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return prefix
    return None


def on_tmpfs(mountpoint: Path, size_bytes: int, *, setup: str = "", after: str = "") -> list[str]:
    """Prefix for :meth:`Run.cli`: mount a ``size_bytes`` tmpfs at ``mountpoint`` (private to the command),
    run the ``setup`` shell lines, the command, then ``after`` (e.g. copy results out before it vanishes)."""
    prefix = private_mount_prefix()
    if prefix is None:
        pytest.skip("cannot mount a private tmpfs here (needs root or unprivileged user namespaces)")
    mountpoint.mkdir(parents=True, exist_ok=True)
    size_kib = max(4, size_bytes // 1024)
    script = (
        f"mount -t tmpfs -o size={size_kib}k tmpfs {shlex.quote(str(mountpoint))} || exit 97\n{setup}\n"
        f'"$@"; rc=$?\n{after}\nexit $rc'
    )
    return [*prefix, "sh", "-c", script, "sh"]
