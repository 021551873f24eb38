"""``hydra/launcher=kubernetes`` against kmock's KubernetesEmulator: the Kubernetes API over real HTTP, in memory.

The launcher runs as a user runs it (``llmexp -m ...`` in a fresh process) and talks to the
emulator through the official client and a kubeconfig file the test writes (``KUBECONFIG``).
The test plays the operator and the pods: it reads the objects the launcher created, patches
their status conditions as Trainer v2 (TrainJob: Complete/Failed) or the training operator
(PyTorchJob: Succeeded/Failed) would, writes each run's results.json as its pod would, and
adds a failed pod with a log. Nothing trains: the launcher never runs a job itself.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
from pathlib import Path

import kmock
import pytest
import yaml
from kubernetes import client, config

from llmexp.results.record import RunRecord
from tests.conftest import jobs_of, read_results, run_llmexp, start_llmexp, wait_for

NAMESPACE = "llm"  # the eks_example profile's
TRAINJOBS = ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
PYTORCHJOBS = ("kubeflow.org", "v1", "pytorchjobs")
# tp8 on the tiny default (4 heads) is refused by the planner: that point is skipped, nothing submitted for it
POINTS = ["technique=sft", "hardware=h100", "parallelism=single,tp2,tp8"]


class Emulator:
    """kmock's KubernetesEmulator on a port of this machine, served from an event loop in a thread of its own."""

    def __init__(self, kubeconfig: Path) -> None:
        ready = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._serve(ready)), daemon=True)
        self.thread.start()
        assert ready.wait(30), "the emulator did not start"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "not-checked"}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester"}}],
        }))
        self.env = {"KUBECONFIG": str(kubeconfig)}
        api_client = config.new_client_from_config(config_file=str(kubeconfig), context="emulator")
        self.custom, self.core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)

    async def _serve(self, ready: threading.Event) -> None:
        async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
            for resource, kind in (("trainer.kubeflow.org/v1alpha1/trainjobs", "TrainJob"),
                                   ("kubeflow.org/v1/pytorchjobs", "PyTorchJob"), ("v1/pods", "Pod"),
                                   ("v1/secrets", "Secret")):
                emulator.resources[resource] = kmock.ResourceInfo(kind=kind, namespaced=True)
            self.emulator, self.url = emulator, str(server.url).rstrip("/")
            self.loop, self.stop = asyncio.get_running_loop(), asyncio.Event()
            ready.set()
            await self.stop.wait()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(10)

    def objects(self, api=TRAINJOBS) -> list:
        group, version, plural = api
        return self.custom.list_namespaced_custom_object(group, version, NAMESPACE, plural)["items"]

    def secrets(self) -> list:
        return [secret.to_dict() for secret in self.core.list_namespaced_secret(NAMESPACE).items]

    def set_status(self, name: str, status: dict, api=TRAINJOBS) -> None:
        """The object's status, as its operator writes it (the status subresource)."""
        group, version, plural = api
        self.custom.patch_namespaced_custom_object_status(group, version, NAMESPACE, plural, name, {"status": status})

    def failed_pod(self, pod: str, label: str, job: str, log: str) -> None:
        """A failed pod of ``job`` (``label`` carries its name, as the operator labels them) whose log is ``log``."""
        self.core.create_namespaced_pod(NAMESPACE, {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod, "namespace": NAMESPACE, "labels": {label: job}},
            "spec": {"containers": [{"name": "node", "image": "llmexp"}]}, "status": {"phase": "Failed"}})
        self.emulator[f"get /api/v1/namespaces/{NAMESPACE}/pods/{pod}/log"] << log.encode()


@pytest.fixture
def emulator(tmp_path):
    served = Emulator(tmp_path / "kubeconfig")
    yield served
    served.close()


def launcher_args(tmp_path: Path, *more: str) -> list:
    """A sweep on the EKS example profile whose shared volume this machine sees at <tmp>/fsx."""
    return ["-m", "hydra/launcher=kubernetes", "cluster=eks_example", "cluster.context=emulator",
            f"cluster.storage.local_path={tmp_path / 'fsx'}", f"hydra.sweep.dir={tmp_path / 'fsx' / 'sweep'}",
            "hydra.launcher.poll_seconds=0.2", *more]


def submitted(sweep: Path, count: int) -> list:
    """jobs.json once it records ``count`` created objects."""
    return wait_for(lambda: (jobs := jobs_of(sweep)) and sum(bool(job["kubernetes"]) for job in jobs) == count
                    and jobs, f"{count} objects in jobs.json")


def run_finished(job: dict, status: str = "completed", reason: str | None = None) -> None:
    """The run's results.json as its pod writes it at the end (rank 0, on the shared volume)."""
    RunRecord.start(job["run_dir"], {"overrides": job["overrides"]}).finish(status, reason).write()


COMPLETE = {"conditions": [{"type": "Created", "status": "True", "reason": "JobSetCreated"},
                           {"type": "Complete", "status": "True", "reason": "JobSetCompleted", "message": "done"}]}


def test_a_trainjob_sweep_reports_completed_failed_and_skipped_points_and_exits_1(emulator, tmp_path):
    sweep = tmp_path / "fsx" / "sweep"
    process = start_llmexp(*launcher_args(tmp_path, *POINTS), cwd=tmp_path, env=emulator.env)
    try:
        single, tp2, tp8 = submitted(sweep, 2)
        objects = {obj["metadata"]["name"]: obj for obj in emulator.objects()}
        assert set(objects) == {single["kubernetes"]["name"], tp2["kubernetes"]["name"]}
        created = objects[tp2["kubernetes"]["name"]]
        assert created["kind"] == "TrainJob" and created["metadata"]["namespace"] == NAMESPACE
        labels = created["metadata"]["labels"]
        assert labels["llmexp.io/job"] == "1" and labels["llmexp.io/sweep"] == objects[single["kubernetes"]["name"]][
            "metadata"]["labels"]["llmexp.io/sweep"]
        trainer = created["spec"]["trainer"]
        assert (trainer["numNodes"], trainer["numProcPerNode"]) == (1, 2) and tp2["resources"]["gpus_per_node"] == 2
        assert "parallelism=tp2" in trainer["command"]
        assert f"hydra.run.dir=/fsx/sweep/{Path(tp2['run_dir']).name}" in trainer["command"]
        assert tp8["kubernetes"] is None and tp8["status"] == "skipped"
        assert "parallelism.tp=8" in tp8["reason"] and read_results(tp8["run_dir"])["status"] == "skipped"

        run_finished(single)
        emulator.set_status(single["kubernetes"]["name"], COMPLETE)
        name = tp2["kubernetes"]["name"]
        emulator.failed_pod(f"{name}-node-0-0-x7k2p", "jobset.sigs.k8s.io/jobset-name", name,
                            "step 3 loss 2.71\nTraceback (most recent call last):\nRuntimeError: loss is nan\n")
        run_finished(tp2, "failed", "RuntimeError: loss is nan")
        emulator.set_status(name, {"conditions": [
            {"type": "Created", "status": "True", "reason": "JobSetCreated"},
            {"type": "Failed", "status": "True", "reason": "JobSetFailed", "message": "jobset failed: job node-0 failed"}]})
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 1, err[-3000:]
    assert f"#0 {' '.join(single['overrides'])}: completed" in err
    reason = "TrainJob Failed (JobSetFailed: jobset failed: job node-0 failed); RuntimeError: loss is nan"
    assert f"#1 {' '.join(tp2['overrides'])}: failed ({reason})" in err
    assert "RuntimeError: loss is nan" in err.split(f"pod {name}-node-0-0-x7k2p's log", 1)[1]
    jobs = jobs_of(sweep)
    assert [job["status"] for job in jobs] == ["completed", "failed", "skipped"]
    assert jobs[1]["reason"] == reason and jobs[1]["kubernetes_state"].startswith("TrainJob Failed")
    assert Path(jobs[1]["stdout"]).read_text().endswith("RuntimeError: loss is nan\n")
    assert jobs[0]["kubernetes_state"] == "TrainJob Complete"
    assert "1 of 3 jobs failed" in err


def test_a_pytorchjob_sweep_whose_jobs_all_succeed_exits_0(emulator, tmp_path):
    sweep = tmp_path / "fsx" / "sweep"
    process = start_llmexp(*launcher_args(tmp_path, "cluster.job_kind=PyTorchJob", "technique=sft", "hardware=h100",
                                          "parallelism=single,tp2"), cwd=tmp_path, env=emulator.env)
    try:
        jobs = submitted(sweep, 2)
        objects = {obj["metadata"]["name"]: obj for obj in emulator.objects(PYTORCHJOBS)}
        assert [obj["kind"] for obj in objects.values()] == ["PyTorchJob"] * 2 and not emulator.objects()
        assert objects[jobs[1]["kubernetes"]["name"]]["spec"]["nprocPerNode"] == "2"
        for job in jobs:
            emulator.set_status(job["kubernetes"]["name"], {"conditions": [
                {"type": "Created", "status": "True"}, {"type": "Running", "status": "True"}]}, PYTORCHJOBS)
        wait_for(lambda: all(job["status"] == "running" for job in jobs_of(sweep)), "both running")
        for job in jobs:
            run_finished(job)
            emulator.set_status(job["kubernetes"]["name"], {"conditions": [
                {"type": "Created", "status": "True"}, {"type": "Running", "status": "False"},
                {"type": "Succeeded", "status": "True", "reason": "PyTorchJobSucceeded"}]}, PYTORCHJOBS)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, err[-3000:]
    assert [(job["status"], job["kubernetes_state"]) for job in jobs_of(sweep)] == [("completed", "PyTorchJob Succeeded")] * 2


def test_a_detached_sweep_is_gathered_until_every_job_has_ended(emulator, tmp_path):
    sweep = tmp_path / "fsx" / "sweep"
    done = run_llmexp(*launcher_args(tmp_path, "hydra.launcher.detach=true", *POINTS), cwd=tmp_path, env=emulator.env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"`llmexp gather {sweep}`" in done.stderr and f"`llmexp cancel {sweep}`" in done.stderr
    single, tp2, _ = jobs_of(sweep)
    assert len(emulator.objects()) == 2

    emulator.set_status(single["kubernetes"]["name"], {"jobsStatus": [
        {"name": "node", "active": 1, "ready": 1, "succeeded": 0, "failed": 0, "suspended": 0}]})
    run_finished(tp2)
    emulator.set_status(tp2["kubernetes"]["name"], COMPLETE)
    gathered = run_llmexp("gather", str(sweep), cwd=tmp_path, env=emulator.env)
    assert gathered.returncode == 3, gathered.stderr[-3000:]
    assert [job["status"] for job in jobs_of(sweep)] == ["running", "completed", "skipped"]

    run_finished(single)
    emulator.set_status(single["kubernetes"]["name"], COMPLETE)
    gathered = run_llmexp("gather", str(sweep), cwd=tmp_path, env=emulator.env)
    assert gathered.returncode == 0, gathered.stderr[-3000:]
    assert [job["status"] for job in jobs_of(sweep)] == ["completed", "completed", "skipped"]
    assert "TrainJob Complete" in gathered.stdout


def test_ctrl_c_names_the_cancel_command_which_deletes_the_objects(emulator, tmp_path):
    sweep = tmp_path / "fsx" / "sweep"
    process = start_llmexp(*launcher_args(tmp_path, *POINTS), cwd=tmp_path, env=emulator.env)
    try:
        submitted(sweep, 2)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, err[-3000:]
    assert f"`llmexp cancel {sweep}`" in err and f"`llmexp gather {sweep}`" in err
    assert len(emulator.objects()) == 2  # Ctrl-C leaves the jobs running

    cancelled = run_llmexp("cancel", str(sweep), cwd=tmp_path, env=emulator.env)
    assert cancelled.returncode == 0, cancelled.stderr[-3000:]
    assert emulator.objects() == []
    jobs = jobs_of(sweep)
    assert [job["status"] for job in jobs] == ["failed", "failed", "skipped"]
    assert jobs[0]["reason"] == "the TrainJob was deleted before it ended (cancelled)"
    assert "cancelled 2 job(s) of 3" in cancelled.stderr


def test_a_dry_run_prints_the_manifests_as_yaml_and_creates_nothing(emulator, tmp_path):
    done = run_llmexp(*launcher_args(tmp_path, "hydra.launcher.dry_run=true", *POINTS), cwd=tmp_path, env=emulator.env)
    assert done.returncode == 0, done.stderr[-3000:]
    manifests = [document for document in yaml.safe_load_all(done.stdout) if document]
    assert [manifest["kind"] for manifest in manifests] == ["TrainJob", "TrainJob"]
    assert [manifest["spec"]["trainer"]["numProcPerNode"] for manifest in manifests] == [1, 2]
    assert "# skipped #2" in done.stdout and "nothing submitted" in done.stdout
    assert emulator.objects() == [] and not (tmp_path / "fsx").exists()


def test_an_api_server_that_cannot_be_reached_ends_the_sweep_with_exit_1_saying_what_to_check(tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "nowhere", "cluster": {"server": "http://127.0.0.1:9"}}],  # the discard port: refused
        "users": [{"name": "tester", "user": {"token": "x"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "nowhere", "user": "tester"}}]}))
    done = run_llmexp(*launcher_args(tmp_path, *POINTS), cwd=tmp_path, env={"KUBECONFIG": str(kubeconfig)})
    assert done.returncode == 1, done.stderr[-3000:]
    message = " ".join(done.stderr.split())
    assert "the Kubernetes API (emulator) cannot be reached" in message
    assert "`kubectl --context emulator -n llm get trainjobs` works here" in message
    assert [job["status"] for job in jobs_of(tmp_path / "fsx" / "sweep")] == []  # nothing was created


@pytest.mark.parametrize("cluster", ["none", "localhost"])
def test_the_kubernetes_launcher_without_a_kubernetes_profile_is_refused_before_anything_is_written(tmp_path, cluster):
    done = run_llmexp("-m", "hydra/launcher=kubernetes", f"cluster={cluster}", "seed=0,1", cwd=tmp_path)
    assert done.returncode == 2
    assert "hydra/launcher=kubernetes needs a cluster profile" in " ".join(done.stderr.split())
    assert "eks_example" in done.stderr and list(tmp_path.iterdir()) == []


def test_the_kubernetes_launcher_without_its_extra_names_the_pip_line(monkeypatch):
    from llmexp.configuration.compose import compose_config
    from llmexp.launchers import placement

    cfg = compose_config(["cluster=eks_example"])
    assert placement.launcher_problem(placement.KUBERNETES_LAUNCHER, cfg) is None
    monkeypatch.setattr(placement, "importable", lambda module: module != "kubeflow_trainer_api")
    assert placement.launcher_problem(placement.KUBERNETES_LAUNCHER, cfg) == (
        "hydra/launcher=kubernetes needs kubeflow_trainer_api, which this environment lacks: "
        "pip install 'llmexp[kubernetes]'")


def test_a_jobs_state_is_its_operators_conditions():
    from llmexp.launchers.kubernetes_jobs import job_state

    created = {"type": "Created", "status": "True", "reason": "PyTorchJobCreated"}
    running = job_state("PyTorchJob", {"status": {"conditions": [created, {"type": "Running", "status": "True"}]}})
    assert running.running and not running.ended and running.describe() == "PyTorchJob Running"
    failed = job_state("PyTorchJob", {"status": {"conditions": [
        created, {"type": "Running", "status": "False"},
        {"type": "Failed", "status": "True", "reason": "PyTorchJobFailed", "message": "pod master-0 exited with 1"}]}})
    assert failed.ended and failed.failed
    assert failed.describe() == "PyTorchJob Failed (PyTorchJobFailed: pod master-0 exited with 1)"
    queued = job_state("TrainJob", {"status": {"jobsStatus": [{"name": "node", "active": 0, "ready": 0}]}})
    assert not (queued.running or queued.ended) and queued.describe() == "TrainJob Pending"
    gone = job_state("TrainJob", None)
    assert gone.ended and gone.failed and "deleted before it ended" in gone.describe()


PASSWORD = "pw-3a9f1c77e2"  # the mlflow URI's, typed on the command line


def test_a_secret_typed_on_the_command_line_reaches_the_pods_through_one_secret_written_nowhere(emulator, tmp_path):
    sweep = tmp_path / "fsx" / "sweep"
    secret_args = ["tracker=mlflow", f"tracker.uri=https://ci:{PASSWORD}@mlflow.example", *POINTS]
    outputs = []
    dry = run_llmexp(*launcher_args(tmp_path, "hydra.launcher.dry_run=true", *secret_args), cwd=tmp_path,
                     env=emulator.env)
    assert dry.returncode == 0, dry.stderr[-3000:]
    outputs += [dry.stdout, dry.stderr]
    printed = [document for document in yaml.safe_load_all(dry.stdout) if document]
    name = re.search(r"# a Secret (llmexp-[0-9a-f]{8}-secrets) \(namespace llm\) would be created first, holding "
                     r"LLMEXP_SECRET_0 ", dry.stdout)[1]
    reference = {"name": "LLMEXP_SECRET_0", "valueFrom": {"secretKeyRef": {"name": name, "key": "LLMEXP_SECRET_0"}}}
    assert all(reference in manifest["spec"]["trainer"]["env"] for manifest in printed) and len(printed) == 2
    assert emulator.secrets() == []

    process = start_llmexp(*launcher_args(tmp_path, *secret_args), cwd=tmp_path, env=emulator.env)
    try:
        jobs = submitted(sweep, 2)
        (secret,) = emulator.secrets()
        name = secret["metadata"]["name"]
        sweep_id = secret["metadata"]["labels"]["llmexp.io/sweep"]
        assert (name, secret["type"], secret["string_data"]) == (
            f"llmexp-{sweep_id}-secrets", "Opaque", {"LLMEXP_SECRET_0": f"ci:{PASSWORD}"})
        reference["valueFrom"]["secretKeyRef"]["name"] = name
        for obj in emulator.objects():
            assert obj["metadata"]["labels"]["llmexp.io/sweep"] == sweep_id
            assert reference in obj["spec"]["trainer"]["env"] and PASSWORD not in json.dumps(obj)
            assert r"tracker.uri=https\://$\{oc.env\:LLMEXP_SECRET_0\}@mlflow.example" in obj["spec"]["trainer"][
                "command"]  # as the sweep writes the job's override: the pod resolves it from its variable
        assert [job["kubernetes"] and job["kubernetes"]["secret"] for job in jobs] == [name, name, None]
        run_finished(jobs[0])
        emulator.set_status(jobs[0]["kubernetes"]["name"], COMPLETE)
        wait_for(lambda: jobs_of(sweep)[0]["status"] == "completed", "the first job completed")
        assert len(emulator.secrets()) == 1  # the second job may still start pods that read it
        run_finished(jobs[1])
        emulator.set_status(jobs[1]["kubernetes"]["name"], COMPLETE)
        outputs += process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, outputs[-1][-3000:]
    assert emulator.secrets() == []  # every job using it has ended

    detached = run_llmexp(*launcher_args(tmp_path, "hydra.launcher.detach=true", "hydra.sweep.dir=" + str(
        tmp_path / "fsx" / "detached"), *secret_args), cwd=tmp_path, env=emulator.env)
    assert detached.returncode == 0 and len(emulator.secrets()) == 1, detached.stderr[-3000:]
    cancelled = run_llmexp("cancel", str(tmp_path / "fsx" / "detached"), cwd=tmp_path, env=emulator.env)
    assert cancelled.returncode == 0, cancelled.stderr[-3000:]
    assert emulator.secrets() == []  # the detached sweep's objects are gone, the ended first sweep's are kept
    assert [obj["metadata"]["labels"]["llmexp.io/sweep"] for obj in emulator.objects()] == [sweep_id] * 2
    outputs += [detached.stdout, detached.stderr, cancelled.stdout, cancelled.stderr]

    gathered_sweep = tmp_path / "fsx" / "gathered"
    detached = run_llmexp(*launcher_args(tmp_path, "hydra.launcher.detach=true", f"hydra.sweep.dir={gathered_sweep}",
                                         *secret_args), cwd=tmp_path, env=emulator.env)
    assert detached.returncode == 0 and len(emulator.secrets()) == 1, detached.stderr[-3000:]
    for job in jobs_of(gathered_sweep)[:2]:
        run_finished(job)
        emulator.set_status(job["kubernetes"]["name"], COMPLETE)
    gathered = run_llmexp("gather", str(gathered_sweep), cwd=tmp_path, env=emulator.env)
    assert gathered.returncode == 0 and emulator.secrets() == [], gathered.stderr[-3000:]
    outputs += [detached.stdout, detached.stderr, gathered.stdout, gathered.stderr]
    assert [text for text in outputs if PASSWORD in text] == []
    files = [path for path in tmp_path.rglob("*") if path.is_file() and path.name != "kubeconfig"]
    assert {"jobs.json", "multirun.yaml", "results.json"} <= {path.name for path in files}
    assert [path for path in files if PASSWORD.encode() in path.read_bytes()] == []
