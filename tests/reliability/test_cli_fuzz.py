"""Every command, fed bad arguments and bad files, exits 1 or 2 with one error line and no traceback.

Two layers: cases derived from the parser itself (unknown flags, missing required arguments, values
of the wrong type, choices out of range), so a command added later is covered the day it lands; and
hand-written cases for the files each command reads or writes (missing, empty, binary garbage, a
folder where a file belongs and the reverse, broken YAML, a fake checkpoint, a folder in use).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from llm_pipeline.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
_ERROR = re.compile(r"^(error: |llm-pipeline.*: error: |\w+: error: )")


def _commands() -> dict[str, argparse.ArgumentParser]:
    """Every runnable (sub)command: ``init``, ``data download``, ..."""
    out = {}

    def walk(parser: argparse.ArgumentParser, prefix: tuple[str, ...]) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs and prefix:
            out[" ".join(prefix)] = parser
        for action in subs:
            for name, child in action.choices.items():
                walk(child, (*prefix, name))

    walk(build_parser(), ())
    return out


COMMANDS = _commands()


def _derived_cases() -> list[tuple[str, list[str]]]:
    cases = []
    for name, parser in COMMANDS.items():
        cmd = name.split()
        cases.append((name, [*cmd, "--definitely-not-an-option"]))
        if any(a.required for a in parser._actions):
            cases.append((name, cmd))
        for a in parser._actions:
            if not a.option_strings or a.nargs == 0:
                continue
            if a.type in (int, float):
                cases.append((name, [*cmd, a.option_strings[0], "not-a-number"]))
            if a.choices:
                cases.append((name, [*cmd, a.option_strings[0], "no-such-choice"]))
    return cases


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def _assert_clean_failure(argv: list[str], code: int, err: str) -> str:
    shown = " ".join(argv)
    assert code in (1, 2), f"`{shown}` exited {code}:\n{err[-2000:]}"
    assert "Traceback" not in err, f"`{shown}` printed a traceback:\n{err[-3000:]}"
    lines = [line for line in err.splitlines() if _ERROR.match(line)]
    assert len(lines) == 1, f"`{shown}`: expected one error line, got:\n{err[-3000:]}"
    return lines[0]


@pytest.mark.parametrize("argv", [c[1] for c in _derived_cases()], ids=[" ".join(c[1]) for c in _derived_cases()])
def test_parser_level_mistakes(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = _run(argv, capsys)
    assert code == 2, f"`{' '.join(argv)}` exited {code}:\n{err[-2000:]}"
    _assert_clean_failure(argv, code, err)


@dataclass
class Files:
    """Bad things to point a command at."""

    root: Path

    def __post_init__(self) -> None:
        r = self.root
        (r / "empty.yaml").write_text("")
        (r / "garbage.bin").write_bytes(bytes(range(256)) * 8)
        (r / "list.yaml").write_text("- a\n- b\n")
        (r / "broken.yaml").write_text("training: [unclosed\n")
        (r / "unknown.yaml").write_text("no_such_key: 1\n")
        (r / "notjson.jsonl").write_text("this is not json\n")
        (r / "emptydir").mkdir()
        (r / "baddir").mkdir()
        (r / "baddir" / "config.json").write_text("{not json")
        (r / "baddir" / "model.safetensors").write_bytes(b"\x00" * 64)
        fake = r / "fakerun" / "checkpoint-3"
        fake.mkdir(parents=True)
        (fake / "COMMITTED").write_text("3\n")
        (fake / ".metadata").write_bytes(b"garbage")
        (fake / "meta.json").write_text("{}")
        (r / "userdir").mkdir()
        (r / "userdir" / "notes.txt").write_text("mine")

    def __getattr__(self, name: str) -> str:
        paths = {
            "missing": "does-not-exist", "empty": "empty.yaml", "garbage": "garbage.bin", "list": "list.yaml",
            "broken": "broken.yaml", "unknown": "unknown.yaml", "notjson": "notjson.jsonl", "emptydir": "emptydir",
            "baddir": "baddir", "fakerun": "fakerun", "fakeckpt": "fakerun/checkpoint-3", "userdir": "userdir",
        }  # fmt: skip
        if name not in paths:
            raise AttributeError(name)
        return str(self.root / paths[name])


CONFIGS = ("missing", "empty", "garbage", "list", "broken", "unknown", "emptydir")
MODEL_DIRS = ("missing", "garbage", "emptydir", "baddir", "fakerun", "fakeckpt")
GATES = str(ROOT / "configs" / "promotion_gates.yaml")
DEMO_PRETRAIN = str(ROOT / "configs" / "demo" / "pretrain.yaml")


def _file_cases() -> list[tuple[str, object]]:
    """(id, f(files) -> argv): the files and values each command takes, each in its bad forms."""
    c: list[tuple[str, object]] = []
    for k in CONFIGS:
        # (not `init --config empty`: were an empty file ever all defaults again, init would build a 7B model)
        init = [["init", "-o", "out"]] if k != "empty" else []
        for cmd in (*init, ["info"], ["run"], ["demo"], ["pretrain"], ["lora"], *(["data", s] for s in
                    ("download", "clean", "tokenizer", "pack", "prepare"))):  # fmt: skip
            c.append((f"{' '.join(cmd)} --config {k}", lambda f, cmd=cmd, k=k: [*cmd, "--config", getattr(f, k)]))
        c.append((f"eval --config {k}", lambda f, k=k: ["eval", f.baddir, "--config", getattr(f, k)]))
        c.append((f"gates --config {k}", lambda f, k=k: ["gates", "sft", "--config", getattr(f, k)]))
    for k in MODEL_DIRS:
        c.append((f"export {k}", lambda f, k=k: ["export", getattr(f, k), "out"]))
        c.append((f"import {k}", lambda f, k=k: ["import", getattr(f, k), "out"]))
        c.append((f"generate {k}", lambda f, k=k: ["generate", getattr(f, k), "--ids", "1 2"]))
        c.append((f"info --checkpoint {k}", lambda f, k=k: ["info", "--checkpoint", getattr(f, k)]))
        c.append((f"eval {k}", lambda f, k=k: ["eval", getattr(f, k), "--tasks", "perplexity"]))
        c.append((f"init --tokenizer {k}", lambda f, k=k: ["init", "--preset", "debug", "-o", "o", "--tokenizer",
                                                            getattr(f, k)]))  # fmt: skip
    for k in ("garbage", "userdir", "fakerun", "fakeckpt"):  # outputs that must not be written
        c.append((f"init -o {k}", lambda f, k=k: ["init", "--preset", "debug", "-o", getattr(f, k)]))
    c.append(("pretrain --output_dir garbage", lambda f: ["pretrain", "--config", DEMO_PRETRAIN, "--output_dir",
                                                          f.garbage]))  # fmt: skip
    c.append(("data download --output-dir garbage", lambda f: ["data", "download", "--output-dir", f.garbage]))
    for k in ("missing", "empty", "garbage", "notjson", "emptydir"):
        c.append((f"eval humaneval --samples {k}", lambda f, k=k: ["eval", "humaneval", "--samples", getattr(f, k)]))
        c.append((f"gates --results {k}", lambda f, k=k: ["gates", "sft", "--config", GATES, "--results",
                                                          getattr(f, k)]))  # fmt: skip
    for bad in ("novalue", "=3", "training.max_steps=-5", "training=3", "training.max_steps.x=1"):
        c.append((f"pretrain --set {bad}", lambda f, bad=bad: ["pretrain", "--config", DEMO_PRETRAIN, "--set", bad]))
        c.append((f"data download --set {bad}", lambda f, bad=bad: ["data", "download", "--set", bad]))
        c.append((f"init --set {bad}", lambda f, bad=bad: ["init", "--preset", "debug", "-o", "o", "--set", bad]))
    c += [
        ("init --preset nope", lambda f: ["init", "--preset", "nope", "-o", "o"]),
        ("info --preset nope", lambda f: ["info", "--preset", "nope"]),
        ("info --gpus 0", lambda f: ["info", "--preset", "debug", "--gpus", "0"]),
        ("info --seq-len -1", lambda f: ["info", "--preset", "debug", "--seq-len", "-1"]),
        ("init --dtype nope", lambda f: ["init", "--preset", "debug", "-o", "o", "--dtype", "nope"]),
        ("gates unknown stage", lambda f: ["gates", "no-such-stage", "--config", GATES]),
        ("eval --tasks nope", lambda f: ["eval", f.emptydir, "--tasks", "nope"]),
        ("eval --limit -1", lambda f: ["eval", "humaneval", "--samples", f.notjson, "--limit", "-1"]),
        ("pretrain --max_steps -5", lambda f: ["pretrain", "--config", DEMO_PRETRAIN, "--max_steps", "-5"]),
        ("export onto itself", lambda f: ["export", f.fakerun, f.fakerun]),
    ]
    return c


FILE_CASES = _file_cases()


@pytest.mark.parametrize("make_argv", [c[1] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_bad_files_and_values(make_argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # commands with relative default paths write nothing outside the test
    files = Files(tmp_path)
    argv = make_argv(files)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    code, err = _run(argv, capsys)
    line = _assert_clean_failure(argv, code, err)
    named = [Path(a).name for a in argv if a.startswith(str(tmp_path))]
    if code == 1 and named:  # a bad file is named (config errors, exit 2, name the file and key below)
        assert any(n in line for n in named), f"`{' '.join(argv)}`: the error does not name the file: {line}"
    for p, mtime in before.items():  # a failed command destroys nothing it was pointed at
        assert p.exists() and (p.is_dir() or p.stat().st_mtime_ns == mtime), f"`{' '.join(argv)}` changed {p}"


def test_every_command_is_fuzzed():
    derived = {name for name, _ in _derived_cases()}
    assert derived == set(COMMANDS)
    assert {"init", "export", "import", "generate", "info", "gates", "run", "demo", "eval", "pretrain",
            "data download", "data clean", "data tokenizer", "data pack", "data prepare"} <= set(COMMANDS)  # fmt: skip
