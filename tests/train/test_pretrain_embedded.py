"""Pretraining through the CLI on the embedded corpus (stdlib sources), packed by the data stage's code."""

from __future__ import annotations

import gzip
import json
import signal
from pathlib import Path

import pytest
import yaml

from llm_pipeline.cli import main
from llm_pipeline.config import load_config
from llm_pipeline.data.config import SourceConfig
from llm_pipeline.data.pack import pack_documents
from llm_pipeline.data.sources import iter_source
from llm_pipeline.data.tokenizer import save_tokenizer, train_tokenizer
from llm_pipeline.train.config import PretrainConfig
from llm_pipeline.train.pretrain import run_pretraining

from .test_trainer import SignalAt


@pytest.fixture(scope="module")
def stdlib_data(tmp_path_factory) -> tuple[Path, Path]:
    """~0.6 MB of stdlib source, a 512-token BPE (the debug preset's vocabulary), packed train/val shards."""
    tmp = tmp_path_factory.mktemp("stdlib")
    src = SourceConfig(kind="stdlib", include_docs=False, held_out_modules=[], max_bytes=600_000)
    docs = [{"id": it.doc_id, "text": it.text, "metadata": {}} for it in iter_source(src) if it.text]
    (tmp / "clean").mkdir()
    with gzip.open(tmp / "clean" / "00000.jsonl.gz", "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    tok_dir = tmp / "tokenizer"
    save_tokenizer(train_tokenizer((d["text"] for d in docs), vocab_size=512), tok_dir)
    pack_documents(tmp / "clean", tmp / "packed", tok_dir / "tokenizer.json", val_fraction=0.1, show_progress=False)
    return tmp / "packed", tok_dir


def _write_config(tmp_path: Path, packed: Path, tok_dir: Path, **training) -> Path:
    cfg = {
        "model": {"preset": "debug"},
        "data": {"path": str(packed), "tokenizer_dir": str(tok_dir)},
        "training": {
            "max_steps": 40, "global_batch_tokens": 2048, "micro_batch_size": 16, "learning_rate": 3e-3,
            "warmup_steps": 4, "precision": "fp32", "logging_steps": 10, "eval_steps": 20, "eval_batches": 4,
            "save_steps": 20, "output_dir": str(tmp_path / "ckpt"), "logging_dir": str(tmp_path / "logs"),
            **training,
        },
        "parallel": {"device": "cpu"},
        "curriculum": [{"step": 0, "seq_len": 64}, {"step": 10, "seq_len": 128}],
    }  # fmt: skip
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_loss_falls_on_embedded_data_with_debug_model(tmp_path, stdlib_data):
    packed, tok_dir = stdlib_data
    config = _write_config(tmp_path, packed, tok_dir)
    assert main(["pretrain", "--config", str(config), "--no-fp8"]) == 0
    evals = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    evals = {e["step"]: e["loss"] for e in evals if e["split"] == "eval"}
    assert list(evals) == [0, 20, 40]
    assert evals[40] < evals[0] - 0.5  # from ~ln(512) = 6.2 (uniform) towards the unigram entropy and below
    final = tmp_path / "ckpt_final"
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()


def test_exact_resume_on_embedded_data(tmp_path, stdlib_data):
    packed, tok_dir = stdlib_data
    straight_cfg = load_config(PretrainConfig, _write_config(tmp_path / "a", packed, tok_dir, max_steps=6))
    straight = run_pretraining(straight_cfg, export=False)
    cfg = load_config(
        PretrainConfig,
        _write_config(tmp_path / "b", packed, tok_dir, max_steps=6, resume_from_checkpoint="auto"),
    )
    first = run_pretraining(cfg, callbacks=[SignalAt(3, signal.SIGTERM)], export=False)
    assert first.status == "preempted"
    second = run_pretraining(cfg, export=False)
    assert {**first.losses, **second.losses} == straight.losses


def test_model_vocabulary_smaller_than_data_is_an_error(tmp_path, stdlib_data):
    packed, tok_dir = stdlib_data
    config = _write_config(tmp_path, packed, tok_dir)
    with pytest.raises(ValueError, match="vocab_size"):
        run_pretraining(load_config(PretrainConfig, config, ["model.overrides.vocab_size=256"]), export=False)
