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
from llm_pipeline.preflight import Check, run_preflight
from llm_pipeline.train.stage import parameter_counts
from llm_pipeline.train.stage_inputs import CHECKPOINT_BYTES_PER_TENSOR, CHECKPOINT_FIXED_BYTES

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
    n, tensors = parameter_counts(get_preset("debug"))
    ckpt = 12 * n + CHECKPOINT_FIXED_BYTES + 4 * tensors * CHECKPOINT_BYTES_PER_TENSOR  # fp32 weights + Adam + state
    need = 3 * ckpt + 4 * n  # 2 kept + 1 being written; fp32 export
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


def test_sft_records_left_without_a_trained_token_are_counted(tmp_path, start_model) -> None:
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
    no_model = _chat_config(tmp_path, tmp_path / "not_yet", records, {"max_seq_len": 48}, "global_batch_size")
    assert "checked once the tokenizer exists" in _one(run_preflight(no_model), "data quality: sft").detail


def test_pairs_identical_after_truncation_are_counted(tmp_path, start_model) -> None:
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


def test_fp8_emulation_on_fp8_gpus_is_a_blocker(tmp_path: Path) -> None:
    """parallel.fp8_emulate is for machines without FP8 (CPU tests): on an H100 it is refused before the run."""
    cfg = _debug_stage(tmp_path)
    cfg["parallel"] = {"device": "auto", "fp8_emulate": True}
    path = _write(tmp_path / "pretrain.yaml", cfg)
    h100 = _by_name(run_preflight(path, gpus=1, gpu_memory_gib=80, gpu_capability="9.0"))["fp8: pretrain"]
    assert h100[0].status == "BLOCKER" and "parallel.fp8_emulate: false" in h100[0].detail
    assert "fp8: pretrain" not in _by_name(run_preflight(path, gpus=1, gpu_memory_gib=40, gpu_capability="8.0"))


# --------------------------------------------------------------------------------------------
# Every stage's data, produced or checked: LoRA's domain data
# --------------------------------------------------------------------------------------------


def test_production_pipeline_names_the_lora_domain_data_nothing_writes(monkeypatch) -> None:
    """configs/pipeline.yaml's LoRA stage reads runs/data_domain/packed, which no step of it writes: a blocker
    naming that path and the command that makes it (not a failure after days of pretraining, SFT and DPO)."""
    monkeypatch.chdir(ROOT)
    checks = run_preflight(ROOT / "configs" / "pipeline.yaml", gpus=8, gpu_memory_gib=80, gpu_capability="9.0")
    domain = _one(checks, "data: lora (domain)")
    assert domain.status == "BLOCKER" and "runs/data_domain/packed: not found" in domain.detail
    assert "configs/data_domain.yaml" in domain.detail and "llm-pipeline data prepare" in domain.detail
    assert _one(checks, "data: lora (general)").detail.endswith("written by the data step")
    assert _one(checks, "model: lora").detail.endswith("written by stage rl")
    # its checkpoints hold the adapters and their AdamW state only (~2 GiB at rank 64), not the 7B base
    disk = _one(checks, "disk").detail
    assert "lora: 4 x 1.9 GiB checkpoints" in disk and "dpo: 4 x 82.6 GiB checkpoints" in disk
    memory = _one(checks, "memory: lora").detail
    assert "(2 x 4096 tokens" in memory  # the stage's seq_len, not the model's context


def _lora_pipeline(tmp: Path, packed: Path, base: Path) -> Path:
    lora = _write(tmp / "lora.yaml", {
        "model": {"init_from": "unused"}, "lora": {"r": 4},
        "data": {"packed_dir": str(packed), "seq_len": 32,
                 "domain": {"kind": "tokens", "path": str(packed), "train_split": "domain", "val_split": "domain_val"},
                 "general": {"kind": "tokens", "train_split": "train", "val_split": "val"}},
        "training": {"max_steps": 2, "global_batch_tokens": 256, "micro_batch_size": 4, "precision": "fp32",
                     "eval_steps": 1, "output_dir": "unused"},
        "parallel": {"device": "cpu"},
    })  # fmt: skip
    return _write(tmp / "pipeline.yaml", {"run_dir": str(tmp / "run"), "stages": [
        {"name": "lora", "kind": "lora", "config": str(lora), "start_from": str(base)}]})  # fmt: skip


@pytest.fixture(scope="module")
def packed_data(tmp_path_factory) -> tuple[Path, Path]:
    """Packed shards with train/val/domain/domain_val splits, their tokenizer beside them, a debug base with it."""
    import gzip

    from llm_pipeline.checkpoint.hf import save_pretrained
    from llm_pipeline.data.pack import pack_documents
    from llm_pipeline.data.tokenizer import save_tokenizer, train_tokenizer
    from llm_pipeline.model.llama import build_model

    tmp = tmp_path_factory.mktemp("lora_data")
    rng = random.Random(0)
    words = ["def", "return", "self", "value", "import", "class", "list", "items", "for", "in", "if", "else"]
    docs = [{"id": str(i), "text": " ".join(rng.choices(words, k=400)), "metadata": {"split": "domain"} if i % 3 == 0
             else {}} for i in range(60)]  # fmt: skip
    (tmp / "clean").mkdir()
    with gzip.open(tmp / "clean" / "00000.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    save_tokenizer(train_tokenizer((d["text"] for d in docs), vocab_size=300), tmp / "tokenizer")
    pack_documents(tmp / "clean", tmp / "packed", tmp / "tokenizer", val_fraction=0.2, domain_val_fraction=0.3,
                   show_progress=False)  # fmt: skip
    base = save_pretrained(build_model(get_preset("debug")), tmp / "base", tokenizer_dir=tmp / "tokenizer")
    return tmp / "packed", base


def test_a_lora_pipeline_whose_data_exists_passes_and_a_foreign_tokenizer_blocks(tmp_path, packed_data) -> None:
    packed, base = packed_data
    checks = run_preflight(_lora_pipeline(tmp_path, packed, base))
    for role in ("domain", "general"):
        c = _one(checks, f"data: lora ({role})")
        assert c.status == "ok" and str(packed) in c.detail, c
    assert not [c for c in checks if c.name.startswith("tokenizer: lora")]
    # a missing split is named with the splits there are
    _write(tmp_path / "lora.yaml", {**yaml.safe_load((tmp_path / "lora.yaml").read_text()),
                                    "data": {**yaml.safe_load((tmp_path / "lora.yaml").read_text())["data"],
                                             "domain": {"kind": "tokens", "path": str(packed),
                                                        "train_split": "legal"}}})  # fmt: skip
    split = _one(run_preflight(tmp_path / "pipeline.yaml"), "data: lora (domain)")
    assert split.status == "BLOCKER" and "no tokens in split(s) legal" in split.detail
    # a base whose tokenizer is another of the same size
    from llm_pipeline.checkpoint.hf import save_pretrained
    from llm_pipeline.data.tokenizer import save_tokenizer, train_tokenizer
    from llm_pipeline.model.llama import build_model

    other = save_tokenizer(train_tokenizer([f"other words {i} here" * 5 for i in range(200)], vocab_size=300),
                           tmp_path / "other_tok")  # fmt: skip
    foreign = save_pretrained(build_model(get_preset("debug")), tmp_path / "foreign", tokenizer_dir=other)
    blocked = run_preflight(_lora_pipeline(tmp_path, packed, foreign))
    tok = _one(blocked, "tokenizer: lora (general)")
    assert tok.status == "BLOCKER" and "ids differ from the base model's tokenizer" in tok.detail


def test_options_that_would_hang_or_turn_checks_off_are_refused(tmp_path, capsys) -> None:
    cfg = str(_write(tmp_path / "pretrain.yaml", _debug_stage(tmp_path)))
    for args, says in ((["--gpus", "99999999999999999999"], "plan for 0 to 65536 GPUs"),
                       (["--data-sample", "-1"], "--data-sample -1"),
                       (["--gpus", "-1"], "--gpus -1")):  # fmt: skip
        assert main(["preflight", "--config", cfg, *args]) == 1
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err


def test_preflight_names_the_embedded_source_it_reads() -> None:
    """An embedded chat source is named by its kind (arithmetic is not "the standard-library corpus")."""
    from llm_pipeline.train.stage_inputs import source_check

    arithmetic = source_check("data: sft", "arithmetic", [], None)
    assert arithmetic.status == "ok" and "'arithmetic'" in arithmetic.detail
    assert "standard-library" not in arithmetic.detail
    assert "'stdlib'" in source_check("data: sft", "stdlib", [], None).detail
