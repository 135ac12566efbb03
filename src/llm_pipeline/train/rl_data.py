"""The RL stage's prompts with their verifiers, and the two sources that read them with the live policy.

Prompts come from the embedded arithmetic task (offline default, :mod:`llm_pipeline.data.arithmetic`), local
JSONL/Parquet files or a hub dataset. A record keeps every field (the rewards read their verifier from it:
GSM8K's ``answer``, MBPP's ``test_list``...) and its prompt is, by ``data.prompt_field``: a ``messages``
conversation (a trailing assistant turn is dropped), or the text of ``prompt`` / ``question`` / ``text`` as
the user turn. The start model's chat template renders it with the generation prompt.

:class:`RolloutSource` is the training batch source: when its rollout is used up it samples ``G``
completions for each of its next prompts with the current policy (our KV-cache generator), scores them,
computes group-relative advantages, and serves the rollout's rows for ``num_iterations`` optimizer steps.
Its state (prompt order, position, the sampling generator's state and the current rollout) is saved with
every checkpoint, so a resumed run samples the very same completions. :class:`HeldOutSource` answers the
held-out prompts greedily at every evaluation and reports their accuracy.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from llm_pipeline.config import StrictModel
from llm_pipeline.data.chat import ChatTemplate, RecordError
from llm_pipeline.data.chat_sources import iter_split_records, resolve_rejects_path
from llm_pipeline.data.config import (
    EMBEDDED_CHAT_SOURCES,
    RECORD_BYTES_FLOOR,
    RECORD_BYTES_PER_TOKEN,
    ArithmeticTaskFields,
)
from llm_pipeline.data.mixing import BLOCK, deficit_order
from llm_pipeline.data.mixture_config import MixtureFields
from llm_pipeline.data.sources import RejectLog
from llm_pipeline.hashing import hash64
from llm_pipeline.model.generate import generate
from llm_pipeline.rewards import SOURCE_KEY, CombinedReward
from llm_pipeline.train.objectives import IGNORE_INDEX
from llm_pipeline.train.parallel import any_rank, is_distributed
from llm_pipeline.train.rl_loss import (
    ADVANTAGES,
    OLD_LOGPS,
    REF_LOGPS,
    WEIGHTS,
    completion_logps,
    group_advantages,
    zero_std_groups,
)

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
PROMPT_FIELDS = ("messages", "prompt", "question", "text")


class RLDataConfig(MixtureFields, ArithmeticTaskFields, StrictModel):
    """The ``data:`` section of the RL stage: prompts and the fields their rewards check.

    Read by the SFT/DPO readers (:mod:`llm_pipeline.data.chat_sources`: size limit, rejects file, hash split),
    so the keys they read have their names here. One source (``kind`` and its keys), or a weighted mixture
    (``sources``: each entry a name, a weight or ``examples`` budget, and these reader keys, the hub dataset
    as ``dataset``); ``rl.rewards[].sources`` routes the rewards.
    """

    budget_key: ClassVar[str] = "examples"

    kind: str = Field(
        "arithmetic",
        description="arithmetic: the embedded arithmetic task ('What is a + b?', or operation largest); local: files; "
        "hf: the hub; or another embedded source with an rl role (data.config.EMBEDDED_CHAT_SOURCES).",
    )
    paths: list[str] = Field(default_factory=list, description="kind=local: JSONL / JSONL.gz / Parquet files.")
    val_paths: list[str] = Field(default_factory=list, description="kind=local: held-out prompts (else val_fraction).")
    name: str | None = Field(None, description="kind=hf: dataset, e.g. openai/gsm8k (config main).")
    config_name: str | None = Field(None, description="kind=hf: dataset config, e.g. main.")
    split: str = Field("train", description="kind=hf: training split.")
    val_split: str | None = Field(None, description="kind=hf: held-out split, e.g. test (else val_fraction).")
    streaming: bool = Field(False, description="kind=hf: stream records instead of downloading the split first.")
    prompt_field: Literal["auto", "messages", "prompt", "question", "text"] = Field(
        "auto", description="Where the prompt is; auto: the first of messages, prompt, question, text."
    )
    system_prompt: str | None = Field(None, description="A system turn put before every prompt.")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="Share of records held out when no split names them.")
    max_prompts: int | None = Field(None, gt=0, description="Keep at most this many training prompts.")
    max_val_prompts: int | None = Field(200, gt=0, description="Held-out prompts answered at every evaluation.")
    max_prompt_len: int = Field(256, gt=0, description="Longer prompts (in tokens) are skipped and counted.")
    tokenizer_dir: Path | None = Field(None, description="Tokenizer and chat template; default: the start model's.")
    rejects_path: str | None = Field(
        None, description="Where unreadable / too large records are written; default <output_dir>/rl_rejects.jsonl."
    )

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        known = ["local", "hf", *(k for k, roles in EMBEDDED_CHAT_SOURCES.items() if "rl" in roles)]
        if kind not in known:
            raise ValueError(f"unknown RL data kind {kind!r}; choose one of: {', '.join(known)}")
        return kind

    @model_validator(mode="after")
    def _check(self) -> RLDataConfig:
        if self.sources:
            if self.eval_loss != "weighted":
                raise ValueError(
                    "data.eval_loss does not apply to RL: the held-out `accuracy` is rl.accuracy_reward's over the "
                    "sources it scores, and every source's own is logged as <name>/accuracy"
                )
            for src in self.sources:
                if "tokenizer_dir" in src.reader:
                    raise ValueError(
                        f"data.sources {src.name!r} sets its own tokenizer_dir, but one policy renders every "
                        "prompt: set data.tokenizer_dir once for every source"
                    )
            return self
        if self.kind == "local" and not self.paths:
            raise ValueError("data.kind=local needs data.paths (JSONL or Parquet prompt files)")
        if self.kind == "hf" and not self.name:
            raise ValueError("data.kind=hf needs data.name (e.g. openai/gsm8k with config_name main)")
        return self

    def source_configs(self, renames: Mapping[str, str] | None = None) -> dict[str, RLDataConfig]:  # type: ignore[override]
        """Each source's own section (``dataset`` is the hub dataset's name, this section's ``name``)."""
        return super().source_configs({"dataset": "name", **(renames or {})})

    def readers(self) -> dict[str, RLDataConfig]:
        """Every source's own section by name; without a mixture ``{"": self}``."""
        return self.source_configs() if self.sources else {"": self}

    @property
    def embedded(self) -> bool:
        """Prompts built offline by a registered source (no files, no hub)."""
        return self.kind in EMBEDDED_CHAT_SOURCES

    @property
    def max_seq_len(self) -> int:
        """The readers' name for the token limit a record's byte limit follows from."""
        return self.max_prompt_len

    @property
    def record_byte_limit(self) -> int:
        """A record (its strings' UTF-8 bytes) larger than this is rejected as too_large before it is parsed."""
        return max(RECORD_BYTES_FLOOR, RECORD_BYTES_PER_TOKEN * self.max_prompt_len)


def prompt_messages(record: dict[str, Any], field: str, system: str | None, where: str) -> list[dict[str, str]]:
    """The conversation a record's prompt is (see the module docstring); RecordError when it has none."""
    name = next((f for f in PROMPT_FIELDS if f in record), None) if field == "auto" else field
    if name is None or name not in record:
        raise RecordError("no_prompt", f"{where}: no {' / '.join(PROMPT_FIELDS) if field == 'auto' else field} field")
    value = record[name]
    if name == "messages":
        if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
            raise RecordError("bad_messages", f"{where}: messages must be a list of role/content objects")
        msgs = [{"role": str(m.get("role")), "content": str(m.get("content", ""))} for m in value]
        while msgs and msgs[-1]["role"] == "assistant":
            msgs.pop()
        if not msgs:
            raise RecordError("no_prompt", f"{where}: the conversation has no user turn")
    else:
        msgs = [{"role": "user", "content": str(value)}]
    if system and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system}, *msgs]
    return msgs


def load_prompts(
    cfg: RLDataConfig,
    template: ChatTemplate,
    *,
    output_dir: str | Path | None = None,
    rank: int = 0,
    source: str | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """``{"train": [...], "val": [...]}`` examples (the record + ``prompt_ids``) and a report of what was skipped.

    The records come from the SFT/DPO reader (:func:`~llm_pipeline.data.chat_sources.iter_split_records`):
    unreadable and too large ones go to the rejects file (rank 0 writes it), the rest are split as there.
    A mixture's ``source`` name is put in every example under :data:`~llm_pipeline.rewards.SOURCE_KEY`
    (a record that has that field already is rejected, never overwritten).
    """
    caps = {"train": cfg.max_prompts, "val": cfg.max_val_prompts}
    kept: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}

    def full(split: str) -> bool:
        cap = caps[split]
        return cap is not None and len(kept[split]) >= cap

    rejects_path = resolve_rejects_path(cfg.rejects_path, output_dir, "rl") if rank == 0 else None
    with RejectLog(rejects_path) as rejects:
        for split, item in iter_split_records(cfg, "rl", rejects, full=full):  # type: ignore[arg-type]
            record, where = item.record, item.where
            try:
                if not isinstance(record, dict):
                    raise RecordError("not_an_object", f"{where}: a record must be a JSON object")
                if source is not None and SOURCE_KEY in record:
                    raise RecordError("reserved_field", f"{where}: {SOURCE_KEY!r} is where RL keeps the source name")
                ids = template.encode_prompt(prompt_messages(record, cfg.prompt_field, cfg.system_prompt, where))
            except RecordError as e:
                rejects.add(where, e.reason, e.detail, item.doc_id)
                continue
            if len(ids) > cfg.max_prompt_len:
                rejects.add(where, "prompt_too_long", f"{len(ids)} tokens > data.max_prompt_len", item.doc_id)
                continue
            tag = {SOURCE_KEY: source} if source is not None else {}
            kept[split].append({**record, "prompt_ids": ids, "where": where, **tag})
            if all(full(s) for s in caps):
                break
        skipped = dict(sorted(rejects.counts.items()))
    if not kept["train"]:
        raise ValueError(f"RL data ({cfg.kind}): no usable training prompt (skipped: {skipped or 'nothing read'})")
    report = {"source": cfg.kind, "train_prompts": len(kept["train"]), "val_prompts": len(kept["val"]),
              "skipped": skipped, "rejects_path": str(rejects_path) if rejects_path else None}  # fmt: skip
    return kept, report


def load_sources(
    cfg: RLDataConfig, template: ChatTemplate, *, output_dir: str | Path | None = None, rank: int = 0
) -> tuple[dict[str, dict[str, list[dict[str, Any]]]], dict[str, Any]]:
    """Every source of ``data.sources`` loaded by :func:`load_prompts` (``{name: {"train", "val"}}``, each with
    its own rejects file) and one report (each source's under ``sources``); an error names its source."""
    from llm_pipeline.data.chat_sources import mixture_rejects_path

    examples: dict[str, dict[str, list[dict[str, Any]]]] = {}
    reports: dict[str, dict[str, Any]] = {}
    for name, scfg in cfg.source_configs().items():
        path = mixture_rejects_path(scfg.rejects_path, output_dir, "rl", name)
        scfg = scfg.model_copy(update={"rejects_path": str(path) if path else None})
        try:
            examples[name], reports[name] = load_prompts(scfg, template, output_dir=output_dir, rank=rank, source=name)
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            raise type(e)(f"data source {name!r}: {e}") from None
    report = {"source": "mixture", "train_prompts": sum(r["train_prompts"] for r in reports.values()),
              "val_prompts": sum(r["val_prompts"] for r in reports.values()), "sources": reports}  # fmt: skip
    return examples, report


def check_prompt_passes(
    entries: Mapping[str, Any], shares: Mapping[str, float], sizes: Mapping[str, int], prompts: int
) -> dict[str, float]:
    """Passes over each source's training prompts that drawing ``prompts`` (all rollouts, DAPO's refill rounds
    not counted) makes; a source's ``max_epochs`` exceeded (beyond the margin and one rollout) is refused."""
    from llm_pipeline.data.mixing import CAP_MARGIN

    planned = {n: shares[n] * prompts / max(sizes[n], 1) for n in shares}
    for n, passes in planned.items():
        cap = getattr(entries[n], "max_epochs", None)
        if cap is not None and passes > cap * (1 + CAP_MARGIN) + 1e-9:
            raise ValueError(
                f"data source {n!r}: the run would pass over its {sizes[n]} prompts {passes:.2f} times, more than "
                f"its max_epochs {cap:g}; lower its share, train fewer steps (training.max_steps) or raise max_epochs"
            )
    return planned


class Sampler:
    """How completions are drawn (shared by the rollout and the held-out evaluation)."""

    def __init__(
        self,
        *,
        stop_ids: list[int],
        pad_id: int,
        decode: Callable[[list[int]], str],
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> None:
        self.stop_ids, self.pad_id, self.decode, self.autocast = stop_ids, pad_id, decode, autocast

    def sample(self, model: nn.Module, prompts: list[list[int]], **kw: Any) -> list[list[int]]:
        """Completions of ``prompts``, each ending at (and including) its first stop token.

        Across ranks (FSDP gathers weights in every forward) every rank keeps decoding until all ranks'
        rows are done, so no rank waits for a forward that never comes.
        """
        keep = any_rank if is_distributed() else None
        with self.autocast():
            return generate(model, prompts, eos_token_ids=self.stop_ids, pad_token_id=self.pad_id,  # type: ignore[arg-type]
                            keep_stepping=keep, **kw)  # fmt: skip

    def text(self, completion: list[int]) -> str:
        """The completion's text for the rewards (its end-of-turn token dropped)."""
        if completion and completion[-1] in self.stop_ids:
            completion = completion[:-1]
        return self.decode(completion)


def completion_rows(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> Batch:
    """``input_ids`` (prompt + completion, right-padded) and ``labels`` (the completion tokens, shifted)."""
    rows = [p + c for p, c in zip(prompts, completions, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids[i, : len(p) + len(c)] = torch.as_tensor(p + c)
        if c:
            labels[i, len(p) - 1 : len(p) + len(c) - 1] = torch.as_tensor(c)
    return {"input_ids": ids, "labels": labels}


def sampling_generator(seed: int, device: torch.device) -> torch.Generator:
    """The rollouts' generator, on ``device`` (CUDA sampling refuses a CPU generator); its state is a CPU tensor."""
    return torch.Generator(device=device).manual_seed(seed)


class RolloutSource:
    """Rollouts of the live policy as training batches (see the module docstring).

    ``model`` (and ``reference_model`` for a KL penalty) are set by the stage once the weights are loaded.
    Every round draws the next ``prompts_per_rank`` x ``world_size`` prompts of one order and one
    [rows, max_new_tokens] block of sampling numbers, both the same on every rank and for every world size;
    rank r samples the r-th slice of each. So a run on W ranks trains on the very rollouts one process does.
    """

    def __init__(
        self,
        examples: list[dict[str, Any]] | Mapping[str, list[dict[str, Any]]],
        *,
        reward: CombinedReward,
        sampler: Sampler,
        prompts_per_rank: int,
        num_generations: int,
        num_iterations: int,
        advantage: str,
        filter_zero_std_groups: bool,
        beta: float,
        dynamic_sampling_rounds: int = 1,
        generation: dict[str, Any],
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        chunk_tokens: int = 2048,
        temperature: float = 1.0,
    ) -> None:
        # the prompts of each source (one unnamed source unless a mixture), and all of them (check_data reads these)
        self.pools = {n: list(v) for n, v in examples.items()} if isinstance(examples, Mapping) else {"": examples}
        self.names = list(self.pools)
        self.examples = [ex for pool in self.pools.values() for ex in pool]
        self.reward, self.sampler = reward, sampler
        self.prompts, self.group = prompts_per_rank, num_generations
        self.iterations, self.advantage, self.filter = num_iterations, advantage, filter_zero_std_groups
        self.beta, self.generation, self.chunk_tokens = beta, generation, chunk_tokens
        self.seed, self.rank, self.world_size, self.temperature = seed, rank, world_size, temperature
        self.model: nn.Module | None = None
        self.reference_model: nn.Module | None = None
        self.micro = prompts_per_rank * num_generations
        self.generator = sampling_generator(seed, torch.device("cpu"))
        self.epochs, self.cursors = dict.fromkeys(self.names, 0), dict.fromkeys(self.names, 0)
        self.orders = {n: self._order(n, 0) for n in self.names}
        self.rollout: Batch | None = None
        self.iteration, self.row = 0, 0
        self.metrics: dict[str, float] = {}
        self.rollouts = 0
        self.rounds = dynamic_sampling_rounds
        self._timing = {"generation": 0.0, "scoring": 0.0}

    def use_device(self, device: torch.device) -> None:
        """Draw the sampling numbers on the model's device (the stage calls it before any resume loads state)."""
        self.generator = sampling_generator(self.seed, device)

    # ---- the protocol of the loop ------------------------------------------------------------------

    def set_micro_batch_size(self, rows: int) -> None:
        self.micro = rows

    def next_batch(self) -> Batch:
        rows = self.prompts * self.group
        if self.rollout is not None and self.row >= rows:
            self.iteration, self.row = self.iteration + 1, 0
        spent = self.rollout is not None and not bool((self.rollout[WEIGHTS] > 0).any())  # nothing to reuse
        if self.rollout is None or self.iteration >= self.iterations or spent:
            self.rollout = self._make_rollout()
            self.iteration, self.row = 0, 0
        elif self.row == 0:
            self.metrics.update({"timing/generation_s": 0.0, "timing/scoring_s": 0.0, "timing/reference_s": 0.0})
        batch = {k: v[self.row : self.row + self.micro] for k, v in self.rollout.items()}
        self.row += self.micro
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "sources": {n: {"epoch": self.epochs[n], "cursor": self.cursors[n]} for n in self.names},
            "generator": self.generator.get_state(),
            "rollout": dict(self.rollout) if self.rollout is not None else None,
            "iteration": self.iteration,
            "row": self.row,
            "metrics": dict(self.metrics),
            "rollouts": self.rollouts,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        walks = state.get("sources") or {"": {"epoch": state["epoch"], "cursor": state["cursor"]}}  # (older files)
        if sorted(walks) != sorted(self.names):
            raise ValueError(
                f"the checkpoint's RL prompt sources ({', '.join(sorted(walks)) or 'one source'}) are not this run's "
                f"({', '.join(self.names) or 'one source'}): resume with the data.sources it was trained on"
            )
        for n, walk in walks.items():
            self.epochs[n], self.cursors[n] = int(walk["epoch"]), int(walk["cursor"])
            self.orders[n] = self._order(n, self.epochs[n])
        self.generator.set_state(state["generator"])
        self.rollout = dict(state["rollout"]) if state["rollout"] is not None else None
        self.iteration, self.row = int(state["iteration"]), int(state["row"])
        self.metrics = dict(state.get("metrics", {}))
        self.rollouts = int(state.get("rollouts", 0))

    # ---- a rollout ---------------------------------------------------------------------------------

    def _order(self, name: str, epoch: int) -> list[int]:
        """The order source ``name`` is walked in during ``epoch`` (a seeded permutation of its prompts)."""
        g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        return torch.randperm(len(self.pools[name]), generator=g).tolist()

    def _pick(self, count: int) -> list[int]:
        """The source (index into ``names``) of each of the next ``count`` prompts of the global order."""
        return [0] * count

    def _take(self, name: str) -> dict[str, Any]:
        """The next prompt of source ``name``'s walk (its next epoch's order when this one is used up)."""
        if self.cursors[name] >= len(self.orders[name]):
            self.epochs[name], self.cursors[name] = self.epochs[name] + 1, 0
            self.orders[name] = self._order(name, self.epochs[name])
        example = self.pools[name][self.orders[name][self.cursors[name]]]
        self.cursors[name] += 1
        return example

    def _next_examples(self) -> list[dict[str, Any]]:
        """This rank's slice of the next ``prompts x world_size`` prompts of the global order."""
        out = [self._take(self.names[k]) for k in self._pick(self.prompts * self.world_size)]
        return out[self.rank * self.prompts : (self.rank + 1) * self.prompts]

    def _sample_groups(self) -> list[dict[str, Any]]:
        """One round: ``G`` completions of each of the next prompts, scored; one dict per group."""
        assert self.model is not None
        examples = [ex for ex in self._next_examples() for _ in range(self.group)]
        prompts = [list(ex["prompt_ids"]) for ex in examples]
        gen, rows = self.generator, len(prompts)
        uniforms = torch.rand(rows * self.world_size, self.generation["max_new_tokens"], generator=gen,
                              device=gen.device)[self.rank * rows : (self.rank + 1) * rows]  # fmt: skip
        t0 = time.perf_counter()
        completions = self.sampler.sample(self.model, prompts, uniforms=uniforms, **self.generation)
        t1 = time.perf_counter()
        total, parts = self.reward([self.sampler.text(c) for c in completions], examples)
        self._timing["generation"] += t1 - t0
        self._timing["scoring"] += time.perf_counter() - t1
        g = self.group
        return [
            {"examples": examples[i : i + g], "prompts": prompts[i : i + g], "completions": completions[i : i + g],
             "rewards": total[i : i + g], "parts": {k: v[i : i + g] for k, v in parts.items()}}
            for i in range(0, len(examples), g)
        ]  # fmt: skip

    def _make_rollout(self) -> Batch:
        """Sample, score and assemble one rollout; with the filter, groups whose rewards are all equal are
        replaced by groups of further rounds (DAPO's dynamic sampling, at most ``dynamic_sampling_rounds``);
        any still missing stay in the batch with no loss units."""
        if self.model is None:
            raise RuntimeError("RolloutSource.model is not set: the RL stage sets it in prepare()")
        self._timing = {"generation": 0.0, "scoring": 0.0}
        sampled: list[dict[str, Any]] = []
        useful: list[dict[str, Any]] = []
        rounds = 0
        while True:
            rounds += 1
            new = self._sample_groups()
            sampled += new
            useful += [grp for grp in new if len(set(grp["rewards"])) > 1]
            # every rank takes the same number of rounds (their forwards are collective under FSDP)
            if not any_rank(self.filter and len(useful) < self.prompts and rounds < self.rounds):
                break
        if self.filter:
            spare = [grp for grp in sampled if len(set(grp["rewards"])) <= 1]
            groups = (useful + spare)[: self.prompts]
        else:
            groups = sampled[: self.prompts]
        t2 = time.perf_counter()
        prompts = [p for grp in groups for p in grp["prompts"]]
        completions = [c for grp in groups for c in grp["completions"]]
        rewards = torch.tensor([r for grp in groups for r in grp["rewards"]], dtype=torch.float32)
        batch = completion_rows(prompts, completions, self.sampler.pad_id)
        batch[ADVANTAGES] = group_advantages(rewards, self.group, self.advantage)
        zero_std = zero_std_groups(rewards, self.group)
        batch[WEIGHTS] = (~zero_std).float() if self.filter else torch.ones(len(completions))
        if self.iterations > 1:  # the sampling policy's log-probs: the ratio's denominator for every step
            batch[OLD_LOGPS] = self._logps(self.model, batch)
        if self.beta > 0:
            if self.reference_model is None:
                raise RuntimeError("rl.beta > 0 needs the reference model (the RL stage builds it in prepare())")
            batch[REF_LOGPS] = self._logps(self.reference_model, batch)
        t3 = time.perf_counter()
        self.rollouts += 1
        self.metrics = self._rollout_metrics(sampled, rounds, t3 - t2)
        return batch

    def _rollout_metrics(self, sampled: list[dict[str, Any]], rounds: int, reference_s: float) -> dict[str, float]:
        """TRL's names where they exist, over every group sampled for this rollout."""
        rewards = torch.tensor([r for grp in sampled for r in grp["rewards"]], dtype=torch.float32)
        groups = rewards.view(-1, self.group)
        lengths = torch.tensor([len(c) for grp in sampled for c in grp["completions"]], dtype=torch.float32)
        truncated = [not c or c[-1] not in self.sampler.stop_ids for grp in sampled for c in grp["completions"]]
        labels = list(sampled[0]["parts"])
        # each reward over the completions it applies to (None: another source's, or the reward said so)
        parts = {k: torch.tensor([v for grp in sampled for v in grp["parts"][k] if v is not None]) for k in labels}
        parts = {k: v for k, v in parts.items() if len(v)}
        return {
            "reward": float(rewards.mean()),
            "reward_std": float(groups.std(dim=1).mean()),
            **{f"rewards/{k}/mean": float(v.mean()) for k, v in parts.items()},
            **{f"rewards/{k}/std": float(v.std()) if len(v) > 1 else 0.0 for k, v in parts.items()},
            **self.reward.counters(),
            "frac_reward_zero_std": float((groups == groups[:, :1]).all(dim=1).float().mean()),
            "sampling_rounds": float(rounds),
            "completions/mean_length": float(lengths.mean()),
            "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()),
            "completions/clipped_ratio": sum(truncated) / len(truncated),
            "timing/generation_s": self._timing["generation"],
            "timing/scoring_s": self._timing["scoring"],
            "timing/reference_s": reference_s,
        }

    @torch.no_grad()
    def _logps(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Per-token log-probs of the completions under ``model``, micro-batch by micro-batch (as training runs)."""
        out = []
        was = model.training
        model.eval()
        try:
            for i in range(0, batch["input_ids"].shape[0], self.micro):
                ids, labels = batch["input_ids"][i : i + self.micro], batch["labels"][i : i + self.micro]
                dev = next(model.parameters()).device
                with self.sampler.autocast():
                    logp, _ = model(
                        ids.to(dev),
                        head_fn=lambda h, head, y=labels.to(dev): completion_logps(
                            head, h, y, chunk_tokens=self.chunk_tokens, temperature=self.temperature
                        ),
                    )
                out.append(logp.float().cpu())
        finally:
            model.train(was)
        return torch.cat(out)


class MixedRolloutSource(RolloutSource):
    """Rollouts whose prompts come from a weighted mixture of sources (``data.sources``).

    Global prompt ``n`` (every rollout draws the next ``prompts_per_rank`` x ``world_size``, rank r samples
    the r-th slice, as for one source) comes from the source :func:`~llm_pipeline.data.mixing.deficit_order`
    gives position ``n`` (the project's deterministic weighted order, with rank 0's jitter on every rank),
    and is that source's next prompt in its own seeded permutation, one per pass over it. The order's position
    and counts, each source's pass and position, and the per-source counts are in the state, so a resumed run
    draws the very same prompts. It reports like a :class:`~llm_pipeline.data.mixing.WeightedMixture`
    (``names``, ``shares``, ``counts()``, ``passes()``): the runner logs ``mix/<source>/share`` (of the
    prompts drawn so far), ``mix/<source>/examples`` and ``mix/<source>/tokens``; the rollout adds
    ``mix/<source>/reward``, its completions' mean total reward.
    """

    unit = "examples"

    def __init__(
        self, sources: Mapping[str, list[dict[str, Any]]], *, shares: Mapping[str, float], **kwargs: Any
    ) -> None:
        tagged = {n: [ex if ex.get(SOURCE_KEY) == n else {**ex, SOURCE_KEY: n} for ex in pool]
                  for n, pool in sources.items()}  # fmt: skip
        empty = [n for n, pool in tagged.items() if not pool and shares.get(n, 0) > 0]
        if empty:
            raise ValueError(f"data source(s) {', '.join(map(repr, empty))}: no training prompt to draw")
        self.shares = {n: float(shares[n]) for n in tagged}
        self.row_weights = np.array([self.shares[n] for n in tagged], np.float64)
        self.drawn = 0  # global prompts drawn so far: the position in the weighted order
        self.block, self.block_counts = 0, np.zeros(len(tagged), np.int64)  # counts at that block's start
        self._block_draw: tuple[np.ndarray, np.ndarray] | None = None  # the current block's order and end counts
        self.drawn_counts = {n: dict.fromkeys(("rows", "tokens", "trained_tokens", "examples"), 0) for n in tagged}
        super().__init__(tagged, **kwargs)

    def _order(self, name: str, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(hash64(f"rl-prompts:{self.seed}:{name}:{epoch}") >> 1)
        return torch.randperm(len(self.pools[name]), generator=g).tolist()

    def _pick(self, count: int) -> list[int]:
        out = []
        for pos in range(self.drawn, self.drawn + count):
            while self.block < pos // BLOCK:  # into the next block: its start counts are the last one's end
                self.block_counts = self._draw_block()[1]
                self.block, self._block_draw = self.block + 1, None
            out.append(int(self._draw_block()[0][pos % BLOCK]))
        self.drawn += count
        return out

    def _draw_block(self) -> tuple[np.ndarray, np.ndarray]:
        """The current block's sources and the counts at its end (drawn once per block, kept until the next)."""
        if self._block_draw is None:
            self._block_draw = deficit_order(self.row_weights, self.block_counts, self.seed, 0, self.block)
        return self._block_draw

    def _sample_groups(self) -> list[dict[str, Any]]:
        groups = super()._sample_groups()
        for grp in groups:
            c = self.drawn_counts[grp["examples"][0][SOURCE_KEY]]
            c["examples"] += 1
            c["rows"] += len(grp["completions"])
            c["trained_tokens"] += sum(len(x) for x in grp["completions"])
            c["tokens"] += sum(len(p) + len(x) for p, x in zip(grp["prompts"], grp["completions"], strict=True))
        return groups

    def _rollout_metrics(self, sampled: list[dict[str, Any]], rounds: int, reference_s: float) -> dict[str, float]:
        metrics = super()._rollout_metrics(sampled, rounds, reference_s)
        for n in self.names:
            rewards = [r for grp in sampled if grp["examples"][0][SOURCE_KEY] == n for r in grp["rewards"]]
            if rewards:
                metrics[f"mix/{n}/reward"] = sum(rewards) / len(rewards)
        return metrics

    # ---- what the runner's mixture report reads (train.mixture.MixtureReport) -----------------------

    def counts(self) -> dict[str, dict[str, int]]:
        """This rank's prompts (``examples``), completions (``rows``) and their tokens, per source."""
        return {n: dict(c) for n, c in self.drawn_counts.items()}

    def passes(self) -> dict[str, int]:
        """Passes begun after the first over each source's prompts."""
        return dict(self.epochs)

    def state_dict(self) -> dict[str, Any]:
        mix = {"drawn": self.drawn, "block": self.block, "block_counts": self.block_counts.tolist(),
               "counts": self.counts()}  # fmt: skip
        return {**super().state_dict(), "mix": mix}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        mix = state["mix"]
        self.drawn, self.block = int(mix["drawn"]), int(mix["block"])
        self.block_counts = np.array(mix["block_counts"], np.int64)
        self._block_draw = None
        self.drawn_counts = {n: {k: int(v) for k, v in mix["counts"][n].items()} for n in self.names}


class HeldOutSource:
    """The held-out prompts answered greedily by the live model, in order; ends (StopIteration) after the last."""

    def __init__(
        self,
        examples: list[dict[str, Any]],
        *,
        reward: CombinedReward,
        accuracy_reward: str,
        sampler: Sampler,
        max_new_tokens: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        share = examples[rank::world_size]
        size = -(-len(examples) // world_size)  # every rank answers as many prompts (collective forwards)
        self.weights = [1.0] * len(share) + [0.0] * (size - len(share))
        self.examples = share + [examples[0]] * (size - len(share))
        self.reward, self.accuracy_reward, self.sampler = reward, accuracy_reward, sampler
        self.max_new_tokens = max_new_tokens
        self.model: nn.Module | None = None
        self.micro, self.cursor = 8, 0

    def set_micro_batch_size(self, rows: int) -> None:
        self.micro = rows

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = int(state["cursor"])

    def next_batch(self) -> Batch:
        if self.model is None:
            raise RuntimeError("HeldOutSource.model is not set: the RL stage sets it in prepare()")
        if self.cursor >= len(self.examples):
            raise StopIteration
        examples = self.examples[self.cursor : self.cursor + self.micro]
        self.cursor += len(examples)
        prompts = [list(ex["prompt_ids"]) for ex in examples]
        completions = self.sampler.sample(self.model, prompts, max_new_tokens=self.max_new_tokens, temperature=0.0)
        texts = [self.sampler.text(c) for c in completions]
        total, parts = self.reward(texts, examples)
        return {
            "correct": torch.tensor(
                [v is not None and v >= 1.0 for v in parts[self.accuracy_reward]], dtype=torch.float32
            ),
            "reward": torch.tensor(total, dtype=torch.float32),
            WEIGHTS: torch.tensor(self.weights[self.cursor - len(examples) : self.cursor]),
        }
