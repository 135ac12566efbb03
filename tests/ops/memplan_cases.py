"""The settings the memory trace is validated on: one small model, real 2-rank runs against fake traces."""

from __future__ import annotations

from llm_pipeline.memplan import StepShape
from llm_pipeline.model import get_preset
from llm_pipeline.train.config import TrainingConfig
from llm_pipeline.train.objectives import CausalLMObjective

# Dimensions divisible by 16 (float8); activations and weights both matter at this size.
MODEL = get_preset(
    "debug", vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2,
)  # fmt: skip
TRAINING = TrainingConfig.model_validate({"max_steps": 1, "output_dir": "unused"})
OBJECTIVE = CausalLMObjective(z_loss_weight=0.0, chunk_tokens=TRAINING.loss_chunk_tokens)
CASES = {
    "fp32, no AC": StepShape(world_size=2, micro_batch=4, seq_len=128, precision="fp32"),
    "bf16, selective AC": StepShape(
        world_size=2, micro_batch=4, seq_len=128, precision="bf16", activation_checkpointing="selective"
    ),
    "bf16, fp8 tensorwise, full AC": StepShape(
        world_size=2, micro_batch=4, seq_len=128, precision="bf16", fp8=True, activation_checkpointing="full"
    ),
}
