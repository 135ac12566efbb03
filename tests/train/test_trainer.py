"""The loop on the debug model and a synthetic stream: learning, exact resume, curriculum, safety nets."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F

from llm_pipeline.checkpoint.dcp import is_committed, latest_checkpoint
from llm_pipeline.train.objectives import Objective, ObjectiveOutput
from llm_pipeline.train.pretrain import run_pretraining
from llm_pipeline.train.trainer import Callback, Trainer, TrainResult

from .conftest import source, tiny_config


def run(cfg, callbacks=(), **src_kw) -> TrainResult:
    return run_pretraining(cfg, train_source=source(cfg, **src_kw), callbacks=callbacks, export=False)


class Record(Callback):
    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict) -> None:
        self.steps.append({"step": step, **metrics})


class SignalAt(Callback):
    """Sends this process a real signal after ``step`` steps (as Slurm does before a preemption)."""

    def __init__(self, step: int, sig: int = signal.SIGTERM) -> None:
        self.step, self.sig = step, sig

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict) -> None:
        if step == self.step:
            os.kill(os.getpid(), self.sig)


def test_loss_falls(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=30, eval_steps=30)
    result = run_pretraining(cfg, train_source=source(cfg), val_source=source(cfg, seed=1), export=False)
    losses = list(result.losses.values())
    assert result.status == "completed" and result.step == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert list(result.val_losses) == [0, 30]  # a baseline before the first step, then every eval_steps
    assert result.val_losses[30] < result.val_losses[0] - 0.5
    lines = (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 15 + 2  # 15 train log lines + 2 evals
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "logs").iterdir())


@pytest.mark.parametrize(
    "async_save, stop_at", [(False, 4), (True, 4), (False, 6)], ids=["sync", "async", "at-curriculum-boundary"]
)
def test_sigterm_checkpoint_and_exact_resume(tmp_path, async_save, stop_at):
    """N steps straight == N/2, SIGTERM, restart with 'auto', N/2 more: identical losses (curriculum too),
    also when the checkpoint is taken exactly where the curriculum switches length."""
    curriculum = [{"step": 0, "seq_len": 16}, {"step": 6, "seq_len": 32}]
    common = dict(max_steps=10, z_loss_weight=1e-4, curriculum=curriculum, async_save=async_save, save_steps=3)
    straight = run(tiny_config(tmp_path / "a", **common))

    cfg = tiny_config(tmp_path / "b", resume_from_checkpoint="auto", **common)
    first = run(cfg, callbacks=[SignalAt(stop_at)])
    assert first.status == "preempted" and first.step == stop_at
    assert first.checkpoint is not None and is_committed(first.checkpoint)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    second = run(cfg)  # fresh model, fresh loader: everything comes from the checkpoint
    assert second.status == "completed" and second.step == 10
    resumed = {**first.losses, **second.losses}
    assert resumed == straight.losses  # bit-identical on CPU


def test_sigusr1_also_saves(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=6)
    result = run(cfg, callbacks=[SignalAt(2, signal.SIGUSR1)])
    assert result.status == "preempted"
    assert latest_checkpoint(cfg.training.output_dir).name == "checkpoint-2"


def test_curriculum_keeps_tokens_per_step(tmp_path):
    curriculum = [{"step": 0, "seq_len": 16}, {"step": 2, "seq_len": 32}, {"step": 4, "seq_len": 64}]
    cfg = tiny_config(tmp_path, max_steps=6, global_batch_tokens=256, micro_batch_size=4, curriculum=curriculum)
    rec = Record()
    src = source(cfg)
    run_pretraining(cfg, train_source=src, callbacks=[rec], export=False)
    seen = [(m["seq_len"], m["micro_batch_size"], m["accum_steps"], m["tokens"]) for m in rec.steps]
    # micro-batch tokens stay at 4 x 16 = 64 per forward; accumulation makes up 256 tokens per step
    assert seen == [(16, 4, 4, 256)] * 2 + [(32, 2, 4, 256)] * 2 + [(64, 1, 4, 256)] * 2
    assert src.seq_len == 64 and src.pos == 6 * 256


class NaNAt(Callback):
    """Poisons the final hidden states for steps in ``steps`` (a stand-in for a numerical blow-up).

    The final norm's output, not the head's: the fused LM-head loss never calls ``lm_head.forward``.
    """

    def __init__(self, steps: set[int]) -> None:
        self.steps, self.handle, self.before = steps, None, None

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        if step + 1 in self.steps:
            norm = trainer.model.model.norm
            self.handle = norm.register_forward_hook(lambda m, i, out: out * float("nan"))
            self.before = [p.detach().clone() for p in trainer.model.parameters()]

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
            for p, q in zip(trainer.model.parameters(), self.before, strict=True):
                assert torch.equal(p, q), "a skipped step must not change the weights"


def test_nan_step_is_skipped_and_counted(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=6)
    rec = Record()
    result = run(cfg, callbacks=[NaNAt({3}), rec])
    assert result.status == "completed" and result.skipped_steps == 1
    assert [m["skipped"] for m in rec.steps] == [False, False, True, False, False, False]
    assert math.isnan(result.losses[3]) and math.isfinite(result.losses[6])
    lines = (tmp_path / "logs" / "metrics.jsonl").read_text()
    assert '"skipped_steps": 1.0' in lines


def test_nonfinite_k_in_a_row_stops_with_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=20, max_consecutive_skips=3)
    result = run(cfg, callbacks=[NaNAt(set(range(3, 21)))])
    assert result.status == "diverged" and result.step == 5 and result.skipped_steps == 3
    assert result.checkpoint is not None and result.checkpoint.name == "checkpoint-5"
    assert is_committed(result.checkpoint)


class OOMOnce(Callback):
    """Raises a CUDA-style OOM from a forward pre-hook on the first micro-batch of ``step``."""

    def __init__(self, step: int) -> None:
        self.step, self.handle = step, None

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        if step + 1 == self.step:

            def boom(module, args):
                self.handle.remove()
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

            self.handle = trainer.model.register_forward_pre_hook(boom)


def test_oom_halves_micro_batch_keeps_global_batch(tmp_path):
    ref = run(tiny_config(tmp_path / "ref", max_steps=4, micro_batch_size=4))
    rec = Record()
    cfg = tiny_config(tmp_path / "oom", max_steps=4, micro_batch_size=4, enable_oom_recovery=True)
    result = run(cfg, callbacks=[OOMOnce(2), rec])
    assert result.oom_events == 1
    plans = [(m["micro_batch_size"], m["accum_steps"], m["tokens"]) for m in rec.steps]
    assert plans == [(4, 1, 128), (2, 2, 128), (2, 2, 128), (2, 2, 128)]
    # same rows, same normalisation: the same losses up to summation order
    for step, loss in ref.losses.items():
        assert result.losses[step] == pytest.approx(loss, rel=1e-5)
    assert '"oom_events": 1.0' in (tmp_path / "oom" / "logs" / "metrics.jsonl").read_text()


def test_oom_without_recovery_raises(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=3)
    with pytest.raises(torch.OutOfMemoryError):
        run(cfg, callbacks=[OOMOnce(2)])


class MeanPerRowObjective(Objective):
    """A non-token objective (one unit per row, like a preference pair): mean token loss of each row."""

    def count(self, batch):
        return batch["input_ids"].shape[0]

    def __call__(self, model, batch):
        logits = model(batch["input_ids"]).float()  # [B, T, V]
        per_token = F.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")  # [B, T]
        rows = per_token.mean(dim=1)
        return ObjectiveOutput(loss_sum=rows.sum(), metric_sums={"row_loss": rows.detach().sum()})


def test_custom_objective_runs_on_the_same_loop_and_ignores_the_split(tmp_path):
    """A stage = config + objective: units are rows here, and micro-batching does not change the result."""
    from llm_pipeline.model import build_model

    results = []
    for micro in (4, 1):
        cfg = tiny_config(tmp_path / str(micro), max_steps=3, micro_batch_size=micro)
        trainer = Trainer(
            model=build_model(cfg.model.resolve(), seed=0),
            objective=MeanPerRowObjective(),
            train_source=source(cfg),
            cfg=cfg.training,
            curriculum=cfg.curriculum,
        )
        results.append(trainer.fit())
    big, small = results
    assert big.status == small.status == "completed"
    for step, loss in big.losses.items():
        assert small.losses[step] == pytest.approx(loss, rel=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, None])
def test_short_run_on_gpu(tmp_path, fp8):
    """bf16 autocast on one GPU; fp8=None turns torchao float8 on by itself where the GPU has FP8."""
    cfg = tiny_config(tmp_path, max_steps=20, precision="bf16")
    cfg.parallel.device, cfg.parallel.fp8 = "cuda", fp8
    result = run(cfg)
    losses = list(result.losses.values())
    assert result.status == "completed" and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


# Recorded with torch 2.13 (CPU, fp32): debug preset, seed 0, the synthetic stream, 4 rows x 32 per step.
REFERENCE_LOSSES = {1: 6.2572, 2: 6.25113, 3: 6.2496, 4: 6.03998, 5: 6.07542}


def test_reference_losses(tmp_path):
    """A change to init, loss, schedule, optimizer or data order shows up here (as torchtitan's loss files)."""
    cfg = tiny_config(tmp_path, max_steps=5, z_loss_weight=1e-4)
    result = run(cfg)
    assert result.losses == pytest.approx(REFERENCE_LOSSES, abs=2e-4)


def test_export_of_training_checkpoint_matches_final_export(tmp_path, capsys):
    """`llm-pipeline export` reads a DCP checkpoint (or a run's folder: its newest) into an HF directory."""
    from llm_pipeline.checkpoint.hf import load_pretrained
    from llm_pipeline.cli import main

    cfg = tiny_config(tmp_path, max_steps=4, save_steps=2)
    result = run_pretraining(cfg, train_source=source(cfg), export=True)
    assert result.final_dir is not None
    out = tmp_path / "exported"
    assert main(["export", str(cfg.training.output_dir), str(out)]) == 0
    assert "checkpoint-4" in capsys.readouterr().out
    x = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(out)(x), load_pretrained(result.final_dir)(x).float())
    assert main(["export", str(tmp_path / "nothing-here"), str(tmp_path / "o2")]) == 1
    assert "not a model directory" in capsys.readouterr().err


def test_auto_resume_skips_a_damaged_newest_checkpoint(tmp_path, caplog):
    """A committed checkpoint whose shard was later truncated: 'auto' falls back to the previous one."""
    straight = run(tiny_config(tmp_path / "a", max_steps=6, save_steps=2))
    cfg = tiny_config(tmp_path / "b", max_steps=6, save_steps=2, resume_from_checkpoint="auto")
    first = run(cfg, callbacks=[SignalAt(4)])
    assert first.step == 4
    newest = latest_checkpoint(cfg.training.output_dir)
    assert newest is not None and newest.name == "checkpoint-4"
    shard = next(newest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:64])  # committed, then damaged on disk
    with caplog.at_level("WARNING"):
        second = run(cfg)
    assert second.status == "completed" and second.step == 6
    assert "checkpoint-4" in caplog.text and "previous one" in caplog.text
    assert second.losses[3] == straight.losses[3] and second.losses[6] == straight.losses[6]  # restarted at step 2

    shard = next(newest.glob("*.distcp"))  # the resumed run saved a healthy checkpoint-4 again
    shard.write_bytes(shard.read_bytes()[:64])
    explicit = tiny_config(tmp_path / "b", max_steps=6, resume_from_checkpoint=str(newest))
    with pytest.raises(RuntimeError, match="no loadable checkpoint"):
        run(explicit)
