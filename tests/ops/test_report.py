"""The run report, from a synthetic run folder written here (no training): the HTML page embeds its plots
and tables and nothing external; the Markdown card's numbers are the inputs'; missing pieces are named."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml

from llm_pipeline.cli import main
from llm_pipeline.report import write_report

STAGES = [("pretrain", "pretrain"), ("sft", "sft"), ("dpo", "dpo"), ("lora", "lora")]
EVALS = {
    "init": {"perplexity": {"status": "ok", "perplexity": 8713.2}, "mmlu": {"status": "ok", "accuracy": 0.25}},
    "pretrain": {"perplexity": {"status": "ok", "perplexity": 245.16}, "mmlu": {"status": "ok", "accuracy": 0.35}},
    "sft": {"perplexity": {"status": "ok", "perplexity": 272.31}, "mmlu": {"status": "ok", "accuracy": 0.33},
            "stage": {"loss": 4.5312}},
    "dpo": {"perplexity": {"status": "ok", "perplexity": 280.0}, "mmlu": {"status": "ok", "accuracy": 0.33},
            "safety": {"status": "ok", "refusal_rate": 0.5}, "stage": {"rewards/accuracies": 0.625}},
}  # fmt: skip
HOST = {"python": "3.11.7", "torch": "2.13.0+cpu", "device": "cpu"}


def _metrics_log(path: Path, steps: int, *, lr: float, tps: float) -> list[dict]:
    """Train lines every 5 steps and eval lines every 10; step 10 is logged twice (a resume re-ran it)."""
    lines = [{"step": 0, "split": "eval", "time": 1000.0, "loss": 9.0}]
    for s in range(5, steps + 1, 5):
        lines.append({"step": s, "split": "train", "time": 1000.0 + 10 * s, "loss": 9.0 - s / 10, "lr": lr,
                      "tokens_per_s": tps + s, "mfu": 0.1, "tokens_seen": 1000.0 * s})  # fmt: skip
        if s % 10 == 0:
            lines.append({"step": s, "split": "eval", "time": 1001.0 + 10 * s, "loss": 9.5 - s / 10})
    stale = {**lines[2], "tokens_per_s": 1e9, "loss": 99.0}  # before the crash: superseded by the rerun
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(x) + "\n" for x in [lines[0], lines[1], stale, *lines[2:]])
    path.write_text(text + '{"step": 99, "split": "tra')  # a line cut short by a kill
    return lines


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """pretrain and sft completed and promoted, dpo evaluated but blocked by its gate, lora never ran."""
    run = tmp_path / "runs" / "demo"
    (run / "promoted").mkdir(parents=True)
    stages = [{"name": n, "kind": k, "config": f"configs/demo/{n}.yaml"} for n, k in STAGES]
    (run / "pipeline.resolved.yaml").write_text(yaml.safe_dump({"run_dir": str(run), "stages": stages}))
    for name, metrics in EVALS.items():
        (run / "evals" / f"{name}_final").mkdir(parents=True)
        (run / "evals" / f"{name}_final" / "results.json").write_text(json.dumps({"metrics": metrics, "host": HOST}))
    summary: dict = {"run_dir": str(run), "stages": {}}
    for i, (name, kind) in enumerate(STAGES[:3]):
        _metrics_log(run / "logs" / name / "metrics.jsonl", 20, lr=1e-3 / (i + 1), tps=1000.0 * (i + 1))
        (run / "checkpoints" / name).mkdir(parents=True)
        (run / "checkpoints" / name / "config.yaml").write_text(f"training:\n  max_steps: 20\n# {name}\n")
        passed = name != "dpo"
        rule = {"metric": "safety.refusal_rate", "passed": passed, "value": 0.5,
                "reason": "ok" if passed else "0.5 < min 0.9"}  # fmt: skip
        summary["stages"][name] = {
            "kind": kind, "final_dir": str(run / "checkpoints" / f"{name}_final"), "steps": 20,
            "tokens_seen": 20000 * (i + 1), "wall_s": 3725.0 * (i + 1), "eval": EVALS[name],
            "gate": {"stage": name, "passed": passed, "rules": [rule]}, "status": "promoted" if passed else "blocked",
        }  # fmt: skip
        final = run / "checkpoints" / f"{name}_final"
        final.mkdir()
        (final / "model.safetensors").write_bytes(b"weights")
        if passed:  # a pointer as written before pointers carried a fingerprint: trusted while its folder exists
            (run / "promoted" / f"{name}.json").write_text(json.dumps({"stage": name, "model_dir": str(final)}))
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def _md_rows(card: str, first_header: str) -> dict[str, dict[str, str]]:
    """The Markdown table whose header starts with ``| <first_header>``, as {first cell: {column: cell}}."""
    lines = card.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header}"))
    head = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(head, cells, strict=True))
    return rows


def test_card_numbers_are_the_inputs_with_deltas_gates_tokens_time_and_hashes(run: Path) -> None:
    _, card_path = write_report(run)
    card = card_path.read_text()
    m = _md_rows(card, "metric | init")  # one column per stage, one row per metric
    assert list(m) == ["perplexity.perplexity", "mmlu.accuracy", "safety.refusal_rate"]
    ppl, mmlu = m["perplexity.perplexity"], m["mmlu.accuracy"]
    assert list(ppl)[1:] == ["init", "pretrain", "sft", "dpo", "lora"]
    assert ppl["init"] == "8713" and mmlu["init"] == "0.25"
    assert ppl["pretrain"] == "245.2 (−8468)"  # 245.16 - 8713.2 = -8468.04
    assert mmlu["pretrain"] == "0.35 (+0.1)"
    assert ppl["sft"] == "272.3 (+27.15)" and mmlu["sft"] == "0.33 (−0.02)"
    assert not any(k.startswith("stage.") for k in m)  # measured on each stage's own data: not compared
    own = _md_rows(card, "stage | held-out metrics")
    assert own["sft"]["held-out metrics on the stage's own data (start → end)"].startswith("loss 4.531")
    assert "rewards/accuracies 0.625" in own["dpo"]["held-out metrics on the stage's own data (start → end)"]
    assert m["safety.refusal_rate"]["dpo"] == "0.5"  # a gated metric is shown even outside the headline list
    assert {row["lora"] for row in m.values()} == {"-"}
    s = _md_rows(card, "stage | kind")
    assert s["pretrain"]["tokens"] == "20,000" and s["sft"]["tokens"] == "40,000"
    assert s["pretrain"]["wall-clock"] == "1h02m" and s["dpo"]["wall-clock"] == "3h06m"  # 3725 s, 11175 s
    assert (
        s["pretrain"]["gate"] == "passed (promoted)"
        and s["dpo"]["gate"] == "BLOCKED: safety.refusal_rate: 0.5 < min 0.9"
    )
    assert s["lora"]["state"] == "not run: the dpo gate blocked promotion"
    # tokens/s: the mean of the last line logged for each step (the stale pre-crash line at step 10 is gone)
    assert s["pretrain"]["tokens/s"] == f"{sum(1000.0 + k for k in (5, 10, 15, 20)) / 4:.4g}" == "1012"
    assert s["sft"]["MFU"] == "10.0%"
    expected_hash = hashlib.sha256((run / "checkpoints" / "sft" / "config.yaml").read_bytes()).hexdigest()
    assert s["sft"]["config sha256"] == expected_hash[:12]
    assert "**Status:** stopped: the dpo gate blocked promotion" in card
    assert "**Environment:** python 3.11.7, torch 2.13.0+cpu, device cpu" in card
    assert card.index("**Environment:**") < card.index("## Evaluation by stage")  # at the top
    assert "1 unreadable line(s) in logs/pretrain/metrics.jsonl skipped" in card


def test_html_is_self_contained_with_the_plots_and_the_tables(run: Path) -> None:
    page_path, _ = write_report(run)
    page = page_path.read_text()
    images = re.findall(r'<h3>([^<]+)</h3><img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    titles = [t for t, _ in images]
    assert titles == ["Loss", "Learning rate", "Throughput (tokens/s)", "MFU", "Evaluation across stages"]
    assert all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for _, data in images)
    assert "<td>mmlu.accuracy</td>" in page and "<th>pretrain</th>" in page and "<td>272.3 (+27.15)</td>" in page
    assert '<td class="bad">BLOCKED: safety.refusal_rate: 0.5 &lt; min 0.9</td>' in page
    assert not re.search(r'(src|href)="(?!data:)', page) and "http" not in page  # nothing fetched from elsewhere


def test_a_run_stopped_halfway_is_reported_as_such(run: Path, capsys, monkeypatch) -> None:
    (run / "summary.json").unlink()  # killed during sft, before the pipeline wrote its summary
    for name in ("sft", "dpo"):
        (run / "evals" / f"{name}_final" / "results.json").unlink()
    (run / "evals" / "pretrain_final" / "results.json").write_text("{not json")
    for p in (run / "logs" / "dpo").glob("*"):
        p.unlink()
    monkeypatch.chdir(run.parent.parent)
    assert main(["report", "--print"]) == 0  # runs/demo is the default
    out = capsys.readouterr().out
    assert "**Status:** incomplete: pretrain stopped at step 20" in out
    for line in ("- summary: no runs/demo/summary.json", "- sft: did not finish; last logged step 20",
                 "- dpo: not run", "- lora: not run", "is unreadable"):  # fmt: skip
        assert line in out
    m = _md_rows(out, "metric | init")
    assert m["perplexity.perplexity"]["sft"] == "-" and m["perplexity.perplexity"]["init"] == "8713"
    assert (run / "report" / "report.html").is_file()


def test_a_run_with_nothing_yet_still_gets_a_report(tmp_path: Path) -> None:
    (tmp_path / "r" / "logs").mkdir(parents=True)
    page, card = write_report(tmp_path / "r")
    text = card.read_text()
    assert "_No evaluation results in this run._" in text and "no summary.json" in text
    assert "No plots" in page.read_text()
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        write_report(tmp_path / "nope")


def test_stage_states_follow_the_pipelines_records(run: Path) -> None:
    summary = json.loads((run / "summary.json").read_text())
    summary["stages"]["sft"] = {"kind": "sft", "status": "preempted"}  # SIGTERM during sft: checkpoint saved
    summary["stages"]["dpo"] = {**summary["stages"]["dpo"], "status": "trained"}
    del summary["stages"]["dpo"]["gate"], summary["stages"]["dpo"]["eval"]
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "evals" / "dpo_final" / "results.json").unlink()
    card = write_report(run)[1].read_text()
    s = _md_rows(card, "stage | kind")
    assert s["sft"]["state"] == "stopped (preempted) at step 20" and s["dpo"]["state"] == "trained, not evaluated"
    assert "- sft: did not finish (preempted) at step 20; run again to resume" in card
    assert "**Status:** incomplete: sft stopped (preempted) at step 20" in card


@pytest.mark.parametrize(
    ("summary", "says"),
    [
        ([{"stage": "sft"}], "expected a JSON object with a 'stages' object, got a list"),
        ({"stages": {"sft": "done"}}, "the record of stage 'sft' is not an object"),
        ({"stages": ["sft"]}, "'stages' is a list"),
    ],
)
def test_a_summary_that_is_not_one_is_a_clear_error_not_a_traceback(run: Path, capsys, summary, says) -> None:
    (run / "summary.json").write_text(json.dumps(summary))
    assert main(["report", str(run)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "AttributeError" not in err
    assert f"{run / 'summary.json'}: {says}" in err and "move it aside" in err, err


def test_a_nan_metric_shows_as_nan_and_a_diverged_stage_as_diverged(run: Path) -> None:
    results = run / "evals" / "sft_final" / "results.json"
    data = json.loads(results.read_text())
    data["metrics"]["perplexity"]["perplexity"] = float("nan")
    results.write_text(json.dumps(data))  # NaN, as json writes it
    summary = json.loads((run / "summary.json").read_text())
    summary["stages"]["dpo"] |= {"status": "diverged", "steps": 17, "gate": None}
    (run / "summary.json").write_text(json.dumps(summary))
    log = run / "logs" / "dpo" / "metrics.jsonl"  # finite losses up to step 15, then NaN
    lines = [x for x in log.read_text().splitlines()[:-1] if json.loads(x)["step"] <= 15]
    log.write_text("\n".join([*lines, json.dumps({"step": 17, "split": "train", "loss": float("nan")})]) + "\n")
    _, card = write_report(run)
    text = card.read_text()
    m = _md_rows(text, "metric | init")
    assert m["perplexity.perplexity"]["sft"] == "NaN" and m["perplexity.perplexity"]["dpo"] == "280"
    s = _md_rows(text, "stage | kind")
    assert s["dpo"]["state"] == "DIVERGED at step 17: non-finite loss", s["dpo"]
    assert "**Status:** stopped: dpo DIVERGED at step 17" in text
    assert "dpo: DIVERGED at step 17: its loss became non-finite" in text


def test_an_old_summary_without_typed_fields_still_reports(run: Path) -> None:
    """summary.json as runs wrote it before the typed records (today's keys, eval_metrics by string step)."""
    summary = json.loads((run / "summary.json").read_text())
    summary["stages"]["pretrain"] |= {"eval_metrics": {"0": {"loss": 9.0}, "20": {"loss": 7.0}},
                                      "val_losses": {"0": 9.0, "20": 7.0}, "fingerprint": "abc",
                                      "output_fingerprint": "def", "future_key": [1, 2]}  # fmt: skip
    summary |= {"evals": {"pretrain_final": {"fingerprint": "x", "results": "y"}}, "init_eval": EVALS["init"]}
    (run / "summary.json").write_text(json.dumps(summary))
    _, card = write_report(run)
    s = _md_rows(card.read_text(), "stage | kind")
    assert s["pretrain"]["state"] == "completed" and s["pretrain"]["gate"] == "passed (promoted)"


def test_a_data_mixture_gets_its_weights_against_the_realised_shares(run: Path) -> None:
    summary = json.loads((run / "summary.json").read_text())
    summary["stages"]["pretrain"]["stats"] = {
        "mix/web/weight": 0.7, "mix/web/share": 0.701, "mix/web/tokens": 14020.0, "mix/web/examples": 110.0,
        "mix/web/passes": 1.0, "mix/code/weight": 0.3, "mix/code/share": 0.299, "mix/code/tokens": 5980.0,
        "mix/code/examples": 47.0, "mix/code/passes": 3.0,
    }  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    card = write_report(run)[1].read_text()
    assert "## Data mixtures (configured weight against the realised share)" in card
    assert "| pretrain | web | 0.700 | 0.701 | 14,020 | 110 | 1 |" in card
    assert "| pretrain | code | 0.300 | 0.299 | 5,980 | 47 | 3 |" in card


def test_mixture_sources_of_equal_weight_are_listed_by_name_whatever_the_hash_seed(run: Path) -> None:
    """Two runs of the same pipeline write the same card: equal weights used to keep a set's order, which
    changes with PYTHONHASHSEED."""
    summary = json.loads((run / "summary.json").read_text())
    names = ["stdlib", "safety", "alpha", "zeta", "mid"]
    summary["stages"]["pretrain"]["stats"] = {f"mix/{n}/weight": 0.2 for n in names}
    (run / "summary.json").write_text(json.dumps(summary))
    rows = [r for r in write_report(run)[1].read_text().splitlines() if r.startswith("| pretrain | ") and "0.200" in r]
    assert [r.split(" | ")[1] for r in rows] == sorted(names)


def test_card_rows_show_suite_averages_unavailable_tasks_and_expectations(run: Path) -> None:
    lm = {"status": "ok", "olmes_base.average": 0.41, "olmes_base.n_tasks": 2, "arc_easy.acc_norm": 0.5,
          "arc_easy.acc": 0.45, "arc_easy.n": 10}  # fmt: skip
    for name, avg in (("pretrain", 0.41), ("sft", 0.44), ("dpo", 0.43)):
        path = run / "evals" / f"{name}_final" / "results.json"
        res = json.loads(path.read_text())
        res["metrics"]["lm_eval"] = {**lm, "olmes_base.average": avg}
        res["metrics"]["humaneval"] = {"status": "unavailable"}
        res["config"] = {"expect": {"mmlu": "flat: model too small"}}
        res["host"] = {**HOST, "git_commit": "0123456789ab", "lm_eval": "0.4.13"}
        path.write_text(json.dumps(res))
    card = write_report(run)[1].read_text()
    m = _md_rows(card, "metric | init")
    assert m["lm_eval.olmes_base.average"]["sft"] == "0.44 (+0.03)"  # a suite's average is a row, with its change
    assert m["lm_eval.arc_easy.acc_norm"]["pretrain"] == "0.5" and "lm_eval.arc_easy.acc" not in m
    assert m["mmlu.accuracy (flat: model too small)"]["pretrain"] == "0.35 (+0.1)"  # labelled, not dropped
    assert m["humaneval.pass@1"]["sft"] == "unavailable" and m["humaneval.pass@1"]["init"] == "-"  # never a 0
    assert "**Environment:** git commit 0123456789ab, python 3.11.7" in card and "lm-eval 0.4.13" in card
