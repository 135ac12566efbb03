"""Pre-flight: everything a multi-day run needs, checked in seconds before it starts (nothing large allocated).

``run_preflight(config)`` takes a pipeline config (``configs/pipeline.yaml``) or one stage's config
(``configs/pretrain.yaml``; the kind is detected) and returns a list of :class:`Check` (ok / warn /
BLOCKER): Python, torch, CUDA and NCCL versions; the GPUs and their FP8 capability; the training memory
estimate of every stage against GPU (or, on CPU, host) memory, with the settings that would fit; disk
space against the checkpoints and exports the run will write; the data, tokenizer and starting model of
every stage (present, or produced by an earlier step of the same pipeline); writable output folders not
in use; for chat data (SFT, DPO), the records that truncation leaves without a trained token and the pairs
it makes identical. Models exist only as configs here; hardware can be simulated (``gpus``,
``gpu_memory_gib``) to plan a cluster run from a laptop.

What is checked for a stage, and how large it is, is the stage class's own knowledge (its hooks:
``input_checks``, ``data_quality``, ``memory_plan``, ``checkpoint_bytes``, ``export_bytes``,
``export_paths``); this module loops over the stages of the plan and knows no stage kind.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from llm_pipeline.config import ConfigError, ModelConfig, load_config, load_yaml
from llm_pipeline.hardware import Check, Environment, Status, environment_checks, gpu_fp8, probe_environment
from llm_pipeline.model.flops import GiB, count_parameters, estimate_training_memory
from llm_pipeline.train.stage import Stage, stage_class
from llm_pipeline.train.stage_inputs import InputContext, source_check
from llm_pipeline.train.trackers import TrackerUnavailable, require_tracker_packages

__all__ = ["Check", "Environment", "plan_run", "render", "run_preflight"]

# --------------------------------------------------------------------------------------------
# What the run will do: its stages, as the pipeline wires them
# --------------------------------------------------------------------------------------------


@dataclass
class StagePlan:
    """One training stage as it will run: its resolved config and where its inputs come from."""

    name: str
    kind: str
    stage: Stage  # the stage object on its wired config (asked, never trained)
    model: ModelConfig | None
    nproc: int | None  # processes it runs on (None: as launched, i.e. the GPUs available)
    produced: dict[str, str] = field(default_factory=dict)  # path -> the earlier step that writes it
    tokenizer_hint: Path | None = None  # the data step's tokenizer, for checks before the stage's own exists

    @property
    def cfg(self) -> Any:
        return self.stage.cfg

    def context(self, data_sample: int) -> InputContext:
        return InputContext(self.name, self.model, dict(self.produced), self.tokenizer_hint, data_sample)


@dataclass
class Plan:
    kind: Literal["pipeline", "stage"]
    source: Path
    stages: list[StagePlan] = field(default_factory=list)
    run_dir: Path | None = None
    data_cfg: Any = None  # DataConfig of the pipeline's data step
    eval_cfg: Any = None
    checks: list[Check] = field(default_factory=list)  # problems found while planning


def _stage_model(cfg: Any, previous: ModelConfig | None, from_previous: bool) -> ModelConfig | None:
    from llm_pipeline.checkpoint.hf import read_model_config

    init = cfg.model.init_from
    if init is not None and (Path(init) / "config.json").is_file():
        return read_model_config(init)
    if from_previous or init is not None:
        return previous
    return cfg.model.resolve()


def detect_stage_kind(path: Path, data: dict[str, Any], kind: str | None) -> tuple[str, Any]:
    """The registered stage kind whose config class accepts ``data`` (the file name breaks ties)."""
    from llm_pipeline.config import validate_config
    from llm_pipeline.train.stage import STAGE_KINDS

    if kind is not None:
        if kind not in STAGE_KINDS:
            raise ConfigError(f"--kind {kind}: not available here (stage kinds: {', '.join(STAGE_KINDS)})")
        return kind, validate_config(stage_class(kind).config_class, data, str(path))
    fits, errors = {}, {}
    for k in STAGE_KINDS:
        try:
            fits[k] = validate_config(stage_class(k).config_class, dict(data), str(path))
        except ConfigError as e:
            errors[k] = e
    named = [k for k in fits if k in path.stem]
    if len(fits) == 1 or len(named) == 1:
        k = named[0] if len(named) == 1 else next(iter(fits))
        return k, fits[k]
    if fits:
        raise ConfigError(f"{path}: valid for stage kinds {', '.join(fits)}; pass --kind to choose")
    named = [k for k in errors if k in path.stem]
    if named:
        raise errors[named[0]]
    raise ConfigError(
        f"{path}: not a config of any stage kind available here ({', '.join(STAGE_KINDS)}); the closest:\n"
        + str(next(iter(errors.values())))
    )


def plan_run(path: str | os.PathLike[str], *, kind: str | None = None) -> Plan:
    """Read a pipeline or stage config into a :class:`Plan` (which one is decided by its keys)."""
    path = Path(path)
    data = load_yaml(path)
    if "stages" in data or "run_dir" in data:
        return _plan_pipeline(path, data)
    if "training" in data or "model" in data:
        k, cfg = detect_stage_kind(path, data, kind)
        model = _stage_model(cfg, None, False)
        return Plan("stage", path, [StagePlan(k, k, stage_class(k)(cfg), model, None)])
    raise ConfigError(f"{path}: neither a pipeline config (stages: ...) nor a training stage config (training: ...)")


def _plan_pipeline(path: Path, data: dict[str, Any]) -> Plan:
    from llm_pipeline.config import validate_config
    from llm_pipeline.pipeline import PipelineConfig, StageEntry
    from llm_pipeline.train.stage import STAGE_KINDS, WiringContext

    raw_stages = data.pop("stages", None) or []
    cfg = validate_config(PipelineConfig, data, str(path))
    plan = Plan("pipeline", path, run_dir=cfg.run_dir)
    run_dir = cfg.run_dir
    packed = tokenizer = None
    if cfg.data is not None:
        from llm_pipeline.data.config import DataConfig

        plan.data_cfg = load_config(DataConfig, cfg.data.config, cfg.data.set, output_dir=str(run_dir / "data"))
        packed, tokenizer = plan.data_cfg.packed_dir, plan.data_cfg.tokenizer_dir
    if cfg.eval is not None:
        from llm_pipeline.eval.config import EvalConfig

        plan.eval_cfg = load_config(EvalConfig, cfg.eval.config, cfg.eval.set)
    previous_dir: Path | None = None
    previous_model: ModelConfig | None = None
    produced: dict[str, str] = {}  # path -> the step of this pipeline that writes it (before the stage reading it)
    if packed is not None:
        produced |= {str(packed): "the data step", str(tokenizer): "the data step"}
    entries = []
    for i, raw in enumerate(raw_stages):
        name = raw.get("name", f"stages[{i}]") if isinstance(raw, dict) else f"stages[{i}]"
        if isinstance(raw, dict) and raw.get("kind") not in STAGE_KINDS:
            plan.checks.append(Check(f"stage {name}", "BLOCKER", f"stage kind {raw.get('kind')!r} is not available "
                                     f"in this installation (kinds: {', '.join(STAGE_KINDS)})"))  # fmt: skip
            previous_dir = run_dir / "checkpoints" / f"{name}_final"
            continue
        entry = validate_config(StageEntry, raw, f"{path}: stages[{i}]")
        entries.append(entry)
        start = entry.start_from
        start_dir = previous_dir if start == "previous" else (None if start == "config" else Path(start))
        cls = stage_class(entry.kind)
        wiring: dict[str, Any] = {
            "training.output_dir": str(run_dir / "checkpoints" / entry.name),
            "training.final_dir": str(run_dir / "checkpoints" / f"{entry.name}_final"),
            "training.logging_dir": str(run_dir / "logs" / entry.name),
            "training.resume_from_checkpoint": "auto",
            **cls.pipeline_wiring(WiringContext(run_dir, entry.name, start_dir, packed, tokenizer)),
        }  # as pipeline.run_pipeline wires it
        if start_dir is not None:
            wiring |= {"model.init_from": str(start_dir), "model.overrides": {}}
        stage_cfg = load_config(cls.config_class, entry.config, entry.set, **wiring)
        model = _stage_model(stage_cfg, previous_model, start == "previous")
        stage = cls(stage_cfg)
        sp = StagePlan(entry.name, entry.kind, stage, model, entry.nproc_per_node, dict(produced), tokenizer)
        if start_dir is not None and start == "previous" and i > 0:
            sp.produced[str(start_dir)] = f"stage {raw_stages[i - 1].get('name')}"
        plan.stages.append(sp)
        produced |= {str(p): f"stage {entry.name}" for p in stage.export_paths().values()}
        previous_dir, previous_model = stage_cfg.training.resolved_final_dir, model
    if cfg.gates is not None:
        plan.checks += _gate_checks(cfg, entries)
    return plan


def _gate_checks(cfg: Any, entries: list[Any]) -> list[Check]:
    """Every stage's gate exists, and its baseline is evaluated before it (else it fails after training)."""
    from llm_pipeline.gates import GatesConfig

    try:
        gates = load_config(GatesConfig, cfg.gates)
    except ConfigError as e:
        return [Check("gates", "BLOCKER", str(e).splitlines()[0])]
    from llm_pipeline.pipeline import gate_baseline

    out = []
    pipeline = cfg.model_copy(update={"stages": entries})  # the stages as validated here
    for entry in entries:
        if entry.gate is None:
            continue
        if entry.gate not in gates.stages:
            out.append(Check(f"gate {entry.gate}", "BLOCKER", f"{cfg.gates} has no gate {entry.gate!r} "
                             f"(defined: {', '.join(gates.stages)}); the run would stop after training"))  # fmt: skip
            continue
        try:
            gate_baseline(pipeline, entry, gates.stages[entry.gate].baseline_stage)
        except ConfigError as e:  # the run refuses it before training
            out.append(Check(f"gate {entry.gate}", "BLOCKER", str(e)))
    if not out:
        out.append(Check("gates", "ok", f"{cfg.gates}: a gate for every gated stage, baselines evaluated first"))
    return out


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Devices:
    on_gpu: bool
    world: int
    capacity: int  # bytes one rank has


def _devices(sp: StagePlan, env: Environment) -> _Devices | Check:
    """Where the stage runs (GPUs or host memory, how many ranks), or the blocker that stops it."""
    name = f"memory: {sp.name}"
    device = sp.cfg.parallel.device
    on_gpu = device == "cuda" or (device == "auto" and bool(env.gpus))
    world = sp.nproc or (len(env.gpus) if on_gpu else 1)
    if device == "cuda" and not env.gpus:
        return Check(name, "BLOCKER", "parallel.device is cuda but no GPU is visible (CUDA_VISIBLE_DEVICES?)")
    if on_gpu and world > len(env.gpus):
        return Check(name, "BLOCKER", f"runs on {world} processes (nproc_per_node) but {len(env.gpus)} GPU(s) "
                     "are visible: lower nproc_per_node or run on a larger node")  # fmt: skip
    capacity = min(g.memory for g in env.gpus) if on_gpu else env.host_available // world
    return _Devices(on_gpu, world, capacity)


def memory_check(sp: StagePlan, env: Environment) -> Check:
    """The stage's per-device training memory estimate (formula) against what the device has, with what would fit.

    The quick check; ``traced_memory_check`` (``preflight --trace-memory``) traces the step instead.
    """
    name = f"memory: {sp.name}"
    cfg, model = sp.cfg, sp.model
    if model is None:
        return Check(name, "warn", "architecture unknown until the previous stage's export exists")
    devices = _devices(sp, env)
    if isinstance(devices, Check):
        return devices
    on_gpu, world, capacity = devices.on_gpu, devices.world, devices.capacity
    mp = sp.stage.memory_plan(model)
    rows, seq, min_rows = mp.rows, mp.seq_len, mp.min_rows
    sharding = "full" if cfg.parallel.fsdp and world > 1 else "no"
    ac = cfg.parallel.activation_checkpointing
    act_bytes = 2 if cfg.training.precision == "bf16" else 4
    n = count_parameters(model)

    def estimate(gpus: int, micro: int, checkpointing: str) -> Any:
        shard = "full" if gpus > 1 and cfg.parallel.fsdp else "none"
        est = estimate_training_memory(
            model, num_gpus=gpus, micro_batch_size=micro, seq_len=seq, activation_checkpointing=checkpointing,  # type: ignore[arg-type]
            sharding=shard, gpu_memory_gib=capacity / GiB, act_bytes=act_bytes,
        )  # fmt: skip
        if mp.trainable_params is None:
            return est
        # frozen weights in their own dtype; gradients and AdamW moments for the trainable ones only
        div = gpus if shard == "full" else 1
        trained = mp.trainable_params
        weights = ((n - trained) * mp.frozen_bytes + trained * 4) / div
        grads, adam = trained * 4 / div, trained * 8 / div
        total = est.total - est.weights - est.gradients - est.optimizer + weights + grads + adam
        return replace(est, weights=weights, gradients=grads, optimizer=adam, total=total,
                       fits=total <= est.gpu_memory * 0.95)  # fmt: skip

    est = estimate(world, rows, ac)
    where = f"per GPU ({world} x {capacity / GiB:.1f} GiB)" if on_gpu else f"of {capacity / GiB:.1f} GiB free RAM"
    parts = (
        f"weights+grads+Adam {(est.weights + est.gradients + est.optimizer) / GiB:.1f}, "
        f"activations {est.activations / GiB:.1f}, logits {est.logits / GiB:.1f}"
    )
    detail = (
        f"~{est.total / GiB:.1f} GiB {where}: {parts} GiB ({rows} x {seq} tokens, {sharding} sharding, "
        f"activation checkpointing {ac})"
    )
    note = f"; {mp.note}" if mp.note else ""
    if est.fits:
        return Check(name, "ok", detail + note)
    fixes = []
    if ac != "full" and estimate(world, rows, "full").fits:
        fixes.append("parallel.activation_checkpointing: full")
    if rows > min_rows and estimate(world, min_rows, ac).fits:
        fixes.append("training.micro_batch_size: 1 (gradient accumulation keeps the global batch)")
    if not on_gpu:  # a CPU cannot hold it: say what GPU node would
        capacity = 80 * GiB
    for n in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        if n <= world and on_gpu:
            continue
        size = "this size" if on_gpu else "80 GiB"
        if estimate(n, rows, ac).fits:
            fixes.append(f"{n} GPU(s) of {size}" + (" (FSDP shards weights, gradients, Adam state)" if n > 1 else ""))
            break
        if estimate(n, min_rows, "full").fits:
            fixes.append(f"{n} GPU(s) of {size} with full activation checkpointing and micro-batch 1")
            break
    fix = "; or ".join(fixes) or "nothing tried fits (to 256 GPUs, full checkpointing, micro-batch 1)"
    return Check(name, "BLOCKER", f"does not fit: {detail}. Would fit: {fix}")


def stage_step_shape(sp: StagePlan, env: Environment, world: int) -> tuple[Any, str]:
    """The step the stage runs on ``world`` ranks, as a memory trace needs it; and a note on what differs."""
    from llm_pipeline.memplan import StepShape

    cfg = sp.cfg
    assert sp.model is not None
    mp = sp.stage.memory_plan(sp.model)
    fp8 = cfg.parallel.fp8
    if fp8 is None:  # auto: on where every GPU has FP8
        fp8 = bool(env.gpus) and all(gpu_fp8(g)[0] for g in env.gpus)
    notes = [mp.note] if mp.note else []
    if fp8:
        try:
            import torchao.float8  # noqa: F401
        except ImportError:
            fp8 = False
            notes.append("traced without FP8 (torchao is not installed)")
    shape = StepShape(
        world_size=world,
        micro_batch=mp.rows,
        seq_len=mp.seq_len,
        precision=cfg.training.precision,
        activation_checkpointing=cfg.parallel.activation_checkpointing,
        fp8=fp8,
        fp8_recipe=cfg.parallel.fp8_recipe,
        fsdp=cfg.parallel.fsdp,
        reshard_after_forward=cfg.parallel.reshard_after_forward,
    )
    return shape, "; ".join(notes)


def traced_memory_check(sp: StagePlan, env: Environment) -> Check:
    """The stage's step traced at full size on fake tensors (llm_pipeline.memplan) against the GPU memory.

    Falls back to :func:`memory_check` (the formula) where the step cannot be traced, and says so.
    """
    from llm_pipeline.memplan import format_plan, plan_memory
    from llm_pipeline.train.objectives import CausalLMObjective

    name = f"memory: {sp.name}"
    if sp.model is None:
        return memory_check(sp, env)
    devices = _devices(sp, env)
    if isinstance(devices, Check):
        return devices
    shape, note = stage_step_shape(sp, env, devices.world)
    t = sp.cfg.training
    # Every position through the head, no z-loss: its masked indexing has a data-dependent shape.
    objective = CausalLMObjective(z_loss_weight=0.0, chunk_tokens=t.loss_chunk_tokens)
    try:
        result = plan_memory(
            sp.model, shape, t, objective, gpu_memory_gib=devices.capacity / GiB,
            transform=sp.stage.transform, fp8_filter=sp.stage.fp8_filter,
        )  # fmt: skip
    except Exception as e:  # any failure of the trace leaves the formula's answer
        fallback = memory_check(sp, env)
        return replace(fallback, detail=f"formula (the trace failed: {type(e).__name__}: {e}): {fallback.detail}")
    detail = format_plan(result) + (f"; {note}" if note else "")
    return Check(name, "ok" if result.fits else "BLOCKER", detail)


# --------------------------------------------------------------------------------------------
# Disk
# --------------------------------------------------------------------------------------------


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _size(path: Path) -> int:
    from llm_pipeline.checkpoint.manager import folder_size

    return folder_size(path) if path.is_dir() else 0


def disk_checks(plan: Plan, evaluate_start: bool = False) -> list[Check]:
    """Checkpoints (weights + Adam state, kept ``save_total_limit`` + 1 deep while a save completes) and
    exports of every stage, plus the data step's shards, against the free space of each disk they go to."""
    from llm_pipeline.checkpoint.manager import human_bytes

    needs: dict[int, list[tuple[Path, int, str]]] = {}
    for sp in plan.stages:
        if sp.model is None:
            continue
        t, n = sp.cfg.training, count_parameters(sp.model)
        ckpt = sp.stage.checkpoint_bytes(sp.model)  # the weights it saves, AdamW moments, small state files
        keep = t.save_total_limit + 1
        export = sp.stage.export_bytes(sp.model)
        items = [(Path(t.output_dir), keep * ckpt, f"{sp.name}: {keep} x {human_bytes(ckpt)} checkpoints"),
                 (t.resolved_final_dir, export, f"{sp.name}: export {human_bytes(export)}")]  # fmt: skip
        if evaluate_start and sp is plan.stages[0] and plan.run_dir is not None:
            items.append((plan.run_dir / "checkpoints" / "init_final", n * 4, f"start model {human_bytes(n * 4)}"))
        for path, nbytes, label in items:
            have = _size(path)  # a resume replaces what is already there
            dev = os.stat(_existing_ancestor(path)).st_dev
            needs.setdefault(dev, []).append((path, max(0, nbytes - have), label))
    notes = []
    if plan.data_cfg is not None:
        src = plan.data_cfg.source
        out = Path(plan.data_cfg.output_dir)
        if src.max_bytes:
            nbytes = max(0, int(1.5 * src.max_bytes) - _size(out))  # raw + cleaned gzip JSONL + packed tokens
            dev = os.stat(_existing_ancestor(out)).st_dev
            needs.setdefault(dev, []).append((out, nbytes, f"data ~1.5 x {human_bytes(src.max_bytes)}"))
        else:
            notes.append("the data step has no source.max_bytes cap: its size is not counted")
    checks = []
    for items in needs.values():
        where = _existing_ancestor(items[0][0])
        free = shutil.disk_usage(where).free
        total = sum(i[1] for i in items)
        status: Status = "BLOCKER" if total > free else "warn" if total > 0.8 * free or notes else "ok"
        detail = (
            f"needs ~{human_bytes(total)} more on the disk of {where}, {human_bytes(free)} free "
            f"({'; '.join(i[2] for i in items)})"
        )
        if status == "BLOCKER":
            detail += "; free space, lower training.save_total_limit or move run_dir / output_dir"
        checks.append(Check("disk", status, "; ".join([detail, *notes])))
    return checks


# --------------------------------------------------------------------------------------------
# Inputs and outputs
# --------------------------------------------------------------------------------------------


def output_checks(paths: list[Path], label: str) -> list[Check]:
    """Each output folder can be created and written (a real probe file), and no live run holds it."""
    from llm_pipeline.checkpoint.lock import live_owner

    out = []
    for path in dict.fromkeys(paths):
        base = _existing_ancestor(path)
        if not base.is_dir():
            out.append(Check(f"output: {label}", "BLOCKER", f"{path}: {base} is a file, not a folder"))
            continue
        try:
            fd, probe = tempfile.mkstemp(prefix=".preflight-", dir=base)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            out.append(Check(f"output: {label}", "BLOCKER", f"{path}: cannot write in {base} ({e.strerror or e})"))
            continue
        owner = live_owner(path) if path.is_dir() else None
        if owner is not None:
            out.append(Check(f"output: {label}", "BLOCKER", f"{path} is in use by {owner.describe()}"))
            continue
        out.append(Check(f"output: {label}", "ok", f"{path} (writable)"))
    return out


# --------------------------------------------------------------------------------------------
# The whole pre-flight
# --------------------------------------------------------------------------------------------


#: The most GPUs a plan may simulate: far beyond any cluster, small enough to list without a hang.
MAX_SIMULATED_GPUS = 65536


def check_options(
    gpus: int | None = None,
    gpu_memory_gib: float | None = None,
    data_sample: int = 0,
    gpu_capability: str | None = None,
) -> None:
    """Refuse pre-flight options that would hang, or silently turn a check off (one error naming the option)."""
    import re

    if gpus is not None and not 0 <= gpus <= MAX_SIMULATED_GPUS:
        raise ValueError(f"--gpus {gpus}: plan for 0 to {MAX_SIMULATED_GPUS} GPUs")
    if gpu_memory_gib is not None and not 0 < gpu_memory_gib < 1e6:
        raise ValueError(f"--gpu-memory-gib {gpu_memory_gib}: give the memory of one GPU in GiB (above 0)")
    if data_sample < 0:
        raise ValueError(f"--data-sample {data_sample}: give the number of chat records to build (0 skips the check)")
    if gpu_capability is not None and not re.fullmatch(r"\d+\.\d+", gpu_capability):
        raise ValueError(f"--gpu-capability {gpu_capability!r}: expected MAJOR.MINOR, e.g. 9.0 (H100) or 8.0 (A100)")


def run_preflight(
    config: str | os.PathLike[str],
    *,
    kind: str | None = None,
    gpus: int | None = None,
    gpu_memory_gib: float | None = None,
    gpu_capability: str | None = None,
    data_sample: int = 2000,
    env: Environment | None = None,
    trace_memory: bool = False,
) -> list[Check]:
    """Every check for ``config`` (pipeline or stage); a configuration error is raised, not listed.

    ``trace_memory``: each stage's memory from one step traced on fake tensors (seconds per stage)
    instead of the formula estimate.
    """
    check_options(gpus, gpu_memory_gib, data_sample, gpu_capability)
    env = env or probe_environment(gpus=gpus, gpu_memory_gib=gpu_memory_gib, gpu_capability=gpu_capability)
    plan = plan_run(config, kind=kind)
    checks = environment_checks(env) + plan.checks
    for sp in plan.stages:
        if sp.cfg.parallel.fp8_emulate and sp.cfg.parallel.fp8 is not False:
            real = [g.name for g in env.gpus if gpu_fp8(g)[0]]
            if real:  # resolve_fp8 refuses emulation where the real kernels exist
                checks.append(Check(f"fp8: {sp.name}", "BLOCKER", f"parallel.fp8_emulate is true but {real[0]} has "
                                    "FP8 tensor cores: set parallel.fp8_emulate: false"))  # fmt: skip
        elif sp.cfg.parallel.fp8:  # true = required: training stops at start where it cannot run
            verdicts = [gpu_fp8(g) for g in env.gpus] or [(False, "no GPU is visible")]
            bad = next(((ok, why) for ok, why in verdicts if not ok), None)
            if bad is not None:
                status: Status = "warn" if bad[0] is None else "BLOCKER"
                checks.append(Check(f"fp8: {sp.name}", status, f"parallel.fp8 is true but FP8 is not available "
                                    f"here ({bad[1]}): set it to null (auto) or false"))  # fmt: skip
    if plan.data_cfg is not None:
        src = plan.data_cfg.source
        checks.append(source_check("data: source", src.kind, src.paths, src.dataset))
    for sp in plan.stages:
        ctx = sp.context(data_sample)
        checks += sp.stage.input_checks(ctx)
        checks.append(tracker_check(sp.name, sp.cfg.training.trackers))
        checks.append(traced_memory_check(sp, env) if trace_memory else memory_check(sp, env))
        if (c := sp.stage.data_quality(ctx)) is not None:
            checks.append(c)
    if plan.eval_cfg is not None:
        checks += _eval_checks(plan)
    checks += disk_checks(plan, evaluate_start=_evaluate_start(plan))
    if plan.kind == "pipeline":
        assert plan.run_dir is not None
        checks += output_checks([plan.run_dir, *(Path(s.cfg.training.output_dir) for s in plan.stages)], "run")
    else:
        t = plan.stages[0].cfg.training
        checks += output_checks([Path(t.output_dir), t.resolved_final_dir, t.resolved_logging_dir], plan.stages[0].name)
    return checks


def _evaluate_start(plan: Plan) -> bool:
    if plan.kind != "pipeline" or plan.eval_cfg is None:
        return False
    return bool(load_yaml(plan.source).get("evaluate_start", True))


def _eval_checks(plan: Plan) -> list[Check]:
    """Evals whose data cannot be found fail their gates after hours of training: say so now."""
    from llm_pipeline.eval.availability import unavailable_reason

    out = []
    cfg = plan.eval_cfg
    if plan.data_cfg is not None:  # the pipeline scores perplexity on the data step's held-out split
        cfg = cfg.model_copy(update={"perplexity": cfg.perplexity.model_copy(update={"files": ["<data step>"]})})
    for task in dict.fromkeys(cfg.tasks):
        why = None if task == "perplexity" and plan.data_cfg is not None else unavailable_reason(task, cfg)
        out.append(Check(f"eval: {task}", "warn" if why else "ok", why or "data available"))
    return out


def render(checks: list[Check], *, console: Any = None) -> None:
    """The table an operator reads: check / status / detail, blockers in red."""
    from rich.console import Console
    from rich.table import Table

    console = console or (Console() if sys.stdout.isatty() else Console(width=200))
    style = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "BLOCKER": "[bold red]BLOCKER[/]"}
    t = Table(title="pre-flight")
    t.add_column("check", no_wrap=True)
    t.add_column("status", no_wrap=True)
    t.add_column("detail")
    for c in checks:
        t.add_row(c.name, style[c.status], c.detail)
    console.print(t)
    n = sum(c.status == "BLOCKER" for c in checks)
    w = sum(c.status == "warn" for c in checks)
    console.print(f"{n} blocker(s), {w} warning(s)" + (": fix the blockers before starting" if n else ""))


def tracker_check(stage: str, names: Sequence[str]) -> Check:
    """Pre-flight's line for a stage's trackers: a missing package is a blocker (the stage would stop at start)."""
    try:
        require_tracker_packages(names)
    except TrackerUnavailable as e:
        return Check(f"trackers: {stage}", "BLOCKER", str(e))
    return Check(f"trackers: {stage}", "ok", ", ".join(names))
