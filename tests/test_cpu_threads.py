"""Every job's torch threads take the job's share of the cores, and give back what another process takes.

What a job ran with is read back from its results.json: ``environment.cpu_threads`` (torch's
thread count when the job started, the OpenMP settings libgomp read) and each training stage's
``fewest_threads``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmexp.machine.cpu_threads import usable_cores
from tests.conftest import run_llmexp

SHORT_RUN = ["pipeline=technique_only", "technique.max_steps=2", "technique.save_model=false"]
SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def choose(monkeypatch, **chosen: str) -> None:
    """Exactly these thread settings in the environment the run inherits (pytest may run under OMP_NUM_THREADS=1)."""
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    for name, value in chosen.items():
        monkeypatch.setenv(name, value)


def test_a_run_starts_on_every_usable_core_and_leaves_waiting_to_libgomp(tmp_path, monkeypatch):
    choose(monkeypatch)
    done = run_llmexp(*SHORT_RUN, "hydra.run.dir=run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    settings = record(tmp_path / "run")["environment"]["cpu_threads"]
    assert settings == {"usable_cores": usable_cores(), "threads": usable_cores(), "omp_wait_policy": None,
                        "gomp_spincount": None, "omp_num_threads": None}


def test_the_users_thread_count_wins(tmp_path, monkeypatch):
    choose(monkeypatch, OMP_NUM_THREADS="1")
    done = run_llmexp(*SHORT_RUN, "hydra.run.dir=run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert record(tmp_path / "run")["environment"]["cpu_threads"]["threads"] == 1


@pytest.mark.skipif(usable_cores() < 2, reason="a share of one core is the whole core")
def test_parallel_sweep_jobs_each_get_their_share_of_the_cores(tmp_path, monkeypatch):
    choose(monkeypatch)
    done = run_llmexp("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1", *SHORT_RUN,
                      "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for job in ("0", "1"):
        assert record(tmp_path / "sweep" / job)["environment"]["cpu_threads"]["threads"] == usable_cores() // 2


@pytest.mark.slow
@pytest.mark.skipif(usable_cores() < 2, reason="with one core there is no thread to give back")
def test_training_beside_a_busy_core_gives_that_core_back_and_says_so(tmp_path, monkeypatch):
    choose(monkeypatch)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        done = run_llmexp("pipeline=technique_only", "technique.max_steps=120", "technique.save_model=false",
                          "hydra.run.dir=run", cwd=tmp_path)
    finally:
        busy.kill()
        busy.wait()
    assert done.returncode == 0, done.stderr
    assert record(tmp_path / "run")["stages"]["pretrain"]["metrics"]["fewest_threads"] == usable_cores() - 1
    assert "pretrain: other processes are using" in done.stderr
    assert f"so torch runs on {usable_cores() - 1} thread(s) while they do" in " ".join(done.stderr.split())
