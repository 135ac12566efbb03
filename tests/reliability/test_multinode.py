"""Every training stage kind as a real two-node job: ``torchrun --nnodes 2 --nproc-per-node 1`` twice (node
ranks 0 and 1, two agents), a c10d rendezvous on localhost and gloo, running ``llm-pipeline <kind>``.

Each kind gives the losses of one process over the same global batch (the two nodes' micro-batches are the
rows one process accumulates; the gradients are summed in another order, hence a relative tolerance, see
``REL``), writes one export that loads and matches the single-process one, and its checkpoints move across
world sizes both ways: two nodes' sharded checkpoint loads on one process, and one process's on two nodes,
with the weights bit for bit (a re-export after a zero-step resume equals the run's own export). A resume
on another world size continues training with the data stream restarted on each rank, as documented in
train/trainer.py; it is refused only for the config changes train/resume.py lists.

One torchrun job runs every command (``multinode_worker.py``), so its start-up is paid once. To cover a new
stage kind, add one entry to ``KINDS``: a function that writes its config (and, for a kind whose ranks
draw different data than one process does, the reason its losses cannot be compared).
"""

from __future__ import annotations

import gzip
import json
import os
import random
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from llm_pipeline.checkpoint.hf import load_pretrained
from llm_pipeline.cli import main
from llm_pipeline.records import load_summary
from stages.chat_pipeline import make_chat_pipeline

pytestmark = pytest.mark.slow  # two torchrun agents and their workers

WORKER = Path(__file__).with_name("multinode_worker.py")
#: Largest relative difference allowed between a two-node loss and the single-process one: the same
#: gradients summed in another order (all-reduce over two ranks vs. accumulation in one) differ in the
#: last bits of fp32, which AdamW's normalisation can amplify over a few steps.
REL = 1e-4
#: Losses smaller than this are compared absolutely: RL's policy term is zero-mean over each group at ratio 1.
LOSS_FLOOR = 1e-2
STEPS = 4

# Shared by every kind: fp32 on CPU, 4 steps, a checkpoint at step 2 and at the end, losses every step.
TRAINING = {"max_steps": STEPS, "save_steps": 2, "logging_steps": 1, "eval_steps": 0, "precision": "fp32",
            "warmup_steps": 1, "output_dir": "unused"}  # fmt: skip
PARALLEL = {"device": "cpu", "fp8": False}


def _pretrain(inp: dict[str, Path]) -> dict[str, Any]:
    return {
        "model": {"preset": None, "init_from": str(inp["base"])},
        "data": {"path": str(inp["packed"]), "tokenizer_dir": str(inp["tok"])},
        "training": {**TRAINING, "global_batch_tokens": 256, "micro_batch_size": 2, "learning_rate": 3e-3},
        "parallel": PARALLEL,
        "curriculum": [{"step": 0, "seq_len": 32}],
    }


def _sft(inp: dict[str, Path]) -> dict[str, Any]:
    return {
        "model": {"preset": None, "init_from": str(inp["base"])},
        "data": {"kind": "local", "paths": [str(inp["chat"])], "max_seq_len": 96, "val_fraction": 0.0},
        "training": {**TRAINING, "global_batch_size": 4, "micro_batch_size": 1, "learning_rate": 3e-3},
        "parallel": PARALLEL,
    }


def _dpo(inp: dict[str, Path]) -> dict[str, Any]:
    return {
        "model": {"init_from": str(inp["base"])},
        "data": {"kind": "local", "paths": [str(inp["pairs"])], "max_seq_len": 48, "max_prompt_len": 24,
                 "val_fraction": 0.0},
        "training": {**TRAINING, "global_batch_size": 4, "micro_batch_size": 1, "learning_rate": 2e-3},
        "parallel": PARALLEL,
    }  # fmt: skip


def _lora(inp: dict[str, Path]) -> dict[str, Any]:
    return {
        "model": {"init_from": str(inp["base"])},
        "lora": {"r": 4},
        # every row from the domain: each rank draws its own mix, so only then do both runs see the same rows
        "data": {"packed_dir": str(inp["packed"]), "seq_len": 32, "domain_fraction": 1.0,
                 "domain": {"kind": "tokens", "train_split": "domain", "val_split": "domain_val"},
                 "general": {"kind": "tokens", "train_split": "train", "val_split": "val"}},
        "training": {**TRAINING, "global_batch_tokens": 256, "micro_batch_size": 2, "learning_rate": 1e-2},
        "parallel": PARALLEL,
    }  # fmt: skip


def _rl(inp: dict[str, Path]) -> dict[str, Any]:
    return {
        "model": {"init_from": str(inp["base"])},
        "data": {"kind": "arithmetic", "max_val_prompts": 4, "max_operand": 9},
        # a random model never answers right: a format reward that random text meets about half the time gives
        # the groups advantages, so the gradients (and the export) carry the rollouts
        "rl": {"prompts_per_step": 2, "num_generations": 4, "max_new_tokens": 6, "variant": "grpo",
               "rewards": [{"name": "numeric_answer"}, {"name": "format", "options": {"pattern": "(?s).*[aeiou].*"}}]},
        "training": {**TRAINING, "micro_batch_size": 4, "learning_rate": 1e-3},
        "parallel": PARALLEL,
    }  # fmt: skip


@dataclass(frozen=True)
class Kind:
    config: Callable[[dict[str, Path]], dict[str, Any]]  # the stage's config, from the shared inputs
    differs: str | None = None  # why two nodes cannot give one process's losses (None: they must, within REL)


#: One entry per stage kind.
KINDS: dict[str, Kind] = {
    "pretrain": Kind(_pretrain),
    "sft": Kind(_sft),
    "dpo": Kind(_dpo),
    "lora": Kind(_lora),
    "rl": Kind(_rl),  # rank r samples the r-th slice of one global rollout (train/rl_data.py)
}
SAME = [k for k, v in KINDS.items() if v.differs is None]


def test_every_registered_stage_kind_has_a_two_node_run():
    from llm_pipeline.train.kinds import STAGE_KINDS

    missing = sorted(set(STAGE_KINDS) - set(KINDS))
    assert not missing, f"stage kinds {missing} have no entry in KINDS ({__file__}): add a function writing its config"


def _inputs(root: Path) -> dict[str, Path]:
    """A debug model with a chat tokenizer, chat records, preference pairs and packed tokens (train, val,
    domain, domain_val): everything every kind reads, in a few seconds."""
    from data.corpus import random_doc
    from llm_pipeline.data.pack import pack_documents
    from train.chat_fixtures import chat_records, make_chat_model, train_chat_tokenizer, write_records
    from train.dpo_setup import write_pairs

    tok = train_chat_tokenizer(root / "tok")
    rng = random.Random(0)
    (root / "clean").mkdir(parents=True)
    docs = [{"id": f"d{i}", "text": random_doc(rng, 400), "metadata": {"split": "domain"} if i % 2 else {}}
            for i in range(24)]  # fmt: skip
    with gzip.open(root / "clean" / "00000.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    pack_documents(root / "clean", root / "packed", tok, val_fraction=0.2, domain_val_fraction=0.25,
                   show_progress=False)  # fmt: skip
    return {
        "tok": tok,
        "base": make_chat_model(root / "base", tok),
        "packed": root / "packed",
        "chat": write_records(root / "chat.jsonl", chat_records(32, seed=1)),
        "pairs": write_pairs(root / "pairs.jsonl", 32, seed=1),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_nodes(commands: list[list[str]], cwd: Path, timeout: float = 300) -> list[str]:
    """Start the two torchrun agents (node ranks 0 and 1) of one job on localhost; return their outputs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    port = _free_port()

    def agent(node: int) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                "--rdzv-id", "multinode-test", "--max-restarts", "0", str(WORKER), json.dumps(commands)]  # fmt: skip

    out = subprocess.PIPE
    procs = [
        subprocess.Popen(agent(n), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True) for n in (0, 1)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            p.kill()
    for node, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"node {node} exited with {p.returncode}:\n{out[-5000:]}"
    return outputs


def losses(out_dir: Path) -> dict[int, float]:
    """Step -> training loss, from a run's metrics (``<output_dir>/logs`` or a logging folder itself)."""
    logs = out_dir if (out_dir / "metrics.jsonl").is_file() else out_dir / "logs"
    rows = map(json.loads, (logs / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Each kind on one process (here, through the CLI) and on two nodes (one torchrun job for every command)."""
    root = tmp_path_factory.mktemp("multinode")
    inp = _inputs(root / "in")
    configs = {}
    for kind, spec in KINDS.items():
        configs[kind] = root / f"{kind}.yaml"
        configs[kind].write_text(yaml.safe_dump(spec.config(inp)))
        if spec.differs is None:
            assert main([kind, "--config", str(configs[kind]), "--output_dir", str(root / "one" / kind)]) == 0
    pre = ["pretrain", "--config", str(configs["pretrain"])]
    commands = [[kind, "--config", str(configs[kind]), "--output_dir", str(root / "two" / kind)] for kind in KINDS]
    # one process's checkpoints on two nodes: a zero-step resume re-exports the loaded weights
    for kind in SAME:
        commands.append([kind, "--config", str(configs[kind]), "--output_dir", str(root / "one_to_two" / kind),
                         "--resume_from_checkpoint", str(root / "one" / kind / f"checkpoint-{STEPS}")])  # fmt: skip
    # the whole pipeline (two SFT stages, each evaluated, gated and promoted), on one process and on two nodes
    pipelines = {n: make_chat_pipeline(root / f"pipeline_{n}", stages=("sft", "sft2")) for n in ("one", "two")}
    assert pipelines["one"].run() == 0
    commands.append(pipelines["two"].args())
    outputs = run_two_nodes(commands, cwd=root)
    return {"root": root, "configs": configs, "outputs": outputs, "pre": pre, "pipelines": pipelines}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_trains_on_two_nodes_with_one_export_and_a_checkpoint_part_per_node(runs, kind):
    two = runs["root"] / "two" / kind
    b = losses(two)
    assert sorted(b) == list(range(1, STEPS + 1)) and all(v == v and abs(v) < 1e6 for v in b.values())
    final = Path(f"{two}_final")
    assert (final / "config.json").is_file() and (final / "model.safetensors").is_file()
    assert not list(final.parent.glob(f"{final.name}*.replaced*"))  # written once: nothing set aside
    ckpt = two / f"checkpoint-{STEPS}"
    assert {"__0_0.distcp", "__1_0.distcp", "rank_0.pt", "rank_1.pt", "COMMITTED"} <= {p.name for p in ckpt.iterdir()}


@pytest.mark.parametrize("kind", SAME)
def test_two_nodes_give_the_single_process_losses_and_one_matching_export(runs, kind):
    one, two = runs["root"] / "one" / kind, runs["root"] / "two" / kind
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    rel = {s: abs(b[s] - a[s]) / max(abs(a[s]), LOSS_FLOOR) for s in a}
    print(f"{kind}: largest relative loss difference, two nodes vs one process: {max(rel.values()):.2e}")
    assert max(rel.values()) <= REL, rel
    # the export: written once, complete, and the single-process weights up to the same reduction-order noise
    final_one, final_two = Path(f"{one}_final"), Path(f"{two}_final")
    assert (final_two / "config.json").is_file()
    assert sorted(p.name for p in final_two.iterdir()) == sorted(p.name for p in final_one.iterdir())
    exports = [sorted(p.name for p in d.parent.iterdir() if p.name.startswith(d.name)) for d in (final_one, final_two)]
    assert exports[0] == exports[1]  # the same exports (model, adapter), and no second copy set aside
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(final_two)(ids), load_pretrained(final_one)(ids), rtol=0, atol=1e-3)


def _same_weights(a: Path, b: Path) -> None:
    sa, sb = load_pretrained(a).state_dict(), load_pretrained(b).state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("kind", SAME)
def test_one_process_checkpoint_resumes_on_two_nodes_with_the_same_weights(runs, kind):
    root = runs["root"]
    _same_weights(root / "one_to_two" / f"{kind}_final", root / "one" / f"{kind}_final")


@pytest.mark.parametrize("kind", list(KINDS))
def test_two_node_checkpoint_resumes_on_one_process_with_the_same_weights(runs, kind):
    root, two = runs["root"], runs["root"] / "two" / kind
    out = root / "two_to_one" / kind
    assert main([kind, "--config", str(runs["configs"][kind]), "--output_dir", str(out), "--resume_from_checkpoint",
                 str(two / f"checkpoint-{STEPS}")]) == 0  # fmt: skip
    _same_weights(Path(f"{out}_final"), Path(f"{two}_final"))


def test_two_node_checkpoint_goes_on_training_on_one_process(runs, caplog):
    """From the step it was saved at, with the data stream restarted on each rank (train/trainer.py)."""
    root, pre = runs["root"], runs["pre"]
    with caplog.at_level("WARNING"):
        assert main([*pre, "--output_dir", str(root / "two_to_one_more"), "--resume_from_checkpoint",
                     str(root / "two" / "pretrain" / "checkpoint-2")]) == 0  # fmt: skip
    assert "saved with another world size" in caplog.text
    assert sorted(losses(root / "two_to_one_more")) == [3, 4]


def test_pipeline_on_two_nodes_trains_on_both_and_evaluates_gates_and_exports_once(runs):
    """``llm-pipeline run`` as the two-node job: both ranks train each stage, rank 0 alone evaluates, gates,
    promotes and writes the records; the losses are the single-process run's."""
    one, two = runs["pipelines"]["one"], runs["pipelines"]["two"]
    for stage in ("sft", "sft2"):
        a, b = losses(one.run_dir / "logs" / stage), losses(two.run_dir / "logs" / stage)
        assert a.keys() == b.keys() and a
        rel = max(abs(b[s] - a[s]) / abs(a[s]) for s in a)
        print(f"pipeline stage {stage}: largest relative loss difference, two nodes vs one process: {rel:.2e}")
        assert rel <= REL
        assert one.pointer(stage) and two.pointer(stage)  # promoted on both
    summary = load_summary(two.run_dir)
    assert [s.gate.passed for s in summary.stages.values()] == [True, True]
    assert (two.export("sft2") / "model.safetensors").is_file()
    # the evaluation and the gate ran on one node only (which one is rank 0 is the rendezvous' choice)
    evaluated = ["eval: mmlu: ok" in out for out in runs["outputs"]]
    gated = ["sft2 gate: passed" in out for out in runs["outputs"]]
    assert sorted(evaluated) == sorted(gated) == [False, True] and evaluated == gated
    assert sorted(p.name for p in (two.run_dir / "evals").iterdir()) == ["sft2_final", "sft_final"]
