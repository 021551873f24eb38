"""Parallelism executed on torch.distributed: real 2-process gloo jobs on CPU, checked against one process.

The `llmexp` runs start their ranks themselves (``llmexp.training.distributed``), as a user's run does.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from llmexp.training import preemption
from llmexp.configuration.compose import compose_config
from llmexp.training.distributed import run_job

from .conftest import read_results, run_llmexp
from .test_training import context, log_rows, run

# 2 layers, 32-token blocks, 6 optimiser steps of 16 blocks, checkpoints at steps 3 and 6; the
# warm-up is short enough for the loss to move and for gradient clipping to act.
COMMAND = [
    "pipeline=technique_only", "model.num_layers=2", "data.seq_len=32", "technique.max_steps=6", "technique.log_every=1",
    "technique.warmup_steps=2", "technique.checkpoint_every=3", "technique.keep_checkpoints=2",
]
LAYOUTS = ["dp2", "fsdp2", "tp2"]  # DDP, FSDP2, tensor parallel: 2 ranks each, micro-batches of 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One run per layout (and parallelism=single, micro-batches of 16) of the same command, in one directory."""
    cwd = tmp_path_factory.mktemp("parallel")
    for layout in ["single", *LAYOUTS]:
        result = run_llmexp(*COMMAND, f"parallelism={layout}", f"hydra.run.dir={layout}", cwd=cwd)
        assert result.returncode == 0, f"{layout}: {result.stderr[-3000:]}"
    return cwd


def metrics(run_dir: Path) -> dict:
    return read_results(run_dir)["stages"]["pretrain"]["metrics"]


def losses(run_dir: Path) -> list:
    return [json.loads(line)["loss"] for line in (run_dir / "pretrain/train_log.jsonl").read_text().splitlines()]


def files(run_dir: Path) -> set:
    return {str(path.relative_to(run_dir)) for path in run_dir.rglob("*") if path.is_file()}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_ranks_train_as_one_process_does(runs, layout):
    single, parallel = runs / "single", runs / layout
    expected = losses(single)
    assert expected[-1] < expected[0] - 0.5  # it learned: the comparison is of a moving loss
    assert losses(parallel) == pytest.approx(expected, abs=1e-4)
    assert metrics(parallel)["final_loss"] == pytest.approx(metrics(single)["final_loss"], abs=1e-4)
    assert metrics(parallel)["train_tokens"] == metrics(single)["train_tokens"] == 6 * 16 * 32
    assert metrics(parallel)["steps"] == 6 and metrics(parallel)["tokens_per_s"] > 0
    weights, reference = (load_file(run / "pretrain/model/model.safetensors") for run in (parallel, single))
    assert weights.keys() == reference.keys()
    # Adam turns float rounding in near-zero gradients into small update differences: 1e-3 of weights ~0.1-1
    assert max((weights[name] - reference[name]).abs().max().item() for name in reference) < 1e-3


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rank_zero_alone_writes_the_run_directory(runs, layout):
    """Rank 1 writes nothing: the run directory holds what a one-process run's holds, once."""
    parallel = runs / layout
    assert files(parallel) == files(runs / "single")
    assert sorted(p.name for p in (parallel / "pretrain/checkpoints").iterdir()) == [
        "step-00000003.ckpt", "step-00000006.ckpt"]
    assert [row.split(",")[0] for row in (parallel / "pretrain/metrics.csv").read_text().splitlines()[1:]] == [
        str(step) for step in range(1, 7)]  # one logger row per step, not one per rank
    assert read_results(parallel)["status"] == "completed"


@pytest.mark.parametrize("layout", ["dp2", "fsdp2"])
def test_a_two_rank_run_resumes_from_its_checkpoint(runs, tmp_path, layout):
    """DDP restores through Lightning's checkpoint IO, FSDP2 through the ModelParallel strategy's own load."""
    run_dir = tmp_path / layout
    shutil.copytree(runs / layout, run_dir)
    (run_dir / "results.json").unlink()  # as if killed after step 4 was logged, before step 6's checkpoint
    (run_dir / "pretrain/checkpoints/step-00000006.ckpt").unlink()
    log = run_dir / "pretrain/train_log.jsonl"
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:4]))

    result = run_llmexp(*COMMAND, f"parallelism={layout}", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed, clean = metrics(run_dir), metrics(runs / layout)
    assert resumed["resumed_from_step"] == 3
    assert resumed["final_loss"] == pytest.approx(clean["final_loss"], abs=1e-5)
    assert resumed["train_tokens"] == clean["train_tokens"]
    assert losses(run_dir) == pytest.approx(losses(runs / layout), abs=1e-5)


def test_a_ranks_user_error_is_one_paragraph_and_exit_code_2(tmp_path):
    # The plan reads the corpus (it has a document) but cannot count its tokens: each rank's tokenizer finds 5.
    (tmp_path / "note.txt").write_text("A short note.\n")
    result = run_llmexp(*COMMAND, "data=text", "data.paths=[note.txt]", "parallelism=dp2", "hydra.run.dir=run",
                        cwd=tmp_path)
    message = "data.paths holds 5 tokens, fewer than one block of data.seq_len=32; add text or lower data.seq_len."
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if "data.paths" in line] == [f"error: {message}"]
    assert "Traceback" not in result.stderr and "torch/distributed" not in result.stderr  # nor the launcher's logs
    record = read_results(tmp_path / "run")
    assert (record["status"], record["reason"], record["stages"]) == ("failed", message, {})


def test_a_ranks_crash_shows_its_traceback(tmp_path):
    # hidden 128 over 3 heads: transformers refuses the model while the ranks build it
    result = run_llmexp(*COMMAND, "model.num_attention_heads=3", "parallelism=dp2", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 1
    message = " ".join(result.stderr.split())
    assert "of parallelism=dp2 failed: Traceback (most recent call last)" in message
    assert 'models/loading.py", line' in message and "not a multiple of the number of attention heads (3)" in message


def test_a_layout_over_more_nodes_than_this_machine_is_refused(tmp_path):
    result = run_llmexp(*COMMAND, "parallelism=dp2", "parallelism.nodes=2", "parallelism.devices_per_node=1",
                        "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 2
    assert "parallelism.nodes=2" in result.stderr and "hydra/launcher=slurm" in result.stderr


# -- preemption: a checkpoint at the step boundary, then a requeue -------------------------------


class SignalAt(L.Callback):
    """Sends SIGUSR2 to this process once, when step ``step`` is done on rank ``rank`` (``delay`` seconds later)."""

    def __init__(self, step: int, rank: int = 0, delay: float = 0.0):
        self.step, self.rank, self.delay, self.sent = step, rank, delay, False

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step and trainer.global_rank == self.rank and not self.sent:
            self.sent = True
            if self.delay:
                threading.Timer(self.delay, os.kill, (os.getpid(), signal.SIGUSR2)).start()
            else:
                os.kill(os.getpid(), signal.SIGUSR2)  # handled before os.kill returns to this step


@pytest.fixture
def requeue(monkeypatch):
    """A requeue handler for SIGUSR2 that records the signal and exits, as a launcher's does; restored after."""
    requeued = []

    def handler(signum, frame):
        requeued.append(signum)
        raise SystemExit(0)

    previous = signal.getsignal(signal.SIGUSR2)
    monkeypatch.setattr(preemption, "_signum", None)  # a fresh process has had no signal
    preemption.install(signal.SIGUSR2, handler)
    yield requeued
    signal.signal(signal.SIGUSR2, previous)


def test_a_stop_signal_checkpoints_the_step_and_the_requeued_run_resumes_from_it(tmp_path, requeue, monkeypatch):
    overrides = ("technique.checkpoint_every=0",)  # no periodic checkpoints: the one there is, the signal made
    ctx = context(tmp_path / "cut" / "pretrain", *overrides)
    with pytest.raises(SystemExit):
        run(ctx, callbacks=[SignalAt(step=3)])
    assert requeue == [signal.SIGUSR2]
    assert [p.name for p in (ctx.stage_dir / "checkpoints").iterdir()] == ["step-00000003.ckpt"]
    assert [row["step"] for row in log_rows(ctx.stage_dir)] == [1, 2, 3]

    monkeypatch.setattr(preemption, "_signum", None)  # the requeued job is a new process
    _, resumed = run(ctx)
    clean_ctx = context(tmp_path / "clean" / "pretrain", *overrides)
    _, clean = run(clean_ctx)
    assert resumed["resumed_from_step"] == 3
    assert resumed["final_loss"] == pytest.approx(clean["final_loss"], abs=1e-6)
    assert log_rows(ctx.stage_dir) == log_rows(clean_ctx.stage_dir)


def _preempted_job(stage_dir: Path):
    """dp2 with the stop signal reaching rank 1 after step 3 and rank 0 half a second later, as a cluster's
    signal reaches a job's tasks at about the same time; returns the steps rank 0 logged and the checkpoints."""
    import torch.distributed as dist

    preemption.install(signal.SIGUSR2, _exit_as_requeued)
    signals = SignalAt(step=3, rank=1) if dist.get_rank() == 1 else SignalAt(step=3, rank=0, delay=0.5)
    ctx = context(stage_dir, "parallelism=dp2", "technique.checkpoint_every=0")
    with pytest.raises(SystemExit):
        run(ctx, callbacks=[signals])
    dist.barrier()
    return [row["step"] for row in log_rows(stage_dir)], sorted(p.name for p in (stage_dir / "checkpoints").iterdir())


def _exit_as_requeued(signum, frame):
    raise SystemExit(0)


def test_ranks_stop_after_the_same_step_when_the_signal_reaches_them_apart(tmp_path):
    layout = compose_config(["parallelism=dp2"])
    steps, checkpoints = run_job(layout, _preempted_job, tmp_path / "pretrain")
    assert steps == [1, 2, 3]  # rank 0 had no signal yet after step 3, and stopped there with rank 1
    assert checkpoints == ["step-00000003.ckpt"]
