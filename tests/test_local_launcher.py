"""``hydra/launcher=local``: warm workers on their share of the cores, jobs reported as the basic launcher reports them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from llmexp.launchers.warm_workers import cores_of
from llmexp.machine.cpu_threads import usable_cores
from tests.conftest import read_results, run_llmexp

LOCAL = ["hydra/launcher=local", "hydra.launcher.workers=2"]
SHORT_JOB = ["pipeline=technique_then_evaluation", "technique.max_steps=2", "technique.checkpoint_every=0",
             "technique.save_model=false", "evaluation.limit=2", "evaluation.tasks=[perplexity]"]


def _jobs(sweep: Path) -> dict:
    return {job["num"]: job for job in json.loads((sweep / "jobs.json").read_text())}


def test_each_worker_has_its_own_share_of_the_cores():
    cpus = sorted(os.sched_getaffinity(0))
    share = max(1, usable_cores() // 2)
    first, second = cores_of(0, 2), cores_of(1, 2)
    assert len(first) == len(second) == share and set(first) <= set(cpus) and set(second) <= set(cpus)
    if len(cpus) >= 2:
        assert not set(first) & set(second)
    assert cores_of(0, 1) == cpus[:usable_cores()]


def test_no_workers_is_bad_input_refused_before_anything_starts(tmp_path):
    done = run_llmexp("-m", "hydra/launcher=local", "hydra.launcher.workers=0", *SHORT_JOB, "seed=0,1",
                      "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "hydra.launcher.workers=0: the number of jobs run at once must be at least 1" in " ".join(done.stderr.split())
    assert not (tmp_path / "sweep").exists()


def test_a_sweep_computes_what_the_basic_launcher_computes_each_job_logging_to_its_own_file(tmp_path):
    points = ["seed=0,1,2"]
    basic = run_llmexp("-m", *SHORT_JOB, *points, "hydra.sweep.dir=basic", cwd=tmp_path)
    assert basic.returncode == 0, basic.stderr[-3000:]
    local = run_llmexp("-m", *LOCAL, *SHORT_JOB, *points, "hydra.sweep.dir=local", cwd=tmp_path)
    assert local.returncode == 0, local.stderr[-3000:]

    for num in range(3):
        ours, theirs = read_results(tmp_path / "local" / str(num)), read_results(tmp_path / "basic" / str(num))
        assert ours["status"] == theirs["status"] == "completed"
        # a worker computes on half the cores: sums reduce in another order, so agreement is to float32 rounding
        for stage, metric in (("pretrain", "final_loss"), ("evaluate", "perplexity")):
            assert ours["stages"][stage]["metrics"][metric] == pytest.approx(theirs["stages"][stage]["metrics"][metric],
                                                                             rel=1e-5)
        assert ours["environment"]["cpu_threads"]["usable_cores"] == max(1, usable_cores() // 2)
        output = (tmp_path / "local" / str(num) / "output.log").read_text()
        assert f"run directory: {tmp_path / 'local' / str(num)}" in " ".join(output.split())
    assert {n: job["status"] for n, job in _jobs(tmp_path / "local").items()} == {0: "completed", 1: "completed", 2: "completed"}
    # the console: one line per job, not the jobs' own output
    assert local.stdout.count("run directory:") == 0 and basic.stdout.count("run directory:") == 3
    ended = [line for line in local.stderr.splitlines() if line.startswith("[")]
    assert len(ended) == 3 and all(": completed (worker " in line for line in ended)
    workers = f"worker 0: cores {','.join(map(str, cores_of(0, 2)))}, worker 1: cores {','.join(map(str, cores_of(1, 2)))}"
    assert workers in local.stdout + local.stderr


def test_a_failed_job_is_failed_as_with_the_basic_launcher(tmp_path, tiny_checkpoint):
    """The same failing sweep as the basic launcher's test: the same statuses, reasons and exit code 1."""
    sweep = tmp_path / "sweep"
    (sweep / "1").mkdir(parents=True)
    (sweep / "1" / "evaluate").write_text("a file where the stage's directory goes: the stage cannot write there")
    done = run_llmexp("-m", *LOCAL, "technique=evaluate", f"model.path={tiny_checkpoint}", "technique.tasks=[perplexity]",
                      "technique.limit=2", "precision=fp32,fp8", "seed=0,1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]
    jobs = _jobs(sweep)
    assert [jobs[n]["status"] for n in range(4)] == ["completed", "failed", "skipped", "skipped"]
    reason = f"FileExistsError: [Errno 17] File exists: '{sweep / '1' / 'evaluate'}'"
    assert jobs[1]["reason"] == read_results(sweep / "1")["reason"] == reason
    assert "Traceback (most recent call last)" in open(read_results(sweep / "1")["error_log"]).read()
    console = " ".join(done.stderr.split())
    assert f"#1 technique=evaluate model.path={tiny_checkpoint} technique.tasks=[perplexity] technique.limit=2 " \
           f"precision=fp32 seed=1 pipeline=technique_then_evaluation: failed ({reason})" in console
    assert "precision=fp8 seed=1 pipeline=technique_then_evaluation: skipped (precision=fp8" in console
    assert "1 of 4 jobs failed" in console


@contextlib.contextmanager
def _sweep(tmp_path: Path, *points: str) -> Iterator[subprocess.Popen]:
    """A local sweep in its own session (so a signal can go to its whole process group), its output to files;
    whatever of it is left at the end is killed."""
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "llmexp", "-m", *LOCAL, *SHORT_JOB[:1], *SHORT_JOB[2:], *points, "hydra.sweep.dir=sweep"],
        cwd=tmp_path, env=env, stdout=open(tmp_path / "stdout", "w"), stderr=open(tmp_path / "stderr", "w"),
        start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as from a terminal
    )
    try:
        yield launcher
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()


def _workers_training(sweep: Path, launcher: subprocess.Popen, jobs: set, timeout: float = 240) -> dict:
    """pid -> job number of the workers running ``jobs``, once each is training (its stdout is its job's output.log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert launcher.poll() is None, (sweep.parent / "stderr").read_text()[-3000:]
        training = {}
        for pid in map(int, Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()):
            try:
                log = Path(os.readlink(f"/proc/{pid}/fd/1"))
            except OSError:
                continue
            if log.name == "output.log" and "step " in log.read_text():
                training[pid] = int(log.parent.name)
        if set(training.values()) >= jobs:
            return training
        time.sleep(0.5)
    pytest.fail(f"jobs {jobs} not training after {timeout} s: {(sweep.parent / 'stderr').read_text()[-3000:]}")


def _gone(pids, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()
                   for pid in pids):
            return True
        time.sleep(0.2)
    return False


def test_a_job_whose_worker_dies_is_failed_and_the_sweep_goes_on(tmp_path):
    with _sweep(tmp_path, "technique.max_steps=3,2000", "seed=0") as launcher:
        [long_job] = [pid for pid, num in _workers_training(tmp_path / "sweep", launcher, {1}).items() if num == 1]
        os.kill(long_job, signal.SIGKILL)
        assert launcher.wait(timeout=240) == 1, (tmp_path / "stderr").read_text()[-3000:]
    jobs = _jobs(tmp_path / "sweep")
    assert [jobs[n]["status"] for n in range(2)] == ["completed", "failed"]
    reason = "the worker process running it was killed by SIGKILL (the out-of-memory killer sends it; so does `kill -9`)"
    assert jobs[1]["reason"] == read_results(tmp_path / "sweep" / "1")["reason"] == reason
    assert "#1 " in (tmp_path / "stderr").read_text() and f": failed ({reason})" in (tmp_path / "stderr").read_text()


@pytest.mark.parametrize("how", ["ctrl-c", "kill -9"])
def test_no_worker_outlives_an_interrupted_or_killed_sweep(tmp_path, how):
    with _sweep(tmp_path, "technique.max_steps=2000", "seed=0,1") as launcher:
        workers = _workers_training(tmp_path / "sweep", launcher, {0, 1})
        if how == "ctrl-c":  # the terminal signals the whole foreground process group
            os.killpg(launcher.pid, signal.SIGINT)
            assert launcher.wait(timeout=60) != 0
            assert "KeyboardInterrupt" in (tmp_path / "stderr").read_text()  # the launching process was interrupted
            assert "[1/2]" not in (tmp_path / "stderr").read_text()  # not a sweep that went on without its workers
        else:
            launcher.kill()
            launcher.wait(timeout=60)
        assert _gone(workers), f"workers still running after the sweep ended ({how})"
