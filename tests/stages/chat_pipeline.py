"""A one- or two-stage SFT pipeline at the smallest size (debug model, 2 steps, 2 MMLU questions): for the
promotion, lock and crash tests, where the pipeline's bookkeeping is under test, not the training."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from llm_pipeline.cli import main


@dataclass
class ChatPipeline:
    root: Path
    base: Path
    config: Path
    sft_config: Path
    passing: Path  # gates every model passes
    blocking: Path  # gates no model passes

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    def args(self, *extra: str, gates: Path | None = None) -> list[str]:
        return ["run", "--config", str(self.config), "--set", f"gates={gates or self.passing}", *extra]

    def run(self, *extra: str, gates: Path | None = None) -> int:
        return main(self.args(*extra, gates=gates))

    def export(self, stage: str = "sft", suffix: str = "_final") -> Path:
        return self.run_dir / "checkpoints" / f"{stage}{suffix}"

    def weights(self, stage: str = "sft", suffix: str = "_final") -> bytes:
        return (self.export(stage, suffix) / "model.safetensors").read_bytes()

    def pointer(self, stage: str = "sft") -> str:
        return (self.run_dir / "promoted" / f"{stage}.json").read_text()


def make_chat_pipeline(root: Path, *, stages: tuple[str, ...] = ("sft",), max_steps: int = 2) -> ChatPipeline:
    from train.chat_fixtures import chat_records, make_chat_model, sft_config, train_chat_tokenizer, write_records

    root.mkdir(parents=True, exist_ok=True)
    tok = train_chat_tokenizer(root / "tok")
    base = make_chat_model(root / "base", tok)
    data = write_records(root / "chat.jsonl", chat_records(32, seed=1))
    cfg = sft_config(root, base, data, max_steps=max_steps, logging_steps=1)
    (root / "sft.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True)))
    (root / "eval.yaml").write_text(yaml.safe_dump(
        {"tasks": ["mmlu"], "limit": 2, "device": "cpu", "mmlu": {"source": "builtin:python"}}
    ))  # fmt: skip
    for name, bound in (("pass", 0.0), ("block", 2.0)):
        rules = [{"metric": "mmlu.accuracy", "min": bound}]
        (root / f"gates_{name}.yaml").write_text(yaml.safe_dump({"stages": {s: {"rules": rules} for s in stages}}))
    entries = [
        {"name": s, "kind": "sft", "config": str(root / "sft.yaml"), "gate": s,
         "start_from": str(base) if i == 0 else "previous"}
        for i, s in enumerate(stages)
    ]  # fmt: skip
    pipeline = {"run_dir": str(root / "run"), "report": False, "evaluate_start": False,
                "eval": {"config": str(root / "eval.yaml")}, "stages": entries}  # fmt: skip
    (root / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    return ChatPipeline(root, base, root / "pipeline.yaml", root / "sft.yaml", root / "gates_pass.yaml",
                        root / "gates_block.yaml")  # fmt: skip
