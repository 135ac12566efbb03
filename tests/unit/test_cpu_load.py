"""CPU oversubscription: detected from the cores, our threads and the others' load, and said with its fix."""

from __future__ import annotations

import logging

import pytest

from llm_pipeline import hardware
from llm_pipeline.hardware import CpuLoad, measure_cpu_load, usable_cores, warn_if_cpu_oversubscribed


def test_the_rule_and_its_advice(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    busy = CpuLoad(cores=2, threads=2, ranks=1, others=1.0)  # the case: 2 threads, 2 cores, other load
    assert busy.oversubscribed and busy.free_cores == 1
    text = busy.warning()
    assert text is not None and "OMP_NUM_THREADS=1" in text and "one thread per core by default" in text
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert "OMP_NUM_THREADS=2 is set" in CpuLoad(2, 2, 1, 1.0).warning()

    assert not CpuLoad(cores=2, threads=2, ranks=1, others=0.2).oversubscribed  # an idle machine
    assert not CpuLoad(cores=2, threads=1, ranks=1, others=1.0).oversubscribed  # already one thread: nothing to fix
    assert not CpuLoad(cores=16, threads=8, ranks=1, others=4.0).oversubscribed  # room to spare
    assert CpuLoad(cores=16, threads=16, ranks=1, others=6.0).free_cores == 10
    two_ranks = CpuLoad(cores=4, threads=2, ranks=2, others=1.5)
    assert two_ranks.oversubscribed and two_ranks.free_cores == 1 and "2 process(es)" in two_ranks.warning()


def test_cores_honour_a_container_quota(tmp_path):
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert usable_cores(cpu_max) == usable_cores(tmp_path / "missing")
    cpu_max.write_text("150000 100000\n")
    assert usable_cores(cpu_max) == min(1.5, usable_cores(tmp_path / "missing"))


def test_measured_load_subtracts_our_own_work(monkeypatch):
    """All cores' busy time over the window, minus this process's: the others' share."""
    monkeypatch.setattr(hardware, "usable_cores", lambda: 2)
    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (3.0, 3.0, 3.0))
    clock = iter([0.0, 1.0])
    monkeypatch.setattr(hardware.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(hardware.time, "sleep", lambda s: None)
    busy = iter([100.0, 101.8])  # 1.8 cores busy over the second
    own = iter([5.0, 5.6])  # 0.6 of them ours
    monkeypatch.setattr(hardware, "_busy_seconds", lambda: next(busy))
    monkeypatch.setattr(hardware, "_own_seconds", lambda: next(own))
    load = measure_cpu_load(2)
    assert load.others == pytest.approx(1.2) and load.oversubscribed

    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (0.3, 0.3, 0.3))  # a quiet machine: nothing sampled
    monkeypatch.setattr(hardware, "_busy_seconds", lambda: pytest.fail("sampled although the load average was low"))
    assert not measure_cpu_load(2).oversubscribed


def test_a_cpu_stage_start_logs_the_warning(monkeypatch, caplog):
    monkeypatch.setattr(hardware, "measure_cpu_load", lambda threads, ranks=1: CpuLoad(2, 2, ranks, 1.4))
    with caplog.at_level(logging.WARNING):
        load = warn_if_cpu_oversubscribed("cpu")
    assert load is not None and load.oversubscribed
    assert "CPU oversubscribed" in caplog.text and "OMP_NUM_THREADS=1" in caplog.text
    assert warn_if_cpu_oversubscribed("cuda") is None  # GPU runs: the CPU threads do not set the pace


def test_real_measurement_is_sane():
    load = measure_cpu_load(1, window=0.05)
    assert load.cores >= 1 and load.others >= 0 and load.threads == 1
