"""The DPO stage: every loss against its paper's formula, the reference cache, resume, FSDP2, training signal.

Expected values are computed here from the papers' formulas in plain Python floats (``math``), never
with the functions under test.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_pipeline.data.preference import PreferenceBatchSource, PreferencePairs
from llm_pipeline.data.sft import TokenExamples
from llm_pipeline.model import build_model, get_preset
from llm_pipeline.model.flops import FlopModel
from llm_pipeline.train.dpo import DPOConfig, DPOStage
from llm_pipeline.train.dpo_loss import DPOObjective, sequence_logps
from llm_pipeline.train.dpo_reference import (
    ReferenceCache,
    compute_reference_logps,
    load_or_compute_reference,
    pass_plan,
)
from llm_pipeline.train.parallel import DistInfo
from llm_pipeline.train.stage import run_stage

from .dpo_setup import dpo_config, make_start
from .test_trainer import SignalAt


@pytest.fixture(scope="module")
def start(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_start(tmp_path_factory.mktemp("dpo_start"))


# --------------------------------------------------------------------------------------------
# The losses, from the papers
# --------------------------------------------------------------------------------------------


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def paper_loss(kind: str, pw: float, pl: float, rw: float, rl: float, nw: int, nl: int, beta: float, eps: float):
    """One pair's loss as the papers write it (sums for DPO/cDPO/rDPO/hinge, per-token means for IPO/dpo_norm)."""
    h = (pw - rw) - (pl - rl)  # log π(w)/π_ref(w) - log π(l)/π_ref(l)
    h_mean = (pw - rw) / nw - (pl - rl) / nl
    if kind == "sigmoid":  # Rafailov et al. eq. 7; Mitchell's cDPO with eps
        return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    if kind == "robust":  # Chowdhury et al. eq. 12: (1-ε)L(h) - εL(-h) over 1-2ε, L = -log σ(β·)
        return ((1 - eps) * -log_sigmoid(beta * h) - eps * -log_sigmoid(-beta * h)) / (1 - 2 * eps)
    if kind == "hinge":  # SLiC / RSO
        return max(0.0, 1 - beta * h)
    if kind == "ipo":  # Azar et al. eq. 17, τ = β
        return (h_mean - 1 / (2 * beta)) ** 2
    if kind == "dpo_norm":  # length-normalised DPO (Tulu 3)
        return -(1 - eps) * log_sigmoid(beta * h_mean) - eps * log_sigmoid(-beta * h_mean)
    raise AssertionError(kind)


def _random_logps(b: int = 7):
    g = torch.Generator().manual_seed(3)
    n = torch.randint(1, 40, (2, b), generator=g).double()
    pol = -torch.rand(2, b, generator=g, dtype=torch.float64) * n * 3  # summed log-probs of n tokens
    ref = pol + torch.randn(2, b, generator=g, dtype=torch.float64) * 4
    return pol, ref, n


@pytest.mark.parametrize(
    ("kind", "beta", "eps"),
    [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("robust", 0.1, 0.1), ("robust", 0.3, 0.0), ("hinge", 0.2, 0.0),
     ("ipo", 0.1, 0.0), ("ipo", 1.0, 0.0), ("dpo_norm", 5.0, 0.0), ("dpo_norm", 2.0, 0.15)],
)  # fmt: skip
def test_each_loss_matches_its_paper_formula(kind, beta, eps):
    pol, ref, n = _random_logps()
    objective = DPOObjective([kind], beta=beta, label_smoothing=eps)
    got, _ = objective.pair_losses((pol[0], pol[1]), (ref[0], ref[1]), (n[0], n[1]))
    for i in range(pol.shape[1]):
        want = paper_loss(kind, *(float(x) for x in (pol[0, i], pol[1, i], ref[0, i], ref[1, i])),
                          int(n[0, i]), int(n[1, i]), beta, eps)  # fmt: skip
        assert float(got[i]) == pytest.approx(want, rel=1e-9, abs=1e-12), (kind, i)


def test_combined_losses_with_weights_and_the_sft_term():
    pol, ref, n = _random_logps()
    kinds, weights, beta, eps, sft = ["sigmoid", "ipo", "hinge"], [1.0, 0.25, 0.5], 0.2, 0.1, 0.7
    objective = DPOObjective(kinds, weights, beta=beta, label_smoothing=eps, sft_weight=sft)
    got, parts = objective.pair_losses((pol[0], pol[1]), (ref[0], ref[1]), (n[0], n[1]))
    assert set(parts) == {"sigmoid", "ipo", "hinge", "nll"}
    for i in range(pol.shape[1]):
        pw, pl, rw, rl = (float(x) for x in (pol[0, i], pol[1, i], ref[0, i], ref[1, i]))
        nw, nl = int(n[0, i]), int(n[1, i])
        want = sum(w * paper_loss(k, pw, pl, rw, rl, nw, nl, beta, eps) for k, w in zip(kinds, weights, strict=True))
        want += sft * (-pw / nw)  # the chosen completion's mean token NLL
        assert float(got[i]) == pytest.approx(want, rel=1e-9)


def test_dpo_gradient_is_the_papers():
    """∇L = -β σ(-β h) (∇ log π(w) - ∇ log π(l)) (Rafailov et al., §4)."""
    pol, ref, n = _random_logps()
    pw, pl = pol[0].clone().requires_grad_(), pol[1].clone().requires_grad_()
    loss, _ = DPOObjective(["sigmoid"], beta=0.3).pair_losses((pw, pl), (ref[0], ref[1]), (n[0], n[1]))
    loss.sum().backward()
    for i in range(pol.shape[1]):
        h = float((pol[0, i] - ref[0, i]) - (pol[1, i] - ref[1, i]))
        coeff = 0.3 * (1 / (1 + math.exp(0.3 * h)))
        assert float(pw.grad[i]) == pytest.approx(-coeff, rel=1e-9)
        assert float(pl.grad[i]) == pytest.approx(coeff, rel=1e-9)


def test_bad_dpo_settings_are_clear_errors(start, tmp_path):
    base = dpo_config(tmp_path, start).model_dump(mode="json")  # a resolved config, as saved in checkpoints
    assert DPOConfig.model_validate(base).dpo.loss_type == ["sigmoid"]  # loads back
    cases = [
        ({"loss_type": "dpo"}, "loss_type"),
        ({"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0]}, "1 values for 2 loss types"),
        ({"loss_type": ["ipo", "hinge"], "label_smoothing": 0.1}, "would ignore it"),
        ({"loss_type": ["ipo", "ipo"]}, "more than once"),
        ({"label_smoothing": 0.5}, "label_smoothing"),
        ({"beta": 0}, "beta"),
        ({"reference": "frozen"}, "reference"),
    ]
    for dpo, match in cases:
        with pytest.raises(ValueError, match=match):
            DPOConfig.model_validate({**base, "dpo": dpo})
    with pytest.raises(ValueError, match=r"set model\.init_from"):
        DPOConfig.model_validate({**base, "model": {"preset": "debug"}})
    with pytest.raises(ValueError, match="global_batch_size"):
        DPOConfig.model_validate({**base, "training": {**base["training"], "global_batch_size": None}})
    assert DPOConfig.model_validate({**base, "dpo": {"loss_type": "ipo"}}).dpo.loss_type == ["ipo"]


# --------------------------------------------------------------------------------------------
# Log-probs, batches, cost
# --------------------------------------------------------------------------------------------


def _pairs_source(n: int = 9, *, micro: int = 3, seed: int = 0) -> PreferenceBatchSource:
    """Pairs of random tokens: a prompt, then completions of different lengths (all trained)."""
    rng = np.random.default_rng(seed)
    sides = []
    prompts = [rng.integers(5, 500, rng.integers(2, 6)).tolist() for _ in range(n)]
    for _ in range(2):
        rows = []
        for p in prompts:
            c = rng.integers(5, 500, rng.integers(1, 9)).tolist()
            rows.append((p + c, [0] * len(p) + [1] * len(c)))
        sides.append(TokenExamples.from_lists(rows))
    return PreferenceBatchSource(PreferencePairs(*sides), micro_batch_size=micro, seed=seed, pad_id=0)


def test_sequence_logps_equal_log_softmax_sums_and_padding_changes_nothing():
    torch.manual_seed(0)
    model = build_model(get_preset("debug"), seed=0)
    src = _pairs_source()
    batch = src.collate_pairs([4, 0, 7])
    with torch.no_grad():
        pw, pl, nw, nl = sequence_logps(model, batch, chunk_tokens=5)
    for side, got, counts in (("chosen", pw, nw), ("rejected", pl, nl)):
        for r, pair in enumerate([4, 0, 7]):
            tokens, trained = getattr(src.pairs, side).example(pair)
            ids = torch.tensor(tokens, dtype=torch.long)[None]
            with torch.no_grad():
                logp = torch.log_softmax(model(ids)[0].double(), -1)  # this row alone, no padding
            want = sum(float(logp[t, tokens[t + 1]]) for t in range(len(tokens) - 1) if trained[t + 1])
            assert float(got[r]) == pytest.approx(want, rel=1e-5)
            assert int(counts[r]) == int(trained[1:].sum())


def test_collate_pairs_and_attached_columns_follow_the_pair_ids():
    src = _pairs_source()
    src.attach(ref_chosen_logps=torch.arange(9.0), ref_rejected_logps=-torch.arange(9.0))
    batch = src.collate_pairs([3, -1, 8])
    assert batch["pair_ids"].tolist() == [3, -1, 8]
    assert batch["ref_chosen_logps"].tolist() == [3.0, 0.0, 8.0] and batch["ref_rejected_logps"].tolist() == [-3, 0, -8]
    assert (batch["chosen_labels"][1] == -100).all()
    first = src.next_batch()  # the training order carries them too
    assert torch.equal(first["ref_chosen_logps"], first["pair_ids"].float())
    with pytest.raises(ValueError, match="expected \\(9,\\)"):
        src.attach(bad=torch.zeros(4))


def test_cost_counts_real_tokens_of_both_sides_and_a_live_reference_forward():
    src = _pairs_source()
    batch = src.collate_pairs([1, 2, -1])
    fm = FlopModel.from_config(get_preset("debug"))
    lengths = [len(getattr(src.pairs, s).example(i)[0]) for s in ("chosen", "rejected") for i in (1, 2)]
    logits = sum(int(getattr(src.pairs, s).example(i)[1][1:].sum()) for s in ("chosen", "rejected") for i in (1, 2))
    tokens, attn = sum(lengths), sum(n * n for n in lengths)
    cached = DPOObjective().cost(batch, fm)
    assert cached.tokens == tokens
    assert cached.flops == fm.training(tokens=tokens, logit_tokens=logits, attention_pairs=attn)
    live = DPOObjective(reference_model=torch.nn.Identity()).cost(batch, fm)
    assert live.flops == cached.flops + fm.forward(tokens=tokens, logit_tokens=logits, attention_pairs=attn)


def test_reference_pass_plan_gives_every_rank_the_same_number_of_forwards():
    lengths = np.array([5, 9, 1, 7, 3, 8, 2])
    plans = [pass_plan(lengths, 2, 3, r) for r in range(3)]
    assert {len(p) for p in plans} == {2}
    ids = sorted(i for p in plans for mb in p for i in mb if i >= 0)
    assert ids == list(range(7))
    assert plans[0][0] == [1, 5] and plans[1][0] == [3, 0]  # longest pairs first


def test_the_reference_model_itself_gives_log2_and_zero_rewards():
    model = build_model(get_preset("debug"), seed=0)
    src = _pairs_source()
    table = compute_reference_logps(model, src, DistInfo(), micro_batch_size=4, precision="fp32", chunk_tokens=16)
    table.attach_to(src)
    out = DPOObjective(beta=0.1)(model, src.next_batch())
    assert float(out.loss_sum.detach()) == pytest.approx(3 * math.log(2), rel=1e-5)
    assert float(out.metric_sums["rewards/margins"]) == pytest.approx(0.0, abs=1e-5)


def test_filler_pairs_add_nothing_to_any_metric():
    """An evaluation pads its last micro-batch with filler pairs (no tokens): every metric sum stays
    finite and equals the sum over the real pairs alone; chosen_nll is the per-token NLL of the chosen side."""
    model = build_model(get_preset("debug"), seed=0)
    src = _pairs_source()
    src.attach(ref_chosen_logps=torch.full((9,), -20.0), ref_rejected_logps=torch.full((9,), -25.0))
    objective = DPOObjective(beta=0.1)
    with torch.no_grad():
        padded = objective(model, src.collate_pairs([3, -1, 8, -1])).metric_sums
        alone = objective(model, src.collate_pairs([3, 8])).metric_sums
        pw, _, nw, _ = sequence_logps(model, src.collate_pairs([3, 8]), chunk_tokens=0)
    for name, value in alone.items():
        assert math.isfinite(float(padded[name])), name
        assert float(padded[name]) == pytest.approx(float(value), rel=1e-5, abs=1e-6), name
    assert float(alone["chosen_nll"]) == pytest.approx(float((-pw / nw).sum()), rel=1e-6)


# --------------------------------------------------------------------------------------------
# The reference cache
# --------------------------------------------------------------------------------------------


def test_reference_cache_is_reused_and_a_mismatch_is_recomputed(tmp_path, monkeypatch, caplog):
    import llm_pipeline.train.dpo_reference as ref_mod

    model = build_model(get_preset("debug"), seed=0)
    both = {"train": _pairs_source(9), "val": _pairs_source(4, seed=1)}
    calls = []
    real = ref_mod.compute_reference_logps
    monkeypatch.setattr(ref_mod, "compute_reference_logps", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run(components, sources=both):
        return load_or_compute_reference(
            model, sources, DistInfo(), cache_dir=tmp_path, components=lambda: components, micro_batch_size=8,
            precision="fp32", chunk_tokens=0,
        )  # fmt: skip

    tables, first = run({"model": "a"})
    assert first["computed"] == ["train", "val"] and len(calls) == 2
    train_file = Path(first["paths"]["train"])
    meta = json.loads(train_file.with_suffix(".json").read_text())
    assert meta["components"] == {"model": "a", "split": "train", "data": both["train"].fingerprint()}
    mtime = os.stat(train_file).st_mtime_ns
    again, second = run({"model": "a"})
    assert second["loaded"] and len(calls) == 2 and os.stat(train_file).st_mtime_ns == mtime
    for split in both:
        assert torch.equal(again[split].chosen, tables[split].chosen)
        assert torch.equal(again[split].rejected, tables[split].rejected)
    # Evaluation switched off, then on again: nothing is recomputed.
    assert run({"model": "a"}, {"train": both["train"]})[1]["loaded"] and len(calls) == 2

    _, other = run({"model": "b"})  # another start model: other keys, other files; the first ones stay
    assert other["computed"] == ["train", "val"] and other["paths"]["train"] != str(train_file)
    assert train_file.is_file()

    # A file under this key holding another key's table (copied, renamed) is never used.
    train_file.write_bytes(Path(other["paths"]["train"]).read_bytes())
    _, third = run({"model": "a"})
    assert third["computed"] == ["train"] and "does not match" in caplog.text  # val still came from its file
    # A torn file: recomputed and replaced.
    train_file.write_bytes(train_file.read_bytes()[:100])
    _, fourth = run({"model": "a"})
    assert fourth["computed"] == ["train"] and "unreadable" in caplog.text
    assert run({"model": "a"})[1]["loaded"]
    # Another pair count under the same key (a tampered file): refused.
    assert ReferenceCache(tmp_path, third["keys"]["train"], {}).load(10) is None


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def test_dpo_raises_held_out_reward_accuracy_and_exports_with_the_start_tokenizer(start, tmp_path):
    cfg = dpo_config(tmp_path, start, max_steps=8, eval_steps=8, dpo={"sft_weight": 0.1})
    result = run_stage(DPOStage(cfg))
    before, after = result.eval_metrics[0], result.eval_metrics[8]
    # Policy = reference before the first step: every reward is 0 (a tie counts as wrong, as in TRL).
    assert before["rewards/accuracies"] == 0.0 and before["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert after["rewards/accuracies"] > 0.5 and after["rewards/margins"] > 0
    assert after["loss"] < before["loss"]
    # chosen_nll, always reported, is the SFT term's per-token NLL of the chosen replies
    assert after["chosen_nll"] == pytest.approx(after["nll_loss"], rel=1e-6) and before["chosen_nll"] > 0
    lines = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    names = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected", "nll_loss", "chosen_nll", "loss"}  # fmt: skip
    train = [x for x in lines if "lr" in x]
    assert train and all(names <= set(x) for x in train)
    assert any(names - {"nll_loss"} <= set(x) and "lr" not in x for x in lines)  # the eval lines
    final = Path(result.final_dir)
    for f in ("tokenizer.json", "chat_template.jinja"):
        assert (final / f).read_bytes() == (start["model"] / f).read_bytes()
    assert json.loads((final / "llm_pipeline.json").read_text())["stage"] == "dpo"


def test_cached_and_live_references_give_the_same_losses(start, tmp_path):
    cached = run_stage(DPOStage(dpo_config(tmp_path / "cached", start, max_steps=3, eval_steps=3)), export=False)
    stage = DPOStage(dpo_config(tmp_path / "live", start, max_steps=3, eval_steps=3, dpo={"reference": "live"}))
    live = run_stage(stage, export=False)
    assert stage.reference_model is not None and not (tmp_path / "live" / "ckpt" / "reference").exists()
    for step, loss in cached.losses.items():
        assert live.losses[step] == pytest.approx(loss, rel=1e-5), step
    for key, value in cached.eval_metrics[3].items():
        assert live.eval_metrics[3][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_oom_fallback_splits_pairs_with_their_reference_values(start, tmp_path):
    from .test_trainer import OOMOnce

    ref = run_stage(DPOStage(dpo_config(tmp_path / "a", start, max_steps=3, micro_batch_size=4)), export=False)
    cfg = dpo_config(tmp_path / "b", start, max_steps=3, micro_batch_size=4, enable_oom_recovery=True)
    got = run_stage(DPOStage(cfg), callbacks=[OOMOnce(2)], export=False)
    assert got.oom_events == 1
    for step, loss in ref.losses.items():
        assert got.losses[step] == pytest.approx(loss, rel=1e-5), step


def test_data_beyond_the_model_vocabulary_is_refused(start, tmp_path):
    from llm_pipeline.train.model_setup import resolve_model_config

    stage = DPOStage(dpo_config(tmp_path, start))
    model_cfg = resolve_model_config(stage.cfg.model)
    train, _ = stage.build_sources(DistInfo(), model_cfg)
    stage.check_data(train, model_cfg)
    with pytest.raises(ValueError, match="vocab_size 300"):
        stage.check_data(train, model_cfg.model_copy(update={"vocab_size": 300}))


def test_resume_is_exact_and_reuses_the_cached_reference(start, tmp_path):
    straight = run_stage(DPOStage(dpo_config(tmp_path / "a", start, max_steps=6)), export=False)
    cfg = dpo_config(tmp_path / "b", start, max_steps=6, save_steps=2, resume_from_checkpoint="auto")
    first_stage = DPOStage(cfg)
    first = run_stage(first_stage, callbacks=[SignalAt(3)], export=False)
    assert first.status == "preempted" and not first_stage.reference_report["loaded"]
    cache = Path(first_stage.reference_report["paths"]["train"])
    mtime = os.stat(cache).st_mtime_ns
    second_stage = DPOStage(cfg)
    second = run_stage(second_stage, export=False)
    assert second_stage.reference_report["loaded"] and os.stat(cache).st_mtime_ns == mtime  # not recomputed
    assert {**first.losses, **second.losses} == straight.losses
    # The loss section cannot change on resume (the checkpoint's objective would silently differ).
    changed = dpo_config(tmp_path / "b", start, max_steps=8, resume_from_checkpoint="auto", dpo={"beta": 0.5})
    from llm_pipeline.train.trainer import TrainingError

    with pytest.raises(TrainingError, match=r"dpo\.beta: 0\.1 -> 0\.5"):
        run_stage(DPOStage(changed), export=False)
    # Other data (a shorter max_seq_len truncates pairs): refused before any reference pass or record is written.
    shorter = dpo_config(tmp_path / "b", start, max_steps=6, resume_from_checkpoint="auto")
    shorter.data.max_seq_len = 40
    third_stage = DPOStage(shorter)
    with pytest.raises(TrainingError, match=r"data\.max_seq_len"):
        run_stage(third_stage, export=False)
    assert third_stage.reference_report == {} and [p.name for p in cache.parent.glob("*.pt")] == [cache.name]


@pytest.mark.slow
def test_two_rank_fsdp_with_the_reference_pass_matches_one_process(start, tmp_path):
    worker = Path(__file__).with_name("dpo_fsdp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker)]
    proc = subprocess.run(
        [*cmd, str(tmp_path / "fsdp"), json.dumps({k: str(v) for k, v in start.items()})],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads((tmp_path / "fsdp" / "result.json").read_text())
    single = DPOStage(dpo_config(tmp_path / "single", start, max_steps=4, eval_steps=4))
    ref = run_stage(single, export=False)
    for step, loss in ref.losses.items():
        assert got["losses"][str(step)] == pytest.approx(loss, rel=1e-4), step
    for step in (1, 2):  # a live reference under FSDP2 too
        assert got["live_losses"][str(step)] == pytest.approx(ref.losses[step], rel=1e-4), step
    for key, value in ref.eval_metrics[4].items():
        assert got["eval"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    # The 2-rank pass stored the same reference log-probs as one process (same key: world size is not in it).
    assert got["reference"]["keys"] == single.reference_report["keys"]
    assert got["reference"]["computed"] == ["train", "val"]
    for split in ("train", "val"):
        mine = torch.load(single.reference_report["paths"][split], weights_only=True)
        theirs = torch.load(got["reference"]["paths"][split], weights_only=True)
        for side in ("chosen", "rejected"):
            torch.testing.assert_close(theirs[side], mine[side], rtol=1e-5, atol=1e-5)


def test_pipeline_runs_a_dpo_stage_from_a_model_folder(start, tmp_path):
    import yaml

    from llm_pipeline.pipeline import PipelineConfig, run_pipeline

    stage_cfg = dpo_config(tmp_path / "unused", start, max_steps=2, eval_steps=2).model_dump(mode="json")
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(stage_cfg))
    entry = {"name": "dpo", "kind": "dpo", "config": str(tmp_path / "dpo.yaml"), "start_from": str(start["model"])}
    cfg = PipelineConfig.model_validate({"run_dir": str(tmp_path / "run"), "stages": [{**entry, "evaluate": False}]})
    summary = run_pipeline(cfg)
    record = summary["stages"]["dpo"]
    assert record["final_dir"] == str(tmp_path / "run" / "checkpoints" / "dpo_final")
    assert set(record["eval_metrics"][2]) >= {"rewards/accuracies", "rewards/margins"}  # what a gate would read
    assert len(list((tmp_path / "run" / "checkpoints" / "dpo" / "reference").glob("*.pt"))) == 2  # train, val


def test_cli_command_and_a_typo_in_the_loss_section(start, tmp_path, capsys):
    import yaml

    from llm_pipeline.cli import main

    data = dpo_config(tmp_path / "unused", start).model_dump(mode="json")
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(data))
    out = tmp_path / "cli"
    assert main(["dpo", "--config", str(tmp_path / "dpo.yaml"), "--max_steps", "1", "--output_dir", str(out)]) == 0
    assert (tmp_path / "cli_final" / "model.safetensors").is_file() and (out / "logs" / "metrics.jsonl").is_file()
    data["dpo"]["betta"] = 0.2
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(data))
    assert main(["dpo", "--config", str(tmp_path / "typo.yaml")]) == 2
    err = capsys.readouterr().err
    assert "betta" in err and "typo.yaml" in err


def test_a_start_model_changed_in_place_is_refused_not_used_as_a_new_reference(start, tmp_path):
    """The policy continues from its checkpoint while the reference is the start model: when the start model's
    files changed since, the resume is refused (naming why) before a reference is recomputed from them."""
    import shutil

    from llm_pipeline.checkpoint.hf import save_pretrained
    from llm_pipeline.train.trainer import TrainingError

    own = {**start, "model": shutil.copytree(start["model"], tmp_path / "start")}
    run_stage(DPOStage(dpo_config(tmp_path, own, max_steps=2, save_steps=2)), export=False)
    ref_dir = tmp_path / "ckpt" / "reference"
    tables = sorted(ref_dir.glob("*.pt"))
    save_pretrained(build_model(get_preset("debug"), seed=3), own["model"], tokenizer_dir=start["model"],
                    overwrite=True)  # fmt: skip
    stage = DPOStage(dpo_config(tmp_path, own, max_steps=4, save_steps=2, resume_from_checkpoint="auto"))
    with pytest.raises(TrainingError, match=r"model\.init_digest: .*start model's files changed"):
        run_stage(stage, export=False)
    assert stage.reference_report == {} and sorted(ref_dir.glob("*.pt")) == tables  # nothing recomputed


def test_reference_write_errors_name_the_folder_and_dead_writers_temp_files_are_cleaned(tmp_path, monkeypatch):
    import errno

    import llm_pipeline.train.dpo_reference as ref_mod

    model = build_model(get_preset("debug"), seed=0)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".{'a' * 32}.pt.tmp-{dead.pid}"
    stale.write_bytes(b"torn")
    alive = tmp_path / f".{'b' * 32}.pt.tmp-{os.getpid()}"  # a live writer's (here: this process) stays
    alive.write_bytes(b"in progress")

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ref_mod, "replace_synced", full)
    with pytest.raises(OSError, match=rf"into {tmp_path}: No space left on device; free space there"):
        load_or_compute_reference(
            model, {"train": _pairs_source(5)}, DistInfo(), cache_dir=tmp_path, components=lambda: {"model": "a"},
            micro_batch_size=8, precision="fp32", chunk_tokens=0,
        )  # fmt: skip
    assert not stale.exists() and alive.exists()
