"""Stand-ins for the SFT and DPO stage kinds (their configs only), so the pre-flight's chat-data checks are
tested on this branch whether or not those stages are installed."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from llm_pipeline.data.config import PreferenceDataConfig, SFTDataConfig
from llm_pipeline.train.config import StageConfig
from llm_pipeline.train.stage import Stage


class FakeSFTConfig(StageConfig):
    batch_unit: ClassVar[str] = "sequences"
    default_output_dir: ClassVar[str] = "checkpoints/sft"
    data: SFTDataConfig = Field(default_factory=SFTDataConfig)


class FakeDPOConfig(StageConfig):
    batch_unit: ClassVar[str] = "pairs"
    default_output_dir: ClassVar[str] = "checkpoints/dpo"
    data: PreferenceDataConfig = Field(default_factory=PreferenceDataConfig)


class _NoTraining(Stage):
    def build_sources(self, info, model_cfg):  # type: ignore[override]
        raise NotImplementedError

    def build_objective(self, model_cfg):  # type: ignore[override]
        raise NotImplementedError


class FakeSFTStage(_NoTraining):
    kind = "sft"
    config_class = FakeSFTConfig


class FakeDPOStage(_NoTraining):
    kind = "dpo"
    config_class = FakeDPOConfig
