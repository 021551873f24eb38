"""``hydra/launcher=kubernetes``: a multirun's jobs as Kubeflow TrainJobs or PyTorchJobs, each on its GPU generation.

The same shape as ``hydra/launcher=slurm`` (``launchers.cluster_sweep``):

- every point is composed and planned first; one the planner refuses, or whose hardware the
  cluster profile (``cluster=<name>`` of kind kubernetes) does not map, is skipped with its
  reason (its results.json says so) before anything is submitted;
- each other point's manifest is rendered and checked against Kubeflow's own API models
  (``launchers.kubernetes_manifests``); ``dry_run`` prints them as YAML and submits nothing;
- secrets typed on the command line go to the pods through one Secret per sweep, created first
  and deleted once every job using it has ended (``launchers.kubernetes_secrets``);
- each job's object is created through the official client (``launchers.kubernetes_jobs``),
  labelled with the sweep (``llmexp.io/sweep=<id>``, so ``kubectl get trainjobs -l ...``
  finds them), and jobs.json records it as soon as the API server has it;
- ``detach`` submits and returns; ``llmexp gather <sweep dir>`` collects, ``llmexp cancel
  <sweep dir>`` deletes the objects of the jobs not yet ended;
- otherwise it reads each object's status conditions every ``poll_seconds``, reports each job as
  it ends (a failed one with the operator's reason, the run's own when its results.json says
  more, and the tail of its failed pod's log), and exits 1 if any failed, 0 when every job
  completed or was skipped. Ctrl-C leaves the jobs running and prints the command that cancels them.

The pods run the point's overrides with ``torchrun -m llmexp`` (and the sweep's ``--config-name``
and ``--config-dir``, which must then be on the volume) in the run directory on the profile's shared volume, which this machine mounts too: the launcher reads the results.json
each job writes there.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from llmexp.configuration.compose import CONFIG_NAME
from llmexp.display import console
from llmexp.errors import UserError
from llmexp.launchers.cluster_sweep import (
    compose_points, follow, job_return, nothing_orphaned, record_skipped, remove_sweep_dir,
)
from llmexp.launchers.kubernetes_jobs import KubernetesJobs, KubernetesJobState, KubernetesRefused, KubernetesUnreachable
from llmexp.launchers.kubernetes_manifests import (
    API, CONFIG_DIR, job_name, kubernetes_resources, manifests_yaml, pod_path, render, validate,
)
from llmexp.launchers.kubernetes_secrets import referenced, sweep_secret, sweep_secret_name
from llmexp.launchers.sweep_jobs import JOBS_FILE, UNFINISHED, SweepJob, finish, observe_kubernetes, write_jobs

SWEEP_LABEL = "llmexp.io/sweep"  # every object of a sweep carries it, with the sweep's id
JOB_LABEL = "llmexp.io/job"  # and its point's number
LOGS_DIR = ".kubernetes"  # <sweep dir>/.kubernetes/<job>.log: the tail of a failed job's pod log


class KubernetesLauncher(Launcher):
    def __init__(self, dry_run: bool = False, detach: bool = False, poll_seconds: float = 5.0) -> None:
        self.dry_run, self.detach, self.poll_seconds = dry_run, detach, poll_seconds
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_id = secrets.token_hex(4)  # a sweep run again into the same directory gets objects of its own
        jobs, placed, skipped = compose_points(self, job_overrides, initial_job_idx, "kubernetes", kubernetes_resources)
        manifests: List[Tuple[SweepJob, Dict[str, Any]]] = []
        secret_users: Dict[int, List[str]] = {}  # job number -> its overrides, when they read LLMEXP_SECRET_<n>
        for job, cfg, resources, overrides in placed:
            try:
                manifest = _manifest(cfg, sweep_id, job, resources, [*self._config_arguments(cfg), *overrides])
            except (UserError, ValueError) as error:  # a run directory off the shared volume, a value the API refuses
                skipped.append((job, cfg, str(error)))
                continue
            job.resources = resources.to_dict()
            manifests.append((job, manifest))
            if referenced(overrides):
                secret_users[job.num] = overrides
        secret = None
        if secret_users:
            keys = referenced(argument for overrides in secret_users.values() for argument in overrides)
            secret = sweep_secret(sweep_secret_name(sweep_id), self.config.cluster.namespace, _labels(sweep_id), keys,
                                  os.environ)
        if self.dry_run:
            self._print_dry_run(manifests, skipped, secret)
            remove_sweep_dir(sweep_dir)
            return [job_return(job) for job in jobs]
        record_skipped(skipped)
        if manifests:  # else every point was skipped: nothing to ask the cluster
            with nothing_orphaned(sweep_dir, jobs, lambda running: f"llmexp cancel {sweep_dir}"):
                api = self._submit(sweep_dir, jobs, manifests, secret, set(secret_users))
                if self.detach:
                    console.err.print(
                        f"submitted {len(manifests)} job(s) to Kubernetes (label {SWEEP_LABEL}={sweep_id}), skipped "
                        f"{len(skipped)}; they are recorded in {sweep_dir / JOBS_FILE}; collect them with "
                        f"`llmexp gather {sweep_dir}`, cancel them with `llmexp cancel {sweep_dir}`",
                        highlight=False, soft_wrap=True,
                    )
                    return [job_return(job) for job in jobs]
                connections = {(api.context, api.namespace): api}
                follow(sweep_dir, jobs, self.poll_seconds, lambda waiting: update(waiting, connections),
                       KubernetesUnreachable, lambda job: keep_failed_log(job, sweep_dir, connections))
                try:
                    release_secrets(jobs, connections)
                except (KubernetesRefused, KubernetesUnreachable) as error:
                    console.warn(f"{error}; the sweep's Secret stays: `kubectl -n {api.namespace} delete secret "
                                 f"{sweep_secret_name(sweep_id)}` deletes it")
        code = finish(sweep_dir, jobs)
        if code:
            raise SystemExit(code)
        return [job_return(job) for job in jobs]

    def _config_arguments(self, cfg) -> List[str]:
        """The config the sweep was composed from, for the pod's llmexp: ``--config-name`` (a sweep file's, say) and a
        ``--config-dir`` as pods see it on the shared volume. Without them a pod would compose its point from the
        default config, a different experiment."""
        hydra = self.config.hydra
        arguments = []
        for source in hydra.runtime.config_sources:
            if source.provider == "command-line" and source.schema == "file":
                arguments.append(f"--config-dir={pod_path(cfg, str(Path(source.path).absolute()), CONFIG_DIR)}")
        if arguments or hydra.job.config_name != CONFIG_NAME:
            arguments.append(f"--config-name={hydra.job.config_name}")
        return arguments

    def _submit(self, sweep_dir: Path, jobs: List[SweepJob], manifests, secret: Optional[Dict[str, Any]],
                secret_users: Set[int]) -> KubernetesJobs:
        """The sweep's Secret if it has one, then each job's object; jobs.json records each as soon as the API server
        has created it. An API that cannot be reached or refuses ends the sweep (exit code 1), saying what to check."""
        cluster = self.config.cluster
        api = None
        try:
            api = KubernetesJobs(cluster.context, cluster.namespace)
            if secret is not None:
                api.create_secret(secret)
                console.err.print(f"Secret {secret['metadata']['name']}: {', '.join(secret['stringData'])}, "
                                  "for the pods (deleted once its jobs have ended)", highlight=False, soft_wrap=True)
            for job, manifest in manifests:
                api.create(manifest)
                job.kubernetes = {"kind": manifest["kind"], "name": manifest["metadata"]["name"],
                                  "namespace": api.namespace, "context": api.context,
                                  **({"secret": secret["metadata"]["name"]} if job.num in secret_users else {})}
                write_jobs(sweep_dir, jobs)
                console.err.print(f"#{job.num} {' '.join(job.overrides)} -> {manifest['kind']} {job.kubernetes['name']}",
                                  highlight=False, soft_wrap=True)
        except (KubernetesRefused, KubernetesUnreachable) as error:
            if api is not None and secret is not None and not any(job.kubernetes for job in jobs):
                try:  # no job will read it
                    api.delete_secret(secret["metadata"]["name"])
                except (KubernetesRefused, KubernetesUnreachable):
                    pass
            context = f"--context {cluster.context} " if cluster.context else ""
            console.error(f"{error}. Check the cluster profile (cluster={cluster.name}) and that "
                          f"`kubectl {context}-n {cluster.namespace} get {API[str(cluster.job_kind)][2]}` works here.")
            raise SystemExit(1) from None
        return api

    def _print_dry_run(self, manifests, skipped, secret: Optional[Dict[str, Any]]) -> None:
        """The manifests exactly as they would be created, one YAML stream (``kubectl apply -f -`` takes it);
        the sweep's Secret by its name and keys only, never its values."""
        if secret is not None:
            metadata = secret["metadata"]
            console.out.print(f"# a Secret {metadata['name']} (namespace {metadata['namespace']}) would be created "
                              f"first, holding {', '.join(secret['stringData'])} (the secrets typed on the command "
                              "line, not shown); each job reads those its overrides use (secretKeyRef)",
                              highlight=False, soft_wrap=True, markup=False)
        for job, manifest in manifests:
            console.out.print(f"# #{job.num} {' '.join(job.overrides)}", highlight=False, soft_wrap=True)
        console.out.print(manifests_yaml([manifest for _, manifest in manifests]), highlight=False, soft_wrap=True,
                          markup=False)
        for job, _, reason in skipped:
            console.out.print(f"# skipped #{job.num} {' '.join(job.overrides)}: {reason}", highlight=False,
                              soft_wrap=True, markup=False)
        console.out.print(f"# dry run: {len(manifests)} manifest(s); nothing submitted", highlight=False)


def _labels(sweep_id: str) -> Dict[str, str]:
    """What every object of the sweep carries."""
    return {"app.kubernetes.io/managed-by": "llmexp", SWEEP_LABEL: sweep_id}


def _manifest(cfg, sweep_id: str, job: SweepJob, resources, overrides: List[str]) -> Dict[str, Any]:
    """The job's manifest, rendered and checked against the official models (``ValueError`` naming the field)."""
    labels = {**_labels(sweep_id), JOB_LABEL: str(job.num)}
    manifest = render(cfg, job_name(sweep_id, job.num), overrides, job.run_dir, resources, labels,
                      sweep_secret_name(sweep_id))
    validate(manifest)
    return manifest


Connections = Dict[Tuple[str, str], KubernetesJobs]


def _api(job: SweepJob, connections: Connections) -> KubernetesJobs:
    """The API where ``job``'s object lives (one client per kubeconfig context and namespace)."""
    key = (job.kubernetes["context"], job.kubernetes["namespace"])
    if key not in connections:
        connections[key] = KubernetesJobs(*key)
    return connections[key]


def update(jobs: Sequence[SweepJob], connections: Connections) -> None:
    """Bring each of ``jobs`` up to date from its object's status conditions (``KubernetesUnreachable``: none is)."""
    for job in jobs:
        observe_kubernetes(job, _api(job, connections).state(job.kubernetes["kind"], job.kubernetes["name"])
                           if job.kubernetes else None)


def keep_failed_log(job: SweepJob, sweep_dir: Path, connections: Connections) -> None:
    """A failed job's pod log tail, printed and kept in ``<sweep dir>/.kubernetes/<name>.log`` (its ``stdout``)."""
    if job.status != "failed" or not job.kubernetes:
        return
    found = _api(job, connections).failed_pod_log(job.kubernetes["kind"], job.kubernetes["name"])
    if found is None:
        return
    pod, log = found
    path = Path(sweep_dir) / LOGS_DIR / f"{job.kubernetes['name']}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(log)
    job.stdout = str(path)
    console.err.print(f"  the last lines of pod {pod}'s log ({path}):\n" +
                      "\n".join(f"    {line}" for line in log.rstrip().splitlines()), highlight=False, markup=False)


def release_secrets(jobs: Sequence[SweepJob], connections: Connections) -> List[str]:
    """Delete each sweep Secret all of whose jobs (of ``jobs``) have ended; the Secrets so deleted. A job still
    pending or running keeps its Secret: its pods may start (again) and read it."""
    users: Dict[str, List[SweepJob]] = {}
    for job in jobs:
        if job.kubernetes and job.kubernetes.get("secret"):
            users.setdefault(job.kubernetes["secret"], []).append(job)
    ended = [secret for secret, using in users.items() if all(job.status not in UNFINISHED for job in using)]
    for secret in ended:
        _api(users[secret][0], connections).delete_secret(secret)
    return ended


def cancel(jobs: List[SweepJob]) -> List[SweepJob]:
    """Delete the object of each of ``jobs`` not yet ended (its pods go with it), then the sweep's Secret; the
    jobs so cancelled."""
    connections: Connections = {}
    waiting = [job for job in jobs if job.kubernetes and job.status in UNFINISHED]
    update(waiting, connections)
    cancelled = [job for job in waiting if job.status in UNFINISHED]
    for job in cancelled:  # deleted, whether the API has let it go yet or still deletes its pods
        _api(job, connections).delete(job.kubernetes["kind"], job.kubernetes["name"])
        observe_kubernetes(job, KubernetesJobState(job.kubernetes["kind"], deleted=True))
    release_secrets(jobs, connections)
    return cancelled
