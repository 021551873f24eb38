"""What a job becomes on a Kubernetes cluster: a Kubeflow TrainJob (Trainer v2) or PyTorchJob (training operator).

Pure Python: the launcher, its dry run and the tests share it; only ``validate`` imports the
official API models (the ``kubernetes`` extra). The job's ``hardware`` picks its nodes through the
cluster profile (``cluster=<name>``, kind kubernetes), its layout comes from ``parallelism``: one
pod per node (``parallelism.nodes``), ``devices_per_node`` processes in each, started by
``torchrun -m llmexp``. torchrun takes the node count, processes per node, node rank and master
address from the ``PET_*`` variables both operators set, so the command is the same for both kinds.
Each pod mounts the profile's shared volume, where the run directory is, and asks for its GPUs,
their share of the node's EFA devices, CPUs and memory.
"""

from __future__ import annotations

import hashlib
import math
import posixpath
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Dict, List, Optional, Tuple, Union, get_args, get_origin

import yaml

from llmexp.errors import UserError
from llmexp.launchers.kubernetes_secrets import secret_env
from llmexp.launchers.placement import hardware_placement

# kind -> (API group, version, plural): what the client's CustomObjectsApi calls take
API = {"TrainJob": ("trainer.kubeflow.org", "v1alpha1", "trainjobs"), "PyTorchJob": ("kubeflow.org", "v1", "pytorchjobs")}

EFA_RESOURCE = "vpc.amazonaws.com/efa"  # the AWS EFA device plugin's extended resource
RUN_VOLUME = "runs"  # the pod's volume holding the shared storage (run directories)
SHM_VOLUME = "dshm"  # a memory-backed /dev/shm: NCCL and data loader workers outgrow the container's 64 MB
TRAINJOB_NODE = "node"  # the torch-distributed runtime's replicated job and container
PYTORCHJOB_CONTAINER = "pytorch"  # the container name the training operator looks for
PATCH_MANAGER = "llmexp"  # this launcher's entry in a TrainJob's runtimePatches
MAX_NAME = 40  # leaves room for what the operators append (-worker-<n>, -node-0-<n>-<hash>) within 63


@dataclass(frozen=True)
class KubernetesResources:
    """What one job asks for: its pods (one per node) and what each pod gets; equal jobs go to the same nodes."""

    nodes: int
    procs_per_node: int
    gpus_per_node: int  # GPUs each pod asks for (0 on CPU nodes)
    gpu_resource: str
    cpu: int  # per pod
    memory_gb: Optional[int]  # per pod; None: no memory request
    efa_per_node: int  # EFA devices each pod asks for
    node_selector: Tuple[Tuple[str, str], ...]
    node_affinity: Tuple[Tuple[str, Tuple[str, ...]], ...]  # node label -> any of these values
    tolerations: Tuple[Tuple[Tuple[str, str], ...], ...]  # each toleration's set fields, as (name, value) pairs

    def resource_requirements(self) -> Dict[str, Dict[str, str]]:
        """The pod's core/v1 ResourceRequirements: GPUs and EFA devices as limits (extended resources), CPU and
        memory requested too, so the pod lands on a node with room; CPU is not capped (no throttling)."""
        devices = {name: str(count) for name, count in ((self.gpu_resource, self.gpus_per_node),
                                                        (EFA_RESOURCE, self.efa_per_node)) if count}
        memory = {"memory": f"{self.memory_gb}G"} if self.memory_gb else {}
        return {"requests": {"cpu": str(self.cpu), **memory, **devices}, "limits": {**memory, **devices}}

    def affinity(self) -> Dict[str, Any]:
        """The pod's core/v1 Affinity: nodes whose labels take one of the listed values, each label required."""
        if not self.node_affinity:
            return {}
        expressions = [{"key": key, "operator": "In", "values": list(values)} for key, values in self.node_affinity]
        return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": expressions}]}}}

    def to_dict(self) -> Dict[str, Any]:
        return {
            "nodes": self.nodes, "procs_per_node": self.procs_per_node, "gpus_per_node": self.gpus_per_node,
            "gpu_resource": self.gpu_resource, "cpu": self.cpu, "memory_gb": self.memory_gb,
            "efa_per_node": self.efa_per_node, "node_selector": dict(self.node_selector),
            "node_affinity": {key: list(values) for key, values in self.node_affinity},
            "tolerations": [dict(toleration) for toleration in self.tolerations],
        }


def kubernetes_resources(cfg) -> Union[KubernetesResources, str]:
    """The job's resources on ``cfg.cluster``, or why it cannot go there (one sentence with the fix)."""
    place = hardware_placement(cfg)
    if isinstance(place, str):
        return place
    procs = cfg.parallelism.devices_per_node
    gpus = procs if place.gpus_per_node else 0
    per_process = gpus or procs  # CPU and memory come per GPU, or per process on CPU nodes
    return KubernetesResources(
        nodes=cfg.parallelism.nodes,
        procs_per_node=procs,
        gpus_per_node=gpus,
        gpu_resource=place.gpu_resource,
        cpu=place.cpus_per_gpu * per_process,
        memory_gb=place.memory_per_gpu_gb * per_process if place.memory_per_gpu_gb else None,
        efa_per_node=math.ceil(place.efa_per_node * gpus / place.gpus_per_node) if gpus else 0,
        node_selector=tuple(sorted((str(key), str(value)) for key, value in place.node_selector.items())),
        node_affinity=tuple(sorted((str(key), tuple(map(str, values))) for key, values in place.node_affinity.items())),
        tolerations=tuple(_toleration(toleration) for toleration in place.tolerations),
    )


def _toleration(toleration) -> Tuple[Tuple[str, str], ...]:
    """A profile's toleration as core/v1 Toleration fields, unset ones left out (Exists takes no value)."""
    fields = {"key": toleration.key, "operator": toleration.operator,
              "value": toleration.value, "effect": toleration.effect}
    return tuple((name, str(value)) for name, value in fields.items() if value is not None)


def job_name(sweep_id: str, num: int) -> str:
    """The job's object name: ``llmexp-<sweep>-<num>``, a DNS-1035 label short enough for the pods' names.

    ``sweep_id`` (e.g. the sweep directory's ``2026-12-07/10-00-00``) is lowercased to letters, digits
    and dashes; a long one is cut and given a hash of the whole, so two sweeps never share names.
    """
    suffix = f"-{num}"
    slug = re.sub(r"[^a-z0-9]+", "-", sweep_id.lower()).strip("-")
    room = MAX_NAME - len("llmexp-") - len(suffix)
    if len(slug) > room:
        digest = hashlib.sha1(sweep_id.encode("utf-8")).hexdigest()[:6]
        slug = f"{slug[:room - len(digest) - 1].rstrip('-')}-{digest}"
    return f"llmexp-{slug}{suffix}" if slug else f"llmexp{suffix}"


def pod_path(cfg, local_path: str, what: str = "run directory") -> str:
    """``local_path`` (a run directory or a ``--config-dir`` on this machine) as the pods see it on the shared volume.

    The launcher's machine sees the volume at ``cluster.storage.local_path`` (or at ``mount_path``
    when unset), pods at ``mount_path``; a directory outside the volume is one pods cannot reach.
    """
    storage = cfg.cluster.storage
    root = PurePosixPath(posixpath.normpath(storage.local_path or storage.mount_path))
    path = PurePosixPath(posixpath.normpath(local_path))
    if path != root and root not in path.parents:
        fix = (f"copy it under {root} and pass --config-dir={root}/<dir>" if what == CONFIG_DIR else
               f"run the sweep from a directory under {root} or set hydra.sweep.dir={root}/<dir>")
        raise UserError(
            f"the {what} {local_path} is not on cluster={cfg.cluster.name}'s shared volume (claim "
            f"{storage.claim}, seen here at {root}), so its pods could not reach it: {fix}, or set "
            "cluster.storage.local_path to where this machine mounts the volume."
        )
    return str(PurePosixPath(storage.mount_path) / path.relative_to(root))


CONFIG_DIR = "config directory (--config-dir)"


def render(cfg, name: str, arguments: List[str], run_dir: str, resources: KubernetesResources,
           labels: Dict[str, str], secret: Optional[str] = None) -> Dict[str, Any]:
    """The job's manifest (a plain dict) of kind ``cfg.cluster.job_kind``.

    The pod runs ``torchrun -m llmexp <arguments> hydra.run.dir=<run_dir as pods see it>``;
    ``arguments`` are the sweep's ``--config-name``/``--config-dir`` (as pods see it), if any, and the point's
    overrides (the profile included), without ``hydra.run.dir``.
    ``labels`` go on the job and its pods (a sweep's objects are found by them), after the profile's own.
    ``secret`` names the sweep's Secret, where the container finds the ``LLMEXP_SECRET_<n>`` that
    ``arguments`` read (``kubernetes_secrets``).
    """
    cluster = cfg.cluster
    labels = {**cluster.labels, **labels}
    command = ["torchrun", "-m", "llmexp", *arguments, f"hydra.run.dir={pod_path(cfg, run_dir)}"]
    env = [{"name": key, "value": str(value)} for key, value in cluster.env.items()]
    env += secret_env(cluster, arguments, secret)
    mounts = [{"name": RUN_VOLUME, "mountPath": cluster.storage.mount_path}, {"name": SHM_VOLUME, "mountPath": "/dev/shm"}]
    volumes = [{"name": RUN_VOLUME, "persistentVolumeClaim": {"claimName": cluster.storage.claim}},
               {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}}]
    placement = {
        **({"serviceAccountName": cluster.service_account} if cluster.service_account else {}),
        **({"nodeSelector": dict(resources.node_selector)} if resources.node_selector else {}),
        **({"affinity": resources.affinity()} if resources.node_affinity else {}),
        **({"tolerations": [dict(toleration) for toleration in resources.tolerations]} if resources.tolerations else {}),
        "volumes": volumes,
    }
    metadata = {"name": name, "namespace": cluster.namespace, "labels": dict(labels)}
    deadline = {"activeDeadlineSeconds": cluster.time_limit_min * 60} if cluster.time_limit_min > 0 else {}
    if cluster.job_kind == "PyTorchJob":
        container = {"name": PYTORCHJOB_CONTAINER, "image": cluster.image, "command": command,
                     "resources": resources.resource_requirements(), "volumeMounts": mounts,
                     **({"env": env} if env else {})}
        pod = {"metadata": {"labels": dict(labels)}, "spec": {**placement, "containers": [container]}}
        replicas = {"Master": 1, "Worker": resources.nodes - 1}
        return {
            "apiVersion": "/".join(API["PyTorchJob"][:2]), "kind": "PyTorchJob", "metadata": metadata,
            "spec": {
                "nprocPerNode": str(resources.procs_per_node),
                "runPolicy": {**deadline, "backoffLimit": 0, "cleanPodPolicy": "None"},
                "pytorchReplicaSpecs": {role: {"replicas": count, "restartPolicy": "Never", "template": pod}
                                        for role, count in replicas.items() if count},
            },
        }
    pod_patch = {**placement, "containers": [{"name": TRAINJOB_NODE, "volumeMounts": mounts}]}
    return {
        "apiVersion": "/".join(API["TrainJob"][:2]), "kind": "TrainJob", "metadata": metadata,
        "spec": {
            "runtimeRef": {"name": cluster.runtime, "apiGroup": API["TrainJob"][0], "kind": "ClusterTrainingRuntime"},
            **deadline,
            "trainer": {
                "image": cluster.image, "command": command, "numNodes": resources.nodes,
                "numProcPerNode": resources.procs_per_node, "resourcesPerNode": resources.resource_requirements(),
                **({"env": env} if env else {}),
            },
            "runtimePatches": [{"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {
                "replicatedJobs": [{"name": TRAINJOB_NODE, "template": {"spec": {"template": {
                    "metadata": {"labels": dict(labels)}, "spec": pod_patch}}}}],
            }}}}],
        },
    }


def validate(manifest: Dict[str, Any]) -> None:
    """Check ``manifest`` against the official API models of its kind; ValueError naming the first wrong field.

    A TrainJob is read into kubeflow_trainer_api's ``TrainerV1alpha1TrainJob``, a PyTorchJob into
    kubeflow.training's ``KubeflowOrgV1PyTorchJob`` (its pods are the ``kubernetes`` client's models),
    one object at a time, so an error carries its path. What their own deserialisers let through is
    refused as well: a key the model does not declare (the API server would drop it, or refuse it),
    and a value of another JSON type (``"2"`` for an integer, which they would coerce).
    """
    kind = manifest.get("kind")
    if kind not in API:
        raise ValueError(f"kind: expects one of {', '.join(API)}, got {kind!r}.")
    version = "/".join(API[kind][:2])
    if manifest.get("apiVersion") != version:
        raise ValueError(f"{kind} field apiVersion: expects {version}, got {manifest.get('apiVersion')!r}.")
    name = (manifest.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not DNS_1035.fullmatch(name):
        raise ValueError(f"{kind} field metadata.name: {name!r} is not a DNS-1035 label (lowercase letters, digits "
                         f"and '-', starting with a letter, at most 63 characters).")
    try:
        if kind == "TrainJob":
            from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

            _read_pydantic(TrainerV1alpha1TrainJob, manifest, "")
        else:
            _read_swagger("KubeflowOrgV1PyTorchJob", manifest, "")
    except ValueError as error:
        raise ValueError(f"{kind} field {error}") from None


DNS_1035 = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


def _read_pydantic(annotation: Any, data: Any, path: str) -> None:
    """Read ``data`` as ``annotation`` of kubeflow_trainer_api (pydantic models), one object at a time."""
    from pydantic import BaseModel, TypeAdapter, ValidationError

    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Union:  # Optional[X]
        _read_pydantic(next(arg for arg in args if arg is not type(None)), data, path)
    elif origin is list:
        _expect(data, list, "a list", path)
        for index, item in enumerate(data):
            _read_pydantic(args[0], item, f"{path}[{index}]")
    elif origin is dict:
        _expect(data, dict, "an object", path)
        for key, value in data.items():
            _read_pydantic(args[1], value, _field(path, key))
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if "one_of_schemas" not in annotation.model_fields:  # not a oneOf wrapper (a quantity: string or number)
            _expect(data, dict, "an object", path)
            fields = {field.alias or name: field for name, field in annotation.model_fields.items()}
            for key, value in data.items():
                if key not in fields:
                    raise ValueError(_unknown(path, key, annotation.__name__, fields))
                if value is not None:
                    _read_pydantic(fields[key].annotation, value, _field(path, key))
        try:
            annotation.from_dict(data)  # required fields, enumerations, a quantity's oneOf
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            missing = first["loc"] and first["loc"][0] not in data
            raise ValueError(f"{_field(path, where)}: {'required, missing' if missing else first['msg']}.") from None
        except ValueError as error:  # a oneOf wrapper matching none of its schemas
            if "one_of_schemas" not in annotation.model_fields:
                raise ValueError(f"{path}: {error}") from None
            schemas = " or ".join(sorted(annotation.model_fields["one_of_schemas"].default))
            raise ValueError(f"{path}: expects {schemas}, got {data!r}.") from None
    else:
        try:
            TypeAdapter(annotation).validate_python(data)
        except ValidationError as error:
            raise ValueError(f"{path}: {error.errors()[0]['msg']}, got {data!r}.") from None


SWAGGER_TYPES = {"str": (str,), "int": (int,), "bool": (bool,), "float": (int, float), "object": (object,),
                 "datetime": (str,), "date": (str,)}


def _read_swagger(type_name: str, data: Any, path: str) -> Any:
    """``data`` as the object kubeflow.training's ApiClient would make of it (its models, or the ``kubernetes``
    client's for pods), one object at a time; its constructors refuse missing required fields."""
    import kubeflow.training.models

    if type_name.startswith("list["):
        _expect(data, list, "a list", path)
        return [_read_swagger(type_name[5:-1], item, f"{path}[{index}]") for index, item in enumerate(data)]
    if type_name.startswith("dict("):
        _expect(data, dict, "an object", path)
        value_type = type_name[5:-1].split(", ", 1)[1]
        return {key: _read_swagger(value_type, value, _field(path, key)) for key, value in data.items()}
    if type_name in SWAGGER_TYPES:
        if not isinstance(data, SWAGGER_TYPES[type_name]) or (type_name != "bool" and isinstance(data, bool)):
            raise ValueError(f"{path}: expects {type_name}, got {data!r}.")
        return data
    model = getattr(kubeflow.training.models, type_name)
    _expect(data, dict, "an object", path)
    fields = {json_name: attribute for attribute, json_name in model.attribute_map.items()}
    values = {}
    for key, value in data.items():
        if key not in fields:
            raise ValueError(_unknown(path, key, type_name, fields))
        if value is not None:
            values[fields[key]] = _read_swagger(model.openapi_types[fields[key]], value, _field(path, key))
    try:
        return model(**values)
    except ValueError as error:  # "Invalid value for `containers`, must not be `None`"
        required = re.match(r"Invalid value for `(\w+)`, must not be `None`", str(error))
        if required:
            raise ValueError(f"{_field(path, model.attribute_map[required[1]])}: required, missing.") from None
        raise ValueError(f"{path}: {error}") from None


def _expect(data: Any, kind: type, what: str, path: str) -> None:
    if not isinstance(data, kind):
        raise ValueError(f"{path}: expects {what}, got {data!r}.")


def _unknown(path: str, key: str, model: str, fields) -> str:
    return f"{_field(path, key)}: {model} has no field {key!r} (its fields: {', '.join(sorted(fields))})."


def _field(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def manifests_yaml(manifests: List[Dict[str, Any]]) -> str:
    """The manifests as one multi-document YAML stream, as ``kubectl apply -f -`` takes it."""
    return yaml.safe_dump_all(manifests, sort_keys=False, default_flow_style=False)
