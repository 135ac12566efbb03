"""The sandbox runs every canonical HumanEval solution and contains hostile programs."""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from llm_pipeline.eval.humaneval import load_problems, pass_at_k, score_samples
from llm_pipeline.eval.sandbox import Sandbox, SandboxLimits, _live_pids_of_uid


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(SandboxLimits(timeout_s=5.0, memory_mb=512), workers=2) as sb:
        yield sb


def test_all_canonical_solutions_pass(sandbox: Sandbox) -> None:
    problems = load_problems()
    assert len(problems) == 164
    samples = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]
    metrics, records = score_samples(problems, samples, sandbox, k=[1])
    failed = [(r["task_id"], r["status"], r["stderr"][-300:]) for r in records if not r["passed"]]
    assert not failed
    assert metrics["pass@1"] == 1.0 and metrics["n_tasks"] == 164


def test_wrong_solution_fails(sandbox: Sandbox) -> None:
    problems = load_problems()
    p = problems["HumanEval/0"]
    wrong = "    return False\n"
    metrics, records = score_samples({p["task_id"]: p}, [{"task_id": p["task_id"], "completion": wrong}], sandbox)
    assert records[0]["status"] == "failed" and "AssertionError" in records[0]["stderr"]
    assert metrics["pass@1"] == 0.0


def test_early_exit_is_not_a_pass(sandbox: Sandbox) -> None:
    assert sandbox.run("import sys\nsys.exit(0)").status == "failed"
    assert sandbox.run("import os\nos._exit(0)").status == "failed"
    assert sandbox.run("x = 1").status == "passed"


def test_infinite_loop_times_out() -> None:
    with Sandbox(SandboxLimits(timeout_s=1.0), workers=1) as sb:
        res = sb.run("while True:\n    pass\n")
    assert res.status == "timed_out" and not res.passed


def test_ten_gigabyte_allocation_is_contained(sandbox: Sandbox) -> None:
    res = sandbox.run("x = bytearray(10 * 1024 ** 3)\nprint(len(x))")
    assert res.status == "failed" and "MemoryError" in res.stderr


def test_fork_bomb_is_contained(sandbox: Sandbox) -> None:
    bombs = (
        "import os\nwhile True:\n    os.fork()\n",
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    )
    with Sandbox(SandboxLimits(timeout_s=1.0), workers=1) as quick:
        for bomb in bombs:
            assert quick.run(bomb).status in ("failed", "timed_out")
    if sandbox.drop_uid:  # nothing of the sandbox uids is left running
        assert not [pid for slot in range(sandbox.workers) for pid in _live_pids_of_uid(sandbox.slot_uid(slot))]
    assert sandbox.run("print('still here')").passed  # the evaluator survives and keeps working


def test_cannot_touch_files_outside_scratch(sandbox: Sandbox) -> None:
    iso = sandbox.isolation()
    if not (iso["filesystem"].startswith("landlock") or iso["uid_drop"]):
        pytest.skip(f"no filesystem confinement on this machine: {iso['filesystem']}")
    # World-writable, so only the sandbox (not file permissions alone) can protect it.
    victim_dir = Path(tempfile.mkdtemp(prefix="sandbox-victim-", dir="/tmp"))
    try:
        victim_dir.chmod(0o777)
        victim = victim_dir / "precious.txt"
        victim.write_text("keep me")
        victim.chmod(0o666)
        for attack in (
            f"import os\nos.remove({str(victim)!r})",
            f"import shutil\nshutil.rmtree({str(victim_dir)!r})",
            f"open({str(victim)!r}, 'w').write('gone')",
            f"open({str(victim_dir / 'new.txt')!r}, 'w').write('x')",
        ):
            res = sandbox.run(attack)
            assert res.status == "failed", attack
            assert "PermissionError" in res.stderr
        assert victim.read_text() == "keep me"
        assert sorted(p.name for p in victim_dir.iterdir()) == ["precious.txt"]
        # Inside its own scratch directory the program may write freely.
        assert sandbox.run("open('out.txt', 'w').write('ok')\nimport os\nos.remove('out.txt')").passed
    finally:
        shutil.rmtree(victim_dir, ignore_errors=True)


def test_no_network(sandbox: Sandbox) -> None:
    iso = sandbox.isolation()
    if iso["network"] != "namespace" and "tcp blocked" not in iso["filesystem"]:
        pytest.skip(f"no network isolation on this machine: {iso['network']}")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        res = sandbox.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).send(b'x')")
        assert res.status == "failed"
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()


def test_pass_at_k_hand_computed() -> None:
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    assert pass_at_k(10, 0, 3) == 0.0
    assert pass_at_k(4, 4, 2) == 1.0
    assert pass_at_k(10, 1, 10) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_eval_budget_stops_execution_and_reports_timeout(tmp_path: Path) -> None:
    from llm_pipeline.eval.budget import Budget, EvalTimeout
    from llm_pipeline.eval.humaneval import HumanEvalConfig, run_humaneval

    problems = list(load_problems())[:6]
    samples = tmp_path / "loops.jsonl"
    samples.write_text("".join(f'{{"task_id": "{t}", "completion": "    while True: pass\\n"}}\n' for t in problems))
    cfg = HumanEvalConfig(samples=str(samples), workers=1, sandbox=SandboxLimits(timeout_s=0.5))
    with pytest.raises(EvalTimeout) as info:
        run_humaneval(cfg, None, limit=6, budget=Budget(1.2))
    assert 1 <= info.value.completed < info.value.total == 6
