"""The Kubernetes API side of ``hydra/launcher=kubernetes``: create, read and delete a sweep's Kubeflow jobs.

Through the official client (``kubernetes``, the extra of that name, imported when a client is
made, so that the launcher loads, and the preflight names the extra, without it): the kubeconfig
(``KUBECONFIG``, else ~/.kube/config) and the cluster profile's context, the namespace the
profile names. Jobs are custom objects (``CustomObjectsApi``): Trainer v2's TrainJob or the
training operator's PyTorchJob (``kubernetes_manifests.API`` says where each lives); a sweep's
Secret (``kubernetes_secrets``) is a core/v1 object.

How a job stands is the operator's word, its status conditions: a TrainJob ends Complete or
Failed (and runs while one of its child Jobs is active), a PyTorchJob ends Succeeded or
Failed (Running or Restarting while it runs). An object gone before either (deleted: the
sweep was cancelled) has ended too, failed. When one fails, the tail of its failed pod's log
(the traceback) is read if the API still has it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import urllib3

from llmexp.launchers.kubernetes_manifests import API

# Each kind's conditions that end it (True when it failed), and the label its pods carry with its name
# (JobSet's for a TrainJob's pods, the training operator's for a PyTorchJob's).
ENDING_CONDITIONS = {"TrainJob": {"Complete": False, "Failed": True}, "PyTorchJob": {"Succeeded": False, "Failed": True}}
RUNNING_CONDITIONS = {"TrainJob": (), "PyTorchJob": ("Running", "Restarting")}
POD_LABEL = {"TrainJob": "jobset.sigs.k8s.io/jobset-name", "PyTorchJob": "training.kubeflow.org/job-name"}
LOG_LINES = 20


class KubernetesUnreachable(RuntimeError):
    """The API server cannot be asked right now (connection refused, a timeout, a 5xx): nothing is known."""


class KubernetesRefused(RuntimeError):
    """The API server answered no (4xx): an operator not installed, no permission, an invalid object ..."""


@dataclass(frozen=True)
class KubernetesJobState:
    """One job's object as the operator describes it now."""

    kind: str
    condition: Optional[str] = None  # the True condition that says most: an ending one, else the latest
    reason: Optional[str] = None
    message: Optional[str] = None
    running: bool = False
    deleted: bool = False  # the object is gone

    @property
    def ended(self) -> bool:
        return self.deleted or self.condition in ENDING_CONDITIONS[self.kind]

    @property
    def failed(self) -> bool:
        return self.deleted or bool(ENDING_CONDITIONS[self.kind].get(self.condition))

    def describe(self) -> str:
        """``PyTorchJob Failed (BackoffLimitExceeded: ...)``: where the job stands, in the operator's words."""
        if self.deleted:
            return f"the {self.kind} was deleted before it ended (cancelled)"
        said = ": ".join(filter(None, (self.reason, self.message)))
        word = self.condition or ("Running" if self.running else "Pending")
        return f"{self.kind} {word}" + (f" ({said})" if said and self.failed else "")


def job_state(kind: str, obj: Optional[Dict[str, Any]]) -> KubernetesJobState:
    """What ``obj`` (the object as the API returns it; None: not found) says of the job."""
    if obj is None:
        return KubernetesJobState(kind, deleted=True)
    status = obj.get("status") or {}
    true = [condition for condition in status.get("conditions") or [] if condition.get("status") == "True"]
    ending = [condition for condition in true if condition.get("type") in ENDING_CONDITIONS[kind]]
    deciding = (ending or true or [{}])[-1]
    running = any(condition.get("type") in RUNNING_CONDITIONS[kind] for condition in true) or any(
        (child.get("active") or 0) > 0 for child in status.get("jobsStatus") or [])
    return KubernetesJobState(kind, deciding.get("type"), deciding.get("reason"), deciding.get("message"), running)


class KubernetesJobs:
    """One kubeconfig context's API, in one namespace: the calls the launcher, gather and cancel make."""

    def __init__(self, context: Optional[str], namespace: str) -> None:
        from kubernetes import client, config  # the kubernetes extra: imported when a sweep talks to a cluster

        self.api_error = client.ApiException
        try:
            self.api_client = config.new_client_from_config(context=context)
        except (config.ConfigException, OSError) as error:
            raise KubernetesRefused(
                f"no usable kubeconfig{f' context {context}' if context else ''} ({error}); point KUBECONFIG at the "
                "cluster's kubeconfig, or set cluster.context to one of its contexts") from None
        self.context = context or config.list_kube_config_contexts()[1]["name"]
        self.namespace = namespace
        self.custom = client.CustomObjectsApi(self.api_client)
        self.core = client.CoreV1Api(self.api_client)

    def create(self, manifest: Dict[str, Any]) -> Dict[str, Any]:
        group, version, plural = API[manifest["kind"]]
        try:
            return self._call(self.custom.create_namespaced_custom_object, group, version, self.namespace, plural,
                              manifest)
        except _NotFound:
            raise KubernetesRefused(
                f"the Kubernetes API ({self.context}) serves no {plural}.{group}/{version}: the operator that runs "
                f"{manifest['kind']}s is not installed there (examples/kubernetes/ installs it), or choose "
                "cluster.job_kind to match the one that is") from None

    def state(self, kind: str, name: str) -> KubernetesJobState:
        group, version, plural = API[kind]
        try:
            obj = self._call(self.custom.get_namespaced_custom_object, group, version, self.namespace, plural, name)
        except _NotFound:
            obj = None
        return job_state(kind, obj)

    def delete(self, kind: str, name: str) -> bool:
        """Delete the object (its pods go with it); False when it was already gone."""
        group, version, plural = API[kind]
        try:
            self._call(self.custom.delete_namespaced_custom_object, group, version, self.namespace, plural, name,
                       propagation_policy="Foreground")
        except _NotFound:
            return False
        return True

    def create_secret(self, manifest: Dict[str, Any]) -> None:
        """Create the Secret (core/v1); what the API answers, which holds the values, is not kept."""
        self._call(self.core.create_namespaced_secret, self.namespace, manifest)

    def delete_secret(self, name: str) -> bool:
        """Delete the Secret; False when it was already gone."""
        try:
            self._call(self.core.delete_namespaced_secret, name, self.namespace)
        except _NotFound:
            return False
        return True

    def failed_pod_log(self, kind: str, name: str, lines: int = LOG_LINES) -> Optional[Tuple[str, str]]:
        """(pod, the last ``lines`` of its log) of a failed pod of the job, else None (no such pod, or no log left)."""
        label = POD_LABEL[kind]
        try:
            pods = self._call(self.core.list_namespaced_pod, self.namespace, label_selector=f"{label}={name}").items
            # the label is checked here too, so that a server ignoring the selector cannot hand another job's pod
            failed = [pod for pod in pods if (pod.metadata.labels or {}).get(label) == name and _failed(pod)]
            if not failed:
                return None
            pod = failed[0].metadata.name
            return pod, self._call(self.core.read_namespaced_pod_log, pod, self.namespace, tail_lines=lines)
        except (_NotFound, KubernetesRefused, KubernetesUnreachable):
            return None

    def _call(self, method, *args: Any, **kwargs: Any) -> Any:
        """``method``, its failures said as ``KubernetesUnreachable``, ``_NotFound`` or ``KubernetesRefused``."""
        try:
            return method(*args, _request_timeout=30, **kwargs)
        except self.api_error as error:
            if error.status == 404:
                raise _NotFound() from None
            if not error.status or error.status >= 500:
                raise KubernetesUnreachable(f"the Kubernetes API ({self.context}) answered {error.status} "
                                            f"{error.reason}") from None
            raise KubernetesRefused(f"the Kubernetes API ({self.context}) refused: {error.status} {error.reason}: "
                                    f"{_message(error)}") from None
        except urllib3.exceptions.HTTPError as error:
            raise KubernetesUnreachable(f"the Kubernetes API ({self.context}) cannot be reached: {error}") from None


class _NotFound(Exception):
    """404: no such object (or, on create, no such resource: the operator's CRD is not installed)."""


def _failed(pod) -> bool:
    if pod.status is None:
        return False
    statuses = pod.status.container_statuses or []
    return pod.status.phase == "Failed" or any(
        status.state and status.state.terminated and status.state.terminated.exit_code for status in statuses)


def _message(error) -> str:
    """The ``message`` of the API's Status body, else its body as it is."""
    try:
        return json.loads(error.body)["message"]
    except (TypeError, ValueError, KeyError):
        return " ".join(str(error.body or "").split())[:300]
