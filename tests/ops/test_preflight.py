"""Pre-flight: a 7B model on a (simulated) 24 GiB GPU, missing data, an unwritable or busy output folder
and a missing gate are blockers with the fix in the message; chat data that truncation ruins is counted
exactly; nothing large is allocated."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from llm_pipeline.checkpoint.lock import FolderLock
from llm_pipeline.cli import main
from llm_pipeline.model import get_preset
from llm_pipeline.model.flops import count_parameters
from llm_pipeline.preflight import Check, run_preflight

ROOT = Path(__file__).resolve().parents[2]


def _by_name(checks: list[Check]) -> dict[str, list[Check]]:
    out: dict[str, list[Check]] = {}
    for c in checks:
        out.setdefault(c.name, []).append(c)
    return out


def _one(checks: list[Check], name: str) -> Check:
    found = _by_name(checks)[name]
    assert len(found) == 1, found
    return found[0]


def _write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def _debug_stage(tmp: Path, **training) -> dict:
    return {
        "model": {"preset": "debug"},
        "data": {"path": str(tmp / "packed"), "tokenizer_dir": None},
        "training": {"max_steps": 4, "global_batch_tokens": 256, "micro_batch_size": 2, "precision": "fp32",
                     "output_dir": str(tmp / "out" / "debug"), **training},
        "parallel": {"device": "cpu"},
        "curriculum": [{"step": 0, "seq_len": 64}],
    }  # fmt: skip


def test_7b_on_a_24gib_gpu_is_a_blocker_that_names_what_would_fit(capsys) -> None:
    checks = run_preflight(ROOT / "configs" / "pretrain.yaml", gpus=1, gpu_memory_gib=24, gpu_capability="8.9")
    mem = _one(checks, "memory: pretrain")
    assert mem.status == "BLOCKER" and "does not fit" in mem.detail and "24.0 GiB" in mem.detail
    # 110 GiB of fp32 weights, gradients and Adam state need 8-way sharding to leave room for activations
    assert "Would fit: 8 GPU(s) of this size with full activation checkpointing and micro-batch 1" in mem.detail
    gpus = _one(checks, "GPUs")
    assert "1 x simulated GPU (24 GiB)" in gpus.detail and "FP8 yes" in gpus.detail
    # the same config on the node it was written for: 8 x 80 GiB, FSDP + selective checkpointing
    ok = run_preflight(ROOT / "configs" / "pretrain.yaml", gpus=8, gpu_memory_gib=80)
    assert _one(ok, "memory: pretrain").status == "ok"
    code = main(["preflight", "--config", str(ROOT / "configs" / "pretrain.yaml"), "--gpus", "1",
                 "--gpu-memory-gib", "24", "--json"])  # fmt: skip
    listed = json.loads(capsys.readouterr().out)
    assert code == 1 and {"check": "memory: pretrain", "status": "BLOCKER"}.items() <= listed[
        [c["check"] for c in listed].index("memory: pretrain")].items()  # fmt: skip


def test_missing_data_and_tokenizer_are_blockers(tmp_path: Path) -> None:
    cfg = _debug_stage(tmp_path)
    cfg["data"]["tokenizer_dir"] = str(tmp_path / "tok")
    checks = run_preflight(_write(tmp_path / "pretrain.yaml", cfg))
    data, tok = _one(checks, "data: pretrain"), _one(checks, "tokenizer: pretrain")
    assert data.status == tok.status == "BLOCKER"
    assert str(tmp_path / "packed") in data.detail and "llm-pipeline data prepare" in data.detail
    assert _one(checks, "memory: pretrain").status == "ok"  # a debug model fits anywhere


def test_unwritable_and_busy_output_folders_are_blockers(tmp_path: Path) -> None:
    (tmp_path / "packed").mkdir()
    (tmp_path / "packed" / "manifest.json").write_text("{}")
    (tmp_path / "a_file").write_text("not a folder")
    cfg = _debug_stage(tmp_path, output_dir=str(tmp_path / "a_file" / "ckpts"))
    checks = [c for c in run_preflight(_write(tmp_path / "pretrain.yaml", cfg)) if c.name == "output: pretrain"]
    assert checks[0].status == "BLOCKER" and "is a file, not a folder" in checks[0].detail
    busy = tmp_path / "busy"
    with FolderLock(busy, purpose="pretrain stage"):
        cfg = _debug_stage(tmp_path, output_dir=str(busy))
        out = [c for c in run_preflight(_write(tmp_path / "pretrain.yaml", cfg)) if c.name == "output: pretrain"]
    assert out[0].status == "BLOCKER" and "in use by pid" in out[0].detail
    assert all(c.status == "ok" for c in out[1:])  # the export and logs folders can be written


def test_disk_need_is_checkpoints_times_keep_plus_export_against_free_space(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "packed").mkdir()
    (tmp_path / "packed" / "manifest.json").write_text("{}")
    cfg = _write(tmp_path / "pretrain.yaml", _debug_stage(tmp_path, save_total_limit=2))
    n = count_parameters(get_preset("debug"))
    need = 3 * (12 * n + (16 << 20)) + 4 * n  # 2 kept + 1 being written, fp32 weights + Adam; fp32 export
    import shutil as real

    usage = real.disk_usage(tmp_path)
    monkeypatch.setattr("llm_pipeline.preflight.shutil.disk_usage", lambda p: usage._replace(free=need - 1))
    disk = _one(run_preflight(cfg), "disk")
    assert disk.status == "BLOCKER" and "lower training.save_total_limit" in disk.detail
    monkeypatch.setattr("llm_pipeline.preflight.shutil.disk_usage", lambda p: usage._replace(free=need * 2))
    assert _one(run_preflight(cfg), "disk").status == "ok"


def test_pipeline_inputs_from_earlier_steps_unknown_kinds_and_missing_gates(tmp_path: Path) -> None:
    stage = _write(tmp_path / "pretrain.yaml", _debug_stage(tmp_path))
    gates = _write(tmp_path / "gates.yaml", {"stages": {"pretrain": {"rules": [{"metric": "a.b", "min": 0}]}}})
    pipe = _write(tmp_path / "pipeline.yaml", {
        "run_dir": str(tmp_path / "run"), "data": {"config": str(ROOT / "configs" / "demo" / "data.yaml")},
        "gates": str(gates),
        "stages": [{"name": "pretrain", "kind": "pretrain", "config": str(stage), "start_from": "config",
                    "gate": "pretrain"},
                   {"name": "polish", "kind": "no-such-kind", "config": str(stage)},
                   {"name": "again", "kind": "pretrain", "config": str(stage), "gate": "again"}],
    })  # fmt: skip
    checks = run_preflight(pipe)
    assert _one(checks, "data: pretrain").detail.endswith("written by the data step")
    assert _one(checks, "model: again").detail.endswith("written by stage polish")
    unknown = _one(checks, "stage polish")
    assert unknown.status == "BLOCKER" and "'no-such-kind' is not available" in unknown.detail
    gate = _one(checks, "gate again")
    assert gate.status == "BLOCKER" and "no gate 'again'" in gate.detail


# --------------------------------------------------------------------------------------------
# Chat data: what truncation ruins, counted exactly
# --------------------------------------------------------------------------------------------


@pytest.fixture
def chat_kinds(monkeypatch):
    from llm_pipeline.train import stage as stage_mod

    module = __name__.rsplit(".", 1)[0] + ".fake_chat_stages"
    monkeypatch.setitem(stage_mod.STAGE_KINDS, "sft", f"{module}:FakeSFTStage")
    monkeypatch.setitem(stage_mod.STAGE_KINDS, "dpo", f"{module}:FakeDPOStage")


@pytest.fixture(scope="module")
def start_model(tmp_path_factory) -> Path:
    """A debug model exported with a small BPE: the chat stages read their tokenizer from it."""
    from llm_pipeline.checkpoint.hf import save_pretrained
    from llm_pipeline.data.tokenizer import save_tokenizer, train_tokenizer
    from llm_pipeline.model.llama import build_model

    rng = random.Random(0)
    words = ["the", "a", "function", "returns", "value", "list", "of", "items", "python", "code", "write"]
    tok = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_tokenizer([" ".join(rng.choices(words, k=40)) for _ in range(50)], vocab_size=400), tok)
    return save_pretrained(build_model(get_preset("debug")), tmp_path_factory.mktemp("m") / "model", tokenizer_dir=tok)


def _chat_config(tmp: Path, model: Path | None, records: list[dict], data: dict, batch: str) -> Path:
    (tmp / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return _write(tmp / f"{'sft' if batch == 'global_batch_size' and 'max_prompt_len' not in data else 'dpo'}.yaml", {
        "model": {"init_from": str(model) if model else None, "preset": "debug"},
        "data": {"kind": "local", "paths": [str(tmp / "records.jsonl")], "val_fraction": 0.0, **data},
        "training": {"max_steps": 2, batch: 4, "output_dir": str(tmp / "out"), "precision": "fp32"},
        "parallel": {"device": "cpu"},
    })  # fmt: skip


def _turns(user: str, reply: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


def test_sft_records_left_without_a_trained_token_are_counted(tmp_path, start_model, chat_kinds) -> None:
    long_prompt = " ".join(["write the python function"] * 40)  # far beyond max_seq_len on its own
    records = [_turns("write a list", "the items")] * 8 + [_turns(long_prompt, "ok")] * 3
    cfg = _chat_config(tmp_path, start_model, records, {"max_seq_len": 48}, "global_batch_size")
    quality = _one(run_preflight(cfg), "data quality: sft")
    assert quality.status == "BLOCKER"  # 3 of 11 lost: more than a quarter, max_seq_len is wrong for this data
    assert "in the first 11 records: 3 record(s) with no trained token after truncation to 48" in quality.detail
    assert "raise data.max_seq_len" in quality.detail
    few = _chat_config(tmp_path, start_model, [_turns("write a list", "the items")] * 12 + records[-1:],
                       {"max_seq_len": 48}, "global_batch_size")  # fmt: skip
    assert _one(run_preflight(few), "data quality: sft").status == "warn"  # 1 of 13
    no_model = _chat_config(tmp_path, None, records, {"max_seq_len": 48}, "global_batch_size")
    assert "checked once the tokenizer exists" in _one(run_preflight(no_model), "data quality: sft").detail


def test_pairs_identical_after_truncation_are_counted(tmp_path, start_model, chat_kinds) -> None:
    shared = " ".join(["the function returns the value"] * 12)  # longer than the room left for a completion
    pairs = [{"prompt": "write code", "chosen": "return items", "rejected": "the list"}] * 6
    pairs += [{"prompt": "write code", "chosen": shared + " items", "rejected": shared + " list"}] * 2
    data = {"max_seq_len": 40, "max_prompt_len": 16}
    quality = _one(run_preflight(_chat_config(tmp_path, start_model, pairs, data, "global_batch_size")),
                   "data quality: dpo")  # fmt: skip
    assert (
        "in the first 8 records: 0 record(s) with no trained token after truncation to 40, 2 pair(s) "
        "identical after truncation" in quality.detail
    )
    assert quality.status == "warn" and "lower data.max_prompt_len" in quality.detail


def test_required_fp8_on_gpus_without_it_is_a_blocker(tmp_path: Path) -> None:
    cfg = _debug_stage(tmp_path)
    cfg["parallel"] = {"device": "auto", "fp8": True}
    path = _write(tmp_path / "pretrain.yaml", cfg)

    def fp8(capability: str | None) -> list[Check]:
        return _by_name(run_preflight(path, gpus=1, gpu_memory_gib=40, gpu_capability=capability)).get(
            "fp8: pretrain", []
        )

    a100 = fp8("8.0")
    assert a100[0].status == "BLOCKER" and "compute capability below 8.9" in a100[0].detail
    assert fp8("9.0") == []  # an H100 can
    assert fp8(None)[0].status == "warn"  # a simulated GPU of unknown capability: cannot tell
