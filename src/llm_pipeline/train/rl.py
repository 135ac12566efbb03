"""The RL stage: reinforcement learning with verifiable rewards (GRPO, Dr. GRPO, DAPO, RLOO) on the stage runner.

``llm-pipeline rl --config configs/rl.yaml``. Each optimizer step reads its batch from a
:class:`~llm_pipeline.train.rl_data.RolloutSource`: ``G`` completions for each of ``P`` prompts sampled with
the current policy (temperature, top-p, at most ``max_new_tokens``, stopping at the chat template's end
token), scored by the reward functions (:mod:`llm_pipeline.rewards`), turned into group-relative advantages,
and trained with the clipped objective of :mod:`llm_pipeline.train.rl_loss` for ``num_iterations`` steps.
The loop, checkpoints, resume, evaluation, metrics and exports are the runner's (:mod:`llm_pipeline.train.stage`);
the rollout's own metrics (``reward``, ``rewards/<fn>/mean``, ``frac_reward_zero_std``, completion lengths,
generation/scoring/training time) join each step's line through a callback. Every evaluation answers the
held-out prompts greedily: ``accuracy`` (and ``reward``) in the eval rows. With ``data.sources`` the prompts
are a weighted mixture (:class:`~llm_pipeline.train.rl_data.MixedRolloutSource`), ``rl.rewards[].sources``
routes each reward to its sources, and each source's held-out prompts add ``<source>/accuracy``.

``rl.variant`` picks a published recipe's defaults (each key can still be set):

==========  ===========  =========  ============  ===============  ====
variant     advantage    loss_type  epsilon_high  filter groups    beta
==========  ===========  =========  ============  ===============  ====
grpo        (r-μ)/σ      grpo       0.2           no               0.04
dr_grpo     r-μ          dr_grpo    0.2           no               0
dapo        (r-μ)/σ      dapo       0.28          yes (3 rounds)   0
rloo        leave-1-out  grpo       0.2           no               0
==========  ===========  =========  ============  ===============  ====
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator
from torch import nn

from llm_pipeline.config import ModelConfig, StrictModel
from llm_pipeline.hardware import Check
from llm_pipeline.rewards import RewardSpec
from llm_pipeline.train.batching import Batching, BatchSource, RowBatching
from llm_pipeline.train.config import StageConfig
from llm_pipeline.train.objectives import Objective
from llm_pipeline.train.parallel import DistInfo
from llm_pipeline.train.rl_data import RLDataConfig
from llm_pipeline.train.rl_loss import RLObjective
from llm_pipeline.train.stage import Stage
from llm_pipeline.train.stage_inputs import InputContext, MemoryPlan, source_check
from llm_pipeline.train.trainer import Callback, Trainer

log = logging.getLogger(__name__)

#: rl.variant -> the defaults it sets (keys the config names explicitly win).
VARIANTS: dict[str, dict[str, Any]] = {
    "grpo": {"advantage": "grpo", "loss_type": "grpo", "epsilon_high": 0.2, "filter_zero_std_groups": False,
             "dynamic_sampling_rounds": 1, "beta": 0.04},
    "dr_grpo": {"advantage": "dr_grpo", "loss_type": "dr_grpo", "epsilon_high": 0.2,
                "filter_zero_std_groups": False, "dynamic_sampling_rounds": 1, "beta": 0.0},
    "dapo": {"advantage": "grpo", "loss_type": "dapo", "epsilon_high": 0.28, "filter_zero_std_groups": True,
             "dynamic_sampling_rounds": 3, "beta": 0.0},
    "rloo": {"advantage": "rloo", "loss_type": "grpo", "epsilon_high": 0.2, "filter_zero_std_groups": False,
             "dynamic_sampling_rounds": 1, "beta": 0.0},
}  # fmt: skip


class RLSection(StrictModel):
    """The ``rl:`` section: sampling, the objective and the rewards."""

    variant: Literal["grpo", "dr_grpo", "dapo", "rloo"] = Field("grpo", description="Recipe whose defaults apply.")
    prompts_per_step: int = Field(16, gt=0, description="P: prompts sampled per rollout (all ranks together).")
    num_generations: int = Field(8, ge=2, description="G: completions per prompt (a group).")
    num_iterations: int = Field(1, ge=1, description="Optimizer steps on each rollout (μ; 1: ratio exactly 1).")
    max_new_tokens: int = Field(256, gt=0, description="Longest completion (also Dr. GRPO's constant normaliser).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the rollouts.")
    top_k: int = Field(0, ge=0, description="Top-k sampling of the rollouts (0: off).")
    advantage: Literal["grpo", "dr_grpo", "rloo"] | None = Field(
        None, description="grpo: (r - mean)/std per group; dr_grpo: r - mean; rloo: leave-one-out baseline."
    )
    loss_type: Literal["grpo", "dr_grpo", "dapo"] | None = Field(
        None, description="grpo: per-sequence mean; dr_grpo: sum / (N·max_new_tokens); dapo: token-level mean."
    )
    epsilon: float = Field(0.2, gt=0, lt=1, description="Lower clip ε_low of the ratio.")
    epsilon_high: float | None = Field(None, gt=0, description="Upper clip ε_high (DAPO's clip-higher: 0.28).")
    filter_zero_std_groups: bool | None = Field(
        None, description="Give groups whose rewards are all equal no loss units (DAPO's dynamic-sampling filter)."
    )
    dynamic_sampling_rounds: int | None = Field(
        None, ge=1, description="With the filter: sampling rounds at most to fill a rollout with useful groups."
    )
    beta: float | None = Field(None, ge=0, description="Weight of the k3 KL to the start model (0: no reference).")
    rewards: list[RewardSpec] = Field(
        default_factory=lambda: [RewardSpec(name="numeric_answer")],
        description="Reward functions, summed with their weights.",
    )
    accuracy_reward: str | None = Field(
        None, description="The reward whose value 1 means 'correct' for the held-out accuracy (default: the first)."
    )
    eval_max_new_tokens: int | None = Field(
        None, gt=0, description="Held-out answers' length (default max_new_tokens)."
    )

    @model_validator(mode="after")
    def _defaults(self) -> RLSection:
        for key, value in VARIANTS[self.variant].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        labels = [r.label for r in self.rewards]
        if self.accuracy_reward is None:
            self.accuracy_reward = labels[0] if labels else None
        elif self.accuracy_reward not in labels:
            raise ValueError(f"rl.accuracy_reward {self.accuracy_reward!r} is none of rl.rewards ({labels})")
        if self.num_generations < 2 and self.advantage == "rloo":
            raise ValueError("rl.advantage rloo needs rl.num_generations >= 2")
        return self

    @property
    def rows(self) -> int:
        return self.prompts_per_step * self.num_generations


class RLConfig(StageConfig):
    """``configs/rl.yaml``: start model + prompts with verifiers + the loop + parallelism + the ``rl`` section."""

    batch_unit: ClassVar[str] = "completions"
    default_output_dir: ClassVar[str] = "checkpoints/rl"
    fixed_on_resume: ClassVar[tuple[str, ...]] = ("training.seed", "model.init_from")

    data: RLDataConfig = Field(default_factory=RLDataConfig)
    rl: RLSection = Field(default_factory=RLSection)

    @model_validator(mode="before")
    @classmethod
    def _batch_from_rollout(cls, data: Any) -> Any:
        """training.global_batch_size defaults to the rollout's rows (P x G)."""
        if isinstance(data, dict):
            rl, training = data.get("rl") or {}, data.get("training") or {}
            if isinstance(rl, dict) and isinstance(training, dict) and training.get("global_batch_size") is None:
                fields = RLSection.model_fields
                p = rl.get("prompts_per_step", fields["prompts_per_step"].default)
                g = rl.get("num_generations", fields["num_generations"].default)
                data = {**data, "training": {**training, "global_batch_size": p * g}}
        return data

    @model_validator(mode="after")
    def _check(self) -> RLConfig:
        if self.model.init_from is None:
            raise ValueError(
                "RL starts from a trained chat model: set model.init_from to an HF model folder with its tokenizer "
                "and chat template (e.g. checkpoints/dpo_final)"
            )
        self._check_routing()
        rows = self.rl.rows
        if self.training.global_batch_size != rows:
            raise ValueError(
                f"training.global_batch_size ({self.training.global_batch_size}) must equal rl.prompts_per_step x "
                f"rl.num_generations ({rows}): one optimizer step trains on one rollout (leave it unset)"
            )
        return self

    def _check_routing(self) -> None:
        """``rl.rewards[].sources`` name sources of ``data.sources``, and every source has a reward."""
        names = [s.name for s in self.data.sources]
        for i, r in enumerate(self.rl.rewards):
            if r.sources is None:
                continue
            if not names:
                raise ValueError(
                    f"rl.rewards[{i}] ({r.label}) sets sources {r.sources}, but data.sources is empty: routing "
                    "rewards by source needs a mixture of prompt sources"
                )
            unknown = [n for n in r.sources if n not in names]
            if unknown:
                raise ValueError(
                    f"rl.rewards[{i}] ({r.label}): sources {', '.join(map(repr, unknown))} not in data.sources "
                    f"(have: {', '.join(names)})"
                )
        bare = self.anchor_sources
        if bare and (not self.rl.beta or self.rl.filter_zero_std_groups):
            why = "rl.beta is 0" if not self.rl.beta else "rl.filter_zero_std_groups drops its groups"
            raise ValueError(
                f"data.sources {', '.join(map(repr, bare))}: no reward in rl.rewards scores its prompts, and {why}: "
                "its groups would teach nothing. Add it to a reward's sources, or keep it as a KL anchor (its "
                "completions only held near the start model) with rl.beta > 0 and no zero-std filter"
            )

    @property
    def anchor_sources(self) -> list[str]:
        """Mixture sources no reward scores: KL anchors (their groups' rewards are all equal, so their advantage is
        0 and only the KL term moves them: the policy is held near the start model on those prompts)."""
        return [s.name for s in self.data.sources if not any(r.applies_to(s.name) for r in self.rl.rewards)]


class RLMetrics(Callback):
    """Adds the rollout's metrics and the step's time split to each step's metrics."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, Any]) -> None:
        m = dict(getattr(self.source, "metrics", {}))
        spent = sum(m.get(f"timing/{k}_s", 0.0) for k in ("generation", "scoring", "reference"))
        m["timing/training_s"] = max(metrics["step_time_s"] - spent, 0.0)
        metrics.update(m)


class RLStage(Stage):
    kind = "rl"
    config_class = RLConfig
    cfg: RLConfig
    report_metrics = ("accuracy", "reward")
    # The KL's reference is the start model: a resume must start from the very same one.
    resume_needs_same_start = True

    def __init__(self, cfg: RLConfig) -> None:
        super().__init__(cfg)
        self.data_report: dict[str, Any] = {}
        self.train_source: Any = None
        self.val_source: Any = None
        self.reference_model: nn.Module | None = None
        self.reward: Any = None

    def encoding_tokenizer(self) -> Path:
        tok = self.cfg.data.tokenizer_dir or self.tokenizer_dir()
        if tok is None:
            raise FileNotFoundError(
                f"model.init_from {self.cfg.model.init_from} has no tokenizer.json: RL renders its prompts with the "
                "start model's tokenizer and chat template (or set data.tokenizer_dir)"
            )
        return Path(tok)

    def batching(self) -> Batching:
        t = self.cfg.training
        assert t.global_batch_size is not None
        return RowBatching(t.global_batch_size, t.micro_batch_size, unit="completions")

    def build_sources(self, info: DistInfo, model_cfg: ModelConfig) -> tuple[BatchSource, BatchSource | None]:
        from llm_pipeline.data.chat import ChatTemplate
        from llm_pipeline.data.chat_sources import pad_id_of
        from llm_pipeline.data.mixing import SourceSet
        from llm_pipeline.data.mixture_config import resolve_shares
        from llm_pipeline.rewards import CombinedReward
        from llm_pipeline.train.rl_data import (
            HeldOutSource,
            MixedRolloutSource,
            RolloutSource,
            Sampler,
            check_prompt_passes,
            load_prompts,
            load_sources,
        )
        from llm_pipeline.train.trainer import training_autocast

        cfg, rl, t = self.cfg, self.cfg.rl, self.cfg.training
        if rl.prompts_per_step % info.world_size:
            raise ValueError(
                f"rl.prompts_per_step ({rl.prompts_per_step}) must be a multiple of the number of ranks "
                f"({info.world_size}): each rank samples whole groups"
            )
        template = ChatTemplate.from_dir(self.encoding_tokenizer())
        if cfg.data.sources:
            mixed, self.data_report = load_sources(cfg.data, template, output_dir=t.output_dir, rank=info.rank)
        else:
            examples, self.data_report = load_prompts(cfg.data, template, output_dir=t.output_dir, rank=info.rank)
        if info.is_main:
            log.info("RL prompts: %s", self.data_report)
        self.reward = CombinedReward(rl.rewards)
        stop_ids = template.stop_token_ids()
        if not stop_ids:
            raise ValueError(f"{self.encoding_tokenizer()}: the chat template has no end-of-turn token to stop at")
        holder: dict[str, nn.Module] = {}

        def autocast() -> Any:
            return training_autocast(holder["model"], t.precision, info.device)

        sampler = Sampler(
            stop_ids=stop_ids,
            pad_id=pad_id_of(template),
            decode=lambda ids: template.tokenizer.decode(ids, skip_special_tokens=False),
            autocast=autocast,
        )
        self._holder = holder
        rollouts: Any = RolloutSource
        mix: dict[str, Any] = {}
        if cfg.data.sources:  # the shares of the prompts each source is drawn at
            sizes = {n: len(v["train"]) for n, v in mixed.items()}
            shares = resolve_shares(cfg.data.mixture_weights(), sizes, cfg.data.budget_key)
            rollouts, mix = MixedRolloutSource, {"shares": shares}
            drawn = rl.prompts_per_step * -(-t.max_steps // rl.num_iterations)  # one rollout per num_iterations
            passes = check_prompt_passes(cfg.data.mixture_weights(), shares, sizes, drawn)
            if info.is_main:
                log.info("RL prompt mixture: %s", ", ".join(f"{n} {v:.1%} ({passes[n]:.2f} passes)"
                                                            for n, v in shares.items()))  # fmt: skip
        self.train_source = rollouts(
            {n: v["train"] for n, v in mixed.items()} if cfg.data.sources else examples["train"],
            **mix,
            reward=self.reward,
            sampler=sampler,
            prompts_per_rank=rl.prompts_per_step // info.world_size,
            num_generations=rl.num_generations,
            num_iterations=rl.num_iterations,
            advantage=str(rl.advantage),
            filter_zero_std_groups=bool(rl.filter_zero_std_groups),
            beta=float(rl.beta or 0.0),
            dynamic_sampling_rounds=int(rl.dynamic_sampling_rounds or 1),
            generation={
                "max_new_tokens": rl.max_new_tokens,
                "temperature": rl.temperature,
                "top_p": rl.top_p,
                "top_k": rl.top_k,
            },
            seed=t.seed,
            rank=info.rank,
            world_size=info.world_size,
            chunk_tokens=t.loss_chunk_tokens,
            temperature=rl.temperature,
        )
        assert rl.accuracy_reward is not None

        def held_out(val: list[dict[str, Any]], accuracy_reward: str) -> HeldOutSource:
            return HeldOutSource(
                val,
                reward=self.reward,
                accuracy_reward=accuracy_reward,
                sampler=sampler,
                max_new_tokens=rl.eval_max_new_tokens or rl.max_new_tokens,
                rank=info.rank,
                world_size=info.world_size,
            )

        if not t.eval_steps:
            return self.train_source, None
        if not cfg.data.sources:
            self.val_source = held_out(examples["val"], rl.accuracy_reward) if examples["val"] else None
            return self.train_source, self.val_source
        anchors = self.cfg.anchor_sources  # no reward scores them: no held-out accuracy either
        if anchors and info.is_main:
            log.info("RL KL anchors (no reward, held near the start model by rl.beta=%s): %s", rl.beta, anchors)
        held = {
            n: held_out(v["val"], self.source_accuracy_reward(n))
            for n, v in mixed.items()
            if v["val"] and n not in anchors
        }
        if held:
            self.val_source = SourceSet(held, shares, combine=self.combine_held_out)
        return self.train_source, self.val_source

    def source_accuracy_reward(self, source: str) -> str:
        """The reward whose value >= 1 is a correct answer on ``source``'s held-out prompts (``<source>/accuracy``):
        rl.accuracy_reward where it scores that source (so ``accuracy`` is their mean), else the first that does."""
        labels = self.reward.applicable(source)
        return self.cfg.rl.accuracy_reward if self.cfg.rl.accuracy_reward in labels else labels[0]

    def combine_held_out(self, per_source: Mapping[str, Mapping[str, float]], units: Mapping[str, float]
                         ) -> dict[str, float]:  # fmt: skip
        """A mixture's overall eval metrics: ``accuracy`` over the held-out prompts of the sources rl.accuracy_reward
        scores (the verifiable task's, whatever else is mixed in; ``loss`` = 1 - accuracy), ``reward`` over all."""
        spec = next(r for r in self.cfg.rl.rewards if r.label == self.cfg.rl.accuracy_reward)
        scored = [n for n in per_source if spec.applies_to(n)]
        n_scored, n_all = sum(units[n] for n in scored), sum(units[n] for n in per_source)
        accuracy = sum(units[n] * per_source[n]["accuracy"] for n in scored) / n_scored if n_scored else 0.0
        reward = sum(units[n] * per_source[n]["reward"] for n in per_source) / n_all if n_all else 0.0
        return {"loss": 1.0 - accuracy, "accuracy": accuracy, "reward": reward}

    def check_data(self, train_source: BatchSource, model_cfg: ModelConfig) -> None:
        examples = getattr(train_source, "examples", [])
        top = max((max(ex["prompt_ids"]) for ex in examples), default=0)
        if top >= model_cfg.vocab_size:
            raise ValueError(
                f"the RL prompts use token id {top} but the model has vocab_size {model_cfg.vocab_size}: the tokenizer "
                f"({self.encoding_tokenizer()}) does not belong to model.init_from"
            )
        longest = max((len(ex["prompt_ids"]) for ex in examples), default=0) + self.cfg.rl.max_new_tokens
        if longest > model_cfg.max_position_embeddings:
            raise ValueError(
                f"the longest prompt + rl.max_new_tokens is {longest} tokens, beyond the model's context "
                f"({model_cfg.max_position_embeddings}): lower data.max_prompt_len or rl.max_new_tokens"
            )

    def prepare(
        self, model: nn.Module, info: DistInfo, train_source: BatchSource, val_source: BatchSource | None = None
    ) -> None:
        """The policy for the sources to sample with; a frozen copy of the start model when a KL is asked."""
        cfg, t = self.cfg, self.cfg.training
        if hasattr(self, "_holder"):
            self._holder["model"] = model
        held_out = getattr(val_source, "sources", {"": val_source})  # a mixture's: one per source
        for src in (train_source, *held_out.values()):
            if src is not None and hasattr(src, "model"):
                src.model = model
        if hasattr(train_source, "use_device"):
            train_source.use_device(next(model.parameters()).device)
        if (cfg.rl.beta or 0.0) > 0:
            from llm_pipeline.train.model_setup import build_training_model, resolve_model_config

            ref = build_training_model(
                resolve_model_config(cfg.model), cfg.parallel, info, precision=t.precision, fp8=False, seed=t.seed,
                init_from=cfg.model.init_from,
            )  # fmt: skip
            self.reference_model = ref.requires_grad_(False).eval()
            if hasattr(train_source, "reference_model"):
                train_source.reference_model = self.reference_model

    def build_objective(self, model_cfg: ModelConfig) -> Objective:
        rl = self.cfg.rl
        return RLObjective(
            loss_type=str(rl.loss_type),
            epsilon_low=rl.epsilon,
            epsilon_high=rl.epsilon_high,
            beta=float(rl.beta or 0.0),
            max_completion_length=rl.max_new_tokens,
            chunk_tokens=self.cfg.training.loss_chunk_tokens,
            temperature=rl.temperature,
        )

    def callbacks(self) -> list[Callback]:
        return [RLMetrics(self.train_source)] if self.train_source is not None else []

    # ---- pre-flight ---------------------------------------------------------------------------

    def input_checks(self, ctx: InputContext) -> list[Check]:
        d = self.cfg.data
        out = super().input_checks(ctx)
        for label, src in d.readers().items():
            what = f"data: {ctx.name}" + (f" ({label})" if label else "")
            if src.embedded:
                out.append(Check(what, "ok", f"the embedded {src.kind} prompts (offline)"))
            else:
                out.append(source_check(what, src.kind, [*src.paths, *src.val_paths], src.name))
        if d.tokenizer_dir is not None:
            out.append(ctx.tokenizer(d.tokenizer_dir))
        return out

    def memory_plan(self, model_cfg: ModelConfig) -> MemoryPlan:
        longest = max(r.max_prompt_len for r in self.cfg.data.readers().values())
        return MemoryPlan(
            rows=self.cfg.training.micro_batch_size,
            seq_len=min(longest + self.cfg.rl.max_new_tokens, model_cfg.max_position_embeddings),
        )
