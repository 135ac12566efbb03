"""Checkpoint management: cleanup never removes promoted, final or in-use checkpoints; archive -> restore is
byte-identical; a corrupted, truncated, altered or path-traversing archive is refused and writes nothing."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from llm_pipeline.checkpoint.archive import ArchiveError, create_archive, restore_archive, sidecar, verify_archive
from llm_pipeline.checkpoint.manager import cleanup, disk_usage, folder_size, scan
from llm_pipeline.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _tree(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below ``folder``: its bytes and permission bits."""
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mode & 0o777)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _steps(stage_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in stage_dir.glob("checkpoint-*"))


def _flip(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _shard(ckpt: Path) -> Path:
    return next(ckpt.glob("__0_*.distcp"))


@pytest.fixture
def held_lock(run_dir: Path):
    """Another live process holding checkpoints/sft, as a running stage does."""
    code = (
        "import sys, time; from llm_pipeline.checkpoint.lock import FolderLock; "
        "FolderLock(sys.argv[1], purpose='sft stage').acquire(); print('held', flush=True); time.sleep(120)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir / "checkpoints" / "sft")], stdout=subprocess.PIPE,
                            env=env, text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


# --------------------------------------------------------------------------------------------
# list / verify / disk usage
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_list_shows_stage_step_size_validity_promotion_and_use(run_dir: Path, held_lock) -> None:
    ck = run_dir / "checkpoints"
    by_path = {e.path: e for e in scan(ck)}
    ckpt8, final, sft3 = ck / "pretrain" / "checkpoint-8", ck / "pretrain_final", ck / "sft" / "checkpoint-3"
    assert [(e.stage, e.step) for e in by_path.values() if e.kind == "checkpoint"] == [
        ("pretrain", 2), ("pretrain", 4), ("pretrain", 6), ("pretrain", 8), ("sft", 3), ("sft", 6)
    ]  # fmt: skip
    assert by_path[ckpt8].final and by_path[ckpt8].status == "committed"  # training ended at max_steps 8
    assert not by_path[ck / "pretrain" / "checkpoint-6"].final
    assert by_path[final].kind == "export" and by_path[final].promoted == "promoted/pretrain.json"
    assert by_path[sft3].promoted == "promoted/sft.json"  # a relative model_dir, read against the run folder
    assert by_path[sft3].in_use is not None and by_path[sft3].in_use.pid == held_lock.pid
    assert by_path[ckpt8].in_use is None
    assert by_path[ckpt8].size == folder_size(ckpt8) > 100_000


def test_verify_finds_a_flipped_byte_and_the_cli_exits_1_naming_it(run_dir: Path, capsys) -> None:
    ck = run_dir / "checkpoints"
    assert main(["ckpt", "verify", "--root", str(ck)]) == 0
    assert "6/6 checkpoints verified" in capsys.readouterr().out
    shard = _shard(ck / "pretrain" / "checkpoint-4")
    _flip(shard)
    fast = {e.step: e.status for e in scan(ck, stage="pretrain")}
    assert fast[4] == "committed"  # the quick check cannot see a bit flip: --verify can
    assert main(["ckpt", "verify", "--root", str(ck)]) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED {ck / 'pretrain' / 'checkpoint-4'}: {shard.name}: sha256" in out
    assert main(["ckpt", "list", "--root", str(ck), "--verify", "--json"]) == 1
    entries = json.loads(capsys.readouterr().out)
    listed = {Path(e["path"]).name: e["status"] for e in entries if e["stage"] == "pretrain"}
    assert listed["checkpoint-4"] == "DAMAGED" and listed["checkpoint-6"] == "verified"


def test_disk_usage_adds_up(run_dir: Path) -> None:
    ck = run_dir / "checkpoints"
    du = disk_usage(ck)
    pre = du["stages"]["pretrain"]
    assert pre["checkpoints"] == sum(folder_size(p) for p in (ck / "pretrain").glob("checkpoint-*"))
    assert pre["exports"] == folder_size(ck / "pretrain_final")
    assert du["total"] == folder_size(ck) == sum(s["total"] for s in du["stages"].values()) + du["unaccounted"]
    assert du["free"] > 0


# --------------------------------------------------------------------------------------------
# cleanup
# --------------------------------------------------------------------------------------------


def test_cleanup_keeps_promoted_and_final_checkpoints_and_deletes_like_pruning(run_dir: Path, capsys) -> None:
    ck = run_dir / "checkpoints"
    (run_dir / "promoted" / "pretrain.json").write_text(
        json.dumps({"stage": "pretrain", "model_dir": str(ck / "pretrain" / "checkpoint-4")})
    )
    (ck / "pretrain" / ".tmp-checkpoint-10").mkdir()  # an interrupted save: cleared as a run's start clears it
    before = _tree(ck / "pretrain_final")
    assert main(["ckpt", "cleanup", "pretrain", "0", "--root", str(ck), "--dry-run"]) == 0
    assert "would delete 2 checkpoint(s)" in capsys.readouterr().out and _steps(ck / "pretrain") == [2, 4, 6, 8]
    assert main(["ckpt", "cleanup", "pretrain", "0", "--root", str(ck)]) == 0
    out = capsys.readouterr().out
    assert _steps(ck / "pretrain") == [4, 8]  # 4: promoted, 8: final; 2 and 6 went
    assert "protected" in out and "promoted (promoted/pretrain.json)" in out and "final (training ended here)" in out
    assert _tree(ck / "pretrain_final") == before  # exports are never cleanup's business
    assert not any(p.name.startswith(".") and p.is_dir() for p in (ck / "pretrain").iterdir())
    assert not (ck / "pretrain" / ".llm_pipeline.lock").exists()  # its lock was given back


@pytest.mark.slow
def test_cleanup_of_a_stage_in_use_is_refused_and_deletes_nothing(run_dir: Path, held_lock, capsys) -> None:
    ck = run_dir / "checkpoints"
    assert main(["ckpt", "cleanup", "sft", "1", "--root", str(ck)]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and f"in use by pid {held_lock.pid}" in err
    assert _steps(ck / "sft") == [3, 6]
    with pytest.raises(RuntimeError, match="in use"):
        cleanup(ck, "sft", 0, dry_run=True)


def test_damaged_checkpoints_are_not_counted_as_kept_nor_deleted(run_dir: Path) -> None:
    ck = run_dir / "checkpoints"
    _flip(_shard(ck / "pretrain" / "checkpoint-8"))  # the newest (and final) one is damaged
    plan = cleanup(ck, "pretrain", 1, progress=False)
    assert [e.step for e in plan.keep] == [6]  # one *valid* checkpoint stays
    assert [e.step for e, _ in plan.left_alone] == [8] and "damaged" in plan.left_alone[0][1]
    assert _steps(ck / "pretrain") == [6, 8]  # 2 and 4 deleted; the damaged one is the user's to judge


# --------------------------------------------------------------------------------------------
# archive and restore
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["pretrain/checkpoint-6", "pretrain_final"])
def test_archive_then_restore_is_byte_identical(run_dir: Path, which: str, capsys) -> None:
    src = run_dir / "checkpoints" / which
    expected = _tree(src)
    assert main(["ckpt", "archive", str(src)]) == 0
    label = "pretrain-checkpoint-6" if "/" in which else which
    tarball = run_dir / "archives" / f"{label}.tar.gz"
    assert tarball.is_file() and sidecar(tarball).is_file()
    lines = sidecar(tarball).read_text().splitlines()
    assert lines[0] == f"{hashlib.sha256(tarball.read_bytes()).hexdigest()}  {tarball.name}"  # sha256sum -c format
    assert len(lines) == 1 + 1 + len(expected)  # the tarball, ARCHIVE.json, every file
    assert main(["ckpt", "archive", str(src)]) == 1  # never overwritten without --overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(["ckpt", "archive", str(src), "--overwrite"]) == 0
    with pytest.raises(FileExistsError):
        restore_archive(tarball, root=run_dir / "checkpoints", progress=False)  # its origin still exists
    out = restore_archive(tarball, run_dir / "restored" / src.name, progress=False)
    assert _tree(out) == expected
    if "/" in which:  # back where it came from once the original is gone; training would resume from it
        import shutil

        shutil.rmtree(src)
        assert restore_archive(tarball, root=run_dir / "checkpoints", progress=False) == src
        assert _tree(src) == expected and [e.status for e in scan(src.parent.parent, stage="pretrain") if e.path == src]


def test_archive_refuses_damage_uncommitted_and_stage_folders(run_dir: Path) -> None:
    ck = run_dir / "checkpoints"
    _flip(_shard(ck / "pretrain" / "checkpoint-2"))
    with pytest.raises(RuntimeError, match="damaged after it was written"):
        create_archive(ck / "pretrain" / "checkpoint-2", progress=False)
    (ck / "pretrain" / "checkpoint-9").mkdir()
    with pytest.raises(ValueError, match="not committed"):
        create_archive(ck / "pretrain" / "checkpoint-9", progress=False)
    with pytest.raises(ValueError, match="archive one of its checkpoints"):
        create_archive(ck / "pretrain", progress=False)
    assert not list((run_dir / "archives").glob("*")) if (run_dir / "archives").exists() else True


@pytest.fixture
def archived(run_dir: Path) -> tuple[Path, Path]:
    tarball, _ = create_archive(run_dir / "checkpoints" / "pretrain" / "checkpoint-6", progress=False)
    return run_dir, tarball


def _refused(tarball: Path, run_dir: Path, match: str) -> None:
    dest = run_dir / "restored"
    with pytest.raises(ArchiveError, match=match):
        restore_archive(tarball, dest, progress=False)
    assert not dest.exists() and not list(run_dir.glob(".restored*")), "a refused archive wrote something"


def test_flipped_byte_is_refused_with_and_without_the_checksum_file(archived) -> None:
    run_dir, tarball = archived
    _flip(tarball)
    _refused(tarball, run_dir, "differs from .*sha256|corrupted")
    sidecar(tarball).unlink()  # without the outside hash, gzip's CRC and the member hashes still catch it
    _refused(tarball, run_dir, "corrupted|differs from the manifest")


@pytest.mark.parametrize("keep", [0.5, -8])
def test_truncated_archive_is_refused(archived, keep: float) -> None:
    run_dir, tarball = archived
    data = tarball.read_bytes()
    tarball.write_bytes(data[: int(len(data) * keep)] if keep > 0 else data[:keep])  # half; or the gzip trailer
    sidecar(tarball).unlink()
    _refused(tarball, run_dir, "corrupted or truncated")


def _rewrite(tarball: Path, change: dict[str, bytes], *, fix_manifest: bool) -> None:
    """Rebuild the tarball with some members' contents replaced (and their manifest lines, if asked)."""
    with tarfile.open(tarball) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]  # type: ignore[union-attr]
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as gz, tarfile.open(fileobj=gz, mode="w|") as tar:
        for m, data in members:
            if m.name in change:
                data = change[m.name]
            if m.name == "MANIFEST.sha256" and fix_manifest:
                lines = dict(line.split("  ", 1)[::-1] for line in data.decode().splitlines())  # type: ignore[union-attr]
                lines.update({n: hashlib.sha256(d).hexdigest() for n, d in change.items()})
                data = "".join(f"{h}  {n}\n" for n, h in sorted(lines.items())).encode()
            if data is not None:
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data) if data is not None else None)
    tarball.write_bytes(buf.getvalue())


def test_altered_member_is_refused(archived) -> None:
    run_dir, tarball = archived
    side = sidecar(tarball).read_text().splitlines()
    _rewrite(tarball, {"checkpoint-6/trainer_state.pt": b"not the trainer state"}, fix_manifest=False)
    # even with the outside hash updated to the altered tarball, the member's own hash gives it away
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    sidecar(tarball).write_text("\n".join([f"{digest}  {tarball.name}", *side[1:]]) + "\n")
    _refused(tarball, run_dir, "trainer_state.pt: sha256 .* differs from the manifest")


def test_altered_member_with_a_consistent_inner_manifest_is_caught_by_the_outside_one(archived) -> None:
    run_dir, tarball = archived
    _rewrite(tarball, {"checkpoint-6/trainer_state.pt": b"forged"}, fix_manifest=True)
    _refused(tarball, run_dir, "tarball changed after it was written")
    sidecar(tarball).unlink()  # no outside record: the inner manifest alone cannot prove anything more
    assert verify_archive(tarball, progress=False).beside_checked is False


def _evil_archive(path: Path, name: str, *, kind: bytes = tarfile.REGTYPE, link: str = "") -> Path:
    info = json.dumps({"format": 1, "kind": "export", "stage": "x", "folder": "x_final"}).encode()
    payload = b"owned"
    sums = {"ARCHIVE.json": hashlib.sha256(info).hexdigest(), name: hashlib.sha256(payload).hexdigest()}
    manifest = "".join(f"{h}  {n}\n" for n, h in sorted(sums.items())).encode()
    with gzip.open(path, "wb") as gz, tarfile.open(fileobj=gz, mode="w|") as tar:
        for n, data in (("ARCHIVE.json", info), (name, payload), ("MANIFEST.sha256", manifest)):
            ti = tarfile.TarInfo(n)
            ti.size = len(data)
            if n == name and kind != tarfile.REGTYPE:
                ti.type, ti.linkname, ti.size = kind, link, 0
            tar.addfile(ti, io.BytesIO(data) if ti.size else None)
    return path


@pytest.mark.parametrize(
    "name,kind,match",
    [
        ("x_final/../../evil", tarfile.REGTYPE, "unsafe member path"),
        ("/tmp/evil", tarfile.REGTYPE, "unsafe member path"),
        ("other/evil", tarfile.REGTYPE, "outside the archived folder"),
        ("x_final/link", tarfile.SYMTYPE, "link or special file"),
        ("x_final/hard", tarfile.LNKTYPE, "link or special file"),
    ],
)
def test_path_traversal_and_links_are_refused(tmp_path: Path, name: str, kind: bytes, match: str) -> None:
    tarball = _evil_archive(tmp_path / "evil.tar.gz", name, kind=kind, link="../../etc/passwd")
    dest = tmp_path / "deep" / "restored"
    with pytest.raises(ArchiveError, match=match):
        restore_archive(tarball, dest, progress=False)
    assert not dest.exists() and not (tmp_path / "evil").exists() and not Path("/tmp/evil").exists()


@pytest.mark.slow
def test_checkpoint_manager_script_runs_the_spec_verbs(run_dir: Path) -> None:
    env = {**os.environ, "CKPT_ROOT": str(run_dir / "checkpoints"), "PYTHON": sys.executable}
    script = ROOT / "scripts" / "checkpoint_manager.sh"

    def sh(*args: str) -> str:
        done = subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    listed = sh("list")  # CKPT_ROOT picks the run's folder
    assert "checkpoint-8" in listed and "promoted, final" in listed
    assert "deleted 3 checkpoint(s)" in sh("cleanup", "pretrain", "1")
    assert _steps(run_dir / "checkpoints" / "pretrain") == [8]


def test_disk_usage_command_prints_stages_total_and_free(run_dir: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("CKPT_ROOT", str(run_dir / "checkpoints"))
    assert main(["ckpt", "disk-usage"]) == 0
    out = capsys.readouterr().out
    assert "pretrain" in out and "sft" in out and "total" in out and "free on this disk" in out


def test_parallel_gzip_writes_one_standard_gzip_member() -> None:
    from llm_pipeline.checkpoint.archive import _ParallelGzip

    rng = random.Random(0)
    data = bytes(rng.getrandbits(8) for _ in range(1 << 16)) * 70 + b"tail" * 1000  # > 4 MiB: several blocks
    buf = io.BytesIO()
    with _ParallelGzip(buf, level=1, workers=2) as gz:
        for i in range(0, len(data), 100_003):  # writes that straddle block boundaries
            gz.write(data[i : i + 100_003])
    assert gzip.decompress(buf.getvalue()) == data  # any gunzip reads it: CRC and length check out


# --------------------------------------------------------------------------------------------
# exports are verified like checkpoints (issue 18, item 7)
# --------------------------------------------------------------------------------------------


def test_a_flipped_byte_in_an_export_fails_verify_list_and_archive(run_dir: Path, capsys) -> None:
    from llm_pipeline.checkpoint.checksums import ChecksumMismatch
    from llm_pipeline.checkpoint.hf import load_pretrained

    ck = run_dir / "checkpoints"
    export = ck / "pretrain_final"
    assert main(["ckpt", "verify", str(export)]) == 0
    assert "0/0 checkpoints verified, 1/1 exports verified" in capsys.readouterr().out
    _flip(export / "model.safetensors")
    for argv in (["ckpt", "verify", str(export)], ["ckpt", "verify", "--root", str(ck)]):
        assert main(argv) == 1
        out = capsys.readouterr().out
        assert f"DAMAGED {export}: model.safetensors: sha256" in out and "0/1 exports verified" in out
    assert main(["ckpt", "list", "--root", str(ck), "--verify", "--json"]) == 1
    listed = {Path(e["path"]).name: e for e in json.loads(capsys.readouterr().out)}
    assert listed["pretrain_final"]["status"] == "DAMAGED" and listed["checkpoint-6"]["status"] == "verified"
    assert "model.safetensors: sha256" in listed["pretrain_final"]["problems"][0]
    with pytest.raises(ChecksumMismatch, match=r"model\.safetensors: differs from the export's checksums\.sha256"):
        create_archive(export, progress=False)
    assert not (run_dir / "archives").exists() or not list((run_dir / "archives").iterdir())
    with pytest.raises(ChecksumMismatch, match=r"pretrain_final: damaged since it was exported \(model.safetensors"):
        load_pretrained(export)  # training from it or evaluating it stops here


def test_an_export_missing_a_listed_file_or_its_manifest_is_damaged(run_dir: Path) -> None:
    export = run_dir / "checkpoints" / "pretrain_final"
    (export / "generation_config.json").unlink()
    assert scan(export.parent, stage="pretrain")[-1].problems == ["generation_config.json: missing"]  # no hashing
    (export / "checksums.sha256").unlink()
    [entry] = [e for e in scan(export.parent) if e.path == export]
    assert entry.status == "DAMAGED" and "checksums.sha256: missing" in entry.problems[0]
    with pytest.raises(RuntimeError, match=r"checksums\.sha256: missing"):
        create_archive(export, progress=False)


def test_an_export_written_before_checksums_is_listed_as_unverified_not_damaged(run_dir: Path, capsys) -> None:
    export = run_dir / "checkpoints" / "pretrain_final"
    meta = json.loads((export / "llm_pipeline.json").read_text())
    meta["files"].remove("checksums.sha256")
    (export / "llm_pipeline.json").write_text(json.dumps(meta))
    (export / "checksums.sha256").unlink()
    assert main(["ckpt", "verify", str(export)]) == 0
    out = capsys.readouterr().out
    assert f"unverified {export}: no checksums.sha256" in out and "0/0 exports verified" in out
    assert [e.status for e in scan(export.parent) if e.path == export] == ["no checksums"]


# --------------------------------------------------------------------------------------------
# restore, cleanup and list for a newcomer; disk faults name the folder (issue 18, item 10)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["pretrain/checkpoint-6", "pretrain_final"])
def test_restore_puts_an_archive_back_where_it_came_from(run_dir: Path, which: str, tmp_path: Path,
                                                         monkeypatch, capsys) -> None:  # fmt: skip
    import shutil

    src = run_dir / "checkpoints" / which
    expected = _tree(src)
    monkeypatch.chdir(run_dir)
    tarball, info = create_archive(Path("checkpoints") / which, progress=False)  # relative, as users type it
    assert info["source"] == str(src)
    shutil.rmtree(src)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # restore from another folder: not under ./checkpoints
    assert main(["ckpt", "restore", str(run_dir / tarball)]) == 0
    assert f"-> {src} " in capsys.readouterr().out and _tree(src) == expected
    assert list(elsewhere.iterdir()) == []


def test_restore_does_not_trust_an_implausible_recorded_origin(run_dir: Path) -> None:
    from llm_pipeline.checkpoint.archive import recorded_origin

    info = {"kind": "checkpoint", "stage": "pretrain", "folder": "checkpoint-6"}
    good = run_dir / "checkpoints" / "pretrain" / "checkpoint-6"
    assert recorded_origin({**info, "source": str(good)}) == good
    for bad in (str(run_dir / ".ssh" / "pretrain" / "checkpoint-6"), str(run_dir / "x" / "checkpoint-6"),
                str(run_dir / "nowhere" / "pretrain" / "checkpoint-6"), "/etc/checkpoint-7", 7):  # fmt: skip
        assert recorded_origin({**info, "source": bad}) is None


def test_restore_checks_free_space_first_and_leaves_no_folder_behind(run_dir: Path, tmp_path: Path,
                                                                     monkeypatch, capsys) -> None:  # fmt: skip
    import errno
    import shutil

    tarball, _ = create_archive(run_dir / "checkpoints" / "pretrain" / "checkpoint-6", progress=False)
    new_root = tmp_path / "new_run" / "checkpoints"
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 4096))  # type: ignore[attr-defined]
    assert main(["ckpt", "restore", str(tarball), "--root", str(new_root)]) == 1
    err = capsys.readouterr().err
    assert "not enough free space in" in err and str(new_root / "pretrain") in err and "--to" in err
    assert not (tmp_path / "new_run").exists()  # checked before anything was created
    monkeypatch.setattr(shutil, "disk_usage", real_usage)
    real_fsync = os.fsync

    def fill_up(fd: int) -> None:
        if os.fstat(fd).st_size > 10_000:  # the disk fills while the weights are unpacked
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fill_up)
    assert main(["ckpt", "restore", str(tarball), "--root", str(new_root)]) == 1
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and f"restoring into {new_root / 'pretrain'}" in line[0] and "no space left" in line[0]
    assert not (tmp_path / "new_run").exists()  # no empty stage (or run) folder left behind


def test_archive_to_a_full_disk_names_the_folder_and_leaves_nothing(run_dir: Path, monkeypatch, capsys) -> None:
    import errno

    out_dir = run_dir / "archives"
    real_fsync = os.fsync

    def full(fd: int) -> None:
        if os.fstat(fd).st_size > 10_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    assert main(["ckpt", "archive", str(run_dir / "checkpoints" / "pretrain_final")]) == 1
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and f"into {out_dir}" in line[0] and "no space left" in line[0]
    assert list(out_dir.iterdir()) == []  # no partial tarball or checksum file


def test_list_and_friends_on_a_fresh_clone_show_nothing_and_succeed(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CKPT_ROOT", raising=False)
    assert main(["ckpt", "list"]) == 0
    captured = capsys.readouterr()
    assert "no checkpoints yet" in captured.out and "no ./checkpoints and no run under runs/" in captured.err
    assert main(["ckpt", "list", "--json"]) == 0 and json.loads(capsys.readouterr().out) == []
    assert main(["ckpt", "verify"]) == 0 and main(["ckpt", "disk-usage"]) == 0
    assert main(["ckpt", "cleanup", "pretrain", "1"]) == 1  # nothing of that stage: an error naming it
    assert "no checkpoints of stage 'pretrain'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cleanup_finds_the_run_itself_as_list_does(run_dir: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(run_dir.parent.parent)  # the project folder: runs/x, no ./checkpoints
    monkeypatch.delenv("CKPT_ROOT", raising=False)
    assert main(["ckpt", "cleanup", "pretrain", "1"]) == 0
    captured = capsys.readouterr()
    assert "using runs/x/checkpoints (the newest run" in captured.err and "deleted 3 checkpoint(s)" in captured.out
    assert _steps(run_dir / "checkpoints" / "pretrain") == [8]


def test_cleanup_leaves_a_symlinked_checkpoint_and_its_target_and_no_pruned_link(run_dir: Path, tmp_path: Path) -> None:
    import shutil

    from llm_pipeline.checkpoint.dcp import clean_leftovers, discard_checkpoint

    stage = run_dir / "checkpoints" / "pretrain"
    moved = tmp_path / "bigdisk" / "checkpoint-2"
    moved.parent.mkdir()
    shutil.move(stage / "checkpoint-2", moved)
    (stage / "checkpoint-2").symlink_to(moved, target_is_directory=True)
    before = _tree(moved)
    plan = cleanup(stage.parent, "pretrain", 0, progress=False)
    assert [e.step for e in plan.delete] == [6, 4]  # 8 is final
    [(left, why)] = plan.left_alone
    assert left.step == 2 and f"a symbolic link to {moved}" in why
    assert (stage / "checkpoint-2").is_symlink() and _tree(moved) == before
    assert not [p for p in stage.iterdir() if p.name.startswith(".pruned-")]
    with pytest.raises(OSError, match=f"{stage / 'checkpoint-2'} is a symbolic link to {moved}"):
        discard_checkpoint(stage / "checkpoint-2")
    assert (stage / "checkpoint-2").is_symlink()
    (stage / ".pruned-checkpoint-2").symlink_to(moved)  # what the old code left behind
    clean_leftovers(stage)
    assert not (stage / ".pruned-checkpoint-2").is_symlink() and _tree(moved) == before


@pytest.mark.slow
def test_checkpoint_manager_script_lists_nothing_on_a_fresh_clone(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CKPT_ROOT"} | {"PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "checkpoint_manager.sh"), "list"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "no checkpoints yet" in done.stdout
