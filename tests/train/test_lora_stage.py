"""The LoRA stage on the runner: real packed data with a held-out domain, peft parity of its exports, the
frozen base, the data mix, exact resume from adapter-only checkpoints, the export command, chat data,
export safety, config checks and a 2-rank FSDP2 run."""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open

from llm_pipeline.checkpoint.hf import load_pretrained, save_pretrained
from llm_pipeline.cli import main
from llm_pipeline.config import ConfigError, validate_config
from llm_pipeline.data.config import SourceConfig
from llm_pipeline.data.pack import pack_documents
from llm_pipeline.data.sources import iter_source
from llm_pipeline.data.tokenizer import save_tokenizer, train_tokenizer
from llm_pipeline.model import build_model, get_preset
from llm_pipeline.train.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_KEY_PREFIX,
    LoRAConfig,
    apply_lora,
    save_adapter,
)
from llm_pipeline.train.lora_stage import LoRAStage, LoRAStageConfig
from llm_pipeline.train.parallel import DistInfo
from llm_pipeline.train.stage import run_stage
from llm_pipeline.train.trainer import Callback, TrainingError

from .test_trainer import SignalAt

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def lora_data(tmp_path_factory) -> tuple[Path, Path]:
    """Stdlib text through the data layer: general modules (train), `csv` held out (val), the `email`
    package as the domain (splits domain/domain_val); a 512-token BPE; a debug-preset base with it."""
    tmp = tmp_path_factory.mktemp("lora_data")
    src = SourceConfig(kind="stdlib", include_docs=False, held_out_modules=["csv"], domain_modules=["email"])
    docs, general_bytes = [], 0
    for item in iter_source(src):
        split = item.meta.get("split")
        if not item.text or (split is None and (len(item.text) < 3000 or general_bytes > 200_000)):
            continue
        general_bytes += len(item.text) if split is None else 0
        docs.append({"id": item.doc_id, "text": item.text, "metadata": {"split": split} if split else {}})
    (tmp / "clean").mkdir()
    with gzip.open(tmp / "clean" / "00000.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    save_tokenizer(train_tokenizer((d["text"] for d in docs), vocab_size=512), tmp / "tokenizer")
    manifest = pack_documents(
        tmp / "clean", tmp / "packed", tmp / "tokenizer", val_fraction=0.0, domain_val_fraction=0.25,
        show_progress=False,
    )  # fmt: skip
    assert {"train", "val", "domain", "domain_val"} <= set(manifest["splits"])
    save_pretrained(build_model(get_preset("debug"), seed=0), tmp / "base", tokenizer_dir=tmp / "tokenizer")
    return tmp / "packed", tmp / "base"


def lora_config(root: Path, data: tuple[Path, Path], **overrides: Any) -> LoRAStageConfig:
    """debug base, rank 4 on all seven projections, 8 rows of 32 tokens per step (80% domain), fp32."""
    packed, base = data
    cfg: dict[str, Any] = {
        "model": {"init_from": str(base)},
        "lora": {"r": 4},
        "data": {
            "packed_dir": str(packed),
            "domain": {"kind": "tokens", "train_split": "domain", "val_split": "domain_val"},
            "general": {"kind": "tokens", "train_split": "train", "val_split": "val"},
            "domain_fraction": 0.8,
            "seq_len": 32,
        },
        "training": {
            "max_steps": 6, "global_batch_tokens": 256, "micro_batch_size": 4, "learning_rate": 1e-2,
            "warmup_steps": 1, "weight_decay": 0.0, "precision": "fp32", "logging_steps": 1, "eval_steps": 3,
            "eval_batches": 2, "save_steps": 0, "output_dir": str(root / "ckpt"), "logging_dir": str(root / "logs"),
        },
        "parallel": {"device": "cpu", "fp8": False},
    }  # fmt: skip
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        cfg[section][name] = value
    return LoRAStageConfig.model_validate(cfg)


class KeepModel(Callback):
    def on_train_end(self, trainer, result) -> None:
        self.model = trainer.model


def _rows(path: Path, split: str) -> list[dict[str, Any]]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["split"] == split]


def windows_served(loader) -> int:
    """Rows a TokenBatchLoader has handed out, from its own cursor (one window per chunk here)."""
    assert loader.chunk_len == loader.seq_len
    return loader.epoch * loader.chunks_per_rank + loader.chunk + (1 if loader.offset else 0)


def _tokens(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 19), generator=torch.Generator().manual_seed(seed))


def test_stage_trains_keeps_the_base_and_its_exports_agree_with_peft(tmp_path, lora_data, caplog):
    _, base_dir = lora_data
    cfg = lora_config(tmp_path, lora_data)
    stage, keep = LoRAStage(cfg), KeepModel()
    with caplog.at_level(logging.INFO):
        result = run_stage(stage, callbacks=[keep])
    assert result.status == "completed" and result.step == 6
    final, adapter = tmp_path / "ckpt_final", tmp_path / "ckpt_final_adapter"
    assert result.exports == {"adapter": adapter, "model": final} and result.final_dir == final
    export_files = {"llm_pipeline.json", "checksums.sha256"}  # the export record and its checksums
    assert {p.name for p in adapter.iterdir()} == {ADAPTER_CONFIG, ADAPTER_WEIGHTS, *export_files}

    # The frozen base is bitwise the base model; only adapters trained.
    model = keep.model.eval()
    base = load_pretrained(base_dir).state_dict()
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert len(frozen) == len(base)
    assert all(torch.equal(p, base[n.replace(".base_layer", "")]) for n, p in frozen.items())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    n_trainable = sum(p.numel() for p in trainable.values())
    assert n_trainable == 9_344  # r·(in + out) summed over the 7 projections of 2 layers (test_lora.py by hand)
    assert f"trainable {n_trainable:,} of " in caplog.text
    assert result.stats["trainable_params"] == n_trainable

    # The adapter file holds the adapter tensors and nothing else, under peft's names.
    with safe_open(str(adapter / ADAPTER_WEIGHTS), framework="pt") as f:
        keys = list(f.keys())
        assert all(k.startswith(PEFT_KEY_PREFIX) and (".lora_A." in k or ".lora_B." in k) for k in keys)
        assert sum(f.get_tensor(k).numel() for k in keys) == n_trainable

    # Ours, peft on the transformers base with our adapter folder, and the merged export: the same logits.
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    with_adapter = peft.PeftModel.from_pretrained(hf_base, adapter).eval()
    hf_merged = transformers.AutoModelForCausalLM.from_pretrained(final, attn_implementation="eager").eval()
    x = _tokens(512)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(with_adapter(x).logits, want, atol=1e-4, rtol=0)
        torch.testing.assert_close(hf_merged(x).logits, want, atol=1e-4, rtol=0)
        torch.testing.assert_close(load_pretrained(final)(x), want, atol=1e-4, rtol=0)
        assert (want - load_pretrained(base_dir)(x)).abs().max() > 1e-3  # the adapters changed the model

    # Domain perplexity falls; the general held-out data is scored at every evaluation too.
    logs = tmp_path / "logs" / "metrics.jsonl"
    evals = {r["step"]: r for r in _rows(logs, "eval")}
    assert list(evals) == [0, 3, 6] and all({"ppl", "general/ppl", "general/loss"} <= set(r) for r in evals.values())
    assert evals[6]["ppl"] < evals[0]["ppl"]

    # The realised mix, logged every step, equals the rows each source's loader handed out.
    domain_loader, general_loader = stage._parts
    domain, general = windows_served(domain_loader), windows_served(general_loader)
    assert domain + general == 6 * 8
    assert result.stats["mix_domain_rows"] == domain and result.stats["mix_general_rows"] == general
    assert result.stats["mix_domain_row_fraction"] == domain / 48
    train_rows = _rows(logs, "train")
    assert train_rows[-1]["mix_domain_row_fraction"] == domain / 48
    assert all(0 < r["mix_domain_token_fraction"] < 1 for r in train_rows)


def test_sigterm_and_restart_resume_exactly_from_adapter_only_checkpoints(tmp_path, lora_data, caplog):
    straight = run_stage(LoRAStage(lora_config(tmp_path / "a", lora_data)), export=False)
    cfg = lora_config(tmp_path / "b", lora_data, **{"training.resume_from_checkpoint": "auto"})
    with caplog.at_level(logging.INFO, logger="llm_pipeline.checkpoint.dcp"):
        first = run_stage(LoRAStage(cfg), callbacks=[SignalAt(4, signal.SIGTERM)])
    assert first.status == "preempted" and first.step == 4 and not first.exports
    ckpt = tmp_path / "b" / "ckpt" / "checkpoint-4"
    assert "checkpoint committed: " in caplog.text and "KiB)" in caplog.text  # its size is logged
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    model_keys = {k.removeprefix("model.") for k in saved if k.startswith("model.")}
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys)  # no base weights

    # The adapters' section and the base they adapt cannot change on resume (one line per key).
    other_base = shutil.copytree(lora_data[1], tmp_path / "other_base")
    for key, value in (("lora", {"r": 8}), ("model", {"init_from": str(other_base)})):
        changed = lora_config(tmp_path / "b", lora_data, **{"training.resume_from_checkpoint": "auto"})
        setattr(changed, key, type(getattr(changed, key)).model_validate(value))
        with pytest.raises(TrainingError, match=rf"{key}\.(r|init_from): "):
            run_stage(LoRAStage(changed))

    second = run_stage(LoRAStage(cfg))
    assert second.status == "completed"
    assert {**first.losses, **second.losses} == straight.losses  # bitwise
    assert second.val_losses[6] == straight.val_losses[6]

    # `llm-pipeline export` on the adapter-only checkpoint rebuilds base + adapters and merges them.
    final = tmp_path / "b" / "ckpt_final"
    assert main(["export", str(tmp_path / "b" / "ckpt"), str(tmp_path / "exported")]) == 0
    x = _tokens(512, seed=2)
    with torch.no_grad():
        exported = load_pretrained(tmp_path / "exported")(x)
        torch.testing.assert_close(exported, load_pretrained(final)(x), atol=1e-5, rtol=0)
    assert (tmp_path / "exported" / "tokenizer.json").is_file()


def test_the_adapter_names_its_base_so_peft_loads_it_from_any_folder(tmp_path, lora_data, monkeypatch):
    """The pipeline's paths are relative to where it runs (run_dir: runs/demo); adapter_config.json must still
    lead `AutoPeftModelForCausalLM` to the base from another working folder."""
    monkeypatch.chdir(lora_data[1].parent)
    cfg = lora_config(tmp_path, lora_data, **{"training.max_steps": 1})
    cfg.model.init_from = Path(lora_data[1].name)  # relative, as the pipeline wires it
    adapter = run_stage(LoRAStage(cfg)).exports["adapter"]
    monkeypatch.chdir(tmp_path)
    model = peft.AutoPeftModelForCausalLM.from_pretrained(adapter)
    assert type(model).__name__ == "PeftModelForCausalLM"


def test_chat_data_from_a_larger_tokenizer_than_the_base_is_one_error_line(tmp_path, capsys):
    """data.tokenizer_dir with ids beyond the base's vocabulary: said before training (as SFT and DPO do), not
    an IndexError deep in the embedding."""
    from .chat_fixtures import chat_records, train_chat_tokenizer, write_records

    tok = train_chat_tokenizer(tmp_path / "tok", vocab_size=400)
    base = save_pretrained(build_model(get_preset("debug", vocab_size=300), seed=0), tmp_path / "base")
    data = write_records(tmp_path / "chat.jsonl", chat_records(32, seed=1))
    cfg = {
        "model": {"init_from": str(base)}, "lora": {"r": 4},
        "data": {"tokenizer_dir": str(tok), "domain_fraction": 1.0,
                 "domain": {"kind": "chat", "sft": {"kind": "local", "paths": [str(data)], "max_seq_len": 96}}},
        "training": {"max_steps": 1, "global_batch_size": 4, "micro_batch_size": 2, "precision": "fp32",
                     "eval_steps": 0, "warmup_steps": 0, "output_dir": str(tmp_path / "out")},
        "parallel": {"device": "cpu"},
    }  # fmt: skip
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["lora", "--config", str(tmp_path / "lora.yaml")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "vocab_size 300" in err.strip().splitlines()[-1], err


def test_export_without_its_base_is_refused_naming_the_base(tmp_path, lora_data, capsys):
    """An adapter-only checkpoint whose base model is gone: one error line saying which folder is needed."""
    cfg = lora_config(tmp_path, lora_data, **{"training.max_steps": 1})
    base_copy = tmp_path / "base_copy"
    shutil.copytree(lora_data[1], base_copy)
    cfg.model.init_from = base_copy
    run_stage(LoRAStage(cfg), export=False)
    shutil.rmtree(base_copy)
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "holds only the LoRA adapters" in err and str(base_copy) in err
    assert not (tmp_path / "out").exists()


def test_adapter_export_never_destroys_a_folder_it_did_not_write(tmp_path):
    cfg, lcfg = get_preset("debug"), LoRAConfig(r=2)
    state = apply_lora(build_model(cfg, seed=0), lcfg).state_dict()
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        save_adapter(state, cfg, lcfg, user)
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    save_adapter(state, cfg, lcfg, user, overwrite=True)  # only our files are written beside the user's
    assert (user / "notes.txt").read_text() == "mine" and (user / ADAPTER_WEIGHTS).is_file()

    out = save_adapter(state, cfg, lcfg, tmp_path / "adapter")
    meta = json.loads((out / "llm_pipeline.json").read_text())
    assert meta["kind"] == "lora_adapter" and meta["lora"]["r"] == 2
    save_adapter(state, cfg, LoRAConfig(r=2, alpha=8), out)  # a previous adapter export is replaced
    assert json.loads((out / ADAPTER_CONFIG).read_text())["lora_alpha"] == 8
    model_dir = save_pretrained(build_model(cfg, seed=0), tmp_path / "model")
    with pytest.raises(FileExistsError, match="hf_model export"):  # another kind of export is not replaced
        save_adapter(state, cfg, lcfg, model_dir)
    run = tmp_path / "run"
    (run / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="training checkpoints"):
        save_adapter(state, cfg, lcfg, run, overwrite=True)
    assert (model_dir / "model.safetensors").is_file() and (run / "checkpoint-2").is_dir()


def test_config_checks(tmp_path, lora_data):
    ok = lora_config(tmp_path, lora_data)
    assert ok.batch_unit == "tokens" and ok.training.output_dir == tmp_path / "ckpt"
    raw = yaml.safe_load(json.dumps(ok.model_dump(mode="json")))
    cases = {
        "needs training.precision bf16": ("lora", {"r": 4, "base_dtype": "bfloat16"}),
        "model.init_from is not set": ("model", {"preset": "debug"}),
        "must be of one kind": ("data", {**raw["data"], "general": {"kind": "chat", "sft": {}}}),
        "data.general is not set": ("data", {**raw["data"], "general": None}),
        "must be a multiple of data.seq_len": ("data", {**raw["data"], "seq_len": 48}),
        "rank": ("lora", {"rank": 4}),
    }
    for message, (section, value) in cases.items():
        with pytest.raises(ConfigError, match=message):
            validate_config(LoRAStageConfig, {**raw, section: value}, "lora.yaml")
    rows = {k: v for k, v in raw["training"].items() if k != "global_batch_tokens"} | {"global_batch_size": 4}
    chat = {"domain": {"kind": "chat", "sft": {"kind": "stdlib"}}, "domain_fraction": 1.0}
    assert validate_config(LoRAStageConfig, {**raw, "training": rows, "data": chat}).batch_unit == "sequences"
    with pytest.raises(ConfigError, match="counts its batch in sequences"):
        validate_config(LoRAStageConfig, {**raw, "data": chat})


def _chat_records(n: int, topic: str) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"{topic} question {i}: what is {i} + {i}?"},
                      {"role": "assistant", "content": f"The {topic} answer is {2 * i}."}]}
        for i in range(n)
    ]  # fmt: skip


def test_chat_data_mixes_rows_and_trains_on_assistant_tokens(tmp_path, lora_data):
    paths = {}
    for name in ("domain", "general"):
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in _chat_records(40, name)))
    sft = {"kind": "local", "max_seq_len": 64, "val_fraction": 0.2}
    cfg = validate_config(LoRAStageConfig, {
        "model": {"init_from": str(lora_data[1])},
        "lora": {"r": 4},
        "data": {"domain": {"kind": "chat", "sft": {**sft, "paths": [str(paths["domain"])]}},
                 "general": {"kind": "chat", "sft": {**sft, "paths": [str(paths["general"])]}}, "domain_fraction": 0.5},
        "training": {"max_steps": 3, "global_batch_size": 4, "micro_batch_size": 2, "precision": "fp32",
                     "logging_steps": 1, "eval_steps": 3, "eval_batches": 2, "save_steps": 0, "warmup_steps": 0,
                     "output_dir": str(tmp_path / "ckpt"), "logging_dir": str(tmp_path / "logs")},
        "parallel": {"device": "cpu", "fp8": False},
    })  # fmt: skip
    stage = LoRAStage(cfg)
    result = run_stage(stage)
    assert result.status == "completed" and (tmp_path / "ckpt_final_adapter" / ADAPTER_WEIGHTS).is_file()
    train = _rows(tmp_path / "logs" / "metrics.jsonl", "train")
    domain_src, general_src = stage._parts
    assert result.stats["mix_domain_rows"] + result.stats["mix_general_rows"] == 12 == (
        domain_src.position + general_src.position
    )  # fmt: skip
    # Units are trained (assistant) tokens only: far fewer than the tokens the model processed.
    assert all(r["units"] < r["tokens_per_s"] * r["step_time_s"] for r in train)
    assert {"ppl", "general/ppl"} <= set(_rows(tmp_path / "logs" / "metrics.jsonl", "eval")[0])


def test_chat_sources_are_mixed_by_rows_and_their_max_epochs_checked(tmp_path, lora_data):
    """Chat sources mix packed rows (the unit their weights and epochs are of, and the report's shares); their
    max_epochs is checked before anything trains, and a `tokens` budget, which would be taken as rows, is refused
    (review #4)."""
    path = tmp_path / "domain.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _chat_records(40, "domain")))
    sft = {"kind": "local", "max_seq_len": 64, "paths": [str(path)]}
    raw = {
        "model": {"init_from": str(lora_data[1])},
        "lora": {"r": 4},
        "data": {"sources": [{"name": "domain", "weight": 0.9, "kind": "chat", "sft": sft, "max_epochs": 1},
                             {"name": "other", "weight": 0.1, "kind": "chat", "sft": sft}]},
        "training": {"max_steps": 20, "global_batch_size": 4, "micro_batch_size": 2, "precision": "fp32",
                     "eval_steps": 0, "save_steps": 0, "output_dir": str(tmp_path / "ckpt"),
                     "logging_dir": str(tmp_path / "logs")},
        "parallel": {"device": "cpu", "fp8": False},
    }  # fmt: skip
    stage = LoRAStage(validate_config(LoRAStageConfig, raw))
    mixer, _ = stage.build_sources(DistInfo(), stage.model_config())
    assert mixer.unit == "rows" and mixer.row_weights.tolist() == pytest.approx([0.9, 0.1])
    with pytest.raises(ValueError, match=r"data source 'domain': the run would pass over it .* more than its max_"):
        run_stage(stage)
    assert not list((tmp_path / "ckpt").glob("checkpoint-*"))
    budget = {"name": "other", "tokens": 10_000, "kind": "chat", "sft": sft}
    raw["data"]["sources"] = [{**raw["data"]["sources"][0], "weight": None, "epochs": 1}, budget]
    with pytest.raises(ConfigError, match=r"'other': a `tokens` budget is for token sources; chat data is mixed by"):
        validate_config(LoRAStageConfig, raw)


@pytest.mark.slow
def test_two_rank_fsdp2_stage_equals_one_process(tmp_path, lora_data):
    """The stage itself under torchrun (2 gloo ranks, FSDP2, meta model + broadcast): same losses and the
    same merged export as one process. Each rank draws its own mix (a per-rank row stream), so the runs
    see the same rows only with every row from the domain: two ranks then read the windows one process
    reads, split between them. The mixer's counts are summed over the ranks."""
    kw = {"training.max_steps": 4, "training.eval_steps": 0, "data.domain_fraction": 1.0}
    one = run_stage(LoRAStage(lora_config(tmp_path / "one", lora_data, **kw)))
    two_cfg = lora_config(tmp_path / "two", lora_data, **kw)
    (tmp_path / "two").mkdir()
    config = tmp_path / "two" / "lora.yaml"
    config.write_text(yaml.safe_dump(two_cfg.model_dump(mode="json")))
    worker = Path(__file__).with_name("lora_fsdp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker)]
    proc = subprocess.run([*cmd, str(tmp_path / "two"), "--stage", str(config)], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads((tmp_path / "two" / "stage_result.json").read_text())
    assert got["losses"] == pytest.approx([one.losses[s] for s in sorted(one.losses)], rel=1e-5)
    assert (got["mix_domain_rows"], got["mix_general_rows"]) == (4 * 8, 0)  # both ranks' rows
    x = _tokens(512, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(
            load_pretrained(tmp_path / "two" / "ckpt_final")(x), load_pretrained(tmp_path / "one" / "ckpt_final")(x),
            atol=1e-4, rtol=0,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# What the stage tells pre-flight, and its start model's identity
# --------------------------------------------------------------------------------------------


def test_checkpoint_size_estimate_is_within_ten_percent_of_a_real_demo_size_checkpoint(tmp_path, lora_data):
    """The demo's shape (the `tiny` preset, rank 16 on all seven projections): the estimate counts the adapters
    and their AdamW state, not the frozen base (a full-weight estimate would be ~20x too large)."""
    from llm_pipeline.checkpoint.manager import folder_size
    from llm_pipeline.train.model_setup import resolve_model_config

    packed, _ = lora_data
    base = save_pretrained(
        build_model(get_preset("tiny"), seed=0), tmp_path / "tiny", tokenizer_dir=packed.parent / "tokenizer"
    )
    cfg = lora_config(tmp_path, (packed, base), **{"training.max_steps": 1, "training.save_steps": 1,
                                                   "training.eval_steps": 0})  # fmt: skip
    cfg.lora = LoRAConfig(r=16, alpha=32)
    stage = LoRAStage(cfg)
    run_stage(stage, export=False)
    real = folder_size(tmp_path / "ckpt" / "checkpoint-1")
    model_cfg = resolve_model_config(cfg.model)
    estimate = stage.checkpoint_bytes(model_cfg)
    assert abs(estimate - real) / real < 0.10, (estimate, real)
    assert stage.memory_plan(model_cfg).seq_len == cfg.data.seq_len  # the stage's rows, not the model's context


def test_resuming_adapters_on_a_base_changed_in_place_is_refused_before_any_record_is_rewritten(tmp_path, lora_data):
    packed, base = lora_data
    own_base = shutil.copytree(base, tmp_path / "base")
    cfg = lora_config(tmp_path, (packed, own_base), **{"training.max_steps": 2, "training.save_steps": 2,
                                                       "training.resume_from_checkpoint": "auto"})  # fmt: skip
    run_stage(LoRAStage(cfg), export=False)
    saved = yaml.safe_load((tmp_path / "ckpt" / "checkpoint-2" / "config.yaml").read_text())
    assert len(saved["model"]["init_digest"]) == 64  # recorded with the checkpoint
    record = (tmp_path / "ckpt" / "config.yaml").read_bytes()
    # other weights, same architecture, same path: only the content tells
    save_pretrained(build_model(get_preset("debug"), seed=1), own_base, tokenizer_dir=packed.parent / "tokenizer",
                    overwrite=True)  # fmt: skip
    more = lora_config(tmp_path, (packed, own_base), **{"training.max_steps": 4, "training.save_steps": 2,
                                                        "training.resume_from_checkpoint": "auto"})  # fmt: skip
    with pytest.raises(TrainingError, match=r"model\.init_digest: .*start model's files changed"):
        run_stage(LoRAStage(more), export=False)
    assert (tmp_path / "ckpt" / "config.yaml").read_bytes() == record  # the refused settings were not written
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 2  # nor exported on the wrong base


def test_a_base_with_another_tokenizer_of_the_same_size_is_an_error_before_training(tmp_path, lora_data):
    """Token shards packed with one 512-token BPE, a base whose tokenizer is another 512-token BPE: the ids mean
    other things. Refused before training (and by pre-flight), not a warning."""
    packed, _ = lora_data
    texts = [f"completely different words number {i} and letters {chr(97 + i % 26)}" * 3 for i in range(300)]
    other_tok = save_tokenizer(train_tokenizer(texts, vocab_size=512), tmp_path / "other_tok")
    base = save_pretrained(build_model(get_preset("debug"), seed=0), tmp_path / "base", tokenizer_dir=other_tok)
    cfg = lora_config(tmp_path, (packed, base))
    with pytest.raises(ValueError, match="ids differ from the base model's tokenizer"):
        run_stage(LoRAStage(cfg))
    assert not list((tmp_path / "ckpt").glob("checkpoint-*"))


def test_a_bf16_base_from_fp32_weights_is_said_and_recorded_with_the_adapter(tmp_path, lora_data, caplog, monkeypatch):
    monkeypatch.setattr("llm_pipeline.train.metrics._cpu_peak", lambda dtype: 1e9)  # no bf16 matmul benchmark on CPU
    cfg = lora_config(tmp_path, lora_data, **{"training.max_steps": 1, "training.precision": "bf16",
                                              "training.eval_steps": 0})  # fmt: skip
    cfg.lora = LoRAConfig(r=4, base_dtype="bfloat16")
    with caplog.at_level(logging.WARNING):
        result = run_stage(LoRAStage(cfg))
    assert "holds float32 weights" in caplog.text and "lora.base_dtype: float32" in caplog.text
    meta = json.loads((result.exports["adapter"] / "llm_pipeline.json").read_text())
    assert json.dumps(meta).count('"base_dtype": "bfloat16"') >= 1 and '"start_model_dtype": "float32"' in json.dumps(
        meta
    )
