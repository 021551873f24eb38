"""Every job's torch threads wait passively and take the job's share of the cores, unless the user chose otherwise.

What a job ran with is read back from its results.json (``environment.cpu_threads``), which
records torch's thread count in the job's own process and the OpenMP settings libgomp read.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmexp.cpu_threads import usable_cores
from tests.conftest import run_llmexp

SHORT_RUN = ["pipeline=single", "technique.max_steps=2", "technique.save_model=false"]
SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")


def job_settings(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())["environment"]["cpu_threads"]


def choose(monkeypatch, **chosen: str) -> None:
    """Exactly these thread settings in the environment the run inherits (pytest may run under OMP_NUM_THREADS=1)."""
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    for name, value in chosen.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize(
    "chosen, expected_policy",
    [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"), ({"GOMP_SPINCOUNT": "1000"}, None)],
    ids=["unset", "user-active", "user-spincount"],
)
def test_a_run_waits_passively_on_all_its_cores_unless_the_user_chose(chosen, expected_policy, tmp_path, monkeypatch):
    choose(monkeypatch, **chosen)
    run_dir = tmp_path / "run"
    done = run_llmexp(*SHORT_RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    recorded = job_settings(run_dir)
    assert recorded["omp_wait_policy"] == expected_policy
    assert recorded["gomp_spincount"] == chosen.get("GOMP_SPINCOUNT")
    assert recorded["usable_cores"] == usable_cores()
    assert recorded["threads"] == usable_cores()


def test_the_users_thread_count_wins(tmp_path, monkeypatch):
    choose(monkeypatch, OMP_NUM_THREADS="1")
    run_dir = tmp_path / "run"
    done = run_llmexp(*SHORT_RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert job_settings(run_dir)["threads"] == 1


@pytest.mark.skipif(usable_cores() < 2, reason="a share of one core is the whole core")
def test_parallel_sweep_jobs_each_get_their_share_of_the_cores(tmp_path, monkeypatch):
    choose(monkeypatch)
    sweep_dir = tmp_path / "sweep"
    done = run_llmexp("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1", *SHORT_RUN,
                      f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    share = usable_cores() // 2
    for job in ("0", "1"):
        recorded = job_settings(sweep_dir / job)
        assert recorded["threads"] == share
        assert recorded["omp_wait_policy"] == "PASSIVE"
