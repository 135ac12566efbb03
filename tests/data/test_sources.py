"""Sources: each kind of bad input is counted, written to the rejects file with file:line, and skipped."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm_pipeline.data.config import DataConfig
from llm_pipeline.data.sources import download, iter_jsonl_documents

from .corpus import write_jsonl


def _cfg(tmp_path, paths, **source):
    return DataConfig.model_validate(
        {"output_dir": str(tmp_path / "out"), "source": {"kind": "local", "paths": [str(p) for p in paths], **source}}
    )


def _rejects(cfg):
    return [json.loads(line) for line in (cfg.raw_dir / "rejects.jsonl").read_text().splitlines()]


def _good(n=3, prefix="g"):
    return [{"id": f"{prefix}{i}", "text": f"document number {i} with some words"} for i in range(n)]


def test_malformed_json_lines_go_to_rejects_with_file_and_line(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"id": "1", "text": "fine"}\n{"id": "2", "text": \n["not", "an object"]\n{"id": "4"}\n')
    cfg = _cfg(tmp_path, [f])
    m = download(cfg, show_progress=False)
    assert m["documents"] == 1
    assert m["rejected"] == {"malformed_json": 1, "malformed_record": 1, "missing_text": 1}
    rej = _rejects(cfg)
    assert [(r["file"], r["line"], r["reason"]) for r in rej] == [
        (str(f), 2, "malformed_json"),
        (str(f), 3, "malformed_record"),
        (str(f), 4, "missing_text"),
    ]


def test_invalid_utf8_line_and_text_file(tmp_path):
    f = tmp_path / "b.jsonl"
    f.write_bytes(b'{"id": "1", "text": "ok"}\n{"id": "2", "text": "bad \xff\xfe"}\n')
    t = tmp_path / "latin1.txt"
    t.write_bytes("caf\xe9".encode("latin-1"))
    cfg = _cfg(tmp_path, [f, t])
    m = download(cfg, show_progress=False)
    assert m["documents"] == 1 and m["rejected"] == {"invalid_utf8": 2}
    assert {(r["file"], r["line"]) for r in _rejects(cfg)} == {(str(f), 2), (str(t), None)}


def test_empty_and_oversized_documents(tmp_path):
    recs = [*_good(2), {"id": "e", "text": "   \n\t "}, {"id": "big", "text": "x" * 5000}]
    f = write_jsonl(tmp_path / "c.jsonl.gz", recs)
    cfg = _cfg(tmp_path, [f], max_document_bytes=1000)
    m = download(cfg, show_progress=False)
    assert m["documents"] == 2 and m["rejected"] == {"empty": 1, "too_large": 1}
    assert {r["id"] for r in _rejects(cfg)} == {"e", "big"}


def test_missing_and_unreadable_files_are_reported_and_the_run_continues(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", _good(2))
    corrupt = tmp_path / "corrupt.jsonl.gz"
    corrupt.write_bytes(gzip.compress(b"x")[:10] + bytes(range(256)))  # gzip header, then garbage
    cfg = _cfg(tmp_path, [good, tmp_path / "missing.jsonl", corrupt, tmp_path / "gone" / "nope.parquet"])
    m = download(cfg, show_progress=False)
    assert m["documents"] == 2
    assert m["rejected"]["missing_file"] == 2
    assert m["rejected"]["unreadable_file"] == 1
    assert any(r["reason"] == "unreadable_file" and r["file"].startswith(str(corrupt)) for r in _rejects(cfg))


def test_parquet_without_text_column(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": ["alpha beta", "gamma delta"], "id": ["p1", "p2"]}), good)
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"content": ["no text column here"]}), bad)
    cfg = _cfg(tmp_path, [good, bad], id_column="id")
    m = download(cfg, show_progress=False)
    assert m["documents"] == 2 and m["rejected"] == {"missing_text_column": 1}
    (rej,) = _rejects(cfg)
    assert rej["file"] == str(bad) and "content" in rej["detail"]
    assert [d["id"] for d in iter_jsonl_documents(cfg.raw_dir)] == ["p1", "p2"]


def test_source_with_no_usable_documents_is_a_clear_error(tmp_path):
    f = tmp_path / "junk.jsonl"
    f.write_text('not json\n{"text": ""}\n')
    cfg = _cfg(tmp_path, [f])
    with pytest.raises(ValueError, match=r"no usable documents.*malformed_json.*rejects\.jsonl"):
        download(cfg, show_progress=False)


def test_manifest_shards_and_caps(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", _good(25))
    cfg = _cfg(tmp_path, [f], documents_per_shard=10, max_documents=23)
    m = download(cfg, show_progress=False)
    assert m["documents"] == 23 and [s["documents"] for s in m["shards"]] == [10, 10, 3]
    assert sum(s["bytes"] for s in m["shards"]) == m["bytes"]
    assert len(list(iter_jsonl_documents(cfg.raw_dir))) == 23


def test_download_resumes_after_an_interruption(tmp_path, monkeypatch, caplog):
    import llm_pipeline.data.sources as sources

    f = write_jsonl(tmp_path / "d.jsonl", _good(30))
    cfg = _cfg(tmp_path, [f], documents_per_shard=10)
    real = sources.iter_local

    def crash_after_15(c):
        for i, item in enumerate(real(c)):
            if i == 15:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(sources, "iter_local", crash_after_15)
    with pytest.raises(KeyboardInterrupt):
        download(cfg, show_progress=False)
    progress = json.loads((cfg.raw_dir / "progress.json").read_text())["state"]
    assert progress["consumed"] == 10 and len(progress["shards"]) == 1
    first_shard = (cfg.raw_dir / "shard_00000.jsonl.gz").stat().st_mtime_ns
    monkeypatch.setattr(sources, "iter_local", real)
    with caplog.at_level("INFO"):
        m = download(cfg, show_progress=False)
    assert "resuming download after 10 source items" in caplog.text
    assert (cfg.raw_dir / "shard_00000.jsonl.gz").stat().st_mtime_ns == first_shard
    assert m["documents"] == 30 and [d["id"] for d in iter_jsonl_documents(cfg.raw_dir)] == [f"g{i}" for i in range(30)]


def test_hf_source_streams_with_caps(tmp_path, monkeypatch):
    import datasets

    rows = [{"text": f"hub document {i}", "id": f"h{i}", "score": 1.5} for i in range(50)]
    calls = {}

    class FakeStream(list):
        def skip(self, n):
            return FakeStream(self[n:])

    def fake_load_dataset(name, subset, split, streaming):
        calls.update(name=name, subset=subset, split=split, streaming=streaming)
        return FakeStream(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = DataConfig.model_validate(
        {
            "output_dir": str(tmp_path),
            "source": {
                "kind": "hf",
                "dataset": "org/corpus",
                "subset": "sample",
                "id_column": "id",
                "max_documents": 12,
            },
        }
    )
    m = download(cfg, show_progress=False)
    assert calls == {"name": "org/corpus", "subset": "sample", "split": "train", "streaming": True}
    docs = list(iter_jsonl_documents(cfg.raw_dir))
    assert m["documents"] == 12 and docs[0]["id"] == "h0" and docs[0]["metadata"]["score"] == 1.5


def test_stdlib_source_is_offline_and_holds_out_modules(tmp_path):
    cfg = DataConfig.model_validate(
        {
            "output_dir": str(tmp_path),
            "source": {"kind": "stdlib", "max_documents": 400, "held_out_modules": ["csv", "abc"]},
        }
    )
    m = download(cfg, show_progress=False)
    assert m["documents"] == 400
    docs = list(iter_jsonl_documents(cfg.raw_dir))
    val = {d["metadata"]["path"] for d in docs if d["metadata"].get("split") == "val"}
    assert val == {"csv.py", "abc.py"}
    assert any(d["metadata"]["path"].endswith(".py") and "def " in d["text"] for d in docs)


def test_stdlib_domain_modules_are_marked_for_the_domain_splits(tmp_path):
    cfg = DataConfig.model_validate(
        {
            "output_dir": str(tmp_path),
            "source": {"kind": "stdlib", "max_documents": 400, "held_out_modules": ["csv"], "domain_modules": ["abc"]},
        }
    )
    download(cfg, show_progress=False)
    docs = list(iter_jsonl_documents(cfg.raw_dir))
    by_split = {d["metadata"]["path"]: d["metadata"].get("split") for d in docs}
    assert by_split["abc.py"] == "domain" and by_split["csv.py"] == "val"
    assert sum(s == "domain" for s in by_split.values()) == 1
    with pytest.raises(ValueError, match="both held out"):
        DataConfig.model_validate({"source": {"held_out_modules": ["csv"], "domain_modules": ["csv"]}})
    with pytest.raises(ValueError, match="only applies to kind=stdlib"):
        DataConfig.model_validate({"source": {"kind": "local", "paths": ["x"], "domain_modules": ["email"]}})


def test_giant_inputs_are_rejected_by_size_before_being_read_whole(tmp_path, monkeypatch):
    """A text file over max_document_bytes is never read; a JSONL line past its cap is skipped in pieces."""
    from pathlib import Path

    from llm_pipeline.data import sources

    big_txt = tmp_path / "big.txt"
    big_txt.write_text("t" * 5000)
    f = tmp_path / "d.jsonl"
    lines = [{"id": "a", "text": "fine document"}, {"id": "huge", "text": "h" * 200_000}, {"id": "b", "text": "ok"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in lines))
    read = []
    real_read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda p: read.append(p.name) or real_read_bytes(p))
    cfg = _cfg(tmp_path, [f, big_txt], max_document_bytes=1000)
    assert sources.json_line_limit(1000) < 200_000  # the huge line is past the cap
    m = download(cfg, show_progress=False)
    assert m["documents"] == 2 and m["rejected"] == {"too_large": 2}
    assert "big.txt" not in read
    rej = {(r["file"], r["line"]): r["detail"] for r in _rejects(cfg)}
    assert "line of 200" in rej[(str(f), 2)] and "5000 bytes > max_document_bytes=1000" in rej[(str(big_txt), None)]


def test_line_reader_bounds_memory_and_keeps_line_numbers(tmp_path):
    from llm_pipeline.data.sources import _iter_jsonl

    f = tmp_path / "x.jsonl.gz"
    with gzip.open(f, "wt") as fh:
        fh.write('{"k": 1}\n' + '{"k": "' + "z" * 3_000_000 + '"}\n' + '{"k": 3}\n' + '{"k": "' + "y" * 100)
    items = list(_iter_jsonl(f, max_line_bytes=1000))
    assert [(i.where.rsplit(":", 1)[1], i.reject, i.record) for i in items] == [
        ("1", None, {"k": 1}),
        ("2", "too_large", None),
        ("3", None, {"k": 3}),
        ("4", "malformed_json", None),  # a short last line without a newline is still parsed
    ]
    assert "3000010 bytes" in items[1].detail
