"""Checkpoint operations: verify, archive and restore throughput against the standard tools, same run.

A real committed DCP checkpoint (model + AdamW state of a model with ``--params`` weights, so about
12 bytes per parameter) is written, then timed:

- ``verify``: ``llm-pipeline ckpt verify`` (sha256 of every file against its manifest, on threads)
  vs ``sha256sum -c checksums.sha256`` (one process);
- ``archive``: ``create_archive`` (gzip level 0, 1 and 6, member hashes, checkpoint checksums checked on
  the way) vs ``tar -czf`` (GNU tar + gzip -6, no hashes);
- ``restore``: ``restore_archive`` (full verification pass, then unpack with a second check) vs
  ``tar -xzf`` followed by ``sha256sum -c`` (unpack, then check).

    python bench/ckpt_ops.py [--params 40e6] [--out /tmp/bench_ckpt_ops]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

from _machine import machine_line  # bench/ is on sys.path when a bench runs
from llm_pipeline.checkpoint.archive import create_archive, restore_archive
from llm_pipeline.checkpoint.dcp import CheckpointManager
from llm_pipeline.checkpoint.manager import folder_size, scan, verify


def write_checkpoint(root: Path, params: int) -> Path:
    width = 2048
    layers = max(1, params // (width * width))
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    with CheckpointManager(root, keep_last=1) as mgr:
        return mgr.save(1, model=model, optimizer=opt, trainer_state={"step": 1}, rank_state={})


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=40e6)
    ap.add_argument("--out", default="/tmp/bench_ckpt_ops")
    args = ap.parse_args()
    print(machine_line())
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    ckpt = write_checkpoint(out / "checkpoints" / "stage", int(args.params))
    size = folder_size(ckpt)
    mib = size / 2**20
    print(f"checkpoint: {ckpt} ({mib:.0f} MiB)")

    def report(name: str, ours: float, base: float, base_name: str) -> None:
        print(f"{name:<22} ours {mib / ours:7.1f} MiB/s ({ours:5.2f} s) | {base_name} {mib / base:7.1f} MiB/s "
              f"({base:5.2f} s) | ours/baseline time {ours / base:.2f}x")  # fmt: skip

    entries = scan(out / "checkpoints")
    t_ours = timed(lambda: verify(entries, progress=False))
    assert all(not e.problems for e in entries)
    t_base = timed(lambda: subprocess.run(["sha256sum", "-c", "--quiet", "checksums.sha256"], cwd=ckpt, check=True))
    report("verify", t_ours, t_base, "sha256sum -c")

    results = {}
    for level in (0, 1, 6):
        tarball = out / "archives" / f"l{level}.tar.gz"
        results[level] = timed(lambda lv=level, tb=tarball: create_archive(ckpt, tb, level=lv, progress=False))
        ratio = tarball.stat().st_size / size
        print(f"  gzip level {level}: archive is {100 * ratio:.1f}% of the checkpoint")
    base_tar = out / "archives" / "gnu.tar.gz"
    t_base = timed(
        lambda: subprocess.run(["tar", "-czf", str(base_tar), "-C", str(ckpt.parent), ckpt.name], check=True)
    )
    report("archive (store, -0)", results[0], t_base, "tar -czf (gzip -6)")
    report("archive (gzip -1)", results[1], t_base, "tar -czf (gzip -6)")
    report("archive (gzip -6)", results[6], t_base, "tar -czf (gzip -6)")

    t_ours = timed(lambda: restore_archive(out / "archives" / "l1.tar.gz", out / "restored", progress=False))

    def tar_then_check() -> None:
        dest = out / "untarred"
        dest.mkdir()
        subprocess.run(["tar", "-xzf", str(base_tar), "-C", str(dest)], check=True)
        subprocess.run(["sha256sum", "-c", "--quiet", "checksums.sha256"], cwd=dest / ckpt.name, check=True)

    t_base = timed(tar_then_check)
    report("restore (gzip -1)", t_ours, t_base, "tar -xzf + sha256sum -c")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
