"""Clean + dedup: planted exact and ~10%-edited near duplicates are found, no unique document is
dropped, and the manifest's books balance (in = kept + dropped by reason)."""

from __future__ import annotations

import gzip
import json

import pytest

from llm_pipeline.data.clean import CodeQualityFilter, build_stages, clean
from llm_pipeline.data.config import DataConfig
from llm_pipeline.data.dedup import find_duplicates, minhash_signature
from llm_pipeline.data.sources import download

from .corpus import planted_duplicates_corpus, write_jsonl

# The demo's near-dedup setting: 112 MinHash values as 56 bands x 2 with a verified similarity >= 0.3.
SENSITIVE = {"num_buckets": 56, "hashes_per_bucket": 2, "min_similarity": 0.3}


def _excluded(cfg):
    out = {}
    for f in (cfg.clean_dir / "excluded").rglob("*.jsonl.gz"):
        with gzip.open(f, "rt") as fh:
            for line in fh:
                rec = json.loads(line)
                out[rec["id"]] = rec["metadata"]
    return out


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("planted")
    records, planted = planted_duplicates_corpus()
    write_jsonl(tmp / "in" / "a.jsonl", records[: len(records) // 2])
    write_jsonl(tmp / "in" / "b.jsonl.gz", records[len(records) // 2 :])
    cfg = DataConfig.model_validate(
        {
            "output_dir": str(tmp / "out"),
            "source": {"kind": "local", "paths": [str(tmp / "in")], "documents_per_shard": 50},
            "clean": {"filters": "none", "minhash": SENSITIVE, "executor": {"tasks": 2, "workers": 2}},
        }
    )
    download(cfg, show_progress=False)
    manifest = clean(cfg, show_progress=False)
    return cfg, manifest, records, planted


def test_planted_duplicates_found_and_no_unique_document_dropped(planted_run):
    cfg, _manifest, records, planted = planted_run
    excluded = _excluded(cfg)
    exact = {i for i, k in planted.items() if k == "exact"}
    near = {i for i, k in planted.items() if k == "near"}
    assert exact <= set(excluded)  # exact copies never survive
    recall = len(near & set(excluded)) / len(near)
    assert recall >= 0.9, f"near-duplicate recall {recall:.2f}"
    # in a cluster the smallest id is kept, so originals ("u...") must all survive
    originals = {r["id"] for r in records if r["id"].startswith("u")}
    assert not originals & set(excluded), "a unique document was dropped"
    assert all(meta["duplicate_of"].startswith("u") for meta in excluded.values())


def test_manifest_counts_add_up(planted_run):
    cfg, manifest, records, _ = planted_run
    assert manifest["documents_in"] == len(records)
    assert manifest["documents_in"] == manifest["documents_kept"] + sum(manifest["dropped_by_reason"].values())
    assert manifest["balanced"] is True
    assert set(manifest["dropped_by_reason"]) <= {"dedup/exact_duplicate", "dedup/near_duplicate"}
    assert len(_excluded(cfg)) == manifest["documents_dropped"]


def test_default_14x8_lsh_misses_10pct_edits_but_catches_light_edits():
    """Why the demo does not use FineWeb's 14 x 8: its threshold (~0.72) misses 10%-edited copies."""
    import random

    import numpy as np

    from .corpus import edit_words, random_doc

    rng = random.Random(1)
    docs = [random_doc(rng, 300) for _ in range(30)]

    def recall(fraction, **lsh):
        sigs = [minhash_signature(t, ngram_size=5, num_perm=112, seed=1) for t in docs]
        edited = [minhash_signature(edit_words(rng, t, fraction), ngram_size=5, num_perm=112, seed=1) for t in docs]
        folder = _write_sigs(sigs + edited)
        removed = find_duplicates(folder, **lsh)
        return sum(f"d{30 + i:04d}" in removed for i in range(30)) / 30

    def _write_sigs(sigs):
        import tempfile
        from pathlib import Path

        d = Path(tempfile.mkdtemp())
        ids = np.array([f"d{i:04d}" for i in range(len(sigs))])
        np.savez(d / "00000.npz", ids=ids, exact=np.arange(len(sigs), dtype=np.uint64), sig=np.stack(sigs))
        return d

    assert recall(0.02, num_buckets=14, hashes_per_bucket=8) >= 0.9
    assert recall(0.10, num_buckets=14, hashes_per_bucket=8) < 0.5
    assert recall(0.10, **SENSITIVE) >= 0.9


def test_code_filter_keeps_code_and_drops_data_blobs():
    from datatrove.data import Document

    f = CodeQualityFilter()
    code = "import os\n\n\ndef main():\n    return os.getcwd()\n" * 5
    assert f.filter(Document(text=code, id="a")) is True
    blob = "DATA = '" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=" * 40 + "'\n"
    assert f.filter(Document(text=blob, id="b")) == (False, "long_line")
    b64 = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0123456789abcdefABCDEF+/QUJDREVGR0hJSktMTU5P"
    blob_lines = "\n".join([f"'{b64}'"] * 30)
    assert f.filter(Document(text=blob_lines, id="c")) == (False, "encoded_data")
    assert f.filter(Document(text="x = 1", id="d")) == (False, "too_short")


def test_prose_filters_drop_junk_and_record_the_reason(tmp_path):
    good = (
        "The committee met on Tuesday to discuss the budget for the next year. Members agreed that the "
        "library needs more funding, and they voted to approve the proposal after a long debate.\n"
        "Several residents spoke about the opening hours of the reading room, which have been shortened "
        "twice since the spring. The chair promised to publish the figures before the next meeting.\n"
        "A teacher from the primary school asked whether children could borrow more books during the "
        "holidays, and the librarian explained how the new lending system will work in practice.\n"
        "Finally, the treasurer presented a short report on the costs of heating the old building, "
        "which is expected to be renovated over the coming two years with help from the region."
    )
    junk = "buy buy buy buy\n" * 40
    write_jsonl(tmp_path / "in.jsonl", [{"id": "good", "text": good}, {"id": "junk", "text": junk}])
    cfg = DataConfig.model_validate(
        {
            "output_dir": str(tmp_path / "out"),
            "source": {"kind": "local", "paths": [str(tmp_path / "in.jsonl")]},
            "clean": {"filters": "prose", "executor": {"tasks": 1, "workers": 1}},
        }
    )
    download(cfg, show_progress=False)
    m = clean(cfg, show_progress=False)
    assert m["documents_kept"] == 1 and m["balanced"]
    (reason,) = m["dropped_by_reason"]
    assert reason.startswith("gopher_repetition/")
    assert set(_excluded(cfg)) == {"junk"}


def test_slurm_and_ray_executors_are_built_from_config(tmp_path):
    """The same stages run on Slurm or Ray: building the executor chain needs no cluster (submission does)."""
    from llm_pipeline.data.clean import make_executor

    cfg = DataConfig.model_validate(
        {
            "output_dir": str(tmp_path),
            "clean": {"executor": {"kind": "slurm", "tasks": 8, "slurm": {"partition": "cpu", "time": "01:00:00"}}},
        }
    )
    prev = None
    stages = build_stages(cfg, "fp")
    assert [s[0] for s in stages] == ["filter", "dedup", "apply", "report"]
    for name, steps, tasks in stages:
        prev = make_executor(cfg, name, steps, tasks, prev)
    assert type(prev).__name__ == "SlurmPipelineExecutor" and prev.depends is not None and prev.tasks == 1
    pytest.importorskip("ray")
    ray_cfg = cfg.model_copy(
        update={
            "clean": cfg.clean.model_copy(update={"executor": cfg.clean.executor.model_copy(update={"kind": "ray"})})
        }
    )
    assert type(make_executor(ray_cfg, "filter", stages[0][1], 8, None)).__name__ == "RayPipelineExecutor"


def test_corpus_where_nothing_survives_is_a_clear_error(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "x = 1"}, {"id": "b", "text": "y = 2"}])
    cfg = DataConfig.model_validate(
        {
            "output_dir": str(tmp_path / "out"),
            "source": {"kind": "local", "paths": [str(tmp_path / "in.jsonl")]},
            "clean": {"filters": "code", "executor": {"tasks": 2, "workers": 2}},
        }
    )
    download(cfg, show_progress=False)
    with pytest.raises(ValueError, match=r"no documents survived.*code_quality/too_short"):
        clean(cfg, show_progress=False)


@pytest.mark.slow
def test_datatrove_minhash_backend_runs_and_balances(tmp_path):
    """The scale-out backend (datatrove's own 4-stage MinHash) on a small planted corpus."""
    records, _ = planted_duplicates_corpus(seed=2, n_unique=40, n_exact=6, n_near=0)
    write_jsonl(tmp_path / "in.jsonl", records)
    cfg = DataConfig.model_validate(
        {
            "output_dir": str(tmp_path / "out"),
            "source": {"kind": "local", "paths": [str(tmp_path / "in.jsonl")], "documents_per_shard": 20},
            "clean": {
                "filters": "none",
                "minhash": {"backend": "datatrove", "num_buckets": 4, "hashes_per_bucket": 4},
                "executor": {"tasks": 2, "workers": 2},
            },
        }
    )
    download(cfg, show_progress=False)
    m = clean(cfg, show_progress=False)
    assert m["balanced"] and m["documents_in"] == len(records)
    # each exact pair loses exactly one member (datatrove may keep the copy rather than the original)
    assert m["dropped_by_reason"] == {"minhash/dropped": 6}
    assert m["documents_kept"] == 40


def test_ray_executor_without_ray_installed_names_the_extra(tmp_path, monkeypatch):
    from llm_pipeline.data import ray_cluster

    monkeypatch.setattr(ray_cluster.importlib.util, "find_spec", lambda name: None)
    missing = pytest.raises(ray_cluster.RayUnavailable, match=r"pack.executor=ray .*pip install 'llm-pipeline\[ray\]'")
    with missing, ray_cluster.ray_connection("127.0.0.1:6379", "pack.executor=ray"):
        pass
