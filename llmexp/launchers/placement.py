"""Where a job goes on a Slurm cluster: its ``hardware`` through the cluster profile, its layout through ``parallelism``.

Pure Python (no submitit, no Slurm): the launcher, the dry run and the tests share it.
Ranks map to Slurm tasks one to one: ``parallelism.nodes`` nodes, ``devices_per_node``
tasks per node, each task one GPU of the profile's type, ``cpus_per_gpu`` CPUs and
``mem_per_gpu_gb`` memory with it.

Which cluster launcher needs which kind of profile (``CLUSTER_LAUNCHERS``), and what the
preflight refuses before anything is written (``launcher_problem``), are said here too, as is
the rule every cluster kind shares (``hardware_placement``): a hardware the profile maps, on
nodes with GPUs enough for the layout's ranks per node.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple, Union

from omegaconf import OmegaConf

from llmexp.configuration.compose import cluster_profiles
from llmexp.configuration.schema import CLUSTER_KINDS
from llmexp.launchers.kubernetes_secrets import secret_env_problem
from llmexp.machine.backends import importable

# llmexp/conf/hydra/launcher/slurm.yaml's _target_: a launcher that starts each job's ranks on the nodes it asks for
SLURM_LAUNCHER = "hydra_plugins.llmexp_launchers.SlurmLauncher"
KUBERNETES_LAUNCHER = "hydra_plugins.llmexp_launchers.KubernetesLauncher"  # conf/hydra/launcher/kubernetes.yaml's
CLUSTER_LAUNCHERS = {SLURM_LAUNCHER: "slurm", KUBERNETES_LAUNCHER: "kubernetes"}  # _target_ -> the profile kind it needs
# What hydra/launcher=kubernetes imports (the kubernetes extra), found without importing it
KUBERNETES_MODULES = ("kubernetes", "kubeflow_trainer_api", "kubeflow.training")
KUBERNETES_INSTALL = "pip install 'llmexp[kubernetes]'"


@dataclass(frozen=True)
class SlurmResources:
    """What one job asks Slurm for; jobs with equal resources are submitted together, as one array."""

    partition: Optional[str]
    constraint: Optional[str]
    gres: Optional[str]  # gpu:<type>:<n> per node
    gpus_per_node: Optional[int]  # untyped GPUs, when the profile names no gres type
    nodes: int
    tasks_per_node: int
    cpus_per_task: int
    mem_per_gpu: Optional[str]  # e.g. "120G"
    account: Optional[str]
    qos: Optional[str]
    timeout_min: int
    setup: Tuple[str, ...]

    def sbatch_parameters(self) -> Dict[str, Any]:
        """The resources in ``submitit.SlurmExecutor``'s names (its sbatch options), unset ones left out."""
        named = {
            "partition": self.partition,
            "constraint": self.constraint,
            "gres": self.gres,
            "gpus_per_node": self.gpus_per_node,
            "nodes": self.nodes,
            "ntasks_per_node": self.tasks_per_node,
            "cpus_per_task": self.cpus_per_task,
            "mem_per_gpu": self.mem_per_gpu,
            "account": self.account,
            "qos": self.qos,
            "time": self.timeout_min,
            "setup": list(self.setup) or None,
        }
        return {key: value for key, value in named.items() if value is not None}

    def to_dict(self) -> Dict[str, Any]:
        return {key: (list(value) if isinstance(value, tuple) else value) for key, value in asdict(self).items()}


def launcher_problem(target: str, cfg) -> Optional[str]:
    """Why the launcher ``target`` (a ``_target_``) cannot take ``cfg``'s jobs at all, else None: a cluster
    launcher without a profile of its kind, or the Kubernetes one without its extra or with a wrong ``secret_env``."""
    kind = CLUSTER_LAUNCHERS.get(target)
    if kind is None:  # the others start the ranks on this machine
        return None
    if problem := missing_cluster(cfg, kind):
        return problem
    if kind == "kubernetes" and (missing := [module for module in KUBERNETES_MODULES if not importable(module)]):
        return (f"hydra/launcher=kubernetes needs {', '.join(missing)}, which this environment lacks: "
                f"{KUBERNETES_INSTALL}")
    if kind == "kubernetes":
        return secret_env_problem(cfg.cluster)
    return None


def missing_cluster(cfg, kind: str = "slurm") -> Optional[str]:
    """Why ``hydra/launcher=<kind>`` cannot place ``cfg`` at all (no cluster profile of that kind chosen), else None."""
    if cluster_kind(cfg) == kind:
        return None
    profiles = ", ".join(name for name, schema in cluster_profiles().items() if schema is CLUSTER_KINDS[kind])
    return (
        f"hydra/launcher={kind} needs a cluster profile saying where each hardware goes, of kind {kind} "
        f"(cluster={cfg.cluster.name} is of kind {cluster_kind(cfg)}): add cluster=<name> "
        f"(llmexp/conf/cluster/: {profiles or 'none yet'}, or your own copy of one of them)."
    )


def cluster_kind(cfg) -> str:
    """The kind of ``cfg.cluster``'s profile (``CLUSTER_KINDS``: none, slurm, kubernetes ...), from its schema."""
    schema = OmegaConf.get_type(cfg.cluster)
    return next((kind for kind, kind_schema in CLUSTER_KINDS.items() if kind_schema is schema), "unknown")


def hardware_placement(cfg) -> Any:
    """``cfg.cluster``'s placement of ``cfg.hardware`` (a cluster kind's placement schema, with ``gpus_per_node``),
    or why the job cannot go there: the hardware is unmapped, or its nodes have fewer GPUs than the layout's
    ranks per node (one sentence with the fix)."""
    cluster, hardware, layout = cfg.cluster, cfg.hardware.name, cfg.parallelism
    place = cluster.hardware.get(hardware)
    if place is None:
        mapped = ", ".join(sorted(cluster.hardware)) or "nothing"
        return (
            f"hardware={hardware} has no placement in cluster={cluster.name} (it maps {mapped}); add "
            f"cluster.hardware.{hardware} to llmexp/conf/cluster/{cluster.name}.yaml or choose a hardware it maps."
        )
    ranks = layout.devices_per_node
    if place.gpus_per_node and ranks > place.gpus_per_node:
        return (
            f"parallelism={layout.name} puts {ranks} ranks on each node, but a {hardware} node of cluster="
            f"{cluster.name} has {place.gpus_per_node} GPUs; choose a layout with parallelism.devices_per_node <= "
            f"{place.gpus_per_node} (more nodes instead)."
        )
    return place


def slurm_resources(cfg) -> Union[SlurmResources, str]:
    """The job's resources on ``cfg.cluster``, or why it cannot go there (one sentence with the fix)."""
    cluster, layout = cfg.cluster, cfg.parallelism
    place = hardware_placement(cfg)
    if isinstance(place, str):
        return place
    ranks = layout.devices_per_node
    gpus = ranks if place.gpus_per_node else 0
    return SlurmResources(
        partition=place.partition,
        constraint=place.constraint,
        gres=f"gpu:{place.gres_type}:{gpus}" if gpus and place.gres_type else None,
        gpus_per_node=gpus if gpus and not place.gres_type else None,
        nodes=layout.nodes,
        tasks_per_node=ranks,
        cpus_per_task=place.cpus_per_gpu,
        mem_per_gpu=f"{place.mem_per_gpu_gb}G" if gpus and place.mem_per_gpu_gb else None,
        account=cluster.account,
        qos=cluster.qos,
        timeout_min=cluster.time_limit_min,
        setup=tuple(cluster.setup),
    )
