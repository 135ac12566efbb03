"""What a stage tells pre-flight without training: its inputs (checked before anything runs) and its size.

A :class:`~llm_pipeline.train.stage.Stage` answers pre-flight through its hooks (``input_checks``,
``data_quality``, ``memory_plan``, ``checkpoint_bytes``, ``export_bytes``) with the primitives here:
an :class:`InputContext` that knows which earlier pipeline step writes which path, a
:class:`MemoryPlan` (rows per micro-batch, their length, what trains), and small checks shared by
the stage modules. Pre-flight itself only loops over the registered stage kinds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llm_pipeline.config import ModelConfig
from llm_pipeline.hardware import Check

#: Bytes of a checkpoint beside its tensors: trainer and rank state, meta.json, config.yaml, checksums.
CHECKPOINT_FIXED_BYTES = 24 << 10
#: Bytes per stored tensor beyond its data (DCP writes each with its own header, and indexes it in .metadata);
#: a trainable weight stores four: itself, AdamW's two moments and its step. Measured on debug, tiny and
#: tiny + LoRA r16 checkpoints (2,060-2,320 bytes each).
CHECKPOINT_BYTES_PER_TENSOR = 2150


@dataclass
class InputContext:
    """What pre-flight knows when a stage checks its inputs: the paths earlier steps will write."""

    name: str  # the stage's name in the pipeline (its kind for a lone stage config)
    model: ModelConfig | None  # the architecture it trains (None: known once the previous export exists)
    produced: dict[str, str] = field(default_factory=dict)  # path -> "the data step", "stage sft", ...
    tokenizer_hint: Path | None = None  # the data step's tokenizer (for checks before the stage's own exists)
    data_sample: int = 2000  # chat records built to count truncation damage (0: skip)

    def writer(self, path: Path | str | None) -> str | None:
        """The earlier step that writes ``path`` (None: nothing in this run does)."""
        return None if path is None else self.produced.get(str(path))

    def available(self, path: Path | str | None, marker: str) -> bool:
        """``path`` holds ``marker`` now (and no earlier step rewrites it first)."""
        return path is not None and self.writer(path) is None and (Path(path) / marker).is_file()

    def present(self, path: Path | str, marker: str, what: str, fix: str) -> Check:
        """ok when an earlier step writes ``path`` or it holds ``marker`` now; else a BLOCKER naming the fix."""
        if (writer := self.writer(path)) is not None:
            return Check(what, "ok", f"{path}: written by {writer}")
        if (Path(path) / marker).is_file():
            return Check(what, "ok", str(path))
        return Check(what, "BLOCKER", f"{path}: not found (no {marker}); {fix}")

    def tokenizer(self, path: Path | str) -> Check:
        """A tokenizer folder the stage reads (data.tokenizer_dir)."""
        return self.present(path, "tokenizer.json", f"tokenizer: {self.name}", "run the data step first")

    def start_model(self, init_from: Path | None, random_init: str) -> Check:
        """The model a stage starts from: a random init (described), or an HF folder present or written earlier."""
        if init_from is None:
            return Check(f"model: {self.name}", "ok", random_init)
        return self.present(
            init_from, "config.json", f"model: {self.name}", "point model.init_from at an HF model directory "
            "(llm-pipeline import / export)",
        )  # fmt: skip


@dataclass(frozen=True)
class MemoryPlan:
    """The shape of one micro-batch and what trains, for the memory estimate."""

    rows: int  # rows per micro-batch at the longest rows
    seq_len: int  # their length: the stage's own (curriculum maximum, data.max_seq_len, data.seq_len)
    min_rows: int = 1  # the fewest rows a micro-batch can hold (a preference pair is two)
    trainable_params: int | None = None  # None: every weight trains (AdamW state for all)
    trainable_tensors: int | None = None  # how many tensors those are (None: every one)
    frozen_bytes: int = 4  # bytes per frozen weight (a bf16 LoRA base: 2)
    note: str = ""


def source_check(label: str, kind: str, paths: list[str], hub_name: str | None) -> Check:
    """A raw data source (local files, an HF dataset, an embedded source named by its kind) can be read."""
    if kind == "local":
        missing = [p for p in paths if not Path(p).exists()]
        if missing:
            return Check(label, "BLOCKER", f"not found: {', '.join(missing)}")
        return Check(label, "ok", f"{len(paths)} local path(s)")
    if kind == "hf":
        from llm_pipeline.eval.availability import hub_cached, hub_offline

        if hub_offline() and hub_name and not hub_cached(hub_name):
            return Check(label, "BLOCKER", f"{hub_name} is on the HF hub, HF_HUB_OFFLINE is set and it is not cached")
        return Check(label, "ok", f"{hub_name} from the HF hub (network or its cache)")
    return Check(label, "ok", f"the embedded {kind!r} source (offline, built into the package)")


def packed_data_checks(
    ctx: InputContext, path: Path, splits: list[str], what: str, fix: str, model: ModelConfig | None
) -> list[Check]:
    """Packed token shards: present or written earlier; when present now, their splits and vocabulary."""
    check = ctx.present(path, "manifest.json", what, fix)
    if check.status != "ok" or not ctx.available(path, "manifest.json"):
        return [check]
    from llm_pipeline.data.manifest import read_manifest

    try:
        manifest = read_manifest(path)
    except (OSError, ValueError) as e:
        return [Check(what, "BLOCKER", f"{path}: unreadable manifest.json ({e}); pack the data again")]
    missing = [s for s in splits if not (manifest.get("splits") or {}).get(s, {}).get("tokens")]
    if missing:
        have = ", ".join(manifest.get("splits") or {}) or "none"
        return [Check(what, "BLOCKER", f"{path}: no tokens in split(s) {', '.join(missing)} (splits: {have}); {fix}")]
    vocab = manifest.get("vocab_size")
    if model is not None and vocab is not None and vocab > model.vocab_size:
        return [Check(what, "BLOCKER", f"{path} uses a {vocab}-token vocabulary but the model has vocab_size "
                      f"{model.vocab_size}: pack it with the model's tokenizer")]  # fmt: skip
    return [Check(what, "ok", f"{path} (splits {', '.join(splits)})")]
