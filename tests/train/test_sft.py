"""The SFT stage: packed rows equal their examples run alone, exact accumulation / OOM fallback / resume,
a held-out loss that falls, an export that `transformers` chats with, over-long and untrainable
examples, a tokenizer without chat tokens, the CLI and the pipeline."""

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
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llm_pipeline.checkpoint.hf import load_pretrained, save_pretrained
from llm_pipeline.cli import main
from llm_pipeline.data.chat import CHAT_TEMPLATE, ChatTemplate, read_chat_template
from llm_pipeline.data.sft import SFTBatchSource, TokenExamples
from llm_pipeline.model import build_model, get_preset
from llm_pipeline.train.objectives import CausalLMObjective
from llm_pipeline.train.sft import SFTConfig, SFTStage, grow_vocabulary
from llm_pipeline.train.stage import run_stage
from llm_pipeline.train.trainer import Callback

from .chat_fixtures import (
    SYSTEM,
    chat_records,
    make_chat_model,
    sft_config,
    train_chat_tokenizer,
    write_records,
)
from .test_trainer import OOMOnce, Record, SignalAt


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    """A tokenizer with our chat template, a random `debug` model with it, train and held-out chat data."""
    d = tmp_path_factory.mktemp("sft")
    tok = train_chat_tokenizer(d / "tok")
    make_chat_model(d / "model", tok)
    write_records(d / "train.jsonl", chat_records(240, seed=1))
    write_records(d / "val.jsonl", chat_records(40, seed=2))
    return d


class KeepWeights(Callback):
    """The trained weights at the end of the run (to compare updates, not only losses)."""

    def on_train_end(self, trainer, result) -> None:
        self.state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


# --------------------------------------------------------------------------------------------
# Packing: no cross-contamination, exact normalisation
# --------------------------------------------------------------------------------------------


def _examples(seed: int = 0) -> TokenExamples:
    """Examples of 5-30 tokens; a prompt part untrained, a reply trained (some replies in two spans)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(9):
        n = int(rng.integers(5, 31))
        ids = [1, *rng.integers(7, 512, n - 1).tolist()]
        prompt = int(rng.integers(1, n - 1))
        mask = [0] * prompt + [1] * (n - prompt)
        if n > 12:
            mask[prompt + 2] = 0  # a second user turn inside the conversation
        out.append((ids, mask))
    return TokenExamples.from_lists(out)


def test_packed_rows_give_the_loss_and_gradients_of_their_examples_run_alone():
    ex = _examples()
    src = SFTBatchSource(ex, max_seq_len=64, micro_batch_size=4, packing=True, seed=0)
    batch = src.next_batch()
    assert batch["input_ids"].shape[0] >= 2 and int(batch["document_ids"].max()) >= 2  # rows of several examples
    model = build_model(get_preset("debug"), seed=0)  # fp32
    params = [p for p in model.parameters()]

    out = CausalLMObjective(trained_only=True, chunk_tokens=16)(model, batch)
    grads = torch.autograd.grad(out.loss_sum, params)

    # Independent reference: every example of the batch through the model on its own, no packing,
    # full logits, the cross-entropy of its trained next tokens written out by hand.
    ref = torch.zeros(())
    count = 0
    for row_ids, row_docs in zip(batch["input_ids"], batch["document_ids"], strict=True):
        for seg in range(int(row_docs.max()) + 1):
            ids = row_ids[row_docs == seg]
            i = next(k for k in range(len(ex)) if ex.example(k)[0].tolist() == ids.tolist())
            tokens, trained = (torch.from_numpy(a.astype(np.int64)) for a in ex.example(i))
            logp = torch.log_softmax(model(tokens[None])[0, :-1].float(), -1)
            picked = logp.gather(-1, tokens[1:, None])[:, 0]
            ref = ref - (picked * trained[1:]).sum()
            count += int(trained[1:].sum())
    ref_grads = torch.autograd.grad(ref, params)
    assert CausalLMObjective().count(batch) == count
    torch.testing.assert_close(out.loss_sum, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_accumulation_and_the_oom_fallback_give_the_same_update(chat_dir, tmp_path):
    d = chat_dir
    start = load_pretrained(d / "model").state_dict()
    updates = {}
    for name, micro, callbacks in (("one", 4, []), ("accum", 1, []), ("oom", 4, [OOMOnce(2)])):
        keep = KeepWeights()
        # adam_eps above every |gradient| makes AdamW's step nearly linear in the gradient, so equal
        # updates mean equal gradients (with eps=1e-8 a gradient of ~0 steps by +-lr, its sign noise).
        cfg = sft_config(
            tmp_path / name, d / "model", d / "train.jsonl", max_steps=3, micro_batch_size=micro, learning_rate=0.1,
            adam_eps=1.0, enable_oom_recovery=name == "oom",
        )  # fmt: skip
        result = run_stage(SFTStage(cfg), callbacks=[*callbacks, keep], export=False)
        updates[name] = (result, {k: keep.state[k] - v for k, v in start.items()})
    ref, ref_update = updates["one"]
    assert updates["oom"][0].oom_events == 1
    for name in ("accum", "oom"):
        result, update = updates[name]
        for step, loss in ref.losses.items():
            assert result.losses[step] == pytest.approx(loss, rel=1e-5), (name, step)
        for k, v in ref_update.items():
            assert v.abs().max() > 1e-6, k  # every weight really moved
            torch.testing.assert_close(update[k], v, rtol=1e-4, atol=1e-8, msg=f"{name}: {k}")


# --------------------------------------------------------------------------------------------
# A real run: held-out loss, resume, export, chat generation
# --------------------------------------------------------------------------------------------


def test_sft_lowers_held_out_loss_resumes_exactly_and_chats_through_transformers(chat_dir, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    d = chat_dir
    common = dict(max_steps=12, eval_steps=6, lr_schedule="linear", min_lr_ratio=0.0)
    files = (d / "model", d / "train.jsonl", d / "val.jsonl")
    straight = run_stage(SFTStage(sft_config(tmp_path / "a", *files, **common)))
    assert straight.status == "completed" and list(straight.val_losses) == [0, 6, 12]
    assert straight.val_losses[12] < straight.val_losses[0] - 1.0  # held-out conversations
    assert all(math.isfinite(v) and v > 0 for v in straight.losses.values())

    # SIGTERM after step 5, then the same command with auto-resume: the very same losses.
    cfg = sft_config(tmp_path / "b", *files, save_steps=4, resume_from_checkpoint="auto", **common)
    first = run_stage(SFTStage(cfg), callbacks=[SignalAt(5)])
    assert first.status == "preempted" and first.step == 5
    second = run_stage(SFTStage(cfg))
    assert {**first.losses, **second.losses} == straight.losses
    assert second.val_losses[12] == straight.val_losses[12]

    # The export: transformers loads it, renders our ids and trained-token mask, stops at <|end|>.
    export = second.final_dir
    assert read_chat_template(export) == CHAT_TEMPLATE
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(export))
    ours = ChatTemplate.from_dir(export)
    conversations = [r["messages"] for r in chat_records(6, seed=3)]
    for convo in conversations:
        got = hf_tok.apply_chat_template(convo, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert ours.encode(convo) == (got["input_ids"], got["assistant_masks"])
    gen_cfg = json.loads((export / "generation_config.json").read_text())
    end = hf_tok.convert_tokens_to_ids("<|end|>")
    assert gen_cfg["eos_token_id"] == [hf_tok.eos_token_id, end]

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(export))
    ids = torch.tensor([ours.encode(conversations[0])[0]])
    torch.testing.assert_close(hf(ids).logits, load_pretrained(export)(ids), rtol=1e-4, atol=1e-4)

    # Greedy chat answers: ours through the template and KV cache = transformers' generate. The export
    # has learnt to end its turn early; the random starting model (same template) answers at length.
    questions = ["reverse: ba de gi ko", "count on from 7"]
    for model_dir in (export, d / "model"):
        capsys.readouterr()
        argv = ["generate", str(model_dir), "--system", SYSTEM, "--max-new-tokens", "24"]
        assert main([*argv, *(a for q in questions for a in ("--chat", q))]) == 0
        answers = [json.loads(line)["completion"] for line in capsys.readouterr().out.splitlines()]
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir))
        for question, answer in zip(questions, answers, strict=True):
            msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
            enc = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            out = hf_model.generate(**enc, max_new_tokens=24, do_sample=False)[0, enc["input_ids"].shape[1] :]
            assert answer == hf_tok.decode(out, skip_special_tokens=True), (model_dir, question)
    assert all(len(a) > 20 for a in answers)


# --------------------------------------------------------------------------------------------
# Over-long and untrainable examples
# --------------------------------------------------------------------------------------------


def _long_records() -> list[dict]:
    long_prompt = "reverse: " + " ".join(["ba"] * 120)  # > max_seq_len before any reply token
    long_reply = " ".join(["de"] * 120)
    records = chat_records(60, seed=4)
    for i in range(0, 60, 6):
        records[i] = {"messages": [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "ok"}]}
        reply = [{"role": "user", "content": "say de"}, {"role": "assistant", "content": long_reply}]
        records[i + 1] = {"messages": reply}
    return records


@pytest.mark.parametrize("truncation", ["truncate", "drop"])
def test_over_long_and_untrainable_examples_are_counted_and_never_give_zero_or_nan(chat_dir, tmp_path, truncation):
    d = chat_dir
    data = write_records(tmp_path / "long.jsonl", _long_records(), bad_lines=["{not json"])
    rec = Record()
    cfg = sft_config(tmp_path, d / "model", data, max_steps=4, data={"truncation": truncation})
    result = run_stage(SFTStage(cfg), callbacks=[rec], export=False)
    assert result.status == "completed" and result.empty_batches == 0
    assert all(m["units"] > 0 and math.isfinite(m["loss"]) and m["loss"] > 0 for m in rec.steps)

    report = json.loads((tmp_path / "ckpt" / "sft_data.json").read_text())
    rejects = [json.loads(line) for line in (tmp_path / "ckpt" / "sft_rejects.jsonl").read_text().splitlines()]
    if truncation == "truncate":  # long replies lose their tail; long prompts leave nothing to train
        assert report["rejected"] == {"malformed_json": 1, "no_trained_tokens_after_truncation": 10}
        assert report["train"]["truncated"] == 10 and report["train"]["examples"] == 50
    else:
        assert report["rejected"] == {"malformed_json": 1, "too_long": 20}
        assert report["train"].get("truncated", 0) == 0 and report["train"]["examples"] == 40
    assert len(rejects) == sum(report["rejected"].values())
    assert all(r["file"] == str(data) and r["line"] >= 1 for r in rejects)


# --------------------------------------------------------------------------------------------
# A tokenizer with neither a chat template nor chat tokens (a base model imported from the hub)
# --------------------------------------------------------------------------------------------


def foreign_model(root, *, vocab: int = 300):
    """A Llama-like tokenizer (`<s>`, `</s>`, `<unk>`, no template) and a model whose vocabulary is its size."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [m["content"] for r in chat_records(200, seed=5) for m in r["messages"]]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok_dir = root / "foreign_tok"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    size = tok.get_vocab_size()
    model = build_model(get_preset("debug", vocab_size=size), seed=0)
    return save_pretrained(model, root / "foreign_model", tokenizer_dir=tok_dir), size


def test_grow_vocabulary_starts_new_rows_at_the_mean_of_the_known_ones():
    model = build_model(get_preset("debug", vocab_size=300), seed=0)
    emb, head = model.model.embed_tokens.weight.clone(), model.lm_head.weight.clone()
    grow_vocabulary(model, 320, [298, 300, 301], known=298)
    new_emb, new_head = model.model.embed_tokens.weight, model.lm_head.weight
    assert new_emb.shape == (320, 64) and new_head.shape == (320, 64) and model.config.vocab_size == 320
    torch.testing.assert_close(new_emb[:298], emb[:298], rtol=0, atol=0)
    torch.testing.assert_close(new_head[:298], head[:298], rtol=0, atol=0)
    for row in [298, *range(300, 320)]:
        torch.testing.assert_close(new_emb[row], emb[:298].mean(0))
        torch.testing.assert_close(new_head[row], head[:298].mean(0))
    torch.testing.assert_close(new_emb[299], emb[299], rtol=0, atol=0)  # not a new token: kept
    meta = grow_vocabulary(build_model(get_preset("debug", vocab_size=300), device="meta"), 320, [300], known=300)
    assert meta.lm_head.weight.shape == (320, 64) and meta.lm_head.weight.is_meta


def test_tokenizer_without_chat_tokens_gets_them_and_our_template(tmp_path):
    transformers = pytest.importorskip("transformers")
    model_dir, size = foreign_model(tmp_path)
    data = write_records(tmp_path / "train.jsonl", chat_records(60, seed=6))
    cfg = sft_config(tmp_path, model_dir, data, max_steps=2)
    result = run_stage(SFTStage(cfg))
    export = result.final_dir
    assert json.loads((export / "config.json").read_text())["vocab_size"] == 320  # 300 + 4, rounded up to 64s
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(export))
    added = hf_tok.convert_tokens_to_ids(["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"])
    assert added == list(range(size, size + 4))
    assert "<|bos|>" not in hf_tok.get_vocab()  # the tokenizer's own <s> starts a conversation
    ours = ChatTemplate.from_dir(export)
    for convo in (r["messages"] for r in chat_records(4, seed=7)):
        got = hf_tok.apply_chat_template(convo, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert ours.encode(convo) == (got["input_ids"], got["assistant_masks"])
        assert got["input_ids"][0] == hf_tok.bos_token_id
    gen_cfg = json.loads((export / "generation_config.json").read_text())
    assert gen_cfg["eos_token_id"] == [hf_tok.eos_token_id, added[-1]]
    assert read_chat_template(model_dir) is None  # the user's folder is untouched


def test_exporting_a_checkpoint_of_a_grown_vocabulary_keeps_the_chat_tokens_and_template(tmp_path):
    """`llm-pipeline export CKPT` of an SFT run that added chat tokens: the tokenizer the run trained with."""
    model_dir, size = foreign_model(tmp_path)
    data = write_records(tmp_path / "train.jsonl", chat_records(40, seed=6))
    result = run_stage(SFTStage(sft_config(tmp_path, model_dir, data, max_steps=1)), export=False)
    out = tmp_path / "exported"
    assert main(["export", str(result.checkpoint), str(out)]) == 0
    assert read_chat_template(out) is not None
    assert Tokenizer.from_file(str(out / "tokenizer.json")).token_to_id("<|end|>") == size + 3


def test_sft_needs_a_tokenizer_and_a_context_that_fits(chat_dir, tmp_path):
    with pytest.raises(ValueError, match="SFT needs the tokenizer"):
        SFTConfig.model_validate({"model": {"preset": "debug"}, "training": {"global_batch_size": 4}})
    cfg = sft_config(tmp_path, chat_dir / "model", chat_dir / "train.jsonl", data={"max_seq_len": 1024})
    with pytest.raises(ValueError, match="exceeds the model's context"):
        run_stage(SFTStage(cfg), export=False)


def test_a_refused_resume_rewrites_none_of_the_runs_records(chat_dir, tmp_path):
    """config.yaml, sft_data.json and the rejects file keep what the checkpoint was trained with when a resume
    with settings it cannot apply (here the data's max_seq_len) is refused."""
    from llm_pipeline.train.trainer import TrainingError

    d = chat_dir
    records = [*chat_records(40, seed=3), {"messages": [{"role": "user", "content": "no reply"}]}]
    data = write_records(tmp_path / "chat.jsonl", records)
    cfg = sft_config(tmp_path, d / "model", data, max_steps=2, save_steps=2, resume_from_checkpoint="auto",
                     data={"rejects_path": str(tmp_path / "rejects.jsonl")})  # fmt: skip
    run_stage(SFTStage(cfg), export=False)
    files = [tmp_path / "ckpt" / "config.yaml", tmp_path / "ckpt" / "sft_data.json", tmp_path / "rejects.jsonl"]
    before = [f.read_bytes() for f in files]
    assert all(before)
    changed = sft_config(tmp_path, d / "model", data, max_steps=4, save_steps=2, resume_from_checkpoint="auto",
                         data={"rejects_path": str(tmp_path / "rejects.jsonl"), "max_seq_len": 64})  # fmt: skip
    with pytest.raises(TrainingError, match=r"data\.max_seq_len: 96 -> 64"):
        run_stage(SFTStage(changed), export=False)
    assert [f.read_bytes() for f in files] == before


def test_the_tokenizer_folder_is_known_before_the_data_is_built(chat_dir, tmp_path):
    """tokenizer_dir() answers the same before and after build_sources (no order-dependent hook)."""
    from llm_pipeline.train.parallel import DistInfo

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes((chat_dir / "tok" / "tokenizer.json").read_bytes())
    make_chat_model(tmp_path / "model", bare)
    stage = SFTStage(sft_config(tmp_path, tmp_path / "model", chat_dir / "train.jsonl"))
    before = stage.tokenizer_dir()
    assert before == tmp_path / "ckpt" / "chat_tokenizer" and not before.exists()
    stage.build_sources(DistInfo(), stage.model_config())
    assert stage.tokenizer_dir() == before and (before / "tokenizer.json").is_file()


# --------------------------------------------------------------------------------------------
# The command line and the pipeline
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sft_command_and_pipeline_stage(chat_dir, tmp_path):
    d = chat_dir
    cfg = sft_config(tmp_path, d / "model", d / "train.jsonl")
    cfg_file = tmp_path / "sft.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True)))
    out = tmp_path / "cli"
    assert main(["sft", "--config", str(cfg_file), "--max_steps", "2", "--output_dir", str(out)]) == 0
    assert (tmp_path / "cli_final" / "model.safetensors").is_file() and (out / "logs" / "metrics.jsonl").is_file()

    pipeline = {
        "run_dir": str(tmp_path / "run"),
        "stages": [{"name": "sft", "kind": "sft", "config": str(cfg_file), "start_from": str(d / "model"),
                    "set": ["training.max_steps=2"]}],
    }  # fmt: skip
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    assert main(["run", "--config", str(tmp_path / "pipeline.yaml")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stages"]["sft"]["steps"] == 2
    assert (tmp_path / "run" / "checkpoints" / "sft_final" / "chat_template.jinja").is_file()
    assert (tmp_path / "run" / "checkpoints" / "sft" / "sft_data.json").is_file()


# --------------------------------------------------------------------------------------------
# Two ranks (FSDP2 on gloo) give the single-process losses
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_rank_fsdp_sft_matches_one_process(chat_dir, tmp_path):
    d = chat_dir
    foreign, _ = foreign_model(tmp_path)
    worker = Path(__file__).with_name("sft_fsdp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker)]
    args = [tmp_path / "fsdp", d / "model", d / "train.jsonl", d / "val.jsonl", foreign]
    proc = subprocess.run([*cmd, *map(str, args)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads((tmp_path / "fsdp" / "result.json").read_text())

    common = dict(max_steps=4, eval_steps=2, micro_batch_size=2)  # the two ranks' rows in one process
    ref = run_stage(SFTStage(sft_config(tmp_path / "one", d / "model", d / "train.jsonl", d / "val.jsonl", **common)))
    grown = run_stage(SFTStage(sft_config(tmp_path / "grown", foreign, d / "train.jsonl", **common)), export=False)
    for key, want in (("losses", ref.losses), ("val_losses", ref.val_losses), ("grown", grown.losses)):
        have = {int(k): v for k, v in got[key].items()}
        assert have.keys() == want.keys(), key
        for step, loss in want.items():
            assert have[step] == pytest.approx(loss, rel=1e-5), (key, step)
    a, b = load_pretrained(got["final_dir"]), load_pretrained(ref.final_dir)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5, msg=n)  # AdamW amplifies ~0 gradients
