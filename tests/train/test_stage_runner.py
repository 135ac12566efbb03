"""The stage runner: a second stage trains, resumes and exports with no loop of its own; honest
accounting; chunked loss parity; empty batches; changed settings on resume; frozen weights; SIGINT."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F
import yaml

from llm_pipeline.checkpoint.dcp import latest_checkpoint
from llm_pipeline.model import build_model, get_preset
from llm_pipeline.model.flops import FlopModel
from llm_pipeline.train.objectives import (
    IGNORE_INDEX,
    lm_head_loss,
    sequence_extent,
    token_logprobs,
)
from llm_pipeline.train.pretrain import run_pretraining
from llm_pipeline.train.stage import run_stage
from llm_pipeline.train.trainer import Callback, Trainer, TrainingError

from .conftest import source, tiny_config
from .test_trainer import OOMOnce, Record, SignalAt
from .toy_stage import ToyStage, toy_config

# --------------------------------------------------------------------------------------------
# Chunked LM head: equal to the unchunked computation
# --------------------------------------------------------------------------------------------


def _head_and_hidden(n_tokens: int = 37):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, n_tokens, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, n_tokens))
    labels[0, :5] = IGNORE_INDEX
    labels[2, -7:] = IGNORE_INDEX
    return head, hidden, labels


@pytest.mark.parametrize("trained_only", [False, True])
def test_chunked_loss_and_gradients_equal_the_unchunked_ones(trained_only):
    head, hidden, labels = _head_and_hidden()
    # Reference written out by hand: fp32 logits of every position, CE and z-loss on labelled ones.
    logits = (hidden @ head.weight.T).float().flatten(0, 1)
    valid = labels.flatten() != IGNORE_INDEX
    ref_ce = F.cross_entropy(logits[valid], labels.flatten()[valid], reduction="sum")
    ref_z = torch.logsumexp(logits[valid], -1).pow(2).sum()
    ref_grads = torch.autograd.grad(ref_ce + 1e-2 * ref_z, [hidden, head.weight])
    for chunk in (0, 7, 16, 1000):
        kw = dict(z_loss_weight=1e-2, chunk_tokens=chunk, trained_only=trained_only)
        loss, ce, z = lm_head_loss(head, hidden, labels, **kw)
        grads = torch.autograd.grad(loss * 3.0, [hidden, head.weight])  # any upstream scale
        grads = [g / 3.0 for g in grads]
        torch.testing.assert_close(ce, ref_ce, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(z, ref_z, rtol=1e-5, atol=1e-5)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("z_loss_weight", [0.0, 1e-3])
def test_fused_head_equals_float64_cross_entropy_at_chunk_boundaries(z_loss_weight):
    """The fused head (one exp per chunk, sums by torch.sum) against F.cross_entropy on the full logits in
    float64: loss and both gradients within 1e-6 relative at a vocabulary where fp32 sums matter, with a
    short last chunk, a chunk of only ignored rows, any upstream scale, and one input without gradient."""
    torch.manual_seed(0)
    head = torch.nn.Linear(24, 3000, bias=False)
    torch.nn.init.normal_(head.weight, std=0.5)
    hidden = torch.randn(2, 45, 24, requires_grad=True)
    labels = torch.randint(0, 3000, (2, 45))
    labels[0, ::3] = IGNORE_INDEX
    labels[1, 16:32] = IGNORE_INDEX  # chunk 4 of 16 rows: every row ignored
    flat_h, flat_y = hidden.double().flatten(0, 1), labels.flatten()
    logits = flat_h @ head.weight.double().T
    ref_ce = F.cross_entropy(logits, flat_y, ignore_index=IGNORE_INDEX, reduction="sum")
    ref_z = torch.logsumexp(logits[flat_y != IGNORE_INDEX], -1).pow(2).sum()
    ref_loss = ref_ce + z_loss_weight * ref_z
    ref = (ref_loss, *(g.double() for g in torch.autograd.grad(ref_loss, [hidden, head.weight])))
    for chunk in (16, 90, 10_000):  # short last chunk (90 = 5 x 16 + 10), exactly one chunk, one larger chunk
        loss, ce, z = lm_head_loss(head, hidden, labels, z_loss_weight=z_loss_weight, chunk_tokens=chunk)
        got = (loss.detach(), *torch.autograd.grad(loss * 0.25, [hidden, head.weight]))
        for g, r, scale in zip(got, ref, (1.0, 0.25, 0.25), strict=True):
            torch.testing.assert_close(g.double(), r * scale, rtol=1e-6, atol=1e-6 * float(r.abs().max()))
        torch.testing.assert_close(ce.double(), ref_ce, rtol=1e-6, atol=0)
        assert (z is None) == (z_loss_weight == 0)
    head.weight.requires_grad_(False)  # only the hidden states' gradient (a frozen head)
    loss, _, _ = lm_head_loss(head, hidden, labels, z_loss_weight=z_loss_weight, chunk_tokens=16)
    (grad_h,) = torch.autograd.grad(loss, [hidden])
    torch.testing.assert_close(grad_h.double(), ref[1], rtol=1e-6, atol=1e-6 * float(ref[1].abs().max()))
    with torch.no_grad():  # evaluation: the loss alone
        loss, _, _ = lm_head_loss(head, hidden, labels, z_loss_weight=z_loss_weight, chunk_tokens=16)
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-6, atol=0)


def test_a_plain_head_takes_the_fused_path_at_any_row_count_as_its_docstring_says(monkeypatch):
    """lm_head_loss's docstring describes the path it runs: the fused function for every plain head (fewer
    rows than one chunk too), CPU chunks capped by CPU_CHUNK_BYTES; plain autograd for another head."""
    from llm_pipeline.train import objectives

    calls = []
    real = objectives._ChunkedLinearCrossEntropy.apply
    monkeypatch.setattr(objectives._ChunkedLinearCrossEntropy, "apply",
                        lambda *a: calls.append(a[-1]) or real(*a))  # fmt: skip
    head, hidden, labels = _head_and_hidden()
    lm_head_loss(head, hidden, labels, chunk_tokens=10_000)  # one chunk: still fused
    assert len(calls) == 1
    lm_head_loss(torch.nn.Sequential(head), hidden, labels, chunk_tokens=16)  # a wrapped head: plain autograd
    assert len(calls) == 1
    doc = objectives.lm_head_loss.__doc__ or ""
    assert "CPU_CHUNK_BYTES" in doc and "whatever the row count" in doc


@pytest.mark.parametrize("native", [True, False])
def test_chunked_loss_under_bf16_autocast_is_as_accurate_as_the_plain_head(monkeypatch, native):
    """Chunks use the autocast dtype for their matmuls, as the plain head does: against fp32, the
    chunked loss and gradients are within bf16 rounding and no worse than the plain bf16 head's, with
    PyTorch's bf16 kernel and with the fp32 emulation of CPUs without a fast one (model/kernels.py)."""
    from llm_pipeline.model import kernels

    monkeypatch.setattr(kernels, "NATIVE_CPU_BF16_MATMUL", native)
    head, hidden, labels = _head_and_hidden(n_tokens=64)
    loss32, _, _ = lm_head_loss(head, hidden, labels, z_loss_weight=1e-3, chunk_tokens=0)
    ref = (loss32.detach(), *torch.autograd.grad(loss32, [hidden, head.weight]))
    errors = []
    for chunk in (0, 16):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _, _ = lm_head_loss(head, hidden, labels, z_loss_weight=1e-3, chunk_tokens=chunk)
        got = (loss.detach(), *torch.autograd.grad(loss, [hidden, head.weight]))
        for g, r in zip(got, ref, strict=True):
            assert g.dtype == r.dtype
            torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-2)
        errors.append([float((g - r).abs().max()) for g, r in zip(got, ref, strict=True)])
    plain, chunked = errors
    assert all(c <= 1.5 * p + 1e-3 for c, p in zip(chunked, plain, strict=True)), (chunked, plain)


def test_chunked_token_logprobs_equal_log_softmax():
    head, hidden, labels = _head_and_hidden()
    logp_all = torch.log_softmax((hidden @ head.weight.T).float(), -1)
    ref = logp_all.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * (labels != IGNORE_INDEX)
    weights = torch.randn_like(ref)  # an arbitrary downstream use, as DPO's per-sequence sums are
    ref_grads = torch.autograd.grad((ref * weights).sum(), [hidden, head.weight])
    got = token_logprobs(head, hidden, labels, chunk_tokens=8)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad((got * weights).sum(), [hidden, head.weight])
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_chunked_objective_trains_like_the_unchunked_one(tmp_path):
    """Pretraining with 4 chunks per micro-batch gives the unchunked losses (fp32)."""
    plain = run_pretraining(tiny_config(tmp_path / "a", max_steps=4, loss_chunk_tokens=0), train_source=source(
        tiny_config(tmp_path / "a")), export=False)  # fmt: skip
    cfg = tiny_config(tmp_path / "b", max_steps=4, loss_chunk_tokens=16)  # micro-batch: 2 x 32 tokens
    chunked = run_pretraining(cfg, train_source=source(cfg), export=False)
    for step, loss in plain.losses.items():
        assert chunked.losses[step] == pytest.approx(loss, rel=1e-5)


# --------------------------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------------------------


def test_sequence_extent_counts_real_tokens_and_attention_pairs_by_hand():
    ids = torch.zeros(2, 6, dtype=torch.long)
    assert sequence_extent(ids, None) == (12, 2 * 36)
    docs = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, -1, -1]])  # packed 3+2 (+1 pad); 4 (+2 pad)
    assert sequence_extent(ids, docs) == (3 + 2 + 4, 9 + 4 + 16)


def test_flop_model_prices_frozen_weights_and_the_head_by_hand():
    cfg = get_preset("debug")  # 2 layers, hidden 64, 4/2 heads of 16, FFN 176, vocab 512
    h, f, layers = 64, 176, 2
    per_layer = h * 64 + 2 * h * 32 + 64 * h + 3 * h * f
    model = build_model(cfg, device="meta")
    full = FlopModel.from_model(model, cfg)
    assert full == FlopModel.from_config(cfg)
    assert full.body_trained == layers * per_layer and full.head == 512 * h and full.attention == layers * 4 * 16
    for p in model.model.layers.parameters():
        p.requires_grad_(False)
    frozen = FlopModel.from_model(model, cfg)
    got = frozen.training(tokens=10, logit_tokens=4, attention_pairs=30)
    # frozen blocks: forward 2n + input-gradient 2n, no weight gradient; trained head 6n on 4 logit rows
    assert got == 4 * layers * per_layer * 10 + 6 * 512 * h * 4 + 12 * layers * 4 * 16 * 30


def test_logged_tokens_and_flops_match_a_hand_count_for_padded_masked_rows(tmp_path):
    rec = Record()
    cfg = toy_config(tmp_path, max_steps=3)
    stage = ToyStage(cfg)
    src, _ = stage.build_sources(_info(), cfg.model.resolve())
    expected = []
    probe = ToyStage(cfg).build_sources(_info(), cfg.model.resolve())[0]
    probe.set_micro_batch_size(2)
    fm = FlopModel.from_config(cfg.model.resolve())
    for _ in range(3):
        batches = [probe.next_batch() for _ in range(2)]
        lengths = [int((b["document_ids"][r] >= 0).sum()) for b in batches for r in range(2)]
        trained = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
        flops = fm.training(tokens=sum(lengths), logit_tokens=trained, attention_pairs=sum(n * n for n in lengths))
        expected.append((sum(lengths), flops))
    run_stage(stage, train_source=src, callbacks=[rec], export=False)
    assert [(m["tokens"], m["flops"]) for m in rec.steps] == expected


def _info():
    from llm_pipeline.train.parallel import DistInfo

    return DistInfo()


# --------------------------------------------------------------------------------------------
# A second stage on the same runner
# --------------------------------------------------------------------------------------------


def test_toy_stage_trains_resumes_exactly_and_exports(tmp_path):
    transformers = pytest.importorskip("transformers")
    common = dict(max_steps=12, data={"examples": 16})  # 4 steps per epoch
    straight = run_stage(ToyStage(toy_config(tmp_path / "a", **common)))
    losses = list(straight.losses.values())
    assert straight.status == "completed" and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5  # third epoch

    cfg = toy_config(tmp_path / "b", save_steps=3, resume_from_checkpoint="auto", **common)
    first = run_stage(ToyStage(cfg), callbacks=[SignalAt(5)])
    assert first.status == "preempted" and first.step == 5
    second_stage = ToyStage(cfg)  # fresh model, source and objective: everything comes from the checkpoint
    second = run_stage(second_stage)
    assert {**first.losses, **second.losses} == straight.losses
    assert second_stage.objective.examples_seen == 12 * 4  # objective state saved and restored

    hf = transformers.AutoModelForCausalLM.from_pretrained(second.final_dir)
    ids = torch.tensor([[3, 5, 7, 9]])
    from llm_pipeline.checkpoint.hf import load_pretrained

    torch.testing.assert_close(hf(ids).logits, load_pretrained(second.final_dir)(ids), rtol=1e-4, atol=1e-4)


def test_toy_stage_oom_fallback_splits_variable_width_batches(tmp_path):
    ref = run_stage(ToyStage(toy_config(tmp_path / "ref", max_steps=4, micro_batch_size=4)), export=False)
    rec = Record()
    cfg = toy_config(tmp_path / "oom", max_steps=4, micro_batch_size=4, enable_oom_recovery=True)
    got = run_stage(ToyStage(cfg), callbacks=[OOMOnce(2), rec], export=False)
    assert got.oom_events == 1
    assert [(m["micro_batch_size"], m["accum_steps"]) for m in rec.steps] == [(4, 1)] + [(2, 2)] * 3
    for step, loss in ref.losses.items():
        assert got.losses[step] == pytest.approx(loss, rel=1e-5)


def test_num_epochs_sets_max_steps_from_the_data(tmp_path):
    cfg = toy_config(tmp_path, num_epochs=0.5, data={"examples": 40})
    result = run_stage(ToyStage(cfg), export=False)
    assert result.step == 5  # ceil(0.5 x 40 examples / 4 per step)


def test_frozen_weights_stay_out_of_checkpoints_and_resume_exactly(tmp_path):
    common = dict(max_steps=6, save_steps=2, data={"freeze_blocks": True})
    straight_stage = ToyStage(toy_config(tmp_path / "a", **common))
    before = {k: v.clone() for k, v in build_model(get_preset("debug"), seed=0).model.layers.state_dict().items()}
    straight = run_stage(straight_stage, export=False)
    cfg = toy_config(tmp_path / "b", resume_from_checkpoint="auto", **common)
    first = run_stage(ToyStage(cfg), callbacks=[SignalAt(3)], export=False)
    ckpt = latest_checkpoint(cfg.training.output_dir)
    from torch.distributed.checkpoint import FileSystemReader

    saved = set(FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)
    assert not any(k.startswith("model.model.layers") for k in saved), "frozen blocks must not be saved"
    assert "model.lm_head.weight" in saved
    second_stage = ToyStage(cfg)
    second = run_stage(second_stage, export=True)
    assert {**first.losses, **second.losses} == straight.losses
    from llm_pipeline.checkpoint.hf import load_pretrained

    after = load_pretrained(second.final_dir).model.layers.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # bitwise unchanged


# --------------------------------------------------------------------------------------------
# Safety nets of the generalised loop
# --------------------------------------------------------------------------------------------


class MaskLabels(Callback):
    """Masks every label of the batches fetched for the listed (1-based) steps."""

    def __init__(self, steps: set[int], *, forever: bool = False) -> None:
        self.steps, self.forever = steps, forever

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        src = trainer.train_source
        if not hasattr(src, "_orig_next"):
            src._orig_next = src.next_batch
        if step + 1 in self.steps:
            calls = {"n": 0}
            accum = trainer.plan.accum

            def masked():
                b = src._orig_next()
                calls["n"] += 1
                if self.forever or calls["n"] <= accum:
                    b = {**b, "labels": torch.full_like(b["labels"], IGNORE_INDEX)}
                return b

            src.next_batch = masked
        else:
            src.next_batch = src._orig_next


def test_empty_global_batch_is_skipped_counted_and_logged(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=4)
    result = run_pretraining(cfg, train_source=source(cfg), callbacks=[MaskLabels({2})], export=False)
    assert result.status == "completed" and result.step == 4 and result.empty_batches == 1
    assert all(math.isfinite(v) for v in result.losses.values())
    assert '"empty_batches": 1.0' in (tmp_path / "logs" / "metrics.jsonl").read_text()


def test_too_many_empty_batches_stop_with_a_clear_error(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=4, max_empty_batches=3)
    with pytest.raises(TrainingError, match="3 global batches in a row had no trained token"):
        run_pretraining(cfg, train_source=source(cfg), callbacks=[MaskLabels({2}, forever=True)], export=False)


def test_resume_applies_a_changed_learning_rate_and_records_it(tmp_path):
    rec = Record()
    cfg = tiny_config(tmp_path, max_steps=6, save_steps=3, warmup_steps=0, lr_schedule="constant")
    run_pretraining(cfg, train_source=source(cfg), callbacks=[SignalAt(3)], export=False)
    again = tiny_config(tmp_path, max_steps=6, warmup_steps=0, lr_schedule="constant", learning_rate=1e-3,
                        weight_decay=0.0, resume_from_checkpoint="auto")  # fmt: skip
    trainer_holder: list[Trainer] = []

    class Grab(Callback):
        def on_train_start(self, trainer: Trainer) -> None:
            trainer_holder.append(trainer)

    result = run_pretraining(again, train_source=source(again), callbacks=[rec, Grab()], export=False)
    assert result.step == 6 and [m["lr"] for m in rec.steps] == [1e-3] * 3
    groups = trainer_holder[0].optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.0, 0.0]
    saved = yaml.safe_load((latest_checkpoint(again.training.output_dir) / "config.yaml").read_text())
    assert saved["training"]["learning_rate"] == 1e-3  # the record says what ran


def test_resume_refuses_changed_model_or_seed_naming_the_keys(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=4, save_steps=2)
    run_pretraining(cfg, train_source=source(cfg), callbacks=[SignalAt(2)], export=False)
    changed = tiny_config(tmp_path, max_steps=4, seed=7, resume_from_checkpoint="auto")
    changed.model.overrides = {"rope_theta": 5e5}
    with pytest.raises(TrainingError, match=r"(?s)model\.overrides\.rope_theta.*training\.seed: 0 -> 7"):
        run_pretraining(changed, train_source=source(changed), export=False)


def test_a_new_run_refuses_a_folder_with_checkpoints_of_another_run(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=2, save_steps=2)
    run_pretraining(cfg, train_source=source(cfg), export=False)
    with pytest.raises(TrainingError, match="--resume_from_checkpoint auto"):
        run_pretraining(cfg, train_source=source(cfg), export=False)


def test_ctrl_c_saves_at_the_step_boundary_and_resumes_exactly(tmp_path):
    straight = run_pretraining(tiny_config(tmp_path / "a", max_steps=6), train_source=source(
        tiny_config(tmp_path / "a")), export=False)  # fmt: skip
    cfg = tiny_config(tmp_path / "b", max_steps=6, resume_from_checkpoint="auto")
    first = run_pretraining(cfg, train_source=source(cfg), callbacks=[SignalAt(2, signal.SIGINT)], export=False)
    assert first.status == "preempted" and latest_checkpoint(cfg.training.output_dir).name == "checkpoint-2"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    second = run_pretraining(cfg, train_source=source(cfg), export=False)
    assert {**first.losses, **second.losses} == straight.losses


def test_output_dir_moves_the_logs_unless_logging_dir_is_given(tmp_path):
    from llm_pipeline.cli import build_parser
    from llm_pipeline.commands.train import stage_config_from_args

    demo = str(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo", "pretrain.yaml"))
    parse = build_parser().parse_args
    a = stage_config_from_args("pretrain", parse(["pretrain", "--config", demo, "--output_dir", str(tmp_path / "a")]))
    assert a.training.resolved_logging_dir == tmp_path / "a" / "logs"
    b = stage_config_from_args(
        "pretrain", parse(["pretrain", "--config", demo, "--output_dir", str(tmp_path / "b"), "--logging_dir", "L"])
    )
    assert str(b.training.resolved_logging_dir) == "L"


def test_resume_may_change_where_the_first_weights_came_from(tmp_path):
    """A standalone run continued by the pipeline (which names its start model) resumes exactly."""
    from llm_pipeline.checkpoint.hf import save_pretrained

    straight = run_pretraining(tiny_config(tmp_path / "a", max_steps=4), train_source=source(
        tiny_config(tmp_path / "a")), export=False)  # fmt: skip
    cfg = tiny_config(tmp_path / "b", max_steps=4, resume_from_checkpoint="auto")
    first = run_pretraining(cfg, train_source=source(cfg), callbacks=[SignalAt(2)], export=False)
    start = save_pretrained(build_model(get_preset("debug"), seed=0), tmp_path / "start")
    again = tiny_config(tmp_path / "b", max_steps=4, resume_from_checkpoint="auto")
    again.model.init_from = start
    second = run_pretraining(again, train_source=source(again), export=False)
    assert {**first.losses, **second.losses} == straight.losses


def test_a_bf16_start_model_trains_fp32_weights_as_under_fsdp(tmp_path):
    """Exports are bf16 after a bf16 run; the next stage still trains fp32 weights under bf16 autocast (as FSDP2's
    fp32 shards do), or AdamW's small updates (DPO's 5e-7 learning rate) would round away in bf16 weights."""
    from llm_pipeline.checkpoint.hf import save_pretrained

    start = save_pretrained(build_model(get_preset("debug"), seed=0), tmp_path / "start", dtype=torch.bfloat16)
    cfg = tiny_config(tmp_path / "run", max_steps=1, precision="bf16")
    cfg.model.init_from = start

    class Dtypes(Callback):
        def on_train_start(self, trainer) -> None:
            self.dtypes = {p.dtype for p in trainer.model.parameters()}

    seen = Dtypes()
    run_pretraining(cfg, train_source=source(cfg), callbacks=[seen], export=False)
    assert seen.dtypes == {torch.float32}
