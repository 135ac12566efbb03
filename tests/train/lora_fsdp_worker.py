"""Run under ``torchrun --nproc_per_node=2``: the LoRA model path a runner takes under FSDP2 on CPU/gloo.

Meta-device model -> ``apply_lora`` -> ``fully_shard`` -> rank 0's full state dict (a materialised model
with the same seeded adapters) broadcast into the shards -> train -> adapter-only sharded checkpoint and an
exact resume from it -> gathered state dict -> adapter and merged exports. Then the same with a bf16 base
under the bf16 FSDP2 policy. Writes ``result.json`` (rank 0) into argv[1]. Driven by test_lora.py.

With ``--stage CONFIG``: the LoRA stage itself through ``run_stage`` (it sets up the process group);
writes ``stage_result.json``. Driven by test_lora_stage.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from llm_pipeline.checkpoint.dcp import CheckpointManager, full_model_state_dict, load_checkpoint
from llm_pipeline.model import build_model, get_preset
from llm_pipeline.train.lora import LoRAConfig, apply_lora, save_adapter, save_merged
from llm_pipeline.train.parallel import apply_fsdp

CFG = get_preset("debug")
GLOBAL_ROWS = 4


def global_batch(step: int) -> torch.Tensor:
    """The step's 4 rows of 17 tokens; rank r trains rows 2r and 2r+1."""
    return torch.randint(0, CFG.vocab_size, (GLOBAL_ROWS, 17), generator=torch.Generator().manual_seed(100 + step))


def build(lcfg: LoRAConfig, precision: str) -> torch.nn.Module:
    rank = dist.get_rank()
    model = apply_lora(build_model(CFG, device="meta"), lcfg)
    apply_fsdp(model, precision=precision, reshard_after_forward=True, device=torch.device("cpu"))
    model.to_empty(device="cpu")
    full = apply_lora(build_model(CFG, seed=0), lcfg).state_dict() if rank == 0 else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    set_model_state_dict(model, full, options=options)
    return model


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range, bf16: bool = False) -> list[float]:
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = GLOBAL_ROWS // world
    losses = []
    for step in steps:
        x = global_batch(step)[rank * rows : (rank + 1) * rows]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())  # FSDP averages over ranks
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    return losses


def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    lcfg = LoRAConfig(r=4, use_dora=True)
    model = build(lcfg, "fp32")
    opt = optimizer(model)
    losses = train(model, opt, range(2))
    manager = CheckpointManager(out / "ckpt")
    ckpt = manager.save(2, model=model, optimizer=opt, trainer_state={}, rank_state={}, save_frozen_params=False)
    losses += train(model, opt, range(2, 4))

    resumed = build(lcfg.model_copy(update={"init_seed": 9}), "fp32")  # other adapters: the checkpoint must win
    resumed_opt = optimizer(resumed)
    load_checkpoint(ckpt, model=resumed, optimizer=resumed_opt, frozen_params=False)
    resumed_losses = train(resumed, resumed_opt, range(2, 4))

    gathered = full_model_state_dict(model)  # collective; complete on rank 0
    if rank == 0:
        save_adapter(gathered, CFG, lcfg, out / "adapter")
        save_merged(gathered, CFG, lcfg, out / "merged")

    # A bf16 frozen base with fp32 adapters under the bf16 FSDP2 policy (fp32 gradient reduction).
    bf16_cfg = LoRAConfig(r=4, base_dtype="bfloat16")
    bf16_model = build(bf16_cfg, "bf16")
    bf16_losses = train(bf16_model, optimizer(bf16_model), range(2), bf16=True)
    dtypes = sorted({f"{'adapter' if p.requires_grad else 'base'}:{p.dtype}" for p in bf16_model.parameters()})
    if rank == 0:
        result = {
            "losses": losses,
            "resumed": resumed_losses,
            "bf16_losses": bf16_losses,
            "bf16_dtypes": dtypes,
        }
        (out / "result.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def stage(out: Path, config: Path) -> None:
    from llm_pipeline.config import load_config
    from llm_pipeline.train.lora_stage import LoRAStage, LoRAStageConfig
    from llm_pipeline.train.stage import run_stage

    result = run_stage(LoRAStage(load_config(LoRAStageConfig, config)))
    if dist.get_rank() == 0:
        losses = [result.losses[s] for s in sorted(result.losses)]
        (out / "stage_result.json").write_text(json.dumps({"losses": losses, **result.stats}))


if __name__ == "__main__":
    if "--stage" in sys.argv:
        stage(Path(sys.argv[1]), Path(sys.argv[sys.argv.index("--stage") + 1]))
    else:
        main(Path(sys.argv[1]))
