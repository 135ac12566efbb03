"""Typed configuration of the data stage (``configs/data.yaml``, ``configs/demo/data.yaml``).

One file drives download -> clean -> tokenizer -> pack; every step writes its resolved section
beside its output, and ``data prepare`` re-runs a step only when that section or its input changed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from llm_pipeline.config import StrictModel
from llm_pipeline.data.mixture_config import MixtureFields

#: Top-level stdlib modules held out of training (perplexity, SFT and DPO validation on unseen code).
HELD_OUT_MODULES: tuple[str, ...] = ("json", "csv", "textwrap", "wave", "statistics")

#: The embedded arithmetic task's defaults (:mod:`llm_pipeline.data.arithmetic`): 0 <= a, b <= 99, 1 in 10 held out.
ARITHMETIC_MAX_OPERAND = 99
ARITHMETIC_VAL_EVERY = 10
ARITHMETIC_POOL_SIZE = 3000


class ArithmeticTaskFields(BaseModel):
    """Which problems the embedded arithmetic task has and which are held out.

    ``operation: add`` ("What is a + b?", every pair enumerated) or ``largest`` ("Which is largest: 37, 82,
    15?" -> "The largest is 82.", ``pool_size`` problems of ``operands`` distinct numbers drawn with a fixed
    seed). Shared by the SFT source, the RL prompts and the ``arithmetic_accuracy`` evaluation: give all three
    the same values, so the problems the evaluation holds out are the ones no stage trained on.
    """

    operation: Literal["add", "largest"] = Field(
        "add",
        description="kind=arithmetic: add ('What is a + b?') or largest ('Which is largest: a, b, c?', a rule a "
        "tiny model generalises from a few thousand examples; copying any number scores 1 in `operands`).",
    )
    operands: int = Field(
        2, ge=2, le=6, description="kind=arithmetic: numbers in a problem (add: 2; largest: 2..6, e.g. 3)."
    )
    min_operand: int = Field(0, ge=0, description="kind=arithmetic: the smallest number (10: two-digit numbers only).")
    max_operand: int = Field(
        ARITHMETIC_MAX_OPERAND, ge=1, le=999, description="kind=arithmetic: numbers from min_operand to this."
    )
    max_smaller_operand: int | None = Field(
        None,
        ge=0,
        description="kind=arithmetic, operation add: only problems whose smaller operand is at most this (9: one "
        "single-digit operand); None = every pair.",
    )
    pool_size: int = Field(
        ARITHMETIC_POOL_SIZE,
        gt=0,
        description="kind=arithmetic, operation largest: distinct problems in the task (the space of ordered "
        "tuples is too large to enumerate), split train/held-out by val_every; add enumerates every pair.",
    )
    val_every: int = Field(
        ARITHMETIC_VAL_EVERY,
        ge=2,
        description="kind=arithmetic: 1 in this many problems is held out, with every reordering of its numbers "
        "(add: a + b with b + a); a smaller task needs a lower value to keep a few hundred held-out problems.",
    )

    @model_validator(mode="after")
    def _check_arithmetic_task(self) -> ArithmeticTaskFields:
        if self.min_operand > self.max_operand:
            raise ValueError(f"min_operand {self.min_operand} is above max_operand {self.max_operand}")
        if self.operation == "add":
            if self.operands != 2:
                raise ValueError(f"operation add takes 2 operands, got operands: {self.operands}")
            # add enumerates every pair: another pool size would be ignored (compared with the default, since
            # a mixture passes every shared field to each source's reader)
            if self.pool_size != ARITHMETIC_POOL_SIZE:
                raise ValueError("pool_size is for operation largest (add enumerates every pair): remove it or "
                                 "set operation: largest")  # fmt: skip
            return self
        if self.max_smaller_operand is not None:
            raise ValueError("max_smaller_operand is for operation add: remove it or set operation: add")
        n = self.max_operand - self.min_operand + 1
        if n < self.operands:
            raise ValueError(f"operation largest needs {self.operands} distinct numbers: only {n} in "
                             f"{self.min_operand}..{self.max_operand}")  # fmt: skip
        if self.pool_size > math.perm(n, self.operands) // 2:
            raise ValueError(f"pool_size {self.pool_size} is more than half of the {math.perm(n, self.operands)} "
                             f"possible problems: lower it or widen min_operand..max_operand")  # fmt: skip
        return self


class SourceConfig(StrictModel):
    """Where documents come from: the embedded stdlib corpus, the HF hub, or local files."""

    kind: Literal["stdlib", "hf", "local"] = Field("stdlib", description="Source type.")
    # --- HF hub (streaming) ---
    dataset: str | None = Field(None, description="HF dataset name, e.g. HuggingFaceFW/fineweb-edu (kind=hf).")
    subset: str | None = Field(None, description="HF dataset config name, e.g. sample-10BT (kind=hf).")
    split: str = Field("train", description="HF split to stream (kind=hf).")
    # --- local files ---
    paths: list[str] = Field(
        default_factory=list,
        description="Files or folders (kind=local): *.jsonl, *.jsonl.gz, *.parquet, *.txt/*.md/*.rst/*.py.",
    )
    text_column: str = Field("text", description="Field holding the document text (JSONL, Parquet, HF).")
    id_column: str | None = Field(
        "id", description="Field holding a document id (default file:line when absent); ids are made unique."
    )
    # --- embedded stdlib corpus ---
    include_docs: bool = Field(True, description="Also take .rst/.txt documentation files (kind=stdlib).")
    include_tests: bool = Field(False, description="Also take the stdlib's own test suite (kind=stdlib).")
    held_out_modules: list[str] = Field(
        default_factory=lambda: list(HELD_OUT_MODULES),
        description="Top-level stdlib modules/packages marked split=val (perplexity on unseen code).",
    )
    domain_modules: list[str] = Field(
        default_factory=list,
        description="Top-level stdlib modules/packages held out of pretraining as a fine-tuning domain (the LoRA "
        "demo's): marked split=domain, packed into the `domain` and `domain_val` splits, never into train or val.",
    )
    docs_split: bool = Field(
        False,
        description="kind=stdlib: pack the .rst/.txt documentation (outside held-out and domain modules) as a "
        "split of its own, `docs`, instead of into train: a pretraining mixture can then weight code and docs.",
    )
    # --- caps (all sources) ---
    max_documents: int | None = Field(None, gt=0, description="Stop after this many accepted documents.")
    max_bytes: int | None = Field(None, gt=0, description="Stop after this many UTF-8 bytes of accepted text.")
    max_document_bytes: int = Field(1_000_000, gt=0, description="Documents larger than this are rejected.")
    documents_per_shard: int = Field(1000, gt=0, description="Documents per compressed JSONL output shard.")

    @model_validator(mode="after")
    def _check_kind(self) -> SourceConfig:
        both = sorted(set(self.held_out_modules) & set(self.domain_modules))
        if both:
            raise ValueError(f"modules {both} are both held out (val) and domain modules; pick one for each")
        if self.docs_split and self.kind != "stdlib":
            raise ValueError("docs_split only applies to kind=stdlib")
        if self.domain_modules and self.kind != "stdlib":
            raise ValueError(
                "domain_modules only applies to kind=stdlib (records of other sources mark it: split=domain)"
            )
        if self.kind == "hf" and not self.dataset:
            raise ValueError("source.kind=hf needs source.dataset (e.g. HuggingFaceFW/fineweb-edu)")
        if self.kind == "local" and not self.paths:
            raise ValueError("source.kind=local needs source.paths (files or folders)")
        return self


class MinhashConfig(StrictModel):
    """MinHash LSH near-dedup. Detection threshold ~ (1/buckets)^(1/hashes_per_bucket)."""

    enabled: bool = Field(True, description="Run near-duplicate removal.")
    backend: Literal["rensa", "datatrove"] = Field(
        "rensa",
        description="rensa: fast signatures + in-memory LSH index (one task); datatrove: its 4-stage "
        "sort-merge MinHash (scales to any corpus size, slower).",
    )
    ngram_size: int = Field(5, gt=0, description="Word n-gram shingle size.")
    num_buckets: int = Field(14, gt=0, description="LSH bands.")
    hashes_per_bucket: int = Field(8, gt=0, description="MinHash values per band.")
    min_similarity: float | None = Field(
        None,
        ge=0,
        le=1,
        description="If set, a band collision only counts when the signatures' estimated Jaccard "
        "similarity is at least this (rensa backend); lets many short bands reach high recall without "
        "false positives.",
    )
    seed: int = Field(1, description="Hash seed (same on every worker).")


class SlurmConfig(StrictModel):
    """Options passed to datatrove's SlurmPipelineExecutor."""

    partition: str = Field("cpu", description="Slurm partition.")
    time: str = Field("04:00:00", description="Time limit per job.")
    cpus_per_task: int = Field(1, gt=0, description="CPUs per task.")
    mem_per_cpu_gb: int = Field(2, gt=0, description="Memory per CPU in GB.")
    job_name: str = Field("llm-data-clean", description="Slurm job name prefix.")
    sbatch_args: dict[str, str] = Field(default_factory=dict, description="Extra #SBATCH options.")
    env_command: str | None = Field(
        None,
        description="Shell line(s) each job runs first, e.g. `module load python; source /shared/venv/bin/activate`; "
        "default: the interpreter that submits (its bin/ on PATH, this package on PYTHONPATH).",
    )


class ExecutorConfig(StrictModel):
    """Which datatrove executor runs the cleaning pipeline."""

    kind: Literal["local", "slurm", "ray"] = Field("local", description="local | slurm | ray.")
    tasks: int = Field(2, gt=0, description="Parallel tasks (input shards are split across them).")
    workers: int = Field(2, gt=0, description="Concurrent worker processes (local executor).")
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)
    ray_cpus_per_task: int = Field(1, gt=0, description="CPUs per Ray task (kind=ray).")
    ray_address: str | None = Field(
        None,
        description="Ray cluster to connect to (kind=ray, and pack.executor=ray): the address `ray start --head` "
        "printed, e.g. 10.0.0.1:6379; None: $RAY_ADDRESS, else the cluster started on this machine, else a new "
        "local Ray instance for this run only.",
    )


class CodeFilterConfig(StrictModel):
    """Code-aware quality thresholds (in the spirit of The Stack / StarCoder filtering)."""

    max_line_length: int = Field(1000, gt=0, description="Drop files with any longer line.")
    max_mean_line_length: float = Field(100.0, gt=0, description="Drop files whose mean line length exceeds this.")
    min_alnum_fraction: float = Field(0.25, ge=0, le=1, description="Drop files with fewer alphanumeric chars.")
    max_encoded_fraction: float = Field(
        0.5, ge=0, le=1, description="Drop files that are mostly base64/hex blobs (data, not code)."
    )
    min_chars: int = Field(20, ge=0, description="Drop files shorter than this.")


class CleanConfig(StrictModel):
    """Normalisation, quality filters and dedup, run as datatrove pipelines."""

    normalize: Literal["NFC", "NFKC", "none"] = Field("NFC", description="Unicode normalisation form.")
    filters: Literal["auto", "code", "prose", "none"] = Field(
        "auto",
        description="prose: Gopher quality+repetition, C4, FineWeb filters; code: code-aware set "
        "(prose filters would drop nearly all code); none: no quality filtering; auto: code for the "
        "stdlib source, prose otherwise.",
    )
    code: CodeFilterConfig = Field(default_factory=CodeFilterConfig)
    language: str = Field("en", description="Language of the prose filters' word tokenizer.")
    exact_dedup: bool = Field(True, description="Drop byte-identical documents after normalisation.")
    minhash: MinhashConfig = Field(default_factory=MinhashConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)


class TokenizerConfig(StrictModel):
    """Train a byte-level BPE on the cleaned data, or use an existing tokenizer."""

    path: str | None = Field(
        None, description="Existing tokenizer: a dir with tokenizer.json, a tokenizer.json file or a hub name."
    )
    vocab_size: int = Field(50304, gt=16, description="Vocabulary size including special tokens.")
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a merge.")
    max_train_bytes: int | None = Field(
        200_000_000, gt=0, description="Train on at most this many bytes of cleaned text (None: all)."
    )


class PackConfig(StrictModel):
    """Tokenize cleaned documents into flat token shards with a train/val split by document."""

    val_fraction: float = Field(
        0.01, ge=0, lt=1, description="Documents without a source-given split go to val with this probability."
    )
    seed: int = Field(0, description="Seed of the hash that assigns documents to splits.")
    workers: int = Field(
        2,
        gt=0,
        description="executor=local: batches encoding at once while the main thread reads and writes (threads "
        "sharing one tokenizer; each batch is spread over the encoder's threads: RAYON_NUM_THREADS, else every "
        "core).",
    )
    executor: Literal["local", "ray"] = Field(
        "local",
        description="local: threads on this machine; ray: one Ray task per cleaned file on the cluster "
        "clean.executor.ray_address names (same shards byte for byte: each file is its own shard).",
    )
    encoder: Literal["auto", "tiktoken", "tokenizers"] = Field(
        "auto",
        description="What encodes the documents. tiktoken: the same tokenizer as a tiktoken Encoding, the same "
        "ids 2-3x faster (byte-level BPE as `data tokenizer` trains it; checked against tokenizers on the first "
        "256 KiB of text before anything is written); tokenizers: encode_batch_fast; auto: tiktoken where the "
        "tokenizer converts, else tokenizers (the log says which ran; the shards are the same bytes).",
    )
    batch_size: int = Field(256, gt=0, description="At most this many documents per encode batch.")
    batch_bytes: int = Field(
        1 << 20,
        ge=1024,
        le=1 << 30,
        description="At most about this many bytes of text per encode batch (a batch closes at the "
        "document that reaches it), across input files and splits: even batches keep every tokenizer thread "
        "busy. Memory: (workers + 1) batches and their encodings (~100 bytes per token) at once.",
    )
    save_loss_mask: bool = Field(False, description="Write a .ds.loss per-token loss mask (all ones for raw text).")
    domain_val_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Documents the source puts in the `domain` split (stdlib: source.domain_modules) go to "
        "`domain_val` with this probability (hashed by id): the domain's own held-out text.",
    )


class DataConfig(StrictModel):
    """The whole data stage."""

    output_dir: Path = Field(Path("runs/data"), description="Root of raw/, clean/, tokenizer/, packed/.")
    source: SourceConfig = Field(default_factory=SourceConfig)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    pack: PackConfig = Field(default_factory=PackConfig)

    @model_validator(mode="after")
    def _resolve_filters(self) -> DataConfig:
        if self.clean.filters == "auto":
            self.clean.filters = "code" if self.source.kind == "stdlib" else "prose"
        return self

    @property
    def raw_dir(self) -> Path:
        return self.output_dir / "raw"

    @property
    def clean_dir(self) -> Path:
        return self.output_dir / "clean"

    @property
    def tokenizer_dir(self) -> Path:
        return self.output_dir / "tokenizer"

    @property
    def packed_dir(self) -> Path:
        return self.output_dir / "packed"


# --------------------------------------------------------------------------------------------
# Chat data of the SFT and DPO stages (the `data:` section of configs/sft.yaml and configs/dpo.yaml)
# --------------------------------------------------------------------------------------------


#: A token holds about 4 bytes of text; a record of 64 bytes per row token is ~16 rows' worth: far more than
#: truncation keeps, so rejecting it by size loses nothing a row could hold and keeps tokenising bounded.
RECORD_BYTES_PER_TOKEN = 64
RECORD_BYTES_FLOOR = 64 << 10


#: Embedded (offline) chat sources by ``kind``: for each stage ("sft", "preference", "rl") the "module:function"
#: that yields its records (``function(cfg: ChatDataConfig) -> Iterator[Item]``). ``stdlib`` is built from
#: this Python's standard library; :func:`register_chat_source` adds others, usable as a source by name.
EMBEDDED_CHAT_SOURCES: dict[str, dict[str, str]] = {
    "stdlib": {
        "sft": "llm_pipeline.data.stdlib_chat:sft_records_of",
        "preference": "llm_pipeline.data.stdlib_chat:preference_records_of",
    },
    # the 'What is a + b?' task: SFT teaches its format before the RL stage's default task
    "arithmetic": {
        "sft": "llm_pipeline.data.arithmetic:sft_records_of",
        "rl": "llm_pipeline.data.arithmetic:rl_records_of",  # prompts with their verifier (the RL stage)
    },
    # refuse harmful requests, answer harmless look-alikes: the DPO demo's pairs, their chosen replies as SFT
    "safety": {
        "sft": "llm_pipeline.data.safety_pairs:sft_records_of",
        "preference": "llm_pipeline.data.safety_pairs:preference_records_of",
        "rl": "llm_pipeline.data.safety_pairs:rl_records_of",  # prompts with `refuse` (the refusal reward)
    },
}


def register_chat_source(
    kind: str, *, sft: str | None = None, preference: str | None = None, rl: str | None = None
) -> None:
    """Make ``kind: <kind>`` an embedded chat source (SFT, DPO records and/or RL prompts with their verifier
    fields), e.g. in a mixture's ``sources``."""
    if kind in ("local", "hf"):
        raise ValueError(f"{kind!r} is a reader of files or the hub, not a name for an embedded source")
    roles = (("sft", sft), ("preference", preference), ("rl", rl))
    EMBEDDED_CHAT_SOURCES[kind] = {k: v for k, v in roles if v is not None}


class ChatDataConfig(MixtureFields, ArithmeticTaskFields, StrictModel):
    """Where chat records come from and how long their token rows may be (shared by SFT and DPO).

    One source (``kind`` and its keys), or a weighted mixture of several (``sources``: each entry a name,
    a weight or ``examples`` budget, and these reader keys; the hub dataset is ``dataset`` there).
    """

    budget_key: ClassVar[str] = "examples"

    kind: str = Field(
        "stdlib",
        description="stdlib: built offline from this Python's standard library; local: files; hf: the hub; or "
        "another registered embedded source (data.config.EMBEDDED_CHAT_SOURCES).",
    )
    paths: list[str] = Field(
        default_factory=list, description="kind=local: *.jsonl, *.jsonl.gz, *.parquet files or folders of them."
    )
    val_paths: list[str] = Field(
        default_factory=list, description="kind=local: validation files (else val_fraction of the records)."
    )
    name: str | None = Field(None, description="kind=hf: dataset name, e.g. HuggingFaceH4/ultrachat_200k.")
    config_name: str | None = Field(None, description="kind=hf: dataset config (subset) name.")
    split: str = Field("train", description="kind=hf: training split, e.g. train_sft.")
    val_split: str | None = Field(None, description="kind=hf: validation split, e.g. test_sft (else val_fraction).")
    streaming: bool = Field(False, description="kind=hf: stream records instead of downloading the split first.")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Field renames, ours -> the dataset's, e.g. {messages: conversation, chosen: response_a}.",
    )
    tokenizer_dir: Path | None = Field(
        None,
        description="Tokenizer folder (and its chat template) the records are encoded with; default: the starting "
        "model's own (model.init_from).",
    )
    max_seq_len: int = Field(2048, gt=8, description="Longest token row (an SFT row or a DPO prompt + completion).")
    max_examples: int | None = Field(
        None,
        gt=0,
        description="Stop reading after this many usable training records (validation: what came first; kind=stdlib "
        "keeps every held-out pair).",
    )
    max_val_examples: int | None = Field(None, gt=0, description="Keep at most this many validation examples.")
    val_fraction: float = Field(
        0.01,
        ge=0,
        lt=1,
        description="Records (hashed by file:line) held out for validation when no val_paths / val_split / "
        "held-out module gives a split; 0 = no validation.",
    )
    held_out_modules: list[str] = Field(
        default_factory=lambda: list(HELD_OUT_MODULES),
        description="kind=stdlib: modules whose functions form the validation set (as in pretraining).",
    )
    stdlib_records: list[Literal["ask", "write", "multi"]] = Field(
        default_factory=lambda: ["ask", "write", "multi"],
        description="kind=stdlib, SFT: which conversations: ask ('What does `m.f` do?' -> its summary), write (its "
        "signature and docstring -> its source), multi (ask, then 'Show me how it is implemented.'). The CPU demo "
        "keeps ask: short answers, ~10x the examples per token, which is what teaches a tiny model the turn's end.",
    )
    rejects_path: str | None = Field(
        None, description="Rejects JSONL (file, line, reason, detail); default <output_dir>/<stage>_rejects.jsonl."
    )
    seed: int | None = Field(None, description="Shuffling and packing seed (epoch e uses seed + e); None: the run's.")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        known = ["local", "hf", *EMBEDDED_CHAT_SOURCES]
        if kind not in known:
            raise ValueError(f"unknown chat data kind {kind!r}; choose one of: {', '.join(known)}")
        return kind

    @property
    def embedded(self) -> bool:
        """Records built offline by a registered source (no files, no hub)."""
        return self.kind in EMBEDDED_CHAT_SOURCES

    def source_configs(self, renames: dict[str, str] | None = None) -> dict[str, ChatDataConfig]:  # type: ignore[override]
        """Each source's own section (``dataset`` is the hub dataset's name, this section's ``name``)."""
        return super().source_configs({"dataset": "name", **(renames or {})})

    @property
    def record_byte_limit(self) -> int:
        """The largest record (its strings' UTF-8 bytes) that is tokenised; larger ones are rejected as too_large.

        Derived from ``max_seq_len`` (no setting of its own, so configs and checkpoints of earlier runs
        stay valid): raise ``max_seq_len`` to accept longer records.
        """
        return max(RECORD_BYTES_FLOOR, RECORD_BYTES_PER_TOKEN * self.max_seq_len)

    @model_validator(mode="after")
    def _check_source(self) -> ChatDataConfig:
        if self.kind == "hf" and not self.name:
            raise ValueError("kind=hf needs name (e.g. HuggingFaceH4/ultrachat_200k)")
        if self.kind == "local" and not self.paths:
            raise ValueError("kind=local needs paths (files or folders)")
        for kind, keys in {"local": ("paths", "val_paths"), "hf": ("name", "config_name", "val_split")}.items():
            given = [k for k in keys if getattr(self, k)]
            if given and self.kind != kind:  # a silently ignored source setting would be a surprise
                raise ValueError(f"{', '.join(given)} only apply to kind={kind}, not kind={self.kind}")
        return self


class SFTDataConfig(ChatDataConfig):
    """SFT examples: conversations -> token ids with a trained-token mask, packed into rows."""

    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion"] = Field(
        "auto",
        description="Record layout: messages (OpenAI role/content), sharegpt (conversations from/value), alpaca "
        "(instruction/input/output), prompt_completion; auto picks per record by its fields.",
    )
    packing: bool = Field(True, description="Best-fit-decreasing packing into max_seq_len rows; false: one per row.")
    truncation: Literal["truncate", "drop"] = Field(
        "truncate", description="Over-long examples: cut the tail (the prompt is kept) or drop them."
    )
    train_on_prompt: bool = Field(False, description="Train on every token, not only the assistant replies.")


class PreferenceDataConfig(ChatDataConfig):
    """DPO pairs: a prompt and a chosen and a rejected completion, as strings or conversations."""

    max_seq_len: int = Field(1024, gt=8, description="Longest prompt + completion (each of chosen, rejected).")
    max_prompt_len: int = Field(
        512, gt=0, description="Prompts longer than this lose their left side first (then completions their tails)."
    )

    @model_validator(mode="after")
    def _check_lengths(self) -> PreferenceDataConfig:
        if self.max_prompt_len >= self.max_seq_len:
            raise ValueError(f"max_prompt_len ({self.max_prompt_len}) must be < max_seq_len ({self.max_seq_len})")
        return self


def stdlib_held_out_modules(cfg: Any) -> set[str] | None:
    """The standard-library modules that every embedded-stdlib source in ``cfg`` (a data or stage config, any
    depth: mixtures too) keeps out of training; None when it reads none. An eval that asks about "functions
    never trained on" (``chat_format``) must stay within these."""
    found: list[set[str]] = []

    def walk(node: Any) -> None:
        if isinstance(node, MixtureFields) and node.sources:  # each source's reader: the section's keys and its own
            walk(list(node.source_configs().values()))
        elif isinstance(node, SourceConfig | ChatDataConfig) and node.kind == "stdlib":
            found.append(set(node.held_out_modules))
        if isinstance(node, BaseModel):
            for name in type(node).model_fields:
                walk(getattr(node, name))
        elif isinstance(node, list | tuple):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            for item in node.values():
                walk(item)

    walk(cfg)
    return set.intersection(*found) if found else None
