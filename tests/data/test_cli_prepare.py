"""`llm-pipeline data ...`: every subcommand has --help; prepare runs the demo config end to end and
skips up-to-date steps; bad configs and missing inputs fail with actionable messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_pipeline.cli import main
from llm_pipeline.data.loader import PackedTokenDataset, TokenBatchLoader
from llm_pipeline.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo" / "data.yaml"


@pytest.mark.parametrize("step", ["download", "clean", "tokenizer", "pack", "prepare"])
def test_every_subcommand_has_help(step, capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", step, "--help"])
    assert e.value.code == 0
    assert "--config" in capsys.readouterr().out


@pytest.mark.slow
def test_prepare_demo_config_small_then_skips(tmp_path, capsys):
    out = tmp_path / "data"
    args = [
        "data",
        "prepare",
        "--config",
        str(DEMO),
        "--output-dir",
        str(out),
        "--no-progress",
        "--set",
        "source.max_documents=60",
        "--set",
        "source.held_out_modules=[abc]",
        "--set",
        "tokenizer.vocab_size=512",
    ]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out) == {s: "ran" for s in ("download", "clean", "tokenizer", "pack")}
    manifest = json.loads((out / "packed" / "manifest.json").read_text())
    assert manifest["vocab_size"] == 512 and manifest["splits"]["val"]["documents"] == 1  # abc.py held out
    assert load_tokenizer(out / "tokenizer").get_vocab_size() == 512
    loader = TokenBatchLoader(PackedTokenDataset(out / "packed"), seq_len=64, micro_batch_size=2)
    assert loader.next_batch()["input_ids"].max() < 512
    assert (out / "data_config.yaml").is_file()

    assert main(args) == 0  # nothing changed: every step skipped
    assert json.loads(capsys.readouterr().out) == {s: "skipped" for s in ("download", "clean", "tokenizer", "pack")}
    assert main([*args, "--set", "pack.seed=5"]) == 0  # only pack's config changed
    assert json.loads(capsys.readouterr().out) == {
        "download": "skipped",
        "clean": "skipped",
        "tokenizer": "skipped",
        "pack": "ran",
    }


def test_typo_in_config_key_is_an_error_naming_it(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("source:\n  max_documets: 10\n")
    assert main(["data", "download", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "max_documets" in err and "max_documents" in err


def test_step_without_its_input_says_which_step_to_run(tmp_path, capsys):
    assert main(["data", "clean", "--output-dir", str(tmp_path)]) == 1
    assert "raw" in capsys.readouterr().err
