"""Code rewards: the completion's program must pass the example's tests, run in the sandbox.

Programs run in :class:`~llm_pipeline.eval.sandbox.Sandbox` (own process, time/memory/process limits, no
network, writes confined to a scratch folder), ``workers`` at a time. The program is the completion's code
(the first fenced block when it has one) followed by the tests: MBPP's ``test_list`` / ``tests`` (a list of
assert lines, with ``test_setup_code``) or HumanEval's ``test`` + ``check(<entry_point>)``. A program that
fails, hangs or is killed scores 0; timeouts and sandbox errors are counted (``rewards/code_tests/timeouts``,
``.../errors``), and training goes on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from llm_pipeline.eval.sandbox import Sandbox, SandboxLimits

_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str:
    """The first fenced code block of a completion, else the whole text."""
    m = _FENCE.search(completion)
    return m.group(1) if m else completion


def test_program(code: str, example: Mapping[str, Any]) -> str:
    """The program that passes iff ``code`` passes the example's tests."""
    if "test_list" in example or "tests" in example:
        tests = example.get("test_list", example.get("tests"))
        if isinstance(tests, str):
            tests = [tests]
        setup = str(example.get("test_setup_code") or "")
        return "\n".join([setup, code, "", *map(str, tests)])
    if "test" in example:
        prompt = str(example.get("prompt_code", ""))
        check = f"\ncheck({example['entry_point']})\n" if "entry_point" in example else "\n"
        return f"{prompt}{code}\n\n{example['test']}{check}"
    raise KeyError(f"code_tests: the example has no tests (test_list, tests or test); keys: {sorted(example)}")


class CodeTestsReward:
    """1 when the program passes its tests in the sandbox, else 0; timeouts and errors are counted."""

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 512, workers: int = 2, **limits: Any) -> None:
        self.sandbox = Sandbox(SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb, **limits), workers=workers)
        self.stats = {"runs": 0, "passed": 0, "failed": 0, "timeouts": 0, "errors": 0}

    def __call__(self, completions: list[str], examples: list[Mapping[str, Any]]) -> list[float]:
        programs = [test_program(extract_code(c), ex) for c, ex in zip(completions, examples, strict=True)]
        results = self.sandbox.run_many(programs)
        out = []
        for res in results:
            self.stats["runs"] += 1
            status = res.status if res is not None else "error"
            key = {"passed": "passed", "failed": "failed", "timed_out": "timeouts"}.get(status, "errors")
            self.stats[key] += 1
            out.append(1.0 if res is not None and res.passed else 0.0)
        return out

    def counters(self) -> dict[str, int]:
        return dict(self.stats)

    def close(self) -> None:
        self.sandbox.close()
