"""Typed configuration of the evaluation suite (``llm-pipeline eval --config eval.yaml``).

The suite's settings (``tasks``, ``limit``, ``device``...) are fields here; every registered task
(:data:`llm_pipeline.eval.task.EVAL_TASKS`) adds a section of its own name, validated by the task's
``config_class`` (each with a wall-clock ``timeout_s``). A section for an unregistered name is an
unknown key, and a ``tasks:`` entry that names no registered task is refused with the known names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticKnownError

from llm_pipeline.config import StrictModel
from llm_pipeline.eval.task import DEFAULT_TASKS, EVAL_TASKS, TaskConfig, task_class, unknown_task_message


@dataclass(frozen=True)
class _Section:
    """A registered task's raw section on its way to that task's config class (extra keys are validated
    without their name: the name travels with the value)."""

    name: str
    raw: Any


def _validate_section(value: Any, info: ValidationInfo) -> Any:
    if isinstance(value, _Section):
        name, raw = value.name, value.raw
    elif info.field_name in EVAL_TASKS:  # an assignment: cfg.mmlu = {...} or a MultipleChoiceConfig
        name, raw = info.field_name, value
    else:  # a key that is neither a setting nor a registered task
        raise PydanticKnownError("extra_forbidden")
    return task_class(name).config_class.model_validate(raw)


class EvalConfig(StrictModel):
    """The whole evaluation run: the suite's settings and one section per registered task."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, protected_namespaces=())
    # Task sections are validated by their task's config class (errors keep their key path: mmlu.batch_size).
    __pydantic_extra__: dict[str, Annotated[Any, BeforeValidator(_validate_section)]]

    tasks: list[str] = Field(default_factory=lambda: list(DEFAULT_TASKS), description="Evals to run.")
    limit: int | None = Field(None, gt=0, description="At most this many samples per eval (problems, questions...).")
    device: str = Field("auto", description="'auto' (cuda if present), 'cpu', 'cuda', 'cuda:1'...")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="Default: bf16 on GPU, fp32 on CPU."
    )
    seed: int = 0
    expect: dict[str, str] = Field(
        default_factory=dict,
        description="What a task is expected to show in this run, shown on the report card next to its row "
        "(e.g. mmlu: 'flat: model too small'): a task that cannot move is kept and labelled, not dropped",
    )

    @model_validator(mode="before")
    @classmethod
    def _sections(cls, data: Any, info: ValidationInfo) -> Any:
        """Every registered task gets its section (defaults when absent), in registry order."""
        if not isinstance(data, dict):
            return data
        if info.field_name is not None:  # an assignment: only the assigned value is validated
            return data
        out = {k: v for k, v in data.items() if k in cls.model_fields}
        for name in EVAL_TASKS:
            if name in cls.model_fields:
                raise ValueError(f"eval task {name!r} has the name of an eval setting; register it under another")
            out[name] = _Section(name, data.get(name, {}))
        out.update({k: v for k, v in data.items() if k not in out})  # unknown keys: refused by _validate_section
        return out

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        for name in tasks:
            if name not in EVAL_TASKS:
                raise ValueError(unknown_task_message(name))
        return tasks

    @field_validator("expect")
    @classmethod
    def _known_expect(cls, expect: dict[str, str]) -> dict[str, str]:
        for name in expect:
            if name not in EVAL_TASKS:
                raise ValueError(f"expect: {unknown_task_message(name)}")
        return expect

    @classmethod
    def extra_fields(cls) -> dict[str, Any]:
        """The task sections' keys and config classes (read by config error messages: allowed keys, hints)."""
        return {name: task_class(name).config_class for name in EVAL_TASKS}

    def section(self, name: str) -> TaskConfig:
        """Task ``name``'s settings (its defaults if this config was built before the task was registered)."""
        value = (self.__pydantic_extra__ or {}).get(name)
        return value if isinstance(value, TaskConfig) else task_class(name).config_class()
