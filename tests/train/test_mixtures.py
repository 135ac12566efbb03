"""Data mixtures on the stages: SFT and DPO mix examples by weight, per-source held-out losses, exact resume,
and every bad mixture refused before anything trains, naming the source (issue 19)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from llm_pipeline.data.mixing import WeightedMixture
from llm_pipeline.train.config import PretrainConfig
from llm_pipeline.train.dpo import DPOStage
from llm_pipeline.train.parallel import DistInfo
from llm_pipeline.train.sft import SFTStage
from llm_pipeline.train.stage import run_stage

from .chat_fixtures import chat_records, make_chat_model, sft_config, train_chat_tokenizer, write_records
from .dpo_setup import dpo_config, make_start, write_pairs
from .test_trainer import SignalAt

SHARES = {"a": 0.5, "b": 0.3, "c": 0.2}


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sftmix")
    make_chat_model(d / "model", train_chat_tokenizer(d / "tok"))
    for name, n, seed in (("a", 200, 1), ("b", 90, 2), ("c", 40, 3)):
        write_records(d / f"{name}.jsonl", chat_records(n, seed=seed))
        write_records(d / f"{name}_val.jsonl", chat_records(12, seed=seed + 10))
    return d


def _chat_sources(d: Path, **extra) -> list[dict]:
    return [
        {"name": n, "weight": w, "kind": "local", "paths": [str(d / f"{n}.jsonl")],
         "val_paths": [str(d / f"{n}_val.jsonl")], **extra}
        for n, w in SHARES.items()
    ]  # fmt: skip


def _sft(tmp: Path, d: Path, sources: list[dict] | None = None, data: dict | None = None, **training) -> SFTStage:
    cfg = sft_config(tmp, d / "model", d / "a.jsonl", data=data or {}, **training).model_dump()
    data = {k: v for k, v in cfg["data"].items() if k not in ("kind", "paths")}
    cfg["data"] = {**data, "sources": sources if sources is not None else _chat_sources(d)}
    return SFTStage(type(sft_config(tmp, d / "model", d / "a.jsonl")).model_validate(cfg))


def _shares(mixer: WeightedMixture, batches: int) -> dict[str, float]:
    for _ in range(batches):
        mixer.next_batch()
    return {n: mixer.stats()[f"mix/{n}/share"] for n in mixer.names}


@pytest.mark.parametrize("packing", [False, True])
def test_sft_mixture_draws_examples_at_their_weights(chat_dir, tmp_path, packing):
    """Example shares within 1% of 0.5/0.3/0.2 (packed rows: 2%, rows hold different numbers of examples)."""
    stage = _sft(tmp_path, chat_dir, data={"packing": packing})
    mixer, held_out = stage.build_sources(DistInfo(), stage.model_config())
    assert isinstance(mixer, WeightedMixture) and mixer.unit == "examples"
    mixer.set_micro_batch_size(8)
    shares = _shares(mixer, 120)
    for n, w in SHARES.items():
        assert shares[n] == pytest.approx(w, abs=0.01 if not packing else 0.02), (n, shares)
    assert set(held_out.sources) == set(SHARES)
    assert set(stage.data_report["sources"]) == set(SHARES)  # each source's own build report


@pytest.mark.slow  # three short SFT runs
def test_sft_mixture_trains_logs_per_source_losses_and_resumes_exactly(chat_dir, tmp_path):
    common = dict(max_steps=8, eval_steps=4, eval_batches=2)
    straight = run_stage(_sft(tmp_path / "a", chat_dir, **common))
    assert straight.status == "completed"
    logs = [json.loads(x) for x in (tmp_path / "a" / "logs" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in logs if r["split"] == "eval"]
    assert all({"a/loss", "b/loss", "c/loss", "loss", "ppl"} <= set(r) for r in evals)
    weighted = sum(w * evals[-1][f"{n}/loss"] for n, w in SHARES.items())
    assert evals[-1]["loss"] == pytest.approx(weighted)
    assert {f"mix/{n}/share" for n in SHARES} <= set(logs[-2] if logs[-1]["split"] == "eval" else logs[-1])
    stats = straight.stats
    assert sum(stats[f"mix/{n}/examples"] for n in SHARES) > 0
    assert {f"mix/{n}/weight" for n in SHARES} <= set(stats)

    cfg_dir = tmp_path / "b"
    first = run_stage(_sft(cfg_dir, chat_dir, save_steps=3, resume_from_checkpoint="auto", **common),
                      callbacks=[SignalAt(5)])  # fmt: skip
    assert first.status == "preempted"
    second = run_stage(_sft(cfg_dir, chat_dir, save_steps=3, resume_from_checkpoint="auto", **common))
    assert {**first.losses, **second.losses} == straight.losses
    assert {k: v for k, v in second.stats.items() if k.startswith("mix/")} == {
        k: v for k, v in stats.items() if k.startswith("mix/")
    }


@pytest.fixture(scope="module")
def dpo_start(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpomix")
    start = make_start(root)
    start["b"] = write_pairs(root / "pairs" / "b.jsonl", 30, seed=3)
    start["b_val"] = write_pairs(root / "pairs" / "b_val.jsonl", 8, seed=4)
    return start


def _dpo(out: Path, start: dict, **training) -> DPOStage:
    cfg = dpo_config(out, start, **training).model_dump()
    data = {k: v for k, v in cfg["data"].items() if k not in ("kind", "paths", "val_paths")}
    data["sources"] = [
        {"name": "a", "weight": 0.7, "kind": "local", "paths": [str(start["train"])], "val_paths": [str(start["val"])]},
        {"name": "b", "weight": 0.3, "kind": "local", "paths": [str(start["b"])], "val_paths": [str(start["b_val"])]},
    ]
    cfg["data"] = data
    return DPOStage(type(dpo_config(out, start)).model_validate(cfg))


def test_dpo_mixture_draws_pairs_at_their_weights(dpo_start, tmp_path):
    stage = _dpo(tmp_path / "x", dpo_start)
    mixer, _ = stage.build_sources(DistInfo(), stage.model_config())
    mixer.set_micro_batch_size(4)
    shares = _shares(mixer, 100)
    assert shares["a"] == pytest.approx(0.7, abs=0.01) and shares["b"] == pytest.approx(0.3, abs=0.01)
    assert mixer.passes()["b"] > 1  # 120 of its 30 pairs: repeated (and warned about)


@pytest.mark.slow  # a short DPO run with its reference pass
def test_dpo_mixture_trains_with_a_reference_per_source_and_per_source_metrics(dpo_start, tmp_path):
    result = run_stage(_dpo(tmp_path / "run", dpo_start, max_steps=4, eval_steps=2))
    assert result.status == "completed"
    refs = sorted(p.name for p in (tmp_path / "run" / "ckpt" / "reference").glob("*.json"))
    assert len(refs) == 4  # train and val of each source: its own reference table
    last = result.eval_metrics[4]
    assert {"a/loss", "b/loss", "a/rewards/accuracies", "rewards/accuracies"} <= set(last)
    assert last["loss"] == pytest.approx(0.7 * last["a/loss"] + 0.3 * last["b/loss"])

    # Stopped after step 2 and resumed: the same losses and the same pairs drawn from each source.
    kw = dict(max_steps=4, eval_steps=2, save_steps=2, resume_from_checkpoint="auto")
    first = run_stage(_dpo(tmp_path / "resumed", dpo_start, **kw), callbacks=[SignalAt(2)])
    assert first.status == "preempted"
    second = run_stage(_dpo(tmp_path / "resumed", dpo_start, **kw))
    assert {**first.losses, **second.losses} == result.losses
    mix = {k: v for k, v in result.stats.items() if k.startswith("mix/")}
    assert {k: v for k, v in second.stats.items() if k.startswith("mix/")} == mix and mix["mix/b/examples"] > 0


# --------------------------------------------------------------------------------------------
# Bad mixtures: a clear error before anything trains, naming the source
# --------------------------------------------------------------------------------------------


def _pretrain(sources, **data) -> PretrainConfig:
    return PretrainConfig.model_validate({"data": {"sources": sources, **data}})


@pytest.mark.parametrize(
    ("sources", "weights", "message"),
    [
        ([{"name": "web", "weight": 0.7}, {"name": "code", "weight": -0.3}], {}, "'code': weight -0.3 is negative"),
        ([{"name": "web", "weight": 0}, {"name": "code", "weight": 0.0}], {}, "every weight is zero"),
        ([{"name": "web", "weight": 1}], {"cdoe": 0.5}, "data.weights names source(s) 'cdoe' not in data.sources"),
        ([{"name": "web", "weight": 1}, {"name": "web", "weight": 1}], {}, "names 'web' more than once"),
        ([{"name": "web", "weight": 1}, {"name": "code", "tokens": 10**9}], {}, "mixes weights (web) with budgets"),
        ([{"name": "web"}], {}, "'web': set exactly one of weight, tokens or epochs"),
        ([{"name": "web", "examples": 5}], {}, "'web': `examples` is a budget of the other kind of stage"),
    ],
)
def test_bad_weights_are_config_errors_naming_the_source(sources, weights, message):
    with pytest.raises(ValidationError) as e:
        _pretrain(sources, weights=weights)
    assert message in str(e.value)


def test_unknown_reader_key_names_the_source():
    with pytest.raises(ValidationError, match=r"data.sources\[0\] \('web'\): pathh: Extra inputs are not permitted"):
        _pretrain([{"name": "web", "weight": 1, "pathh": "x"}])


def test_a_chat_source_with_nothing_left_after_cleaning_is_named(chat_dir, tmp_path):
    bad = write_records(tmp_path / "bad.jsonl", [], bad_lines=["{not json", '{"messages": []}'])
    sources = [*_chat_sources(chat_dir)[:2], {"name": "broken", "weight": 0.2, "kind": "local", "paths": [str(bad)]}]
    stage = _sft(tmp_path, chat_dir, sources)
    with pytest.raises(ValueError, match=r"data source 'broken': SFT data \(local\): no usable train record"):
        run_stage(stage)
    assert not list((tmp_path / "ckpt").glob("checkpoint-*"))


def test_registered_embedded_chat_sources_are_usable_by_name():
    from llm_pipeline.data.config import EMBEDDED_CHAT_SOURCES, SFTDataConfig, register_chat_source

    register_chat_source("toy", sft="llm_pipeline.data.stdlib_chat:sft_records_of")
    try:
        data = SFTDataConfig.model_validate(
            {
                "sources": [
                    {"name": "code", "weight": 0.8, "kind": "stdlib"},
                    {"name": "toy", "weight": 0.2, "kind": "toy"},
                ]
            }
        )
        assert data.source_configs()["toy"].kind == "toy" and data.source_configs()["toy"].embedded
    finally:
        EMBEDDED_CHAT_SOURCES.pop("toy")
    with pytest.raises(ValidationError, match="unknown chat data kind 'toy'"):
        SFTDataConfig.model_validate({"sources": [{"name": "t", "weight": 1, "kind": "toy"}]})


# --------------------------------------------------------------------------------------------
# max_epochs: checked once the run's length is known, however it is set (review #4)
# --------------------------------------------------------------------------------------------


def test_max_epochs_is_checked_when_num_epochs_sets_the_run_length(chat_dir, tmp_path):
    """One epoch of the mixture's rows draws 0.2 of 330 examples from c's 40: ~1.6 passes, over its cap of 1."""
    sources = _chat_sources(chat_dir)
    sources[2]["max_epochs"] = 1
    stage = _sft(tmp_path, chat_dir, sources, num_epochs=1)
    with pytest.raises(ValueError, match=r"data source .c.: the run would pass over it 1\.\d+ times, more than its"):
        run_stage(stage)
    assert not list((tmp_path / "ckpt").glob("checkpoint-*"))


class _Packed:
    """A packed SFT source's size only (what the plan reads)."""

    def __init__(self, examples: int, per_row: float) -> None:
        self.rows_per_epoch = max(1, round(examples / per_row))
        self.mean_examples_per_row = examples / self.rows_per_epoch

    def set_micro_batch_size(self, rows: int) -> None: ...

    def next_batch(self) -> dict: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


def test_the_shipped_sft_mixture_passes_its_own_max_epochs(caplog):
    """configs/sft.yaml: example budgets (the parts' published counts), num_epochs 2, max_epochs 2 on every source.
    With what cleaning leaves of each part (1% held out, a few rejects) and packing densities from 2 to 12
    examples a row, the plan is two passes over each and the run starts; four epochs are refused."""
    from pathlib import Path

    from llm_pipeline.config import load_config
    from llm_pipeline.data.mixing import build_mixture
    from llm_pipeline.train.mixture import check_mixture_plan
    from llm_pipeline.train.sft import SFTConfig
    from llm_pipeline.train.stage import _resolve_epochs

    cfg = load_config(SFTConfig, Path(__file__).parents[2] / "configs" / "sft.yaml")
    entries = cfg.data.mixture_weights()
    assert cfg.training.num_epochs == 2 and {e.max_epochs for e in entries.values()} == {2}
    sizes = {n: _Packed(int(e.examples * 0.99) - 7 * i, 2 + 1.7 * i) for i, (n, e) in enumerate(entries.items())}
    mixer, _ = build_mixture(cfg.data, lambda n, c: (sizes[n], None), unit="examples", seed=0, rank=0)
    _resolve_epochs(cfg, mixer, DistInfo())
    with caplog.at_level("INFO", logger="llm_pipeline.data.mixing"):
        check_mixture_plan(cfg, mixer, DistInfo())
    assert "(2.00 passes)" in caplog.text and not [r for r in caplog.records if r.levelname == "WARNING"]
    cfg.training.num_epochs = 4
    _resolve_epochs(cfg, mixer, DistInfo())
    with pytest.raises(ValueError, match="more than its max_epochs 2"):
        check_mixture_plan(cfg, mixer, DistInfo())
