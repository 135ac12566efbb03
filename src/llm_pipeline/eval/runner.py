"""Run the selected evals on one model directory, each under its own wall-clock budget.

``run_evals(model_dir, cfg, output=...)`` is the library entry point (the CLI and the demo call it).
It writes ``results.json`` (updated after every eval, so a crash loses nothing finished), one
``samples/<task>.jsonl`` per eval and the resolved ``eval_config.yaml``, shows a progress bar per
eval and prints a summary table. An eval that runs out of time is reported as ``timed_out`` with
how far it got, never as a zero score; an eval that fails is reported as ``error``; the others run.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from llm_pipeline.config import config_to_dict, load_config, save_config, validate_config
from llm_pipeline.eval.budget import Budget, EvalTimeout
from llm_pipeline.eval.config import EvalConfig, MultipleChoiceConfig

log = logging.getLogger(__name__)

HEADLINE = {
    "perplexity": "bits_per_byte",
    "mmlu": "accuracy",
    "arc": "accuracy_norm",
    "hellaswag": "accuracy_norm",
    "humaneval": "pass@1",
    "safety": "refusal_rate",
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ModelHandle:
    """Loads the model and tokenizer on first use, so model-free runs (HumanEval samples) need neither."""

    def __init__(self, model_dir: str | Path | None, cfg: EvalConfig, model: Any = None, tokenizer: Any = None):
        self.model_dir = model_dir
        self.cfg = cfg
        self._model = model
        self._tokenizer = tokenizer

    def get(self) -> tuple[Any, Any]:
        if self._model is None:
            if self.model_dir is None:
                raise ValueError("this eval needs a model: pass a checkpoint directory")
            from llm_pipeline.checkpoint.hf import load_pretrained

            root = Path(self.model_dir)
            if (root / ".metadata").is_file() and not (root / "config.json").is_file():
                raise ValueError(
                    f"{root} is a training (DCP) checkpoint; evals read HF model directories: "
                    f"export it first (llm-pipeline export {root} OUT_DIR)"
                )
            device = resolve_device(self.cfg.device)
            dtype = self.cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32")
            self._model = load_pretrained(self.model_dir, device=device, dtype=dtype).eval()
        if self._tokenizer is None:
            if self.model_dir is None:
                raise ValueError("a tokenizer is needed: pass a checkpoint directory with tokenizer.json")
            from llm_pipeline.data.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_dir)
        return self._model, self._tokenizer

    def completer(
        self,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_strings: tuple[str, ...] | list[str] = (),
        seed: int = 0,
    ) -> Callable[[list[str]], list[str]]:
        """``prompts -> completions`` by batched KV-cache generation; prompts too long for the context get ''."""
        from llm_pipeline.model.generate import encode_prompt, generate_text

        model, tok = self.get()
        ctx = model.config.max_position_embeddings
        calls = [0]

        def complete(prompts: list[str]) -> list[str]:
            lengths = [len(encode_prompt(tok, p)) for p in prompts]
            fit = [i for i, n in enumerate(lengths) if n < ctx]
            out = [""] * len(prompts)
            if fit:
                room = ctx - max(lengths[i] for i in fit)
                texts = generate_text(
                    model,
                    tok,
                    [prompts[i] for i in fit],
                    stop_strings=tuple(stop_strings),
                    max_new_tokens=min(max_new_tokens, room),
                    temperature=temperature,
                    top_p=top_p,
                    seed=seed + calls[0] if temperature > 0 else None,
                )
                for i, t in zip(fit, texts, strict=True):
                    out[i] = t
            calls[0] += 1
            return out

        return complete


def _run_task(task: str, cfg: EvalConfig, handle: ModelHandle, budget: Budget) -> tuple[dict, list[dict]]:
    limit = cfg.limit
    if task == "perplexity":
        from llm_pipeline.eval.perplexity import run_perplexity

        model, tok = handle.get()
        return run_perplexity(cfg.perplexity, model, tok, limit=limit, budget=budget)
    if task in ("mmlu", "arc", "hellaswag"):
        from llm_pipeline.eval import multiple_choice as mc

        sub: MultipleChoiceConfig = getattr(cfg, task)
        build = {"mmlu": mc.mmlu_questions, "arc": mc.arc_questions, "hellaswag": mc.hellaswag_questions}[task]
        questions = build(sub, limit)
        model, tok = handle.get()
        return mc.score_questions(
            model, tok, questions, batch_size=sub.batch_size, max_length=sub.max_length, budget=budget
        )
    if task == "humaneval":
        from llm_pipeline.eval.humaneval import run_humaneval

        he = cfg.humaneval
        complete = None
        if not he.samples:
            complete = handle.completer(
                max_new_tokens=he.max_new_tokens,
                temperature=he.temperature,
                top_p=he.top_p,
                stop_strings=he.stop_strings,
                seed=cfg.seed,
            )
        return run_humaneval(he, complete, limit=limit, budget=budget)
    if task == "safety":
        from llm_pipeline.eval.safety import run_safety

        complete = handle.completer(max_new_tokens=cfg.safety.max_new_tokens, seed=cfg.seed)
        return run_safety(cfg.safety, complete, limit=limit, budget=budget, model_dir=handle.model_dir)
    raise ValueError(f"unknown eval task {task!r}")


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def resolve_config(cfg: EvalConfig | Mapping[str, Any] | str | os.PathLike[str] | None) -> EvalConfig:
    """An ``EvalConfig`` from itself, a mapping, a YAML path, or None (all defaults)."""
    if isinstance(cfg, EvalConfig):
        return cfg
    if cfg is None:
        return EvalConfig()
    if isinstance(cfg, Mapping):
        return validate_config(EvalConfig, cfg, "<eval config>")
    return load_config(EvalConfig, cfg)


def run_evals(
    model_dir: str | os.PathLike[str] | None,
    cfg: EvalConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    *,
    output: str | os.PathLike[str] | None = None,
    model: Any = None,
    tokenizer: Any = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run ``cfg.tasks`` on the HF model directory ``model_dir``; returns (and writes) the results dict.

    ``results["tasks"][name]`` holds ``status`` (ok / partial / timed_out / error), ``metrics`` (None when
    timed out or failed; a ``partial`` eval scored only part of its data, e.g. HumanEval samples for
    some problems),
    ``wall_s``, ``progress`` and ``samples_file``. ``model``/``tokenizer`` may be passed in already loaded.
    ``cfg`` may be an ``EvalConfig``, a mapping of its fields, or a YAML path (``configs/demo/eval.yaml``).
    Loading the model is not charged to any eval's budget.
    """
    cfg = resolve_config(cfg)
    console = console or Console(stderr=True)
    out_dir = Path(output) if output is not None else None
    if out_dir is not None:
        (out_dir / "samples").mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "eval_config.yaml")
    handle = ModelHandle(Path(model_dir) if model_dir is not None else None, cfg, model, tokenizer)
    results: dict[str, Any] = {
        "model": str(model_dir) if model_dir is not None else None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": str(resolve_device(cfg.device)),
        },
        "metrics": {},  # {task: {"status": ..., numbers...}}: what promotion gates read (e.g. mmlu.accuracy)
        "tasks": {},
        "config": config_to_dict(cfg),
    }
    with Progress(
        TextColumn("{task.description:<24}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        for task in dict.fromkeys(cfg.tasks):  # keep order, drop duplicates
            bar = progress.add_task(task, total=None)

            def on_progress(done: int, total: int | None, phase: str, _bar: Any = bar, _task: str = task) -> None:
                label = f"{_task} [{phase}]" if phase else _task
                progress.update(_bar, completed=done, total=total, description=label)

            timeout_s = getattr(cfg, task).timeout_s
            budget = Budget(timeout_s, on_progress=on_progress)
            entry: dict[str, Any] = {"status": "ok", "metrics": None, "timeout_s": timeout_s}
            samples: list[dict[str, Any]] = []
            start = time.monotonic()
            try:
                if not (task == "humaneval" and cfg.humaneval.samples):  # samples are scored without a model
                    handle.get()  # load once, before the budget starts
                    budget = Budget(timeout_s, on_progress=on_progress)
                entry["metrics"], samples = _run_task(task, cfg, handle, budget)
                if isinstance(entry["metrics"], dict) and entry["metrics"].get("partial"):
                    m = entry["metrics"]
                    entry.update(
                        status="partial",
                        warning=f"scored {m['problems_scored']} of {m['problems_expected']} problems; promotion "
                        "gates treat a partial result as missing unless the rule sets allow_partial",
                    )
            except EvalTimeout as e:
                entry.update(status="timed_out", error=str(e))
            except Exception as e:  # one broken eval (bad data, OOM...) must not stop the others
                log.debug("eval %s failed", task, exc_info=True)
                entry.update(status="error", error=f"{type(e).__name__}: {e}")
            entry["wall_s"] = round(time.monotonic() - start, 3)
            entry["progress"] = {"completed": budget.completed, "total": budget.total, "phase": budget.phase}
            if out_dir is not None and samples:
                path = out_dir / "samples" / f"{task}.jsonl"
                with path.open("w", encoding="utf-8") as f:
                    f.writelines(json.dumps(s, default=str) + "\n" for s in samples)
                entry["samples_file"] = str(path.relative_to(out_dir))
            results["tasks"][task] = entry
            results["metrics"][task] = {"status": entry["status"], **summary_metrics(task, entry["metrics"])}
            progress.update(bar, description=f"{task} [{entry['status']}]")
            progress.stop_task(bar)
            if out_dir is not None:
                _write_json(out_dir / "results.json", results)
    console.print(summary_table(results))
    for task, entry in results["tasks"].items():
        if entry["status"] != "ok":
            detail = entry.get("error") or entry.get("warning", "")
            console.print(f"[yellow]{task}: {entry['status']}: {detail}[/yellow]", soft_wrap=True)  # one line
    return results


def summary_metrics(task: str, metrics: dict[str, Any] | None) -> dict[str, float | int]:
    """The scalar metrics of an eval (perplexity: those of its first source), for gates and reports."""
    if not metrics:
        return {}
    if task == "perplexity":
        metrics = next((v for v in metrics.values() if isinstance(v, dict)), {})
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def headline(task: str, metrics: dict[str, Any] | None) -> tuple[str, float | None]:
    """The one number shown for an eval (for perplexity: the first source's bits per byte)."""
    name = HEADLINE.get(task, "")
    if not metrics:
        return name, None
    if task == "perplexity":
        first = next(iter(metrics.values()), {})
        return name, first.get(name) if isinstance(first, dict) else None
    value = metrics.get(name)
    return name, value if isinstance(value, (int, float)) else None


def summary_table(results: dict[str, Any]) -> Table:
    table = Table(title=f"eval: {results.get('model') or 'samples'}")
    for col in ("eval", "status", "metric", "value", "n", "time"):
        table.add_column(col, justify="right" if col in ("value", "n", "time") else "left")
    for task, entry in results["tasks"].items():
        name, value = headline(task, entry.get("metrics"))
        m = summary_metrics(task, entry.get("metrics"))
        n = m.get("n") or m.get("n_samples") or m.get("documents") or (m.get("n_harmful", 0) + m.get("n_benign", 0))
        prog = entry.get("progress") or {}
        if entry["status"] != "ok":
            n = f"{prog.get('completed', 0)}/{prog.get('total') if prog.get('total') is not None else '?'}"
        shown = "-" if value is None else f"{value:.4f}"
        table.add_row(task, entry["status"], name, shown, str(n), f"{entry['wall_s']:.1f}s")
    return table
