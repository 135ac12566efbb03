"""Held-out accuracy on the embedded arithmetic task ("What is a + b?", or "Which is largest: a, b, c?" with
``operation: largest``), the RL stage's verifiable default.

The problems are the task's held-out split (:mod:`llm_pipeline.data.arithmetic`: never in SFT or RL
training), rendered with the model's own chat template and answered greedily; a reply is correct when its
final number is the answer, the sum or the largest number (:class:`~llm_pipeline.rewards.numeric.NumericAnswerReward`,
the RL reward). The standard error ``sqrt(p (1 - p) / n)`` is reported with the accuracy, so a gate can ask
for a rise larger than it.
"""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import Field

from llm_pipeline.data.config import ArithmeticTaskFields
from llm_pipeline.eval.task import EvalTask, Metrics, Samples, TaskConfig, TaskContext


class ArithmeticConfig(ArithmeticTaskFields, TaskConfig):
    """``arithmetic_accuracy:`` section (the task's settings: give the RL stage's)."""

    num_problems: int = Field(
        1000, gt=0, description="Held-out problems scored (the first of the fixed order; ~1,000 at max_operand 99)."
    )
    max_new_tokens: int = Field(16, gt=0)
    batch_size: int = Field(64, gt=0, description="Prompts generated together (greedy).")


class ArithmeticAccuracyTask(EvalTask[ArithmeticConfig]):
    config_class = ArithmeticConfig
    headline = ("accuracy",)

    def run(self, ctx: TaskContext) -> tuple[Metrics, Samples]:
        from llm_pipeline.data.arithmetic import prompt_records, task_of
        from llm_pipeline.data.chat import ChatTemplate
        from llm_pipeline.data.chat_sources import pad_id_of
        from llm_pipeline.model.generate import generate
        from llm_pipeline.rewards.numeric import NumericAnswerReward

        cfg = self.cfg
        model, _ = ctx.model.get()
        if ctx.model.model_dir is None:
            raise ValueError("arithmetic_accuracy reads the model folder's chat template: pass a model directory")
        template = ChatTemplate.from_dir(Path(ctx.model.model_dir))
        stop = template.stop_token_ids()
        records = prompt_records("val", **task_of(cfg))[: cfg.num_problems]
        if ctx.limit is not None:
            records = records[: ctx.limit]
        ctx.budget.set_total(len(records), "arithmetic")
        reward = NumericAnswerReward()
        samples: Samples = []
        for i in range(0, len(records), cfg.batch_size):
            ctx.budget.check()
            batch = records[i : i + cfg.batch_size]
            prompts = [template.encode_prompt(r["messages"]) for r in batch]
            outs = generate(model, prompts, max_new_tokens=cfg.max_new_tokens, eos_token_ids=stop,
                            pad_token_id=pad_id_of(template))  # fmt: skip
            texts = [template.tokenizer.decode([t for t in o if t not in stop]) for o in outs]
            for rec, text, score in zip(batch, texts, reward(texts, batch), strict=True):
                samples.append({"id": rec["id"], "completion": text, "answer": rec["answer"], "correct": score == 1.0})
            ctx.budget.advance(len(batch))
        n = len(samples)
        acc = sum(s["correct"] for s in samples) / max(n, 1)
        return {"accuracy": acc, "stderr": math.sqrt(acc * (1 - acc) / max(n, 1)), "n": n}, samples
