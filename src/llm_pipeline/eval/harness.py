"""Any lm-evaluation-harness task on our checkpoints: registry names, groups, custom YAML tasks, suites.

lm-eval (``pip install llm-pipeline[lmeval]``, pinned) is used as a library. ``backend: pipeline`` puts
our model behind its ``LM`` interface (:class:`PipelineLM`): log-likelihoods by our batched scoring
(shared-context KV cache, :func:`~llm_pipeline.eval.loglik.loglikelihood_shared`), generation by our
KV-cache generator (stop strings, the chat template's end-of-turn token). ``backend: hf`` runs lm-eval's
own ``HFLM`` on the export, the reference our numbers are tested against (equal on the same checkpoint).
Tokenisation is the export's HF tokenizer in both, exactly as ``HFLM`` calls it.

Names in ``tasks`` are suites (``suites:`` of this section: named lists of tasks with their few-shot
settings and the metric each contributes to the suite average), or anything lm-eval's ``TaskManager``
knows, including YAML tasks under ``include_path`` that read local files. A name whose data cannot load
(an offline machine, a task lm-eval does not have) is recorded under ``unavailable`` with the reason and
left out of its suite's average: never scored 0. Suite entries with ``project:`` run one of the project's
own tasks (HumanEval in the sandbox) with ``settings``.

Numbers for gates (``results.json`` ``metrics.lm_eval``): ``<task>.<metric>`` (lm-eval's ``acc,none`` is
``acc``; another filter is appended, ``exact_match_strict-match``) and ``<suite>.average``. A task is keyed
by its entry (:func:`entry_keys`): its ``alias`` when set, else its name, with ``_<n>shot`` appended when
the run has it at several few-shot settings (``hellaswag_5shot`` of ``olmes_base`` next to ``hellaswag``
of ``quick``), so no run overwrites another; entries with the same key and settings run once.

``timeout_s`` holds inside a task: :class:`PipelineLM` checks the deadline between log-likelihood and
generation batches, and a project entry runs under a budget with the same deadline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from llm_pipeline.config import StrictModel
from llm_pipeline.eval.task import EvalTask, Metrics, Samples, TaskConfig, TaskContext, TaskUnavailable

log = logging.getLogger(__name__)

INSTALL_HINT = "lm-eval is not installed: pip install 'llm-pipeline[lmeval]' (pins lm-eval 0.4.13)"
#: The metric shown for a task when its suite entry names none: the first of these it reports.
PRIMARY_METRICS = (
    "acc_norm",
    "acc",
    "exact_match_flexible-extract",
    "exact_match",
    "prompt_level_loose_acc",
    "pass@1",
    "f1",
    "word_perplexity",
)


class SuiteEntry(StrictModel):
    """One task of a suite, with the settings the suite's source prescribes."""

    task: str | None = Field(None, description="lm-eval task or group name")
    project: str | None = Field(None, description="or a project task (e.g. humaneval: run in our sandbox)")
    num_fewshot: int | None = Field(None, ge=0, description="shots (None: the task's own default)")
    metric: str | None = Field(None, description="metric averaged into the suite (default: the task's primary)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="lm-eval task config keys to replace")
    settings: dict[str, Any] = Field(default_factory=dict, description="project task: its config section")
    alias: str | None = Field(None, description="the name its numbers go by (two entries of one project task)")
    note: str | None = Field(None, description="why this entry is set up this way")

    @property
    def name(self) -> str:
        return self.alias or self.task or self.project or "?"

    def model_post_init(self, _: Any) -> None:
        if (self.task is None) == (self.project is None):
            raise ValueError("a suite entry names exactly one of task (lm-eval) or project (a project task)")


class LMEvalConfig(TaskConfig):
    """lm-evaluation-harness tasks, groups, YAML tasks and suites."""

    timeout_s: float = Field(7200.0, gt=0, description="Wall-clock budget for this eval.")
    tasks: list[str] = Field(default_factory=list, description="suite names, lm-eval task/group names")
    include_path: list[str] = Field(default_factory=list, description="folders of custom lm-eval task YAMLs")
    backend: Literal["pipeline", "hf"] = Field(
        "pipeline", description="pipeline: our model and batched scoring; hf: lm-eval's HFLM on the export"
    )
    batch_size: int = Field(16, gt=0, description="contexts per forward (log-likelihood), prompts per generate")
    num_fewshot: int | None = Field(None, ge=0, description="shots for names outside a suite (default: task's)")
    apply_chat_template: bool = Field(False, description="wrap prompts in the model's chat template")
    offline: bool | None = Field(
        None, description="keep the HF hub offline (None: offline when the hub is unreachable from here)"
    )
    suites: dict[str, list[SuiteEntry]] = Field(default_factory=dict, description="named task lists")


def metric_key(name: str) -> str:
    """lm-eval's ``acc,none`` -> ``acc``; ``exact_match,strict-match`` -> ``exact_match_strict-match``."""
    metric, _, filt = name.partition(",")
    return metric if filt in ("", "none") else f"{metric}_{filt}"


def primary_metric(metrics: Mapping[str, Any]) -> str | None:
    return next((m for m in PRIMARY_METRICS if m in metrics), next(iter(metrics), None))


@contextlib.contextmanager
def _offline(on: bool) -> Iterator[None]:
    """HF hub and datasets offline for the run (a missing dataset fails at once instead of retrying)."""
    keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    if on:
        os.environ.update(dict.fromkeys(keys, "1"))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def lm_eval_version() -> str | None:
    """The installed lm-eval's version (None: not installed); also what ``results.json`` records as the host's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm-eval")
    except PackageNotFoundError:
        return None


def _settings(entry: SuiteEntry) -> tuple[Any, ...]:
    """What makes two runs of one task differ (the metric an entry averages does not)."""
    return entry.task, entry.project, entry.num_fewshot, repr(sorted(entry.overrides.items())), repr(entry.settings)


def entry_keys(entries: list[SuiteEntry]) -> list[str]:
    """The name each entry's numbers go by: its alias, else its task, with ``_<n>shot`` appended where the
    run has that task at several few-shot settings (the task's own default keeps the bare name). Two entries
    with one key must have the same settings (then they run once); anything else is refused, naming both."""
    shots: dict[str, set[int | None]] = {}
    for e in entries:
        if e.alias is None:
            shots.setdefault(e.name, set()).add(e.num_fewshot)
    keys: list[str] = []
    seen: dict[str, SuiteEntry] = {}
    for e in entries:
        key = e.name
        if e.alias is None and len(shots[key]) > 1 and e.num_fewshot is not None:
            key = f"{key}_{e.num_fewshot}shot"
        first = seen.setdefault(key, e)
        if first is not e and _settings(first) != _settings(e):
            raise ValueError(
                f"lm_eval: two entries of {key!r} have different settings ({first.model_dump(exclude_none=True)} "
                f"and {e.model_dump(exclude_none=True)}); give one of them an alias so their numbers stay apart"
            )
        keys.append(key)
    return keys


class LMEvalTask(EvalTask[LMEvalConfig]):
    """lm-eval tasks and suites as one project eval (``tasks: [lm_eval]``, ``--lm-eval NAMES``)."""

    config_class = LMEvalConfig
    headline = ()

    def unavailable(self) -> str | None:
        if lm_eval_version() is None:
            return INSTALL_HINT
        if not self.cfg.tasks:
            return "no lm-eval tasks named: set lm_eval.tasks or pass --lm-eval TASKS"
        return None

    def _entries(self) -> list[tuple[str | None, SuiteEntry]]:
        """(suite or None, entry) for every name in ``tasks``, suites expanded."""
        out: list[tuple[str | None, SuiteEntry]] = []
        for name in self.cfg.tasks:
            if name in self.cfg.suites:
                out += [(name, e) for e in self.cfg.suites[name]]
            else:
                out.append((None, SuiteEntry(task=name, num_fewshot=self.cfg.num_fewshot)))
        return out

    def run(self, ctx: TaskContext) -> tuple[Metrics, Samples]:
        if (why := self.unavailable()) is not None:
            raise TaskUnavailable(why)
        from llm_pipeline.eval.availability import hub_reachable

        offline = self.cfg.offline if self.cfg.offline is not None else not hub_reachable()
        limit = ctx.limit
        tasks: dict[str, dict[str, float]] = {}
        unavailable: dict[str, str] = {}
        samples: Samples = []
        entries = self._entries()
        keys = entry_keys([e for _, e in entries])
        runs = dict(zip(keys, (e for _, e in entries), strict=True))  # one run per key
        ctx.budget.set_total(len(runs))
        lm = None
        with _offline(offline):
            wanted = {e.task for e in runs.values() if e.task is not None}
            manager = task_manager(tuple(str(Path(p).resolve()) for p in self.cfg.include_path), wanted)
            for key, entry in runs.items():
                ctx.budget.check()
                if entry.project is not None:
                    got, why = self._run_project(entry, ctx)
                    if why:
                        unavailable[key] = why
                    else:
                        tasks[key] = got
                    ctx.budget.advance(1)
                    continue
                if lm is None:
                    lm = self._make_lm(ctx)
                spec: str | dict[str, Any] = entry.task or ""
                try:  # loading is where a missing dataset, package or task shows: this name only
                    if entry.overrides:
                        spec = _with_overrides(manager, str(entry.task), entry.overrides)
                    manager.load([spec])
                except Exception as e:
                    log.debug("lm-eval %s unavailable", key, exc_info=True)
                    unavailable[key] = _reason(e, offline)
                    ctx.budget.advance(1)
                    continue
                out = _simple_evaluate(lm, spec, manager, limit, self.cfg, entry.num_fewshot)  # errors: the run's
                # The entry's own task goes by its key; a group's subtasks by theirs, prefixed when the key differs.
                rename = {entry.task: key}
                for task, values in (out.get("results") or {}).items():
                    nums = {
                        metric_key(k): float(v)
                        for k, v in values.items()
                        if "_stderr" not in k and isinstance(v, int | float) and not isinstance(v, bool)
                    }
                    n = (out.get("n-samples") or {}).get(task, {}).get("effective")
                    if n is not None:
                        nums["n"] = float(n)
                    tasks[rename.get(task, task if key == entry.task else f"{key}:{task}")] = nums
                for task, recs in (out.get("samples") or {}).items():
                    name = rename.get(task, task if key == entry.task else f"{key}:{task}")
                    for rec in recs:
                        samples.append({"task": name, "doc_id": rec.get("doc_id"), "target": rec.get("target"),
                                        "resps": rec.get("filtered_resps"), **_sample_metrics(rec)})  # fmt: skip
                ctx.budget.advance(1)
        if not tasks:
            raise TaskUnavailable("; ".join(f"{k}: {v}" for k, v in unavailable.items()) or "nothing ran")
        suites: dict[str, dict[str, Any]] = {}
        for name in self.cfg.tasks:
            if name not in self.cfg.suites:
                continue
            used, missing = {}, []
            for (suite, entry), key in zip(entries, keys, strict=True):
                if suite != name:
                    continue
                vals = tasks.get(key)
                metric = entry.metric or (primary_metric(vals) if vals else None)
                if vals is None or metric is None or metric not in vals:
                    missing.append(key)
                else:
                    used[key] = vals[metric]
            suites[name] = {
                "average": sum(used.values()) / len(used) if used else None,
                "n_tasks": len(used),
                "of": len(self.cfg.suites[name]),
                "tasks": used,
                "unavailable": missing,
            }
        metrics: Metrics = {
            "backend": self.cfg.backend,
            "lm_eval_version": lm_eval_version(),
            "offline": offline,
            "tasks": tasks,
            "primary": {t: primary_metric(v) for t, v in tasks.items()},
            "suites": suites,
            "unavailable": unavailable,
        }
        return metrics, samples

    def _make_lm(self, ctx: TaskContext) -> Any:
        if self.cfg.backend == "hf":
            from lm_eval.models.huggingface import HFLM

            if ctx.model.model_dir is None:
                raise ValueError("backend hf needs the model's HF export folder")
            device = "cuda" if ctx.model.device in ("auto", "cuda") and _cuda() else ctx.model.device
            if device == "auto":
                device = "cpu"
            dtype = ctx.model.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
            return HFLM(pretrained=str(ctx.model.model_dir), batch_size=self.cfg.batch_size, device=device,
                        dtype=dtype)  # fmt: skip
        model, _ = ctx.model.get()
        return PipelineLM(model, ctx.model.model_dir, batch_size=self.cfg.batch_size, budget=ctx.budget)

    def _run_project(self, entry: SuiteEntry, ctx: TaskContext) -> tuple[dict[str, float], str | None]:
        from llm_pipeline.eval.task import make_task, task_class

        assert entry.project is not None
        try:
            task = make_task(entry.project, task_class(entry.project).config_class.model_validate(entry.settings))
        except ValueError as e:
            return {}, str(e)
        if why := task.unavailable():
            return {}, why
        # Its own progress counter (its run sets totals of its own), the lm_eval eval's deadline.
        metrics, _ = task.run(dataclasses.replace(ctx, budget=ctx.budget.child()))
        return {k: float(v) for k, v in task.scalars(metrics).items()}, None

    def scalars(self, metrics: Mapping[str, Any] | None) -> dict[str, float | int]:
        if not metrics:
            return {}
        out: dict[str, float | int] = {}
        for task, values in (metrics.get("tasks") or {}).items():
            out.update({f"{task}.{k}": v for k, v in values.items()})
        for suite, s in (metrics.get("suites") or {}).items():
            if s.get("average") is not None:
                out[f"{suite}.average"] = s["average"]
            out[f"{suite}.n_tasks"] = s.get("n_tasks", 0)
        return out

    def shown(self, scalars: Mapping[str, float | int]) -> list[str]:
        """Each suite's average, then each task's primary metric (``acc_norm``, ``exact_match``...)."""
        out = [k for k in scalars if k.endswith(".average")]
        tasks: dict[str, dict[str, float | int]] = {}
        for key, value in scalars.items():
            task, _, metric = key.partition(".")
            if metric and not key.endswith((".average", ".n_tasks")):
                tasks.setdefault(task, {})[metric] = value
        for task, values in tasks.items():
            if (m := primary_metric({k: v for k, v in values.items() if k != "n"})) is not None:
                out.append(f"{task}.{m}")
        return out

    def count(self, scalars: Mapping[str, float | int]) -> int | None:
        ns = [v for k, v in scalars.items() if k.endswith(".n")]
        return int(sum(ns)) if ns else None


@functools.lru_cache(maxsize=4)
def _manager(include_path: tuple[str, ...], defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path) or None, include_defaults=defaults)


def task_manager(include_path: tuple[str, ...], names: set[str]) -> Any:
    """lm-eval's task index, built once per process: over ``include_path`` alone when it defines every
    name asked for (indexing lm-eval's thousands of built-in YAMLs takes seconds), else with the built-ins."""
    if include_path:
        local = _manager(include_path, False)
        if names <= set(local.all_tasks) | set(getattr(local, "all_groups", [])):
            return local
    return _manager(include_path, True)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _sample_metrics(rec: Mapping[str, Any]) -> dict[str, Any]:
    skip = {"doc", "arguments", "resps", "filtered_resps", "doc_id", "target", "doc_hash", "prompt_hash",
            "target_hash"}  # fmt: skip
    return {k: v for k, v in rec.items() if k not in skip and isinstance(v, int | float | str | bool)}


def _reason(e: Exception, offline: bool) -> str:
    text = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    if isinstance(e, ImportError):
        missing = getattr(e, "name", None) or "a package"
        return f"needs the Python package {missing!r}, not installed here ({text}): pip install {missing}"
    if "unsafe" in text.lower() and "code" in text.lower():
        return f"runs model-written code ({text}); use the project's sandboxed task instead (project: humaneval)"
    if "not found" in text.lower() and "task" in text.lower():
        return f"not an lm-eval task or group here ({text}); add its YAML folder with --include-path"
    where = "this machine is offline and the data is not in the HF cache" if offline else "its data did not load"
    return f"{where} ({text}); point the task at local files with a YAML under --include-path"


def _with_overrides(manager: Any, name: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Task ``name``'s YAML config with ``overrides`` replacing its keys (lm-eval 0.4.13 builds a dict spec
    from the dict alone, so the registered config is read first)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(name)
    if entry is None or entry.yaml_path is None:
        raise KeyError(f"{name}: overrides need a YAML-defined lm-eval task (not a group or a Python task)")
    return {**load_yaml(entry.yaml_path, resolve_func=True), **overrides, "task": name}


def _simple_evaluate(
    lm: Any, spec: str | dict[str, Any], manager: Any, limit: int | None, cfg: LMEvalConfig, shots: int | None
) -> dict[str, Any]:
    import lm_eval

    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=[spec],
        num_fewshot=shots,
        limit=limit,
        task_manager=manager,
        log_samples=True,
        apply_chat_template=cfg.apply_chat_template,
        fewshot_as_multiturn=cfg.apply_chat_template,
        bootstrap_iters=0,
        confirm_run_unsafe_code=False,
        verbosity="ERROR",
    )
    if out is None:
        raise RuntimeError("lm-eval returned no results")
    return dict(out)


# --------------------------------------------------------------------------------------------
# Our model behind lm-eval's LM interface
# --------------------------------------------------------------------------------------------


def _template_lm() -> type:
    from lm_eval.api.model import TemplateLM

    return TemplateLM


def PipelineLM(model: Any, model_dir: str | os.PathLike[str] | None, **kwargs: Any) -> Any:
    """Our model as an lm-eval ``LM`` (the class is built on first use: lm-eval is an optional extra)."""
    return _pipeline_lm_class()(model, model_dir, **kwargs)


_CLASS: list[type] = []


def _pipeline_lm_class() -> type:
    if _CLASS:
        return _CLASS[0]
    from lm_eval.models.utils import handle_stop_sequences, postprocess_generated_text
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from llm_pipeline.eval.loglik import loglikelihood_shared
    from llm_pipeline.model.generate import generate

    class _PipelineLM(_template_lm()):  # type: ignore[misc]
        """loglikelihood / loglikelihood_rolling / generate_until with our scoring and generation."""

        def __init__(self, model: Any, model_dir: Any, *, batch_size: int = 16, budget: Any = None) -> None:
            super().__init__()
            from transformers import AutoTokenizer

            if model_dir is None:
                raise ValueError("the lm_eval task needs the model's folder (its HF tokenizer)")
            self.model = model.eval()
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
            self.batch_size_ = batch_size
            self.budget = budget
            self.max_length = int(model.config.max_position_embeddings)
            self.eos_ids = _eos_ids(Path(model_dir), self.tokenizer)

        @property
        def eot_token_id(self) -> int:
            return int(self.tokenizer.eos_token_id)

        @property
        def prefix_token_id(self) -> int:
            bos = self.tokenizer.bos_token_id
            return int(bos if bos is not None else self.tokenizer.eos_token_id)

        @property
        def tokenizer_name(self) -> str:
            return str(getattr(self.tokenizer, "name_or_path", "pipeline")).replace("/", "__")

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
            kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
            bos = self.tokenizer.decode(self.prefix_token_id)
            if add_special_tokens is None and bos and string.startswith(bos):
                kw = {"add_special_tokens": False}
            ids = self.tokenizer.encode(string, **kw)
            left = kwargs.get("left_truncate_len")
            return list(ids[-left:] if left else ids)

        def _loglikelihood_tokens(self, requests: list[Any], **kwargs: Any) -> list[tuple[float, bool]]:
            pairs = [(ctx, cont) for _, ctx, cont in requests]
            return loglikelihood_shared(
                self.model, pairs, batch_size=self.batch_size_, max_length=self.max_length, budget=self.budget
            )

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
            windows, owner = [], []
            for i, (string,) in enumerate(req.args for req in requests):
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ):
                    windows.append(make_disjoint_window(w))
                    owner.append(i)
            scores = loglikelihood_shared(
                self.model, windows, batch_size=self.batch_size_, max_length=self.max_length, budget=self.budget
            )
            totals = [0.0] * len(requests)
            for i, (ll, _) in zip(owner, scores, strict=True):
                totals[i] += ll
            return totals

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            """Greedy (or sampled) batched KV-cache generation, grouped by generation settings."""
            eos_text = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
            results: list[str] = [""] * len(requests)
            groups: dict[str, list[int]] = {}
            for i, req in enumerate(requests):
                groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
            for idxs in groups.values():
                kwargs = dict(requests[idxs[0]].args[1])
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
                max_gen = int(kwargs.pop("max_gen_toks", 256))
                temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
                if kwargs.pop("do_sample", None) is False:
                    temperature = 0.0
                top_p = float(kwargs.pop("top_p", 1.0) or 1.0)
                room = self.max_length - max_gen
                encoded = {i: self.tok_encode(requests[i].args[0])[-room:] for i in idxs}
                order = sorted(idxs, key=lambda i: -len(encoded[i]))  # like HFLM: longest first
                for start in range(0, len(order), self.batch_size_):
                    if self.budget is not None:
                        self.budget.check()
                    batch = order[start : start + self.batch_size_]
                    outs = generate(
                        self.model,
                        [encoded[i] for i in batch],
                        max_new_tokens=max_gen,
                        temperature=temperature,
                        top_p=top_p,
                        eos_token_ids=self.eos_ids,
                        pad_token_id=int(self.tokenizer.pad_token_id or 0),
                        seed=0 if temperature > 0 else None,
                        stop_fn=_stop_fn(self.tokenizer, until),
                    )
                    for i, toks in zip(batch, outs, strict=True):
                        text = self.tokenizer.decode(toks, skip_special_tokens=True)
                        results[i] = postprocess_generated_text(generation=text, stop=until, think_end_token=None)
            return results

        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            return str(
                self.tokenizer.apply_chat_template(
                    chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
                )
            )

    _CLASS.append(_PipelineLM)
    return _PipelineLM


def _stop_fn(tokenizer: Any, until: list[str]) -> Any:
    def stop(_row: int, new: list[int]) -> bool:
        text = tokenizer.decode(new[-32:], skip_special_tokens=False)
        return any(s and s in text for s in until)

    return stop


def _eos_ids(model_dir: Path, tokenizer: Any) -> list[int]:
    """The export's generation EOS ids (the tokenizer's EOS and the chat template's end-of-turn), as
    ``HFLM``'s ``model.generate`` reads them from ``generation_config.json``."""
    import json

    ids: list[int] = []
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id")
        ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not ids and tokenizer.eos_token_id is not None:
        ids = [int(tokenizer.eos_token_id)]
    return ids
