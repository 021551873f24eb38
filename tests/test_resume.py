"""Picking a run up again: a killed training stage resumes from its checkpoints, finished stages stay done.

The end-to-end tests run the real command; a shared uninterrupted run is the reference they must match.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmexp.atomic import replace_atomically

from .conftest import read_results, run_llmexp

COMMAND = [
    "pipeline=technique_only", "technique.max_steps=60", "technique.checkpoint_every=20", "technique.log_every=5",
    "data.seq_len=32", "parallelism.micro_batch=4", "parallelism.global_batch=8",
]


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("resume")
    result = run_llmexp(*COMMAND, "hydra.run.dir=clean", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "clean"


def metrics(run_dir: Path) -> dict:
    return read_results(run_dir)["stages"]["pretrain"]["metrics"]


def log_rows(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "pretrain/train_log.jsonl").read_text().splitlines()]


def newest_checkpoint_passed(run_dir: Path, process: subprocess.Popen, timeout: float = 300) -> int:
    """Wait until a checkpoint of step >= 20 exists and the log has a row past it; return its step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run finished before it could be killed"
        steps = [int(p.name[5:13]) for p in (run_dir / "pretrain/checkpoints").glob("step-*.ckpt")]
        log = run_dir / "pretrain/train_log.jsonl"
        complete = log.read_text().split("\n")[:-1] if log.exists() else []  # a line is whole once its newline is
        logged = [json.loads(line)["step"] for line in complete]
        if steps and max(steps) >= 20 and logged and logged[-1] > max(steps):
            return max(steps)
        time.sleep(0.02)
    raise AssertionError("no checkpoint of step >= 20 appeared in time")


def test_a_failed_checkpoint_write_leaves_the_previous_file_and_no_temporary_one(tmp_path):
    target = tmp_path / "step-00000002.ckpt"
    target.write_bytes(b"previous")

    def write_then_fail(handle):
        handle.write(b"half a checkpoint")
        raise OSError("No space left on device")

    with pytest.raises(OSError):
        replace_atomically(target, write_then_fail, binary=True)
    assert target.read_bytes() == b"previous"
    assert list(tmp_path.iterdir()) == [target]


def test_a_killed_run_resumes_where_its_checkpoint_left_off(tmp_path, clean_run):
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "llmexp", *COMMAND, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        checkpoint_step = newest_checkpoint_passed(run_dir, process)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert log_rows(run_dir)[-1]["step"] > checkpoint_step  # rows the resumed run must drop

    result = run_llmexp(*COMMAND, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed, clean = metrics(run_dir), metrics(clean_run)
    assert resumed["final_loss"] == pytest.approx(clean["final_loss"], abs=1e-4)
    assert checkpoint_step <= resumed["resumed_from_step"] < 60
    assert resumed["train_tokens"] == clean["train_tokens"] and resumed["steps"] == 60
    steps = [row["step"] for row in log_rows(run_dir)]
    assert steps == list(range(5, 61, 5))  # strictly increasing, no restart from zero, ends at 60
    for row, reference in zip(log_rows(run_dir), log_rows(clean_run)):
        assert row["loss"] == pytest.approx(reference["loss"], abs=1e-4)


def test_a_truncated_checkpoint_is_skipped_for_the_one_before_it(tmp_path, clean_run):
    run_dir = tmp_path / "run"
    shutil.copytree(clean_run, run_dir)
    (run_dir / "results.json").unlink()  # as if killed after the last checkpoint, before the stage was recorded
    newest = run_dir / "pretrain/checkpoints/step-00000060.ckpt"
    with open(newest, "r+b") as handle:
        handle.truncate(newest.stat().st_size // 2)

    result = run_llmexp(*COMMAND, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step-00000060.ckpt cannot be resumed (it does not load" in " ".join(result.stderr.split())
    assert metrics(run_dir)["resumed_from_step"] == 40
    assert metrics(run_dir)["final_loss"] == pytest.approx(metrics(clean_run)["final_loss"], abs=1e-4)
    assert [row["step"] for row in log_rows(run_dir)] == list(range(5, 61, 5))


def test_rerunning_a_finished_run_in_its_directory_runs_nothing_again(tmp_path, clean_run):
    run_dir = tmp_path / "run"
    shutil.copytree(clean_run, run_dir)
    log = run_dir / "pretrain/train_log.jsonl"
    before = (log.read_bytes(), log.stat().st_mtime_ns)

    result = run_llmexp(*COMMAND, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pretrain: completed by an earlier attempt at this run directory" in " ".join(result.stderr.split())
    assert (log.read_bytes(), log.stat().st_mtime_ns) == before
    record = read_results(run_dir)
    assert record["status"] == "completed"
    assert record["stages"]["pretrain"]["metrics"] == metrics(clean_run)


def test_a_finished_stage_hands_its_saved_model_on_and_a_new_config_starts_afresh(tmp_path):
    args = ["technique.max_steps=20", "technique.checkpoint_every=10", "evaluation.limit=8", "data.seq_len=32",
            "parallelism.micro_batch=4", "parallelism.global_batch=8", "hydra.run.dir=run"]
    first = run_llmexp(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    results = tmp_path / "run/results.json"
    record = json.loads(results.read_text())
    evaluated = record["stages"].pop("evaluate")  # as if killed while evaluating
    record["status"] = "running"
    results.write_text(json.dumps(record))
    log = tmp_path / "run/pretrain/train_log.jsonl"
    trained = log.read_bytes()

    second = run_llmexp(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "pretrain: completed by an earlier attempt" in " ".join(second.stderr.split())
    assert log.read_bytes() == trained
    scores = read_results(tmp_path / "run")["stages"]["evaluate"]["metrics"]
    del scores["eval_peak_memory_mb"], evaluated["metrics"]["eval_peak_memory_mb"]  # the machine's, not the model's
    assert scores == evaluated["metrics"]  # the same model

    third = run_llmexp(*args, "technique.lr=0.02", cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "completed by an earlier attempt" not in third.stderr
    assert "different configuration" in third.stderr
    assert read_results(tmp_path / "run")["stages"]["pretrain"]["metrics"]["resumed_from_step"] == 0
    assert log.read_bytes() != trained
