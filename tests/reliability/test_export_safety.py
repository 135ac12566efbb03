"""``export``/``init``/``import`` never delete what they did not write: a run's checkpoints, a user's
folder and its other files survive every invocation; only a previous export is replaced."""

from __future__ import annotations

import json
import os
import stat

import pytest

from llm_pipeline.checkpoint.hf import METADATA_FILE, clean_export_leftovers, load_pretrained
from llm_pipeline.cli import main

from .conftest import MAX_STEPS, Reference, copy_run


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def model_dir(tmp_path):
    assert main(["init", "--preset", "debug", "-o", str(tmp_path / "model"), "--seed", "1"]) == 0
    return tmp_path / "model"


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.slow
def test_export_of_a_run_onto_itself_is_refused(tmp_path, reference: Reference, capsys):
    run = copy_run(reference.run, tmp_path)
    before = _snapshot(run.out)
    for target in (run.out, run.out / f"checkpoint-{MAX_STEPS}"):
        for extra in ([], ["--overwrite"]):
            assert main(["export", str(run.out), str(target), *extra]) == 1
            assert "training checkpoints" in _one_error_line(capsys)
    assert main(["export", str(run.out / f"checkpoint-{MAX_STEPS}"), str(run.out)]) == 1
    assert "training checkpoints" in _one_error_line(capsys)
    assert _snapshot(run.out) == before


def test_a_users_folder_is_refused_and_overwrite_keeps_its_other_files(tmp_path, model_dir, capsys):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("my notes")
    (target / "config.json").write_text("{}")
    assert main(["export", str(model_dir), str(target)]) == 1
    assert "--overwrite" in _one_error_line(capsys)
    assert _snapshot(target) == {"notes.txt": b"my notes", "config.json": b"{}"}
    assert main(["export", str(model_dir), str(target), "--overwrite"]) == 0
    assert (target / "notes.txt").read_text() == "my notes"  # never the user's other files
    load_pretrained(target)  # config.json and the weights are the export's


def test_other_weights_are_never_mixed_with_ours(tmp_path, model_dir, capsys):
    target = tmp_path / "downloaded"
    target.mkdir()
    (target / "model-00001-of-00002.safetensors").write_bytes(b"theirs")
    assert main(["export", str(model_dir), str(target), "--overwrite"]) == 1
    assert "other model weights" in _one_error_line(capsys)
    assert _snapshot(target) == {"model-00001-of-00002.safetensors": b"theirs"}


def test_previous_export_is_replaced_with_its_stale_files_but_not_the_users(tmp_path, model_dir):
    out = tmp_path / "release"
    assert main(["export", str(model_dir), str(out), "--max-shard-gb", "0.0001"]) == 0  # sharded
    assert (out / "model.safetensors.index.json").is_file()
    (out / "README.md").write_text("model card")
    assert main(["export", str(model_dir), str(out)]) == 0  # one file now; no --overwrite needed
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names and "README.md" in names
    assert not [n for n in names if n.startswith("model-") or n.endswith(".index.json")]
    assert json.loads((out / METADATA_FILE).read_text())["files"] == sorted(names - {"README.md"})
    load_pretrained(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".release.")]


def test_init_and_import_follow_the_same_rules(tmp_path, model_dir, capsys):
    user = tmp_path / "user"
    user.mkdir()
    (user / "data.csv").write_text("a,b\n")
    assert main(["init", "--preset", "debug", "-o", str(user)]) == 1
    assert "--overwrite" in _one_error_line(capsys)
    assert main(["import", str(model_dir), str(user)]) == 1
    assert "--overwrite" in _one_error_line(capsys)
    assert main(["import", str(model_dir), str(model_dir)]) == 1
    assert "outside the source" in _one_error_line(capsys)
    assert main(["init", "--preset", "debug", "-o", str(model_dir), "--seed", "2"]) == 0  # its own export
    assert _snapshot(user) == {"data.csv": b"a,b\n"}


def test_exported_weights_are_as_readable_as_their_siblings(tmp_path, model_dir):
    old = os.umask(0o022)
    try:
        assert main(["export", str(model_dir), str(tmp_path / "out")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}


def test_leftovers_of_an_interrupted_export_are_cleared_and_a_moved_aside_export_restored(tmp_path, model_dir):
    dead = 2**22 + 12345  # no such pid
    out = tmp_path / "model"
    (tmp_path / f".model.tmp-{dead}-abc").mkdir()
    os.rename(out, tmp_path / f".model.old-{dead}")  # killed between moving the old export aside and the swap
    clean_export_leftovers(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    load_pretrained(out)


def test_export_to_a_full_disk_is_one_clear_error_and_leaves_nothing(tmp_path, model_dir, monkeypatch, capsys):
    import shutil

    from safetensors import SafetensorError

    import llm_pipeline.checkpoint.hf as hf

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(hf, "save_file", full)
    assert main(["export", str(model_dir), str(tmp_path / "out")]) == 1
    line = _one_error_line(capsys)
    assert "no space left" in line and str(tmp_path / "out") in line
    monkeypatch.undo()
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 4096))  # type: ignore[attr-defined]
    assert main(["export", str(model_dir), str(tmp_path / "out")]) == 1
    assert "not enough free space" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no partial export, no temp folder


def test_a_model_folder_is_refused_as_a_training_output_dir(tmp_path, model_dir):
    from llm_pipeline.checkpoint.dcp import CheckpointManager, check_training_output_dir

    before = _snapshot(model_dir)
    for attempt in (check_training_output_dir, CheckpointManager):
        with pytest.raises(OSError, match=r"model folder .*config\.json.*model\.safetensors.*training\.output_dir"):
            attempt(model_dir)
    assert _snapshot(model_dir) == before  # no lock file, no config.yaml, nothing
    for fine in (tmp_path / "new", tmp_path):  # a new folder; a folder of other things
        check_training_output_dir(fine)


@pytest.mark.slow
def test_training_into_a_model_folder_is_one_error_and_touches_nothing(tmp_path, packed, model_dir):
    from .conftest import assert_one_line_error, make_run

    before = _snapshot(model_dir)
    run = make_run(tmp_path / "run", packed, output_dir=str(model_dir))
    line = assert_one_line_error(run.cli())
    assert f"{model_dir} is a model folder" in line and "--output_dir" in line
    assert _snapshot(model_dir) == before


def test_init_export_and_import_write_checksums_that_loading_checks(tmp_path, model_dir, capsys):
    from llm_pipeline.checkpoint.checksums import MANIFEST, parse_manifest

    sums = parse_manifest((model_dir / MANIFEST).read_text(), model_dir / MANIFEST)
    assert set(sums) == {p.name for p in model_dir.iterdir()} - {MANIFEST}
    assert MANIFEST in json.loads((model_dir / METADATA_FILE).read_text())["files"]
    data = bytearray((model_dir / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01
    (model_dir / "model.safetensors").write_bytes(bytes(data))
    for argv in (["export", str(model_dir), str(tmp_path / "out")], ["generate", str(model_dir), "--ids", "1 2"]):
        assert main(argv) == 1
        line = _one_error_line(capsys)
        assert f"{model_dir}: damaged since it was exported (model.safetensors: sha256" in line
    assert not (tmp_path / "out").exists()
