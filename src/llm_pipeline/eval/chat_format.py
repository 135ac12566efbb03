"""Chat-format compliance on held-out standard-library questions: what SFT teaches a small model.

Each question ("What does ``json.dumps`` do?", the SFT data's own wording) is about a function of the
held-out modules (never trained on), shown through the model's chat template as one user turn and
answered greedily. ``format_rate``: the share of answers that are non-empty and end the assistant turn
with the template's end-of-turn token (``<|end|>``) within ``max_new_tokens``, which a pretrained model
never does and an SFT model learns within minutes; ``answer_f1``: word overlap with the function's
docstring summary (the SFT target); ``exact_match``: the summary itself. Offline: the questions come
from this Python's standard library, like the demo's SFT data.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from pydantic import Field

from llm_pipeline.eval.task import EvalTask, Metrics, Samples, TaskConfig, TaskContext


class ChatFormatConfig(TaskConfig):
    """Held-out stdlib questions answered through the chat template."""

    timeout_s: float = Field(600.0, gt=0, description="Wall-clock budget for this eval.")
    held_out_modules: list[str] | None = Field(
        None,
        description="modules whose functions are asked about (default: in a pipeline, the modules every stdlib "
        "source of the run holds out, the data step's and the stages'; alone, data.config.HELD_OUT_MODULES)",
    )
    questions: int = Field(32, gt=0, description="questions asked (the suite's limit caps it too)")
    max_new_tokens: int = Field(48, gt=0)
    batch_size: int = Field(16, gt=0)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def word_f1(pred: str, ref: str) -> float:
    """SQuAD-style F1 over lower-cased words."""
    p, r = _words(pred), _words(ref)
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r or not common:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def held_out_questions(modules: list[str] | None, n: int) -> list[tuple[str, str]]:
    """(question, reference answer) for ``n`` held-out functions, spread over the modules (deterministic)."""
    from llm_pipeline.data.config import HELD_OUT_MODULES
    from llm_pipeline.data.stdlib_chat import stdlib_functions
    from llm_pipeline.hashing import hash64

    mods = modules if modules is not None else list(HELD_OUT_MODULES)
    fns = [f for f in stdlib_functions(mods) if f.split == "val"]
    fns.sort(key=lambda f: hash64("chat_format" + f.dotted))
    return [(f"What does `{f.dotted}` do?", f.summary) for f in fns[:n]]  # the SFT data's wording


class ChatFormatTask(EvalTask[ChatFormatConfig]):
    """Answer-format compliance and answer overlap on held-out questions."""

    config_class = ChatFormatConfig
    headline = ("format_rate", "answer_f1")

    def run(self, ctx: TaskContext) -> tuple[Metrics, Samples]:
        from llm_pipeline.data.chat import end_of_turn_token, read_chat_template, special_tokens_map
        from llm_pipeline.eval.safety import prompt_formatter
        from llm_pipeline.model.generate import DEFAULT_STOP_TOKENS, encode_prompt, generate

        model, tok = ctx.model.get()
        n = min(self.cfg.questions, ctx.limit or self.cfg.questions)
        qa = held_out_questions(self.cfg.held_out_modules, n)
        if not qa:
            raise ValueError("chat_format: no documented functions in the held-out modules")
        fmt = prompt_formatter("auto", ctx.model.model_dir)
        template = read_chat_template(ctx.model.model_dir) if ctx.model.model_dir is not None else None
        specials = [t for t in tok.get_vocab() if t.startswith("<|") and t.endswith("|>")]
        variables = special_tokens_map(ctx.model.model_dir) if template else {}
        end = (end_of_turn_token(template, specials, variables) if template else None) or "<|end|>"
        end_id = tok.token_to_id(end)
        stops = [i for i in (tok.token_to_id(t) for t in (end, *DEFAULT_STOP_TOKENS)) if i is not None]
        pad = tok.token_to_id("<|pad|>") or 0
        ctx.budget.set_total(len(qa), "generate")
        samples: Samples = []
        limit = model.config.max_position_embeddings
        for start in range(0, len(qa), self.cfg.batch_size):
            ctx.budget.check()
            chunk = qa[start : start + self.cfg.batch_size]
            prompts = [encode_prompt(tok, fmt(q))[-(limit - self.cfg.max_new_tokens) :] for q, _ in chunk]
            outs = generate(model, prompts, max_new_tokens=self.cfg.max_new_tokens, eos_token_ids=stops,
                            pad_token_id=pad)  # fmt: skip
            for (q, ref), new in zip(chunk, outs, strict=True):
                ended = bool(new) and new[-1] == end_id
                text = tok.decode(new[:-1] if new and new[-1] in stops else new).strip()
                samples.append({
                    "question": q, "reference": ref, "completion": text, "ended_turn": ended,
                    "formatted": ended and bool(text), "f1": word_f1(text, ref),
                    "exact": " ".join(_words(text)) == " ".join(_words(ref)),
                })  # fmt: skip
            ctx.budget.advance(len(chunk))
        metrics: dict[str, Any] = {
            "format_rate": sum(s["formatted"] for s in samples) / len(samples),
            "answer_f1": sum(s["f1"] for s in samples) / len(samples),
            "exact_match": sum(s["exact"] for s in samples) / len(samples),
            "n": len(samples),
            "end_token": end,
        }
        return metrics, samples
