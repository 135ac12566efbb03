"""A complete evaluation task written outside the package: the registry test adds it with one call.

Next-token accuracy on the lines of a text file: for each line, the share of its tokens the model
predicts exactly (greedy, teacher-forced). Its config is a section ``next_token:`` of the eval config.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from llm_pipeline.eval.availability import missing_files
from llm_pipeline.eval.task import EvalTask, Metrics, Samples, TaskConfig, TaskContext


class NextTokenConfig(TaskConfig):
    file: str = Field("", description="text file, one scored line per line")
    timeout_s: float = 600.0


class NextTokenTask(EvalTask[NextTokenConfig]):
    config_class = NextTokenConfig
    headline = ("accuracy",)

    def unavailable(self) -> str | None:
        if not self.cfg.file:
            return "no text to score: set next_token.file"
        missing = missing_files([self.cfg.file])
        return f"not found: {missing[0]}" if missing else None

    def run(self, ctx: TaskContext) -> tuple[Metrics, Samples]:
        import torch

        model, tokenizer = ctx.model.get()
        lines = [x for x in Path(self.cfg.file).read_text(encoding="utf-8").splitlines() if x.strip()][: ctx.limit]
        ctx.budget.set_total(len(lines), "score")
        samples, hits, total = [], 0, 0
        for line in lines:
            ctx.budget.check()
            ids = tokenizer.encode(line, add_special_tokens=False).ids
            if len(ids) < 2:
                continue
            with torch.no_grad():
                logits = model(torch.tensor([ids]))[0, :-1]
            right = int((logits.argmax(-1) == torch.tensor(ids[1:])).sum())
            hits, total = hits + right, total + len(ids) - 1
            samples.append({"line": line, "correct": right, "tokens": len(ids) - 1})
            ctx.budget.advance()
        return {"accuracy": hits / total if total else float("nan"), "n": len(samples), "tokens": total}, samples
