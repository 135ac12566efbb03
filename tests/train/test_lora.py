"""LoRA through peft: parity with peft on transformers, frozen base, counts, float8, meta init, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from llm_pipeline.checkpoint.hf import load_pretrained, save_pretrained
from llm_pipeline.config import ConfigError, ModelConfig, validate_config
from llm_pipeline.model import build_model, get_preset
from llm_pipeline.train.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LORA_TARGETS,
    PEFT_KEY_PREFIX,
    LoRAConfig,
    apply_lora,
    is_adapter_name,
    lora_fp8_filter,
    merged_model,
    save_adapter,
    save_merged,
    trainable_parameter_count,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _tokens(cfg: ModelConfig, b: int = 2, t: int = 17, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


def _perturb_adapters(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Random non-zero updates to every adapter tensor (lora_B starts at zero, so the adapter would be a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _hand_count(cfg: ModelConfig, r: int, targets: tuple[str, ...], dora: bool) -> int:
    """r·(in+out) per adapted projection (+ out for DoRA's magnitude), from the architecture's shapes."""
    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.resolved_head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    shapes = {  # (in, out)
        "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
        "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h),
    }  # fmt: skip
    per_layer = sum(r * (shapes[t][0] + shapes[t][1]) + (shapes[t][1] if dora else 0) for t in targets)
    return cfg.num_hidden_layers * per_layer


def test_config_defaults_alpha_and_validation():
    cfg = LoRAConfig()
    assert (cfg.r, cfg.alpha, tuple(cfg.target_modules)) == (64, 128, LORA_TARGETS)
    assert cfg.scaling == 2.0 and cfg.base_dtype == "float32"
    assert LoRAConfig(r=16).alpha == 32  # alpha = 2r when not given
    assert LoRAConfig(r=16, alpha=8).alpha == 8
    assert LoRAConfig(r=16, alpha=32, use_rslora=True).scaling == 8.0  # alpha / sqrt(r)
    with pytest.raises(ConfigError, match="rank"):
        validate_config(LoRAConfig, {"rank": 8}, "lora.yaml")
    with pytest.raises(ConfigError, match="target_modules"):
        validate_config(LoRAConfig, {"target_modules": ["q_proj", "lm_head"]}, "lora.yaml")
    with pytest.raises(ConfigError, match="twice"):
        validate_config(LoRAConfig, {"target_modules": ["q_proj", "q_proj"]}, "lora.yaml")
    peft_cfg = LoRAConfig(use_dora=True).to_peft("base")
    assert (peft_cfg.r, peft_cfg.lora_alpha, peft_cfg.use_dora, peft_cfg.task_type) == (64, 128, True, "CAUSAL_LM")


VARIANTS = {
    "lora": dict(tie=False, lora=dict(r=8)),
    "rslora": dict(
        tie=True, lora=dict(r=8, alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"])
    ),
    "dora": dict(tie=False, lora=dict(r=4, use_dora=True)),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_ours_peft_on_transformers_and_merged_export_agree(tmp_path, variant):
    spec = VARIANTS[variant]
    cfg = get_preset("debug", tie_word_embeddings=spec["tie"])
    lcfg = LoRAConfig(**spec["lora"])
    base = build_model(cfg, seed=3)
    save_pretrained(base, tmp_path / "base")
    ours = apply_lora(base, lcfg).eval()
    _perturb_adapters(ours)
    state = ours.state_dict()
    adapter_dir = save_adapter(state, cfg, lcfg, tmp_path / "adapter", base_model_name_or_path=tmp_path / "base")
    merged_dir = save_merged(state, cfg, lcfg, tmp_path / "merged")

    hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    with_adapter = peft.PeftModel.from_pretrained(hf_base, adapter_dir).eval()
    hf_merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, attn_implementation="eager").eval()
    x = _tokens(cfg)
    with torch.no_grad():
        want = ours(x)
        torch.testing.assert_close(with_adapter(x).logits, want, atol=1e-4, rtol=0)
        torch.testing.assert_close(hf_merged(x).logits, want, atol=1e-4, rtol=0)
        torch.testing.assert_close(load_pretrained(merged_dir)(x), want, atol=1e-4, rtol=0)
        assert (want - build_model(cfg, seed=3)(x)).abs().max() > 1e-2  # the adapter really changes the model

    conf = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "CAUSAL_LM"
    assert conf["base_model_name_or_path"] == str(tmp_path / "base")
    assert (conf["r"], conf["lora_alpha"], conf["use_rslora"], conf["use_dora"]) == (
        lcfg.r, lcfg.alpha, lcfg.use_rslora, lcfg.use_dora,
    )  # fmt: skip
    assert sorted(conf["target_modules"]) == sorted(lcfg.target_modules)


def test_training_changes_only_adapters_and_the_file_holds_only_them(tmp_path):
    cfg = get_preset("debug")
    lcfg = LoRAConfig(r=4, dropout=0.1)
    model = apply_lora(build_model(cfg, seed=0), lcfg)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable_parameter_count(model) == _hand_count(cfg, 4, LORA_TARGETS, dora=False) == 9_344
    assert sum(p.numel() for p in trainable) == 9_344
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    for step in range(3):
        x = _tokens(cfg, b=4, t=33, seed=step)
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n  # bitwise unchanged
            assert p.grad is None, n
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n)

    out = save_adapter(model.state_dict(), cfg, lcfg, tmp_path / "adapter")
    export_files = {"llm_pipeline.json", "checksums.sha256"}  # the export record and its checksums
    assert {p.name for p in out.iterdir()} == {ADAPTER_CONFIG, ADAPTER_WEIGHTS, *export_files}
    with safe_open(str(out / ADAPTER_WEIGHTS), framework="pt") as f:
        keys = list(f.keys())
        numel = sum(f.get_tensor(k).numel() for k in keys)
    assert all(k.startswith(PEFT_KEY_PREFIX) and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert len(keys) == 2 * len(LORA_TARGETS) * cfg.num_hidden_layers and numel == 9_344


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_trainable_count_matches_hand_computation_on_meta(dora):
    cfg = get_preset("debug")
    targets = ("q_proj", "k_proj", "down_proj")
    model = apply_lora(build_model(cfg, device="meta"), LoRAConfig(r=8, target_modules=list(targets), use_dora=dora))
    assert trainable_parameter_count(model) == _hand_count(cfg, 8, targets, dora)


def test_7b_rank_64_trainable_figure():
    """The README's figure: all seven projections at rank 64 on the 7B preset, counted on the meta device."""
    cfg = get_preset("7b")
    model = apply_lora(build_model(cfg, device="meta"), LoRAConfig())
    assert trainable_parameter_count(model) == _hand_count(cfg, 64, LORA_TARGETS, dora=False) == 167_772_160
    assert sum(p.numel() for p in model.parameters()) == 7_391_678_464 + 167_772_160


def test_meta_transform_has_the_same_structure_and_takes_rank0_weights():
    """What FSDP2 needs: the meta model's adapted structure equals the materialised one's, and the
    materialised (rank 0) full state dict loads into it strictly and gives the same model."""
    cfg = get_preset("debug")
    lcfg = LoRAConfig(r=4, use_dora=True)
    full = apply_lora(build_model(cfg, seed=0), lcfg)
    meta = apply_lora(build_model(cfg, device="meta"), lcfg)

    def layout(m):
        return [(n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in m.named_parameters()]

    assert layout(meta) == layout(full)
    assert [n for n, _ in meta.named_modules()] == [n for n, _ in full.named_modules()]
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    meta.load_state_dict(full.state_dict(), strict=True)
    x = _tokens(cfg)
    with torch.no_grad():
        torch.testing.assert_close(meta(x), full(x), atol=0, rtol=0)
        # B = 0 and DoRA's magnitude = ||W||: the freshly adapted model is the base model
        torch.testing.assert_close(full(x), build_model(cfg, seed=0)(x), atol=1e-5, rtol=0)


def test_adapter_init_is_seeded_and_leaves_the_global_rng_alone():
    cfg = get_preset("debug")
    rng = torch.get_rng_state()
    a = apply_lora(build_model(cfg, seed=0), LoRAConfig(r=4)).state_dict()
    assert torch.equal(torch.get_rng_state(), rng)
    torch.manual_seed(123)  # a different global stream must not change the adapters
    b = apply_lora(build_model(cfg, seed=0), LoRAConfig(r=4)).state_dict()
    c = apply_lora(build_model(cfg, seed=0), LoRAConfig(r=4, init_seed=1)).state_dict()
    name = "model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[name], c[name]) and a[name].abs().sum() > 0


def test_bf16_base_keeps_fp32_adapters_and_exact_dora_magnitude(tmp_path):
    cfg = get_preset("debug")
    model = apply_lora(build_model(cfg, seed=0), LoRAConfig(r=4, use_dora=True, base_dtype="bfloat16"))
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(d == (torch.float32 if is_adapter_name(n) else torch.bfloat16) for n, d in dtypes.items())
    q = model.model.layers[0].self_attn.q_proj
    weight = q.base_layer.weight  # stored in bf16
    magnitude = q.lora_magnitude_vector["default"].weight
    torch.testing.assert_close(magnitude, torch.linalg.norm(weight.float(), dim=1), atol=0, rtol=1e-6)
    x = _tokens(cfg, b=2, t=9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1).float(), x[:, 1:].flatten())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    # the merged export starts from the stored (bf16) base, upcast
    merged = merged_model(model.state_dict(), cfg, LoRAConfig(r=4, use_dora=True, base_dtype="bfloat16"))
    assert torch.equal(merged.model.embed_tokens.weight, model.model.embed_tokens.weight.float())


@pytest.mark.parametrize("r", [16, 64])
def test_float8_never_converts_adapters(r):
    """Composed with parallel's filter, torchao converts the frozen base_layer linears and no adapter matrix."""
    pytest.importorskip("torchao.float8")
    from torchao.float8 import convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    from llm_pipeline.train.parallel import _fp8_filter

    cfg = get_preset("debug")

    def converted(filter_fn):
        model = apply_lora(build_model(cfg, seed=0), LoRAConfig(r=r))
        convert_to_float8_training(model, module_filter_fn=filter_fn)
        return model, {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}

    _, unfiltered = converted(_fp8_filter)
    assert any(".lora_A." in n for n in unfiltered)  # why the LoRA filter exists: rank % 16 == 0 qualifies
    model, names = converted(lambda m, fqn: _fp8_filter(m, fqn) and lora_fp8_filter(m, fqn))
    n_targets = len(LORA_TARGETS) * cfg.num_hidden_layers
    assert len(names) == n_targets and all(n.endswith(".base_layer") for n in names)
    x = _tokens(cfg, b=2, t=16)
    F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    adapters = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(adapters) == 2 * n_targets and all(p.grad is not None for _, p in adapters)


def test_exports_take_a_gathered_state_dict_from_a_wrapped_model(tmp_path):
    """Under activation checkpointing (and FSDP2/compile) the runner gathers with DCP, which strips the
    wrapper names: the exporters accept that state dict as is."""
    from llm_pipeline.checkpoint.dcp import full_model_state_dict
    from llm_pipeline.train.parallel import apply_activation_checkpointing

    cfg = get_preset("debug")
    lcfg = LoRAConfig(r=4)
    model = apply_lora(build_model(cfg, seed=0), lcfg)
    _perturb_adapters(model)
    plain = model.state_dict()
    apply_activation_checkpointing(model, "full")
    gathered = full_model_state_dict(model)
    assert gathered.keys() == plain.keys()
    before = {k: v.clone() for k, v in gathered.items()}
    merged = merged_model(gathered, cfg, lcfg)
    for k, v in gathered.items():  # the merge never writes into the caller's tensors (peft >= 0.22 merges in place)
        assert torch.equal(v, before[k]), k
    x = _tokens(cfg)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), atol=1e-5, rtol=0)
    save_adapter(gathered, cfg, lcfg, tmp_path / "adapter")
    missing = {k: v for k, v in gathered.items() if "layers.1.mlp.up_proj.lora_B" not in k}
    with pytest.raises(ValueError, match="missing"):
        save_adapter(missing, cfg, lcfg, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="already has peft adapters"):
        apply_lora(model, lcfg)


# --------------------------------------------------------------------------------------------
# Checkpoints that hold only what trains
# --------------------------------------------------------------------------------------------


def _lora_run(cfg, lcfg, *, init_seed_base: int = 0):
    model = apply_lora(build_model(cfg, seed=init_seed_base), lcfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, opt


def _steps(model, opt, cfg, steps):
    losses = []
    for step in steps:
        x = _tokens(cfg, b=2, t=17, seed=100 + step)
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _dir_bytes(path):
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_trainable_only_checkpoint_is_small_and_resumes_exactly(tmp_path, dora):
    """``save_frozen_params=False`` (what the LoRA stage sets): adapters and their optimizer state only;
    a new process rebuilds the base from the base model and continues bit for bit."""
    import torch.distributed.checkpoint as dcp

    from llm_pipeline.checkpoint.dcp import CheckpointManager, load_checkpoint

    cfg = get_preset("debug")
    lcfg = LoRAConfig(r=4, use_dora=dora)
    model, opt = _lora_run(cfg, lcfg)
    straight = _steps(model, opt, cfg, range(4))
    full_ckpt = CheckpointManager(tmp_path / "full").save(
        0, model=model, optimizer=opt, trainer_state={}, rank_state={}
    )

    model, opt = _lora_run(cfg, lcfg)
    first = _steps(model, opt, cfg, range(2))
    ckpt = CheckpointManager(tmp_path / "lora").save(
        2, model=model, optimizer=opt, trainer_state={}, rank_state={}, save_frozen_params=False
    )
    saved = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    model_keys = {k.removeprefix("model.") for k in saved if k.startswith("model.")}
    assert model_keys == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(is_adapter_name(k) for k in model_keys)
    assert _dir_bytes(ckpt) < _dir_bytes(full_ckpt) / 2

    # A new process: the base from the base model again, adapters freshly initialised (another seed,
    # so only the checkpoint can make them right), a new optimizer; then the checkpoint on top.
    resumed, resumed_opt = _lora_run(cfg, lcfg.model_copy(update={"init_seed": 7}))
    load_checkpoint(ckpt, model=resumed, optimizer=resumed_opt, frozen_params=False)
    assert first + _steps(resumed, resumed_opt, cfg, range(2, 4)) == straight  # bitwise
    for (n, p), (_, q) in zip(model.named_parameters(), resumed.named_parameters(), strict=True):
        if not p.requires_grad:
            assert torch.equal(p, q), n


@pytest.mark.slow
def test_two_rank_fsdp2_lora_matches_one_process(tmp_path):
    """Meta model + apply_lora + FSDP2 + rank 0's broadcast (DoRA), trained on 2 gloo ranks, equals one
    process; its adapter-only sharded checkpoint resumes exactly; the gathered exports equal the
    single-process ones; a bf16 base trains under the bf16 policy with fp32 adapters."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("lora_fsdp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker)]
    proc = subprocess.run([*cmd, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads((tmp_path / "result.json").read_text())

    cfg = get_preset("debug")
    lcfg = LoRAConfig(r=4, use_dora=True)
    model, opt = _lora_run(cfg, lcfg)
    want = []
    for step in range(4):  # the worker's global batches, whole
        x = torch.randint(0, cfg.vocab_size, (4, 17), generator=torch.Generator().manual_seed(100 + step))
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        want.append(loss.item())
    assert got["losses"] == pytest.approx(want, rel=1e-5)
    assert got["resumed"] == got["losses"][2:]  # bitwise
    save_pretrained(build_model(cfg, seed=0), tmp_path / "base")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    with_adapter = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = _tokens(cfg)
    with torch.no_grad():
        want_logits = model.eval()(x)
        torch.testing.assert_close(load_pretrained(tmp_path / "merged")(x), want_logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(with_adapter(x).logits, want_logits, atol=1e-4, rtol=0)
    assert got["bf16_dtypes"] == ["adapter:torch.float32", "base:torch.bfloat16"]
    assert got["bf16_losses"] == pytest.approx(want[:2], rel=2e-2)
