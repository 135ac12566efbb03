"""The stage kinds by name: a table that imports nothing, so ``llm-pipeline --help`` starts without torch.

:func:`llm_pipeline.train.stage.stage_class` imports a kind's module on first use.
"""

from __future__ import annotations

#: Stage kinds -> "module:Class" (imported on first use, so the CLI starts fast).
STAGE_KINDS: dict[str, str] = {
    "pretrain": "llm_pipeline.train.pretrain:PretrainStage",
    "sft": "llm_pipeline.train.sft:SFTStage",
    "dpo": "llm_pipeline.train.dpo:DPOStage",
    "lora": "llm_pipeline.train.lora_stage:LoRAStage",
    "rl": "llm_pipeline.train.rl:RLStage",
}
#: One line per kind for ``llm-pipeline --help`` (without importing the stage).
STAGE_SUMMARIES: dict[str, str] = {
    "pretrain": "pretrain a model on packed tokens with a context-length curriculum",
    "sft": "supervised fine-tuning on chat data: assistant-only loss, packed examples, chat-template export",
    "dpo": "preference optimisation (DPO, IPO, hinge, robust, length-normalised) against the frozen start model",
    "lora": "adapt a model to a domain with LoRA adapters (peft), mixing domain and general data",
    "rl": "reinforcement learning with verifiable rewards (GRPO, Dr. GRPO, DAPO, RLOO), rewards run in the sandbox",
}
#: The config file each kind's ``--help`` shows as its example.
EXAMPLE_CONFIGS: dict[str, str] = {
    "pretrain": "configs/pretrain.yaml",
    "sft": "configs/sft.yaml",
    "dpo": "configs/dpo.yaml",
    "lora": "configs/lora_finetune.yaml",
    "rl": "configs/rl.yaml",
}
