"""``llm-pipeline ckpt list|archive|restore|cleanup|disk-usage|verify`` (``scripts/checkpoint_manager.sh``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from llm_pipeline.checkpoint.fsio import human_bytes

EPILOG = """examples:
  llm-pipeline ckpt list --root runs/demo/checkpoints
  llm-pipeline ckpt cleanup pretrain 3 --dry-run
  llm-pipeline ckpt archive checkpoints/pretrain_final            -> archives/pretrain_final.tar.gz (+ .sha256)
  llm-pipeline ckpt restore archives/pretrain-checkpoint-5000.tar.gz -> where it was archived from
  llm-pipeline ckpt verify                                         every checkpoint and export; exit 1 on damage

The checkpoints root is --root, else $CKPT_ROOT, else ./checkpoints, else the newest run under runs/ with
checkpoints (for cleanup: with checkpoints of that stage), said on stderr; with none at all, list shows an
empty list. Exports (<stage>_final...) carry checksums.sha256 like checkpoints: verify, list --verify and
archive check them. restore puts an archive back where it came from (ARCHIVE.json), unless --to/--root.
"""


def _given_root(args: argparse.Namespace) -> str | None:
    return args.root or os.environ.get("CKPT_ROOT")


def _root(args: argparse.Namespace, stage: str | None = None) -> Path | None:
    """The root to work on (see ``checkpoint.manager.find_root``), said on stderr when it was not given;
    None on a fresh clone, where only ``cleanup`` (with ``stage``) is an error."""
    from llm_pipeline.checkpoint.manager import find_root

    root, note = find_root(_given_root(args), stage=stage)
    if root is None and stage is not None:
        raise FileNotFoundError(f"no checkpoints of stage {stage!r} to clean up: {note}")
    if note:
        print(note, file=sys.stderr)
    return root


def _console():
    """Rich output; wide enough in logs and pipes that paths are not cut to fit 80 columns."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)


def _table(title: str, columns: list[str]):
    from rich.table import Table

    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="left" if c in ("stage", "folder", "valid", "role", "in use") else "right")
    return t


_STYLE = {"DAMAGED": "[red]DAMAGED[/]", "uncommitted": "[yellow]uncommitted[/]", "leftover": "[dim]leftover[/]"}


def cmd_list(args: argparse.Namespace) -> int:
    from llm_pipeline.checkpoint.manager import inventory

    root = _root(args)
    entries = [] if root is None else inventory(root, stage=args.stage, hashed=args.verify, progress=not args.json)
    if args.json:
        print(json.dumps([e.to_dict() for e in entries], indent=2))
        return 1 if any(e.problems for e in entries) else 0
    print(f"checkpoints under {root}" if root else "no checkpoints yet")
    t = _table("", ["stage", "folder", "step", "size", "valid", "role", "in use"])
    for e in entries:
        role = ", ".join(r for r in (e.promoted and "promoted", e.final and "final") if r) or "-"
        use = f"pid {e.in_use.pid}" if e.in_use else "-"
        valid = _STYLE.get(e.status, e.status) + (f" ({e.problems[0]})" if e.problems else "")
        step = "-" if e.step is None else str(e.step)
        t.add_row(e.stage, e.name, step, human_bytes(e.size), valid, role, use)
    _console().print(t)
    if not args.verify:
        print("valid = commit marker + manifest + files present; --verify hashes every file (exports too)")
    return 1 if any(e.problems for e in entries) else 0


def cmd_verify(args: argparse.Namespace) -> int:
    from llm_pipeline.checkpoint.manager import VerifyReport, verify_target

    target = Path(args.target) if args.target else _root(args)
    report = verify_target(target) if target is not None else VerifyReport([])
    if report.archive is not None:
        checked = report.archive
        beside = "tarball hash checked" if checked.beside_checked else f"no {checked.path.name}.sha256 beside it"
        print(f"ok: {target}: {len(checked.members)} members verified ({beside}); holds {checked.folder}")
        return 0
    for e in report.damaged:
        why = "; ".join(e.problems) or "no COMMITTED marker (a save that never finished; never resumed from)"
        print(f"DAMAGED {e.path}: {why}")
    for e in report.unverifiable:
        print(f"unverified {e.path}: no checksums.sha256 (an older export, or not written by llm-pipeline)")
    (ok_c, n_c), (ok_e, n_e) = report.count("checkpoint"), report.count("export")
    print(f"{ok_c}/{n_c} checkpoints verified, {ok_e}/{n_e} exports verified ({human_bytes(report.hashed_bytes)} "
          f"hashed); {len(report.damaged)} with problems")  # fmt: skip
    return 1 if report.damaged else 0


def cmd_disk_usage(args: argparse.Namespace) -> int:
    from llm_pipeline.checkpoint.manager import disk_usage

    root = _root(args)
    if root is None:
        print("[]" if args.json else "no checkpoints yet: nothing uses disk space")
        return 0
    du = disk_usage(root)
    if args.json:
        print(json.dumps(du, indent=2))
        return 0
    print(f"disk usage of {du['root']}")
    t = _table("", ["stage", "checkpoints", "exports", "other", "total"])
    for name, b in du["stages"].items():
        other = b["other"] + b["leftovers"]
        t.add_row(name, *(human_bytes(v) for v in (b["checkpoints"], b["exports"], other, b["total"])))
    if du["unaccounted"]:
        t.add_row("(other files)", "", "", human_bytes(du["unaccounted"]), human_bytes(du["unaccounted"]))
    t.add_row("[bold]total", "", "", "", f"[bold]{human_bytes(du['total'])}")
    _console().print(t)
    print(f"free on this disk: {human_bytes(du['free'])} of {human_bytes(du['disk_total'])}")
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    from llm_pipeline.checkpoint.manager import cleanup

    root = _root(args, stage=args.stage)
    assert root is not None  # with a stage, _root raises instead
    plan = cleanup(root, args.stage, args.keep, dry_run=args.dry_run, verify_kept=not args.no_verify)
    verb = "would delete" if args.dry_run else "deleted"
    for e in plan.keep:
        print(f"keep      {e.path} ({human_bytes(e.size)})")
    for e, why in plan.protected:
        print(f"protected {e.path}: {why}")
    for e, why in plan.left_alone:
        print(f"left      {e.path}: {why} (not counted as kept, not deleted: decide yourself)")
    for e in plan.delete:
        print(f"{'delete' if args.dry_run else 'deleted':<9} {e.path} ({human_bytes(e.size)})")
    print(f"{args.stage}: {verb} {len(plan.delete)} checkpoint(s), {human_bytes(plan.freed)}; kept {len(plan.keep)}")
    return 0


def cmd_archive(args: argparse.Namespace) -> int:
    from llm_pipeline.checkpoint.archive import create_archive, sidecar

    out, info = create_archive(args.path, args.output, overwrite=args.overwrite, level=args.level)
    ratio = info["archive_bytes"] / info["bytes"] if info["bytes"] else 1.0
    print(f"archived {args.path} -> {out} ({info['files']} files, {human_bytes(info['bytes'])} -> "
          f"{human_bytes(info['archive_bytes'])}, {ratio:.0%}); sha256 {info['sha256']} in {sidecar(out)}")  # fmt: skip
    if not info["source_checksums"]:
        print(f"note: {args.path} had no checksums.sha256 of its own (an older export): archived as found")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from llm_pipeline.checkpoint.archive import restore_archive

    target = restore_archive(args.archive, args.to, root=_given_root(args))
    print(f"restored {args.archive} -> {target} (every file verified against the archive's manifests)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ckpt",
        help="checkpoint management: list, archive, restore, cleanup, disk-usage, verify",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name: str, help: str) -> argparse.ArgumentParser:
        v = verbs.add_parser(name, help=help)
        v.add_argument("--root", help="checkpoints folder (default: $CKPT_ROOT or ./checkpoints)")
        return v

    v = verb("list", "stage, step, size, validity, promotion and use of every checkpoint and export")
    v.add_argument("stage", nargs="?", help="only this stage")
    v.add_argument("--verify", action="store_true", help="hash every file against its manifest (slow on big runs)")
    v.add_argument("--json", action="store_true", help="print JSON instead of a table")
    v.set_defaults(func=cmd_list)

    v = verb("verify", "checksums of every checkpoint and export (or of one, or an archive); exit 1 on damage")
    v.add_argument(
        "target", nargs="?", help="a checkpoint, an export, a checkpoints folder or an archive (default: the root)"
    )
    v.set_defaults(func=cmd_verify)

    v = verb("disk-usage", "space used per stage and in total, and free space on the disk")
    v.add_argument("--json", action="store_true", help="print JSON instead of a table")
    v.set_defaults(func=cmd_disk_usage)

    v = verb("cleanup", "keep the newest N valid checkpoints of a stage; never promoted, final or in-use ones")
    v.add_argument("stage", help="stage name, e.g. pretrain")
    v.add_argument("keep", type=int, help="how many of the newest valid checkpoints to keep")
    v.add_argument("--dry-run", action="store_true", help="print the plan, delete nothing")
    v.add_argument("--no-verify", action="store_true", help="do not hash the kept checkpoints first (faster)")
    v.set_defaults(func=cmd_cleanup)

    v = verb("archive", "a compressed tarball of a checkpoint or export, with sha256 manifests inside and beside it")
    v.add_argument("path", help="a committed checkpoint-<step> folder or an export such as checkpoints/pretrain_final")
    v.add_argument("--output", "-o", help="tarball path (default: <run>/archives/<label>.tar.gz)")
    v.add_argument("--overwrite", action="store_true", help="replace an existing archive of that name")
    v.add_argument(
        "--level",
        type=int,
        default=1,
        choices=range(10),
        metavar="0-9",
        help="gzip level: 1 (default; weights barely compress, speed matters), 0 = store only (fastest)",
    )
    v.set_defaults(func=cmd_archive)

    v = verb("restore", "verify an archive completely, then unpack it where it came from (never over a folder)")
    v.add_argument("archive", help="a .tar.gz written by `ckpt archive`")
    v.add_argument(
        "--to",
        help="folder to create (default: where it was archived from, as ARCHIVE.json records it; with --root: "
        "<root>/<stage>/checkpoint-<step> or <root>/<export>)",
    )
    v.set_defaults(func=cmd_restore)
