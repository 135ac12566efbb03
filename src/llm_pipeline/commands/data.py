"""Data subcommands: download, clean, tokenizer, pack, prepare (each a thin call into llm_pipeline.data)."""

from __future__ import annotations

import argparse
import json

STEP_HELP = {
    "download": "read the configured source (stdlib / HF hub / local files) into raw JSONL shards",
    "clean": "normalise, quality-filter and deduplicate the raw shards with datatrove",
    "tokenizer": "train a byte-level BPE on the cleaned data (or import tokenizer.path)",
    "pack": "tokenize cleaned documents into train/val token shards (datatrove .ds layout)",
    "prepare": "run download, clean, tokenizer and pack, skipping up-to-date steps",
}


def add_data_flags(p: argparse.ArgumentParser) -> None:
    """The flags every data step takes (the spec's scripts parse them too)."""
    p.add_argument(
        "--config",
        help="data config YAML: configs/data.yaml (production: FineWeb-Edu from the HF hub) or "
        "configs/demo/data.yaml (offline: this Python's standard library). Without it, the built-in defaults: "
        "the standard library into runs/data",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set source.max_documents=100 (repeatable)",
    )
    p.add_argument("--output-dir", help="root of raw/, clean/, tokenizer/, packed/ (config key output_dir)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="data stage: sources, cleaning, tokenizer, packed shards")
    steps = data.add_subparsers(dest="data_command", metavar="STEP", required=True)
    for name, help_text in STEP_HELP.items():
        p = steps.add_parser(name, help=help_text, description=help_text)
        add_data_flags(p)
        if name == "prepare":
            p.add_argument("--force", action="store_true", help="re-run every step even if up to date")
        p.set_defaults(func=_handler(name))


def _handler(step: str):
    def run(args: argparse.Namespace) -> int:
        from llm_pipeline.config import load_config
        from llm_pipeline.data.config import DataConfig

        cfg = load_config(DataConfig, args.config, args.set, output_dir=args.output_dir)
        progress = not args.no_progress
        if step == "download":
            from llm_pipeline.data.sources import download

            result = download(cfg, show_progress=progress)
            summary = {k: result[k] for k in ("documents", "bytes", "rejected")}
        elif step == "clean":
            from llm_pipeline.data.clean import clean

            result = clean(cfg, show_progress=progress)
            summary = result and {k: result[k] for k in ("documents_in", "documents_kept", "dropped_by_reason")}
        elif step == "tokenizer":
            from llm_pipeline.data.tokenizer import build_tokenizer

            result = build_tokenizer(cfg, show_progress=progress)
            summary = {k: result[k] for k in ("vocab_size", "tokenizer_sha256")}
        elif step == "pack":
            from llm_pipeline.data.pack import pack

            result = pack(cfg, show_progress=progress)
            summary = {s: {k: v for k, v in d.items() if k != "shards"} for s, d in result["splits"].items()}
        else:
            from llm_pipeline.data.prepare import prepare

            summary = prepare(cfg, force=args.force, show_progress=progress)
        print(json.dumps(summary, indent=2))
        return 0

    return run
