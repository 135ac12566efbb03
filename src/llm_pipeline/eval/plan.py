"""What ``llm-pipeline eval`` evaluates: the model folder, the config with the command line's settings,
and, when the user named neither a config nor tasks, the tasks that can run on this machine.

:func:`evaluate` is the command's one call. A model folder that does not exist is answered with the run
folders that hold a model of that name (``checkpoints/dpo_final`` -> ``runs/demo/checkpoints/dpo_final``);
a task that cannot run here is recorded in ``results.json`` as ``unavailable`` with the reason and the fix.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console

from llm_pipeline.config import load_config, parse_override
from llm_pipeline.eval.config import EvalConfig
from llm_pipeline.eval.results import EvalResults
from llm_pipeline.eval.runner import run_evals
from llm_pipeline.eval.task import EVAL_TASK_FLAGS, EVAL_TASKS, make_task, task_names
from llm_pipeline.runs import RUNS_DIR, find_runs, is_run_dir

DEFAULT_CONFIG = "configs/eval.yaml"


def _say(text: str) -> None:
    print(text, file=sys.stderr)


def missing_model_message(path: str | os.PathLike[str], runs_dir: str | os.PathLike[str] = RUNS_DIR) -> str:
    """``PATH: not a model directory``, with the run folders' models of that name (a pipeline run keeps
    its models in ``runs/<name>/checkpoints/``) or, failing that, the models the runs here hold."""
    p = Path(path)
    runs = find_runs(runs_dir)
    same = [r / p for r in runs if not p.is_absolute() and (r / p / "config.json").is_file()]
    same += [m for r in runs if (m := r / "checkpoints" / p.name) not in same and (m / "config.json").is_file()]
    msg = f"{path}: not a model directory"
    if same:
        return msg + f"; did you mean {' or '.join(map(str, same))}? (pipeline runs keep their models in " \
            f"{Path(runs_dir)}/<run>/checkpoints/)"  # fmt: skip
    models = [m for r in runs for m in sorted((r / "checkpoints").glob("*_final")) if (m / "config.json").is_file()]
    if models:
        shown = ", ".join(map(str, models[:6])) + (", ..." if len(models) > 6 else "")
        msg += f"; models in the run folders here: {shown}"
    return msg + " (to score HumanEval samples without a model: llm-pipeline eval humaneval --samples FILE)"


def _check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise FileNotFoundError(missing_model_message(model_dir))
    if not (model_dir / "config.json").is_file():
        from llm_pipeline.checkpoint.dcp import is_training_checkpoint

        hint = (
            f"a training checkpoint: export it first (llm-pipeline export {model_dir} OUT_DIR)"
            if is_training_checkpoint(model_dir)
            else "no config.json"
        )
        raise FileNotFoundError(f"{model_dir}: not an HF model directory ({hint})")


def plan_tasks(
    cfg: EvalConfig, model_dir: Path, *, config_name: str | None = None, user_keys: Iterable[str] = ()
) -> tuple[EvalConfig, dict[str, str]]:
    """No config and no tasks named: (the config, {task: why it cannot run here}) for this machine.

    A task unavailable as configured takes its settings from the run folder the model belongs to
    (perplexity: the run's held-out split), except the keys the user set (``user_keys``, dotted).
    Raises ValueError when no task can run.
    """
    _say(f"eval: no --config: using {config_name or 'the built-in defaults'}; evals that cannot run here are "
         "skipped (name them with --tasks to run them anyway)")  # fmt: skip
    run = next((p for p in model_dir.resolve().parents if is_run_dir(p)), None)
    given = set(user_keys)
    unavailable: dict[str, str] = {}
    for name in dict.fromkeys(cfg.tasks):
        task = make_task(name, cfg.section(name))
        if task.unavailable() and run is not None:
            adopted = {k: v for k, v in task.run_defaults(run).items() if f"{name}.{k}" not in given}
            if adopted:
                section = cfg.section(name).model_copy(update=adopted)
                if make_task(name, section).unavailable() is None:
                    cfg = cfg.model_copy(update={name: section})
                    settings = ", ".join(f"{k}={v}" for k, v in adopted.items())
                    _say(f"eval: {name}: {settings} (from the run this model belongs to, {run})")
        why = make_task(name, cfg.section(name)).unavailable()
        if why:
            _say(f"eval: skipping {name}: {why}")
            unavailable[name] = why
    if len(unavailable) == len(dict.fromkeys(cfg.tasks)):
        raise ValueError("no evaluation can run here with these settings (see the reasons above)")
    return cfg, unavailable


def evaluate(
    checkpoint: str,
    *,
    config: str | None = None,
    tasks: list[str] | None = None,
    selected: Iterable[str] = (),
    sets: Iterable[str] = (),
    overrides: Mapping[str, Any] | None = None,
    timeout_s: float | None = None,
    output: str | None = None,
    console: Console | None = None,
) -> EvalResults:
    """``llm-pipeline eval CHECKPOINT``: resolve what to run, run it, say where the results are.

    ``checkpoint`` is an HF model folder, or the name of a task configured to score without a model
    (``humaneval`` with ``humaneval.samples``). ``overrides`` are dotted config keys (None: not given),
    ``sets`` the ``--set KEY=VALUE`` strings, ``timeout_s`` replaces every task's budget. Without ``config``
    and ``tasks``: ``configs/eval.yaml`` when present, and only the tasks that can run here. ``selected``
    are tasks a command-line shorthand chose (a flag with ``selects``: ``--lm-eval NAMES`` runs the
    ``lm_eval`` eval), run with ``tasks`` or alone.
    """
    sets = list(sets)
    for name in dict.fromkeys(selected):
        tasks = [*(tasks or []), name]
        if (
            config is None
            and Path(DEFAULT_CONFIG).is_file()
            and any(f.reads_default_config for f in EVAL_TASK_FLAGS.get(name, ()))
        ):
            config = DEFAULT_CONFIG  # what the flag's values name is defined there (lm_eval.suites)
    model_free = checkpoint in EVAL_TASKS and not Path(checkpoint).is_dir()
    if model_free:
        tasks = [checkpoint]
    flat: dict[str, Any] = {"tasks": tasks, **(overrides or {})}
    if timeout_s is not None:
        flat.update({f"{name}.timeout_s": timeout_s for name in task_names()})
    planned = config is None and tasks is None
    if planned and Path(DEFAULT_CONFIG).is_file():
        config = DEFAULT_CONFIG
    cfg = load_config(EvalConfig, config, sets, **flat)
    model_dir = None if model_free else Path(checkpoint)
    if model_dir is None:
        task = make_task(checkpoint, cfg.section(checkpoint))
        if task.needs_model():
            raise FileNotFoundError(missing_model_message(checkpoint))
        if why := task.unavailable():
            raise FileNotFoundError(f"{checkpoint}: {why}")
    else:
        _check_model_dir(model_dir)
    unavailable: dict[str, str] = {}
    if planned and model_dir is not None:
        user_keys = {k for k, v in flat.items() if v is not None} | {".".join(parse_override(s)[0]) for s in sets}
        cfg, unavailable = plan_tasks(cfg, model_dir, config_name=config, user_keys=user_keys)
    if model_dir is not None:
        name = model_dir.resolve().name
    else:
        source = getattr(cfg.section(checkpoint), "samples", None)
        name = f"samples-{Path(source).stem}" if source else checkpoint
    out = Path(output) if output else Path("evals") / name
    results = run_evals(model_dir, cfg, output=out, console=console, unavailable=unavailable)
    print(f"results: {out / 'results.json'}")
    return results
