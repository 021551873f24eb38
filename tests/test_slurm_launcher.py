"""``hydra/launcher=slurm`` against a real Slurm on localhost (tests/conftest.py ``slurm_cluster``).

node1 carries the feature h100 and gres gpu:h100:2, node2 a100 and gpu:a100:2 (fake GPUs, so
jobs compute on CPU: ``hardware.accelerator=cpu``). Slurm itself decides where each job runs;
results.json records where it did, and ``sacct`` how Slurm saw each job end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from llmexp.launchers import slurm_localhost
from tests.conftest import REPO, jobs_of, read_results, run_llmexp, start_llmexp, wait_for

pytestmark = pytest.mark.slow

SLURM = ["-m", "hydra/launcher=slurm", "cluster=localhost", "hardware.accelerator=cpu"]
LONG_TRAINING = ["hardware=h100", "technique.max_steps=2000", "technique.log_every=5"]  # minutes of training
SCRIPTS = REPO / "llmexp" / "launchers" / "slurm-localhost"


def slurm(env: dict, *command: str) -> str:
    """A Slurm client command's output (it fails the test if the command fails)."""
    return subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, check=True).stdout


def sacct(env: dict, job_id: str) -> str:
    """``State ExitCode`` of a job once accounting has its final state (it lags the controller by a few seconds)."""
    deadline = time.monotonic() + 60
    while True:
        row = slurm(env, "sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State,ExitCode").split()
        row = [line for line in row if line.startswith(f"{job_id}|")]
        if row and row[0].split("|")[1] not in ("PENDING", "RUNNING", "REQUEUED"):
            return " ".join(row[0].split("|")[1:])
        assert time.monotonic() < deadline, f"sacct has no final state for {job_id}: {row}"
        time.sleep(1)


def results_of(run_dir: Path):
    try:
        return read_results(run_dir)
    except (OSError, ValueError):
        return None


def cancel_all(sweep: Path, env: dict) -> None:
    """Whatever a failed test left of its sweep in Slurm is cancelled: nothing runs on after it."""
    ids = {job["slurm_job_id"].split("_")[0] for job in jobs_of(sweep) if job["slurm_job_id"]}
    if ids:
        subprocess.run(["scancel", *ids], env={**os.environ, **env}, capture_output=True)


@pytest.fixture
def sweep(slurm_cluster, tmp_path) -> Path:
    """The test's sweep directory; whatever the test leaves of its jobs in Slurm is cancelled after it."""
    yield tmp_path / "sweep"
    cancel_all(tmp_path / "sweep", slurm_cluster)


def gather(sweep: Path, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return run_llmexp("gather", str(sweep), cwd=cwd, env=env)


def gathered(sweep: Path, env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``llmexp gather`` again and again until every job has ended (exit code other than 3)."""
    deadline = time.monotonic() + timeout
    while (done := gather(sweep, env, cwd)).returncode == 3:
        assert time.monotonic() < deadline, done.stdout
        time.sleep(2)
    return done


def test_stop_undoes_what_start_did_and_leaves_every_other_cluster_running(slurm_cluster):
    """A second, throw-away cluster beside the session's: its stop.sh reverts exactly its own changes."""
    hosts = Path("/etc/hosts").read_text()
    etc_conf = Path("/etc/slurm/slurm.conf")
    etc_conf_before = os.readlink(etc_conf) if etc_conf.is_symlink() else etc_conf.exists()
    place = Path(tempfile.mkdtemp(prefix="llmexp-undo-"))  # munged wants every directory above its socket open to all
    place.chmod(0o755)
    base, link = place / "cluster", place / "etc" / "slurm" / "slurm.conf"
    env = {**os.environ, "BASE": str(base), "NODES": "1", "WITH_DBD": "0", "NODE_PREFIX": "llmexp-undo-node",
           "ETC_CONF": str(link), "CTLD_PORT": "17817", "SLURMD_PORT0": "17830", "SLURM_CONF": str(base / "etc" / "slurm.conf")}
    try:
        started = subprocess.run(["bash", str(SCRIPTS / "start.sh")], env=env, capture_output=True, text=True, timeout=600)
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        assert f"127.0.0.1 llmexp-undo-node1  # slurm-localhost {base}" in Path("/etc/hosts").read_text()
        assert os.readlink(link) == str(base / "etc" / "slurm.conf")
        assert slurm(env, "sinfo", "-h", "-N", "-o", "%N").split() == ["llmexp-undo-node1"] * 3  # its 3 partitions
    finally:
        stopped = subprocess.run(["bash", str(SCRIPTS / "stop.sh")], env=env, capture_output=True, text=True, timeout=120)
        remains = sorted(str(path) for path in place.rglob("*"))
        shutil.rmtree(place)
    assert stopped.returncode == 0, stopped.stderr
    assert Path("/etc/hosts").read_text() == hosts
    assert remains == []  # its state, logs, the symlink and the directories made for it
    conf = f"SLURM_CONF={base / 'etc' / 'slurm.conf'}".encode()
    left = [p for p in Path("/proc").glob("[0-9]*") if conf in _environ(p)]
    assert left == [], left
    assert (os.readlink(etc_conf) if etc_conf.is_symlink() else etc_conf.exists()) == etc_conf_before
    assert "node1" in slurm(slurm_cluster, "sinfo", "-h", "-N", "-o", "%N")  # the session's cluster runs on

    controller = (slurm_localhost.base() / "run" / "slurmctld.pid").read_text()
    with slurm_localhost.localhost_slurm() as environment:  # one is running: used, not restarted, not stopped
        assert environment == slurm_cluster
    assert slurm_localhost.running() and (slurm_localhost.base() / "run" / "slurmctld.pid").read_text() == controller


def _environ(process: Path) -> bytes:
    try:
        return (process / "environ").read_bytes()
    except OSError:
        return b""


@pytest.fixture
def awkward_checkpoint(tiny_checkpoint, tmp_path) -> Path:
    """The tiny checkpoint at a path with brackets, quotes, '=', spaces and non-ASCII."""
    path = tmp_path / 'run[3] é "q" x=y'
    shutil.copytree(tiny_checkpoint, path)
    return path


def test_a_sweep_across_generations_runs_each_job_on_its_gpu_node(slurm_cluster, sweep, awkward_checkpoint, tmp_path):
    """Placement by hardware, and user text (brackets, quotes, rich tags) printed and recorded literally."""
    done = run_llmexp(
        *SLURM, "hardware=h100,a100_80g,b200", "technique=evaluate", f"model.path='{awkward_checkpoint}'",
        "technique.tasks=[perplexity]", "technique.limit=2", "tracker.tags=['[bold]','[/]',':smile:']",
        f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=slurm_cluster,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = {dict(o.split("=", 1) for o in job["overrides"])["hardware"]: job for job in jobs_of(sweep)}
    assert set(jobs) == {"h100", "a100_80g", "b200"}
    for hardware, node, gpu_type in (("h100", "node1", "h100"), ("a100_80g", "node2", "a100")):
        job = jobs[hardware]
        assert job["status"] == "completed" and job["node"] == node and job["slurm_state"] == "COMPLETED", job
        assert job["resources"]["gres"] == f"gpu:{gpu_type}:1" and job["resources"]["constraint"] == gpu_type
        results = read_results(job["run_dir"])
        slurm_env = results["environment"]["slurm"]
        assert results["status"] == "completed" and slurm_env["node"] == node
        assert f"{slurm_env['array_job_id'] or slurm_env['job_id']}" == job["slurm_job_id"].split("_")[0]
        assert slurm_env["gpus"] in ("0", "1") and slurm_env["cuda_visible_devices"] == slurm_env["gpus"]
        assert results["config"]["model"]["path"] == str(awkward_checkpoint)
        assert results["config"]["tracker"]["tags"] == ["[bold]", "[/]", ":smile:"]
        assert results["stages"]["evaluate"]["metrics"]["perplexity_n"] == 2
        assert f"#{job['num']} {' '.join(job['overrides'])} -> Slurm job {job['slurm_job_id']}" in done.stderr
    skipped = jobs["b200"]  # no node of this cluster has one, so never submitted
    assert skipped["status"] == "skipped" and skipped["slurm_job_id"] is None
    assert "hardware=b200 has no placement in cluster=localhost" in skipped["reason"]
    assert read_results(skipped["run_dir"])["status"] == "skipped"
    ids = ",".join(job["slurm_job_id"] for job in jobs.values() if job["slurm_job_id"])
    assert slurm(slurm_cluster, "squeue", "-h", "-j", ids).strip() == ""  # it returned once Slurm lists none of them


def dry_run_scripts(stdout: str) -> dict:
    """The sbatch scripts a dry run printed, by their heading ("a single job", "a job array of 2")."""
    scripts = {}
    for chunk in stdout.split("sbatch script ")[1:]:
        heading, _, rest = chunk.partition("\n")
        lines = []
        for line in rest.splitlines():
            if line.startswith("  "):
                break
            lines.append(line)
        scripts[heading.split(", ", 1)[1].rstrip(":")] = "\n".join(lines).rstrip("\n")
    return scripts


def test_the_dry_run_prints_the_sbatch_scripts_that_are_then_submitted(slurm_cluster, sweep, tiny_checkpoint, tmp_path):
    # a100_80g and a100_40g are placed alike (one array of 2); h100 alone is a plain job, as submitit submits it
    points = [*SLURM, "hardware=h100,a100_80g,a100_40g", "technique=evaluate", f"model.path={tiny_checkpoint}",
              "technique.tasks=[perplexity]", "technique.limit=1", f"hydra.sweep.dir={sweep}"]
    dry = run_llmexp(*points, "hydra.launcher.dry_run=true", cwd=tmp_path, env=slurm_cluster)
    assert dry.returncode == 0, dry.stderr[-3000:]
    scripts = dry_run_scripts(dry.stdout)
    assert set(scripts) == {"a single job", "a job array of 2"}, dry.stdout
    assert "--array" not in scripts["a single job"] and "#SBATCH --gres=gpu:h100:1" in scripts["a single job"]
    assert "#SBATCH --array=0-1%2" in scripts["a job array of 2"] and "#SBATCH --gres=gpu:a100:1" in scripts["a job array of 2"]
    assert "nothing submitted" in dry.stdout and not sweep.exists()
    assert str(tmp_path) not in slurm(slurm_cluster, "squeue", "-h", "-o", "%Z")  # no job works here

    submitted = run_llmexp(*points, "hydra.launcher.detach=true", cwd=tmp_path, env=slurm_cluster)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    files = sorted((sweep / ".submitit").glob("*/*_submission.sh"))
    assert sorted(f.read_text().rstrip("\n") for f in files) == sorted(scripts.values())
    slurm(slurm_cluster, "scancel", *{job["slurm_job_id"].split("_")[0] for job in jobs_of(sweep)})
    assert gathered(sweep, slurm_cluster, tmp_path).returncode == 1  # cancelled: failed


def test_a_sweep_stopped_after_its_first_submission_records_every_job_and_says_how_to_reach_them(
        slurm_cluster, sweep, tiny_checkpoint, tmp_path):
    done = run_llmexp(
        *SLURM, "hardware=h100,a100_80g", "cluster.hardware.a100_80g.partition=no_such_partition", "technique=evaluate",
        f"model.path={tiny_checkpoint}", "technique.tasks=[perplexity]", "technique.limit=1", f"hydra.sweep.dir={sweep}",
        cwd=tmp_path, env=slurm_cluster,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    message = " ".join(done.stderr.split())
    h100, a100 = jobs_of(sweep)
    assert "Slurm refused the submission" in message and "no_such_partition" in message.lower().replace("'", "")
    assert f"`llmexp gather {sweep}`" in message and f"`scancel {h100['slurm_job_id']}`" in message
    assert h100["slurm_job_id"] and h100["status"] == "pending" and Path(h100["stderr"]).parent.is_dir()
    assert a100["slurm_job_id"] is None and a100["status"] == "failed" and a100["reason"].startswith("never submitted")

    outcome = gathered(sweep, slurm_cluster, tmp_path)
    assert outcome.returncode == 1, outcome.stdout  # the job that was never submitted counts as failed
    assert [job["status"] for job in jobs_of(sweep)] == ["completed", "failed"]


def test_an_interrupted_sweep_says_how_to_reach_its_job_and_gather_turns_a_job_killed_mid_stage_into_failed(
        slurm_cluster, sweep, tmp_path):
    launcher = start_llmexp(*SLURM, *LONG_TRAINING, f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=slurm_cluster)
    try:
        (job,) = wait_for(lambda: [j for j in jobs_of(sweep) if j["status"] == "running"], "the job to run")
        wait_for(lambda: results_of(sweep / "0"), "results.json at the job's start")
        launcher.send_signal(signal.SIGINT)
        _, stderr = launcher.communicate(timeout=60)
    finally:
        launcher.kill()
    assert launcher.returncode == 130, stderr[-3000:]
    message = " ".join(stderr.split())
    assert f"`llmexp gather {sweep}`" in message
    (scancel,) = re.findall(r"`(scancel [^`]+)`", message)
    assert scancel == f"scancel {job['slurm_job_id']}" and job["node"] == "node1"

    running = gather(sweep, slurm_cluster, tmp_path)
    assert running.returncode == 3, running.stdout + running.stderr
    assert "1 of 1 jobs have not ended yet" in " ".join(running.stderr.split())
    assert results_of(job["run_dir"])["status"] == "running"  # written at the start, before the first stage ends

    slurm(slurm_cluster, *scancel.split())
    outcome = gathered(sweep, slurm_cluster, tmp_path)
    assert outcome.returncode == 1, outcome.stdout
    (ended,) = jobs_of(sweep)
    assert ended["status"] == "failed" and ended["node"] == "node1" and ended["slurm_state"].startswith("CANCELLED")
    assert ended["reason"].startswith("Slurm: CANCELLED") and "exit code" in ended["reason"]
    results = read_results(job["run_dir"])
    assert results["status"] == "failed" and results["reason"] == ended["reason"]


@pytest.mark.parametrize("kill", ["scancel", "sigkill"])
def test_a_job_killed_before_its_first_stage_ends_is_reported_failed_within_15_s(slurm_cluster, sweep, tmp_path, kill):
    """scancel, or SIGKILL from outside Slurm (what the OOM killer does): Slurm's state and exit code are the reason."""
    launcher = start_llmexp(*SLURM, *LONG_TRAINING, f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=slurm_cluster)
    try:
        results = wait_for(lambda: results_of(sweep / "0"), "results.json at the job's start")
        assert results["status"] == "running" and results["stages"] == {}
        assert results["environment"]["slurm"]["node"] == "node1" and results["config"]["technique"]["max_steps"] == 2000
        (job,) = wait_for(lambda: [j for j in jobs_of(sweep) if j["node"] == "node1"], "jobs.json to name the node")
        job_id = job["slurm_job_id"]
        assert results["environment"]["slurm"]["job_id"] == job_id
        wait_for(lambda: (sweep / "0" / "pretrain" / "train_log.jsonl").is_file(), "training to start")
        killed = time.monotonic()
        if kill == "scancel":
            slurm(slurm_cluster, "scancel", job_id)
        else:
            rows = slurm(slurm_cluster, "scontrol", "listpids", job_id).splitlines()[1:]
            os.kill(int(next(row.split()[0] for row in rows if row.split()[2] == "0")), signal.SIGKILL)  # the step's python
        _, stderr = launcher.communicate(timeout=120)
        noticed = time.monotonic() - killed
    finally:
        launcher.kill()
    assert launcher.returncode == 1, stderr[-3000:]
    assert noticed < 15, f"the dead job was reported {noticed:.1f} s after it was killed"
    (ended,) = jobs_of(sweep)
    expected = "Slurm: CANCELLED by 0" if kill == "scancel" else "Slurm: FAILED (exit code "
    assert ended["status"] == "failed" and ended["reason"].startswith(expected), ended
    assert f"[1/1] #0 {' '.join(ended['overrides'])}: failed ({ended['reason']})" in stderr
    results = read_results(sweep / "0")
    assert results["status"] == "failed" and results["reason"] == ended["reason"]
    assert sacct(slurm_cluster, job_id).split()[0] == ("CANCELLED" if kill == "scancel" else "FAILED")


def test_a_failed_run_fails_its_slurm_job_and_stops_an_afterok_chain(slurm_cluster, sweep, tiny_checkpoint, tmp_path):
    blocked = sweep / "1" / "evaluate"  # a file where point 1's stage directory goes, made on the node: a runtime failure
    done = run_llmexp(
        *SLURM, "hardware=h100", "technique=evaluate", f"model.path={tiny_checkpoint}", "technique.tasks=[perplexity]",
        "technique.limit=1", "seed=0,1", f"cluster.setup=['mkdir -p {blocked.parent} && touch {blocked}']",
        "hydra.launcher.detach=true", f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=slurm_cluster,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    good, bad = jobs_of(sweep)
    after = slurm(slurm_cluster, "sbatch", "--parsable", f"--dependency=afterok:{bad['slurm_job_id']}",
                  f"--output={tmp_path}/after.out", "--wrap", "true").strip()
    try:
        outcome = gathered(sweep, slurm_cluster, tmp_path)
        assert outcome.returncode == 1, outcome.stdout
        assert sacct(slurm_cluster, bad["slurm_job_id"]) == "FAILED 1:0"
        assert sacct(slurm_cluster, good["slurm_job_id"]) == "COMPLETED 0:0"
        wait_for(lambda: slurm(slurm_cluster, "squeue", "-h", "-j", after, "-o", "%T %r").split()
                 == ["PENDING", "DependencyNeverSatisfied"], "the chain to stop")
    finally:
        subprocess.run(["scancel", after], env={**os.environ, **slurm_cluster})
    good, bad = jobs_of(sweep)
    assert good["status"] == "completed" and bad["status"] == "failed" and bad["exit_code"] == "1:0"
    assert bad["reason"] == f"FileExistsError: [Errno 17] File exists: '{blocked}'"
    results = read_results(bad["run_dir"])
    assert results["status"] == "failed" and results["reason"] == bad["reason"]
    assert "Traceback (most recent call last)" in Path(results["error_log"]).read_text()
    assert "FileExistsError" in Path(bad["stderr"]).read_text()  # the job's own log


def test_a_detached_training_job_preempted_mid_run_requeues_and_resumes(slurm_cluster, sweep, tmp_path):
    done = run_llmexp(
        *SLURM, "hardware=h100", "technique.max_steps=100", "technique.log_every=5", "technique.checkpoint_every=25",
        "evaluation.limit=4", "hydra.launcher.detach=true", f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=slurm_cluster,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"llmexp gather {sweep}" in done.stderr
    (job,) = jobs_of(sweep)
    assert gather(sweep, slurm_cluster, tmp_path).returncode == 3  # not ended yet

    log = Path(job["run_dir"]) / "pretrain" / "train_log.jsonl"
    wait_for(lambda: log.is_file() and any(json.loads(row)["step"] >= 30 for row in log.read_text().splitlines()),
             "training to reach step 30")
    slurm(slurm_cluster, "scancel", "--signal=USR2", job["slurm_job_id"])

    outcome = gathered(sweep, slurm_cluster, tmp_path)
    assert outcome.returncode == 0, outcome.stdout + outcome.stderr
    (ended,) = jobs_of(sweep)
    assert ended["status"] == "completed" and ended["restarts"] == 1
    assert sacct(slurm_cluster, job["slurm_job_id"]) == "COMPLETED 0:0"
    results = read_results(job["run_dir"])
    metrics = results["stages"]["pretrain"]["metrics"]
    assert results["environment"]["slurm"]["restart_count"] == "1"
    assert metrics["resumed_from_step"] >= 30 and metrics["steps"] == 100
    steps = [json.loads(row)["step"] for row in log.read_text().splitlines() if "loss" in json.loads(row)]
    assert steps == list(range(5, 101, 5))  # each step logged once: the resumed run picked up where the stop was


def test_a_two_node_data_parallel_job_trains_as_one_process_would(slurm_cluster, sweep, tmp_path):
    layout = ["parallelism=dp2", "parallelism.nodes=2", "parallelism.devices_per_node=1"]
    job = ["technique.max_steps=4", "technique.save_model=false", "evaluation.tasks=[perplexity]", "evaluation.limit=4"]
    done = run_llmexp(*SLURM, "hardware=cpu", *layout, *job, f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=slurm_cluster)
    assert done.returncode == 0, done.stderr[-3000:]
    (outcome,) = jobs_of(sweep)
    assert outcome["status"] == "completed" and outcome["resources"]["nodes"] == 2, outcome
    results = read_results(outcome["run_dir"])
    assert results["environment"]["slurm"]["nodelist"] == "node[1-2]"

    single = run_llmexp(*job, f"hydra.run.dir={tmp_path / 'single'}", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    expected = read_results(tmp_path / "single")["stages"]["pretrain"]["metrics"]["final_loss"]
    assert results["stages"]["pretrain"]["metrics"]["final_loss"] == pytest.approx(expected, abs=1e-4)
