"""Model subcommands: init, export, import, generate, info (parsing and printing only)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from llm_pipeline.config import ModelConfig, load_config

if TYPE_CHECKING:
    import torch


def _model_config(args: argparse.Namespace) -> ModelConfig:
    """--preset NAME and/or --config FILE (a model section), then --set overrides, validated."""
    from llm_pipeline.config import apply_overrides, validate_config
    from llm_pipeline.model.presets import PRESETS

    if args.model_config:
        return load_config(ModelConfig, args.model_config, args.set or ())
    if args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; choose one of: {', '.join(PRESETS)}")
    data = apply_overrides(dict(PRESETS[args.preset]), args.set or ())
    return validate_config(ModelConfig, data, f"preset {args.preset!r}")


def _add_model_choice(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", default="tiny", help="model size preset: 7b, 1b, tiny, debug (default: tiny)")
    g.add_argument("--config", dest="model_config", help="YAML file with model fields (see configs/model_7b.yaml)")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a model field, e.g. --set vocab_size=8192"
    )


def _check_room_to_build(cfg: ModelConfig, dtype: torch.dtype, output: Path) -> None:
    """Refuse before allocating: a 7B fp32 model on a 24 GiB machine would die in the allocator or the OOM killer."""
    import shutil

    from llm_pipeline import hardware
    from llm_pipeline.checkpoint.hf import DEFAULT_MAX_SHARD_BYTES
    from llm_pipeline.model.flops import GiB, count_parameters

    n = count_parameters(cfg)
    weights = n * dtype.itemsize
    need = weights + min(weights, DEFAULT_MAX_SHARD_BYTES) + GiB  # + safetensors' copy of one shard + slack
    free = hardware.host_available_memory()
    hint = "use --preset tiny (7M parameters) to try things out"
    hint += ", --dtype bfloat16 to halve it" if dtype.itemsize > 2 else ""
    if free and need > free:
        raise NotEnoughRoom(
            f"init: {n:,} parameters in {str(dtype).replace('torch.', '')} need ~{need / GiB:.1f} GiB of RAM to "
            f"build and write, {free / GiB:.1f} GiB is available: {hint}, or a machine with more memory"
        )
    base = output.absolute()
    while not base.exists() and base != base.parent:
        base = base.parent
    if base.is_dir() and shutil.disk_usage(base).free < weights:
        raise NotEnoughRoom(
            f"init: {output} needs ~{weights / GiB:.1f} GiB of disk, {shutil.disk_usage(base).free / GiB:.1f} GiB "
            f"is free there: {hint}, or write it somewhere larger"
        )


class NotEnoughRoom(ValueError):
    """Not enough memory or disk for what was asked; refused before anything was allocated (one error line)."""


def cmd_init(args: argparse.Namespace) -> int:
    import torch

    from llm_pipeline.checkpoint.hf import parse_dtype, save_pretrained
    from llm_pipeline.model.flops import count_parameters
    from llm_pipeline.model.llama import build_model

    cfg = _model_config(args)
    if args.tokenizer:
        from llm_pipeline.data.tokenizer import load_tokenizer

        vocab = load_tokenizer(args.tokenizer).get_vocab_size()
        if vocab > cfg.vocab_size:
            raise ValueError(f"tokenizer has {vocab} tokens but the model's vocab_size is {cfg.vocab_size}")
    _check_room_to_build(cfg, parse_dtype(args.dtype) or torch.float32, Path(args.output))
    model = build_model(cfg, seed=args.seed, dtype=parse_dtype(args.dtype))
    out = save_pretrained(
        model, args.output, tokenizer_dir=args.tokenizer, metadata={"init_seed": args.seed}, overwrite=args.overwrite
    )
    print(f"initialised {count_parameters(cfg):,} parameters -> {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from llm_pipeline.checkpoint.dcp import checkpoint_tokenizer_dir, is_training_checkpoint
    from llm_pipeline.checkpoint.hf import check_export_target, load_pretrained, save_pretrained

    check_export_target(Path(args.output), overwrite=args.overwrite)  # before the (slow) load
    _refuse_same_folder(args.checkpoint, args.output)
    if is_training_checkpoint(args.checkpoint):
        from llm_pipeline.train.stage import load_checkpoint_for_export

        model, ckpt, note = load_checkpoint_for_export(args.checkpoint)  # the stage kind that wrote it loads it
        print(f"training checkpoint {ckpt}" + (f" ({note})" if note else ""))
        tok = args.tokenizer or checkpoint_tokenizer_dir(ckpt)
    else:
        model = load_pretrained(args.checkpoint)
        tok = args.tokenizer or (args.checkpoint if _has_tokenizer(args.checkpoint) else None)
    out = save_pretrained(
        model,
        args.output,
        dtype=args.dtype,
        tokenizer_dir=tok,
        max_shard_bytes=int(args.max_shard_gb * 1024**3),
        overwrite=args.overwrite,
    )
    print(f"exported {args.checkpoint} -> {out} (HF LlamaForCausalLM format)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from llm_pipeline.checkpoint.hf import check_export_target, load_pretrained, save_pretrained

    check_export_target(Path(args.output), overwrite=args.overwrite)
    _refuse_same_folder(args.hf_dir, args.output)
    model = load_pretrained(args.hf_dir)
    out = save_pretrained(
        model,
        args.output,
        dtype=args.dtype,
        tokenizer_dir=args.hf_dir if _has_tokenizer(args.hf_dir) else None,
        metadata={"imported_from": str(Path(args.hf_dir).resolve())},
        overwrite=args.overwrite,
    )
    print(f"imported {args.hf_dir} -> {out}")
    return 0


def _refuse_same_folder(source: str, output: str) -> None:
    """Writing a model over the folder it is read from would destroy the source on any failure."""
    src, out = Path(source).resolve(), Path(output).resolve()
    if src == out or src in out.parents:
        raise ValueError(f"{output}: the output must be a new folder outside the source {source}")


def _has_tokenizer(path: str) -> bool:
    return any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))


def cmd_generate(args: argparse.Namespace) -> int:
    from llm_pipeline.checkpoint.hf import load_pretrained
    from llm_pipeline.model.generate import generate, generate_text

    if args.system and not args.chat:
        raise ValueError("--system goes with --chat (a system prompt for the chat template)")
    model = load_pretrained(args.model, dtype=args.dtype)
    sampling = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    if args.ids:
        try:
            prompts = [[int(t) for t in s.replace(",", " ").split()] for s in args.ids]
        except ValueError:
            raise ValueError(f"--ids takes whole numbers separated by spaces or commas, got {args.ids}") from None
        for p, new in zip(prompts, generate(model, prompts, **sampling), strict=True):
            print(json.dumps({"prompt_ids": p, "new_ids": new}))
        return 0
    if args.chat:
        return _generate_chat(model, args, sampling)
    from llm_pipeline.data.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(args.tokenizer or args.model)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; pass --tokenizer DIR, or token ids with --ids") from None
    prompts_text = args.prompt
    for p, text in zip(
        prompts_text,
        generate_text(model, tokenizer, prompts_text, stop_strings=args.stop or (), **sampling),
        strict=True,
    ):
        print(json.dumps({"prompt": p, "completion": text}, ensure_ascii=False))
    return 0


def _generate_chat(model: object, args: argparse.Namespace, sampling: dict) -> int:
    """Each ``--chat`` message as a user turn through the model's chat template (after ``--system``),
    answered from the generation prompt until the template's end-of-turn token."""
    from llm_pipeline.data.chat import ChatTemplate
    from llm_pipeline.data.sft import pad_id_of
    from llm_pipeline.model.generate import generate

    template = ChatTemplate.from_dir(args.tokenizer or args.model)
    system = [{"role": "system", "content": args.system}] if args.system else []
    prompts = [template.encode_prompt([*system, {"role": "user", "content": q}]) for q in args.chat]
    stops = template.stop_token_ids()
    outputs = generate(model, prompts, eos_token_ids=stops, pad_token_id=pad_id_of(template), **sampling)
    for question, new in zip(args.chat, outputs, strict=True):
        if new and new[-1] in stops:
            new = new[:-1]
        answer = template.tokenizer.decode(new)
        print(json.dumps({"chat": question, "completion": answer}, ensure_ascii=False))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from llm_pipeline.checkpoint.hf import read_model_config
    from llm_pipeline.model.flops import GiB, count_parameters, estimate_training_memory, flops_per_token

    cfg = read_model_config(args.checkpoint) if args.checkpoint else _model_config(args)
    seq = args.seq_len or cfg.max_position_embeddings
    if seq < 1 or args.gpus < 1 or args.micro_batch < 1 or args.gpu_memory_gib <= 0:
        raise ValueError("--seq-len, --gpus and --micro-batch must be at least 1, --gpu-memory-gib above 0")
    n = count_parameters(cfg)
    est = estimate_training_memory(
        cfg,
        num_gpus=args.gpus,
        micro_batch_size=args.micro_batch,
        seq_len=seq,
        sharding=args.sharding,
        activation_checkpointing=args.activation_checkpointing,
        gpu_memory_gib=args.gpu_memory_gib,
    )
    console = Console()
    t = Table(title="model", show_header=False)
    t.add_row("parameters", f"{n:,}")
    t.add_row("layers / hidden / ffn", f"{cfg.num_hidden_layers} / {cfg.hidden_size} / {cfg.intermediate_size}")
    t.add_row(
        "heads (q / kv) x dim", f"{cfg.num_attention_heads} / {cfg.num_key_value_heads} x {cfg.resolved_head_dim}"
    )
    t.add_row("vocab / context", f"{cfg.vocab_size:,} / {cfg.max_position_embeddings:,}")
    t.add_row(f"training FLOPs per token (T={seq})", f"{flops_per_token(cfg, seq):.4g}")
    console.print(t)
    console.print(
        f"training memory per GPU (estimate): {args.gpus} GPU(s), sharding={args.sharding}, "
        f"micro-batch {args.micro_batch} x {seq}, activation checkpointing={args.activation_checkpointing}"
    )
    m = Table()
    m.add_column("component")
    m.add_column("GiB", justify="right")
    for key in ("weights", "gradients", "optimizer", "activations", "logits", "transient", "total"):
        m.add_row(key, f"{getattr(est, key) / GiB:,.1f}")
    console.print(m)
    verdict = "fits" if est.fits else "DOES NOT FIT"
    console.print(f"{verdict} in {args.gpu_memory_gib:g} GiB per GPU (AdamW, fp32 master weights, bf16 activations)")
    if args.json:
        print(json.dumps({"parameters": n, "flops_per_token": flops_per_token(cfg, seq), "memory_gib": est.as_gib()}))
    return 0


def _add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty folder that is not a previous export: only the model files are "
        "replaced, other files are kept (a previous export is replaced without it; a run's "
        "checkpoint folder is always refused)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="create a randomly initialised model directory (HF format)")
    _add_model_choice(p)
    p.add_argument("--output", "-o", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", help="stored weight dtype (float32, bfloat16)")
    p.add_argument("--tokenizer", help="tokenizer directory to copy into the model directory")
    _add_overwrite(p)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("export", help="write a checkpoint as an HF LlamaForCausalLM directory")
    p.add_argument(
        "checkpoint",
        help="HF model directory, a training checkpoint (checkpoint-N), or a run's checkpoint folder (newest)",
    )
    p.add_argument("output", help="output HF directory")
    p.add_argument("--dtype", default="auto", help="auto (keep), float32, bfloat16, float16")
    p.add_argument("--tokenizer", help="tokenizer directory to include (default: the checkpoint's own)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size (default 5 GB)")
    _add_overwrite(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="import a LLaMA-architecture HF directory (e.g. to start SFT from it)")
    p.add_argument("hf_dir", help="local HF model directory (config.json + safetensors)")
    p.add_argument("output", help="output model directory")
    p.add_argument("--dtype", default="auto", help="auto (keep), float32, bfloat16, float16")
    _add_overwrite(p)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("generate", help="generate text with a KV cache (greedy or sampling)")
    p.add_argument("model", help="model directory")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    given.add_argument("--ids", action="append", help="prompt as token ids, e.g. '1 5 9' (no tokenizer needed)")
    given.add_argument(
        "--chat",
        action="append",
        help="a user message sent through the model's chat template; the answer stops at the end of the turn "
        "(repeat for a batch)",
    )
    p.add_argument("--system", help="with --chat: a system prompt before each message")
    p.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="auto")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="parameters, FLOPs per token and a training memory estimate (allocates nothing)")
    _add_model_choice(p)
    p.add_argument("--checkpoint", help="read the model config from this model directory instead")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=None, help="default: the model's context length")
    p.add_argument("--sharding", choices=["full", "none"], default="full", help="FSDP full sharding or replicated")
    p.add_argument("--activation-checkpointing", choices=["none", "selective", "full"], default="none")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0)
    p.add_argument("--json", action="store_true", help="also print a JSON line")
    p.set_defaults(func=cmd_info)
