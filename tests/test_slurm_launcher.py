"""``hydra/launcher=slurm`` against a real Slurm on localhost (tests/conftest.py ``slurm_cluster``).

node1 carries the feature h100 and gres gpu:h100:2, node2 a100 and gpu:a100:2 (fake GPUs, so
jobs compute on CPU: ``hardware.accelerator=cpu``). Slurm itself decides where each job runs;
results.json records where it did.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import read_results, run_llmexp

pytestmark = pytest.mark.slow

SLURM = ["-m", "hydra/launcher=slurm", "cluster=localhost", "hardware.accelerator=cpu"]


@pytest.fixture
def corrupt_checkpoint(tiny_checkpoint, tmp_path) -> Path:
    """Passes every check before submission (config, tokenizer, a weights file) and fails to load in the job."""
    path = tmp_path / "corrupt"
    shutil.copytree(tiny_checkpoint, path)
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"not a torch checkpoint\n" * 200)
    return path


def test_a_sweep_across_generations_runs_each_job_on_its_gpu_node(slurm_cluster, tiny_checkpoint, corrupt_checkpoint, tmp_path):
    sweep = tmp_path / "sweep"
    done = run_llmexp(
        *SLURM, "hardware=h100,a100_80g,b200", "technique=evaluate", f"model.path={tiny_checkpoint},{corrupt_checkpoint}",
        "technique.limit=4", f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=slurm_cluster,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = {}
    for job in json.loads((sweep / "jobs.json").read_text()):
        chosen = dict(override.split("=", 1) for override in job["overrides"])
        jobs[(f"hardware={chosen['hardware']}", chosen["model.path"] == str(corrupt_checkpoint))] = job
    assert len(jobs) == 6

    for hardware, node, gpu_type in (("hardware=h100", "node1", "h100"), ("hardware=a100_80g", "node2", "a100")):
        job = jobs[(hardware, False)]
        assert job["status"] == "completed" and job["node"] == node, job
        assert job["resources"]["gres"] == f"gpu:{gpu_type}:1" and job["resources"]["constraint"] == gpu_type
        results = read_results(job["run_dir"])
        slurm = results["environment"]["slurm"]
        assert results["status"] == "completed" and slurm["node"] == node
        assert f"{slurm['array_job_id']}_{slurm['array_task_id']}" == job["slurm_job_id"]
        assert slurm["gpus"] in ("0", "1") and slurm["cuda_visible_devices"] == slurm["gpus"]
        assert results["stages"]["evaluate"]["metrics"]["multiple_choice_n"] == 4

        failed = jobs[(hardware, True)]
        assert failed["status"] == "failed" and failed["node"] == node
        assert failed["reason"].startswith("UnpicklingError") and "error.log" in failed["reason"]
        assert read_results(failed["run_dir"])["status"] == "failed"

    for corrupt in (False, True):  # b200: no node of this cluster has one, so never submitted
        skipped = jobs[("hardware=b200", corrupt)]
        assert skipped["status"] == "skipped" and skipped["slurm_job_id"] is None
        assert "hardware=b200 has no placement in cluster=localhost" in skipped["reason"]
        assert read_results(skipped["run_dir"])["status"] == "skipped"


def test_a_dry_run_prints_each_arrays_sbatch_options_and_submits_nothing(slurm_cluster, tmp_path):
    sweep = tmp_path / "sweep"
    done = run_llmexp(
        *SLURM, "hardware=h100,a100_80g", "seed=0,1", "technique.max_steps=3", "hydra.launcher.dry_run=true",
        f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=slurm_cluster,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    arrays = done.stdout.split("job array of ")[1:]
    assert len(arrays) == 2 and all(array.startswith("2:") for array in arrays)
    h100, a100 = sorted(arrays, key=lambda text: "gpu:h100" not in text)
    for text, gpu in ((h100, "h100"), (a100, "a100")):
        for line in (f"--constraint={gpu}", f"--gres=gpu:{gpu}:1", "--partition=gpu", "--array=0-1%2", "--signal=USR2@120"):
            assert f"#SBATCH {line}" in text, (line, text)
    assert "nothing submitted" in done.stdout
    assert not sweep.exists()
    queue = subprocess.run(["squeue", "-h"], capture_output=True, text=True, env={**os.environ, **slurm_cluster})
    assert queue.returncode == 0 and queue.stdout.strip() == ""


def gather(sweep: Path, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return run_llmexp("gather", str(sweep), cwd=cwd, env=env)


def test_a_detached_training_job_preempted_mid_run_requeues_and_resumes(slurm_cluster, tmp_path):
    sweep = tmp_path / "sweep"
    done = run_llmexp(
        *SLURM, "hardware=h100", "technique.max_steps=100", "technique.log_every=5", "technique.checkpoint_every=25",
        "evaluation.limit=4", "hydra.launcher.detach=true", f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=slurm_cluster,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"llmexp gather {sweep}" in done.stderr
    (job,) = json.loads((sweep / "submitted.json").read_text())["jobs"]
    assert gather(sweep, slurm_cluster, tmp_path).returncode == 3  # not ended yet

    log = Path(job["run_dir"]) / "pretrain" / "train_log.jsonl"
    deadline = time.monotonic() + 180
    while not (log.is_file() and any(json.loads(row)["step"] >= 30 for row in log.read_text().splitlines())):
        assert time.monotonic() < deadline, "training did not reach step 30"
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR2", job["slurm_job_id"]], check=True, env={**os.environ, **slurm_cluster})

    deadline = time.monotonic() + 300
    while (gathered := gather(sweep, slurm_cluster, tmp_path)).returncode == 3:
        assert time.monotonic() < deadline, gathered.stdout
        time.sleep(2)
    assert gathered.returncode == 0, gathered.stdout + gathered.stderr
    (outcome,) = json.loads((sweep / "jobs.json").read_text())
    assert outcome["status"] == "completed" and outcome["restarts"] == 1
    results = read_results(job["run_dir"])
    metrics = results["stages"]["pretrain"]["metrics"]
    assert results["environment"]["slurm"]["restart_count"] == "1"
    assert metrics["resumed_from_step"] >= 30 and metrics["steps"] == 100
    steps = [json.loads(row)["step"] for row in log.read_text().splitlines() if "loss" in json.loads(row)]
    assert steps == list(range(5, 101, 5))  # each step logged once: the resumed run picked up where the stop was


def test_a_two_node_data_parallel_job_trains_as_one_process_would(slurm_cluster, tmp_path):
    layout = ["parallelism=dp2", "parallelism.nodes=2", "parallelism.devices_per_node=1"]
    job = ["technique.max_steps=4", "technique.save_model=false", "evaluation.tasks=[perplexity]", "evaluation.limit=4"]
    sweep = tmp_path / "sweep"
    done = run_llmexp(*SLURM, "hardware=cpu", *layout, *job, f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=slurm_cluster)
    assert done.returncode == 0, done.stderr[-3000:]
    (outcome,) = json.loads((sweep / "jobs.json").read_text())
    assert outcome["status"] == "completed" and outcome["resources"]["nodes"] == 2, outcome
    results = read_results(outcome["run_dir"])
    assert results["environment"]["slurm"]["nodelist"] == "node[1-2]"

    single = run_llmexp(*job, f"hydra.run.dir={tmp_path / 'single'}", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    expected = read_results(tmp_path / "single")["stages"]["pretrain"]["metrics"]["final_loss"]
    assert results["stages"]["pretrain"]["metrics"]["final_loss"] == pytest.approx(expected, abs=1e-4)
