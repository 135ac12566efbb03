"""Promotion: a retrain never replaces the promoted model before its gate passes, a promotion record vouches for
one export by content, and fingerprints follow content (not file times)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from llm_pipeline.checkpoint.manager import scan
from llm_pipeline.cli import main
from llm_pipeline.records import folder_fingerprint, load_summary, read_promotion
from llm_pipeline.report import collect

from .chat_pipeline import ChatPipeline, make_chat_pipeline

MORE_STEPS = ("--set", "stages.sft.set=[training.max_steps=3]")


@pytest.fixture
def pipe(tmp_path: Path) -> ChatPipeline:
    p = make_chat_pipeline(tmp_path)
    assert p.run() == 0
    return p


def _promoted_exports(p: ChatPipeline) -> dict[str, str | None]:
    return {e.name: e.promoted for e in scan(p.run_dir / "checkpoints") if e.kind == "export"}


def test_a_retrain_blocked_by_its_gate_leaves_the_promoted_model_and_its_record(pipe: ChatPipeline, capsys):
    promoted, pointer = pipe.weights(), pipe.pointer()
    assert pipe.run(*MORE_STEPS, gates=pipe.blocking) == 3
    err = capsys.readouterr().err
    candidate = pipe.export(suffix="_final_candidate")
    assert f"The promoted model stays {pipe.export()}" in err and f"candidate is at {candidate}" in err
    assert pipe.weights() == promoted and pipe.pointer() == pointer  # untouched, byte for byte
    assert pipe.weights(suffix="_final_candidate") != promoted
    assert _promoted_exports(pipe) == {"sft_final": "promoted/sft.json", "sft_final_candidate": None}
    record = load_summary(pipe.run_dir).stages["sft"]
    assert record.status == "blocked" and record.final_dir == str(candidate) and record.gate and not record.gate.passed

    # The gate passes: the candidate takes the promoted model's place; the old one is kept beside it.
    new = pipe.weights(suffix="_final_candidate")
    assert pipe.run(*MORE_STEPS) == 0
    assert pipe.weights() == new and not candidate.exists()
    (kept,) = pipe.run_dir.glob("checkpoints/sft_final.replaced-*")
    assert (kept / "model.safetensors").read_bytes() == promoted
    pointer = json.loads(pipe.pointer())
    assert pointer["fingerprint"] == folder_fingerprint(pipe.export()) and pointer["gate"]["passed"]
    record = load_summary(pipe.run_dir).stages["sft"]
    assert record.status == "promoted" and record.steps == 3 and record.final_dir == str(pipe.export())
    assert record.eval_dir == str(pipe.run_dir / "evals" / "sft_final")
    assert (pipe.run_dir / "evals" / "sft_final" / "results.json").is_file()


def test_a_promotion_record_does_not_vouch_for_an_export_rewritten_after_its_gate(pipe: ChatPipeline, tmp_path):
    """An export replaced after its gate (a retrain killed before its gate, a stage run by hand into the run
    folder) is not promoted for any reader: ckpt list, the report, the pipeline's next stage."""
    from train.chat_fixtures import make_chat_model

    original = pipe.weights()
    other = make_chat_model(tmp_path / "other", pipe.base, seed=7)
    (pipe.export() / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    record, problem = read_promotion(pipe.run_dir, "sft")
    assert record is not None and problem is not None and "never gated" in problem
    assert _promoted_exports(pipe) == {"sft_final": None}
    sft = next(s for s in collect(pipe.run_dir).stages if s.name == "sft")
    assert not sft.promoted and any("no longer holds" in n for n in sft.notes)

    # The pipeline re-exports its own trained model (bit-identical to the first export) as a candidate, gates
    # it and promotes it; the foreign weights are kept aside, not overwritten.
    assert pipe.run() == 0
    assert pipe.weights() == original
    (kept,) = pipe.run_dir.glob("checkpoints/sft_final.replaced-*")
    assert (kept / "model.safetensors").read_bytes() == (other / "model.safetensors").read_bytes()
    assert read_promotion(pipe.run_dir, "sft")[1] is None


def test_a_re_export_of_the_same_weights_does_not_retrain_or_re_evaluate_later_stages(tmp_path, caplog):
    p = make_chat_pipeline(tmp_path, stages=("a", "b"))
    assert p.run() == 0
    for f in p.export("a").iterdir():  # rewritten with the same bytes: new times, same content
        f.write_bytes(f.read_bytes())
        os.utime(f, (1e9, 1e9))
    caplog.clear()
    with caplog.at_level("INFO"):
        assert p.run() == 0
    assert "stage b: up to date" in caplog.text and "eval b_final: up to date" in caplog.text, caplog.text


def test_a_changed_setting_on_a_finished_stage_with_no_steps_left_is_said_to_change_nothing(pipe, caplog):
    summary = load_summary(pipe.run_dir).stages["sft"]
    saved = (pipe.run_dir / "checkpoints" / "sft" / "checkpoint-2" / "config.yaml").read_text()
    weights = pipe.weights()
    caplog.clear()
    with caplog.at_level("INFO"):
        assert pipe.run("--set", "stages.sft.set=[training.learning_rate=1.0e-4]") == 0
    assert "nothing is left to train" in caplog.text and "NOT applied" in caplog.text
    assert "training.learning_rate: 0.003 -> 0.0001" in caplog.text
    assert "applied from step" not in caplog.text
    after = load_summary(pipe.run_dir).stages["sft"]
    assert after.config_hash == summary.config_hash and after.fingerprint == summary.fingerprint
    assert (pipe.run_dir / "checkpoints" / "sft" / "checkpoint-2" / "config.yaml").read_text() == saved
    assert (
        not (pipe.run_dir / "checkpoints" / "sft" / "config.yaml").is_file()
        or "0.0001" not in (pipe.run_dir / "checkpoints" / "sft" / "config.yaml").read_text()
    )
    assert pipe.weights() == weights


def test_a_summary_that_is_not_one_stops_the_run_before_anything_runs(pipe: ChatPipeline, capsys):
    (pipe.run_dir / "summary.json").write_text("[]")
    assert pipe.run() == 1
    err = capsys.readouterr().err
    assert "summary.json: expected a JSON object" in err and "move it aside" in err and "Traceback" not in err


def test_an_old_format_summary_still_loads_and_round_trips(tmp_path: Path):
    """summary.json as the pipeline wrote it before the typed records (keys and shapes of that code)."""
    old = {
        "run_dir": "runs/demo",
        "stages": {
            "pretrain": {
                "kind": "pretrain", "fingerprint": "0123456789abcdef", "inputs_fingerprint": "fedcba9876543210",
                "config_hash": "aaaabbbbccccdddd", "final_dir": "runs/demo/checkpoints/pretrain_final",
                "exports": {"model": "runs/demo/checkpoints/pretrain_final"}, "steps": 24, "tokens_seen": 49152,
                "val_losses": {"0": 6.3, "12": 5.1, "24": 4.7},
                "eval_metrics": {"0": {"loss": 6.3}, "24": {"loss": 4.7}},
                "skipped_steps": 0, "empty_batches": 0, "oom_events": 0, "stats": {}, "wall_s": 12.5,
                "output_fingerprint": "1111222233334444", "status": "promoted",
                "eval": {"perplexity": {"status": "ok", "perplexity": 123.4}},
                "gate": {"stage": "pretrain", "passed": True, "rules": [
                    {"metric": "perplexity.perplexity", "passed": True, "value": 123.4, "reason": "ok",
                     "baseline": 8000.0, "baseline_of": "init_final"}]},
            },
            "sft": {"kind": "sft", "fingerprint": "x", "inputs_fingerprint": "y", "config_hash": "z"},  # killed
        },
        "evals": {"init_final": {"fingerprint": "e1", "results": "runs/demo/evals/init_final/results.json"}},
        "init": {"fingerprint": "i1", "output_fingerprint": "i2"},
        "init_eval": {"perplexity": {"status": "ok", "perplexity": 8000.0}},
        "data": {"packed": {"fingerprint": "d"}},
        "generate": [{"model": "m", "prompt": "def ", "completion": "x"}],
    }  # fmt: skip
    (tmp_path / "summary.json").write_text(json.dumps(old))
    summary = load_summary(tmp_path)
    pretrain = summary.stages["pretrain"]
    assert pretrain.status == "promoted" and pretrain.steps == 24 and pretrain.val_losses[12] == 5.1
    assert pretrain.gate is not None and pretrain.gate.results[0].baseline_of == "init_final"
    assert summary.stages["sft"].status is None and not summary.stages["sft"].finished
    from llm_pipeline.records import save_summary

    save_summary(tmp_path, summary)
    again = json.loads((tmp_path / "summary.json").read_text())
    assert again["stages"]["pretrain"]["gate"] == old["stages"]["pretrain"]["gate"]
    assert again["stages"]["pretrain"]["eval_metrics"] == old["stages"]["pretrain"]["eval_metrics"]
    assert again["data"] == old["data"] and again["generate"] == old["generate"]
    assert yaml.safe_load(json.dumps(again["stages"]["sft"])) == old["stages"]["sft"]


def test_ckpt_list_cli_does_not_mark_a_rewritten_export_promoted(pipe: ChatPipeline, capsys):
    (pipe.export() / "config.json").write_text((pipe.export() / "config.json").read_text() + " ")
    assert main(["ckpt", "list", "--root", str(pipe.run_dir / "checkpoints"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["promoted"] for r in rows if r["kind"] == "export"] == [None]


def test_a_later_stage_trained_from_an_earlier_promoted_model_says_so(tmp_path):
    p = make_chat_pipeline(tmp_path, stages=("a", "b"))
    assert p.run() == 0
    assert not [n for s in collect(p.run_dir).stages for n in s.notes if "earlier" in n]
    b = p.weights("b")
    assert p.run("--only", "a", "--set", "stages.a.set=[training.max_steps=3]") == 0
    assert p.weights("b") == b and read_promotion(p.run_dir, "b")[1] is None  # b stays promoted, untouched
    notes = {s.name: s.notes for s in collect(p.run_dir).stages}
    assert any("trained from an earlier a model" in n and "--from b" in n for n in notes["b"]), notes


def test_a_run_recorded_before_content_fingerprints_is_taken_as_it_is(pipe: ChatPipeline, caplog):
    """Records of earlier versions fingerprinted exports by file names, sizes and times, and promotion records
    had no fingerprint: such a run is up to date, not retrained, and nothing is set aside."""
    from llm_pipeline.records import folder_stat

    summary = json.loads((pipe.run_dir / "summary.json").read_text())
    summary["stages"]["sft"]["output_fingerprint"] = folder_stat(pipe.export())
    del summary["fingerprints"]
    (pipe.run_dir / "summary.json").write_text(json.dumps(summary))
    pointer = json.loads(pipe.pointer())
    (pipe.run_dir / "promoted" / "sft.json").write_text(json.dumps({k: pointer[k] for k in ("stage", "model_dir")}))
    weights = pipe.weights()
    caplog.clear()
    with caplog.at_level("INFO"):
        assert pipe.run() == 0
    assert "stage sft: up to date" in caplog.text and "resumed from" not in caplog.text
    assert pipe.weights() == weights and not list(pipe.run_dir.glob("checkpoints/*.replaced-*"))
    assert json.loads(pipe.pointer())["fingerprint"] == folder_fingerprint(pipe.export())
