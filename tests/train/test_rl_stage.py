"""The RL stage on the runner: rollouts, TRL-named metrics, held-out accuracy, config errors, and an exact
resume after kill -9 (same completions, same losses, same final weights)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from llm_pipeline.train.rl import RLConfig, RLStage
from llm_pipeline.train.stage import run_stage

from .chat_fixtures import make_chat_model


@pytest.fixture(scope="module")
def start_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `debug` model with a BPE trained on the arithmetic chats (random weights: rewards are mostly 0)."""
    from llm_pipeline.data.arithmetic import chat_records
    from llm_pipeline.data.tokenizer import save_tokenizer, train_tokenizer

    tmp = tmp_path_factory.mktemp("rl-model")
    texts = [m["content"] for item in chat_records() for m in item.record["messages"]]
    save_tokenizer(train_tokenizer(texts, vocab_size=400), tmp / "tok")
    return make_chat_model(tmp / "model", tmp / "tok")


def rl_config(tmp: Path, model_dir: Path, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model": {"init_from": str(model_dir)},
        "data": {"kind": "arithmetic", "max_val_prompts": 8, "max_operand": 9},
        "rl": {"prompts_per_step": 2, "num_generations": 4, "max_new_tokens": 6, "variant": "grpo",
               "rewards": [{"name": "numeric_answer"}, {"name": "format", "weight": 0.1,
                                                        "options": {"pattern": "(?s).*[0-9].*"}}]},
        "training": {"max_steps": 4, "micro_batch_size": 4, "learning_rate": 1e-3, "precision": "fp32",
                     "warmup_steps": 0, "logging_steps": 1, "eval_steps": 2, "eval_batches": 4, "save_steps": 2,
                     "output_dir": str(tmp / "ckpt"), "logging_dir": str(tmp / "logs")},
        "parallel": {"device": "cpu"},
    }  # fmt: skip
    for section, values in over.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def metric_rows(logs: Path, split: str) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("split") == split]


def test_rl_stage_trains_and_logs_trl_metrics(tmp_path: Path, start_model: Path) -> None:
    """DAPO with two steps per rollout and a KL to the start model: every part of a step runs."""
    cfg = RLConfig.model_validate(
        rl_config(tmp_path, start_model, rl={"variant": "dapo", "num_iterations": 2, "beta": 0.05})
    )
    assert cfg.training.global_batch_size == 8 and cfg.rl.epsilon_high == 0.28 and cfg.rl.filter_zero_std_groups
    result = run_stage(RLStage(cfg))
    assert result.status == "completed" and result.step == 4
    assert (tmp_path / "ckpt_final" / "model.safetensors").is_file()
    train = metric_rows(tmp_path / "logs", "train")
    for key in ("reward", "reward_std", "rewards/numeric_answer/mean", "rewards/format/mean", "frac_reward_zero_std",
                "completions/mean_length", "clip_ratio", "kl", "entropy", "timing/generation_s",
                "timing/scoring_s", "timing/training_s"):  # fmt: skip
        assert key in train[-1], key
    assert train[1]["timing/generation_s"] == 0  # the second step reuses the first step's rollout
    evals = metric_rows(tmp_path / "logs", "eval")
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all(0 <= r["accuracy"] <= 1 and r["loss"] == pytest.approx(1 - r["accuracy"]) for r in evals)


#: arithmetic 0.75 + the embedded safety prompts 0.25, each scored by its own reward (the README's example)
MIXTURE = {
    "data": {"sources": [{"name": "arithmetic", "kind": "arithmetic", "weight": 0.75, "max_val_prompts": 6},
                         {"name": "safety", "kind": "safety", "weight": 0.25, "max_val_prompts": 4}]},
    "rl": {"prompts_per_step": 4, "num_generations": 2,
           "rewards": [{"name": "numeric_answer", "sources": ["arithmetic"]},
                       {"name": "refusal", "sources": ["safety"]}]},
}  # fmt: skip


def test_rl_on_a_mixture_routes_rewards_and_reports_each_source(tmp_path: Path, start_model: Path) -> None:
    """Arithmetic + safety prompts: the step metrics have the sources' shares and each reward's mean over its own
    source; every eval row has `accuracy` (the arithmetic's: numeric_answer) and each source's accuracy."""
    cfg = RLConfig.model_validate(rl_config(tmp_path, start_model, **MIXTURE, training={"max_steps": 2}))
    result = run_stage(RLStage(cfg))
    assert result.status == "completed" and result.step == 2
    train = metric_rows(tmp_path / "logs", "train")
    for key in ("mix/arithmetic/share", "mix/safety/share", "mix/arithmetic/examples", "rewards/numeric_answer/mean",
                "rewards/refusal/mean", "mix/arithmetic/reward", "mix/safety/reward"):  # fmt: skip
        assert key in train[-1], key
    # 8 prompts drawn by step 2 at 0.75 / 0.25: exactly 6 and 2 (the deficit order is within a prompt of the shares)
    assert train[-1]["mix/arithmetic/examples"] == 6 and train[-1]["mix/safety/share"] == 0.25
    assert result.stats["mix/safety/weight"] == 0.25
    evals = metric_rows(tmp_path / "logs", "eval")
    assert [r["step"] for r in evals] == [0, 2]
    for r in evals:
        assert {"accuracy", "reward", "arithmetic/accuracy", "safety/accuracy", "safety/loss"} <= set(r)
        assert r["accuracy"] == r["arithmetic/accuracy"]  # the verifiable task's, not diluted by safety's
        assert r["loss"] == pytest.approx(1 - r["accuracy"])


def test_a_source_no_reward_scores_is_a_kl_anchor(tmp_path: Path, start_model: Path) -> None:
    """Safety prompts without a reward and a KL term (the demo's RL): they train with advantage 0 (the KL only),
    and have no held-out accuracy; the arithmetic's is `accuracy`."""
    rl = {**MIXTURE["rl"], "beta": 0.2, "rewards": [{"name": "numeric_answer", "sources": ["arithmetic"]}]}
    cfg = RLConfig.model_validate(rl_config(tmp_path, start_model, data=MIXTURE["data"], rl=rl,
                                            training={"max_steps": 1}))  # fmt: skip
    assert cfg.anchor_sources == ["safety"]
    result = run_stage(RLStage(cfg))
    assert result.status == "completed"
    train = metric_rows(tmp_path / "logs", "train")
    assert train[-1]["mix/safety/reward"] == 0 and "kl" in train[-1] and train[-1]["mix/safety/examples"] == 1
    for r in metric_rows(tmp_path / "logs", "eval"):
        assert "safety/accuracy" not in r and r["accuracy"] == r["arithmetic/accuracy"]


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"training": {"global_batch_size": 6}}, r"must equal rl.prompts_per_step x rl.num_generations \(8\)"),
        ({"rl": {"accuracy_reward": "exact"}}, "rl.accuracy_reward 'exact' is none of rl.rewards"),
        ({"rl": {"rewards": [{"name": "exact"}]}}, "unknown reward 'exact'"),
        ({"model": {"init_from": None}}, "RL starts from a trained chat model"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, start_model: Path, over: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RLConfig.model_validate(rl_config(tmp_path, start_model, **over))


def test_user_reward_import_error_is_one_clear_line(tmp_path: Path, start_model: Path) -> None:
    from llm_pipeline.rewards import RewardError

    cfg = RLConfig.model_validate(rl_config(tmp_path, start_model, rl={"rewards": [{"function": "nope.mod:fn"}]}))
    with pytest.raises(RewardError, match=r"cannot import module 'nope\.mod'"):
        run_stage(RLStage(cfg))


@pytest.mark.slow
@pytest.mark.parametrize("mixture", [False, True], ids=["one-source", "mixture"])
def test_kill9_resumes_to_the_same_completions_and_losses(tmp_path: Path, start_model: Path, mixture: bool) -> None:
    """An undisturbed CLI run, and one killed with SIGKILL during step 3 then run again: every step's loss,
    reward and completion lengths (the completions' fingerprint) and the final weights are identical (on a
    mixture also each source's prompts drawn: the weighted order and every source's walk resume exactly)."""
    from tests.reliability.conftest import DRIVER, cli_env

    def run(root: Path, fault: str = "", kill: bool = False) -> None:
        root.mkdir()
        cfg = rl_config(root, start_model, **(MIXTURE if mixture else {}),
                        training={"max_steps": 5, "eval_steps": 0, "save_steps": 2,
                                  "resume_from_checkpoint": "auto"})  # fmt: skip
        (root / "rl.yaml").write_text(yaml.safe_dump(cfg))
        cmd = [sys.executable, str(DRIVER), "rl", "--config", str(root / "rl.yaml")]
        proc = subprocess.Popen(cmd, env=cli_env(fault), cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip
        if kill:
            ready = root / "release.ready"
            deadline = time.monotonic() + 60
            while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert ready.exists(), proc.communicate()[1][-2000:]
            proc.kill()
            proc.wait()
            proc = subprocess.Popen(cmd, env=cli_env(), cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)  # fmt: skip
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]

    run(tmp_path / "ref")
    run(tmp_path / "killed", fault=f"pause-at-step:3:{tmp_path / 'killed' / 'release'}", kill=True)
    keys = ("loss", "reward", "completions/mean_length", "completions/max_length", "entropy")
    keys += ("mix/arithmetic/examples", "mix/safety/tokens", "rewards/refusal/mean") if mixture else ()
    ref = {r["step"]: [r.get(k) for k in keys] for r in metric_rows(tmp_path / "ref" / "logs", "train")}
    killed = metric_rows(tmp_path / "killed" / "logs", "train")
    assert sorted(ref) == [1, 2, 3, 4, 5]
    assert {r["step"] for r in killed} == set(ref)
    for r in killed:  # steps 1-2 from the killed process, 3-5 after the resume from checkpoint-2
        assert [r.get(k) for k in keys] == ref[r["step"]], r["step"]
    weights = [(p / "ckpt_final" / "model.safetensors").read_bytes() for p in (tmp_path / "ref", tmp_path / "killed")]
    assert weights[0] == weights[1]


def test_arithmetic_is_an_sft_chat_source_with_the_rl_task_held_out(tmp_path: Path, start_model: Path) -> None:
    """``data.kind: arithmetic`` in SFT: the training problems, and as validation exactly the held-out problems
    the RL stage and the arithmetic_accuracy eval score (never trained on)."""
    from llm_pipeline.data import arithmetic
    from llm_pipeline.data.config import SFTDataConfig
    from llm_pipeline.data.sft import build_sft_sources

    cfg = SFTDataConfig(kind="arithmetic", max_seq_len=64, packing=False, max_examples=50)
    _, val, report = build_sft_sources(cfg, start_model, micro_batch_size=4, output_dir=tmp_path)
    assert report["train"]["examples"] == 50 and val is not None
    assert report["val"]["examples"] == len(arithmetic.problems("val")) > 200
    assert not set(arithmetic.problems("val")) & set(arithmetic.problems("train"))
    assert report["rejected"] == {}


def test_rl_prompts_use_the_chat_reader_and_the_embedded_registry(tmp_path: Path, start_model: Path) -> None:
    """Local prompt files go through the SFT/DPO reader (a huge line is rejected unread, into the rejects file);
    arithmetic comes from the embedded-source registry's ``rl`` role, split as the SFT source."""
    from llm_pipeline.data import arithmetic
    from llm_pipeline.data.chat import ChatTemplate
    from llm_pipeline.train.rl_data import RLDataConfig, load_prompts

    template = ChatTemplate.from_dir(start_model)
    path = tmp_path / "prompts.jsonl"
    big = json.dumps({"question": "What is 1 + 1? " + "x" * (1 << 20), "answer": "2"})
    path.write_text("\n".join([json.dumps({"question": "What is 2 + 3?", "answer": "5"}), big, "{not json",
                               json.dumps({"answer": "7"})]) + "\n")  # fmt: skip
    cfg = RLDataConfig(kind="local", paths=[str(path)], val_fraction=0.0)
    kept, report = load_prompts(cfg, template, output_dir=tmp_path)
    assert [ex["answer"] for ex in kept["train"]] == ["5"]
    assert report["skipped"]["too_large"] == 1 and report["skipped"]["no_prompt"] == 1 and len(report["skipped"]) == 3
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "rl_rejects.jsonl").read_text().splitlines()]
    assert "too_large" in reasons and "no_prompt" in reasons and len(reasons) == 3

    kept, _ = load_prompts(RLDataConfig(kind="arithmetic", max_operand=9, max_val_prompts=None), template,
                           output_dir=tmp_path)  # fmt: skip
    assert {ex["id"] for ex in kept["val"]} == {r["id"] for r in arithmetic.prompt_records("val", max_operand=9)}
    with pytest.raises(ValueError, match="unknown RL data kind 'stdlib'"):
        RLDataConfig(kind="stdlib")
