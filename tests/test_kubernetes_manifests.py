"""What the Kubernetes launcher submits: Kubeflow jobs rendered from a cluster profile and checked against the
official API models (kubeflow_trainer_api, kubeflow.training, kubernetes), without a cluster."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import yaml

from llmexp.configuration.compose import compose_config
from llmexp.errors import UserError
from llmexp.launchers.kubernetes_manifests import (
    API, KubernetesResources, job_name, kubernetes_resources, manifests_yaml, pod_path, render, validate,
)
from llmexp.launchers.placement import KUBERNETES_LAUNCHER, launcher_problem
from llmexp.planning.planner import make_plan
from tests.conftest import run_llmexp

PRESETS = ["single", "dp2", "tp8", "tp8_dp2", "tp4_pp4_dp4"]
LABELS = {"llmexp.io/sweep": "s1"}


def job(*overrides: str, kind: str = "TrainJob", run_dir: str = "/fsx/multirun/s1/0"):
    cfg = compose_config(["cluster=eks_example", f"cluster.job_kind={kind}", *overrides])
    resources = kubernetes_resources(cfg)
    assert isinstance(resources, KubernetesResources), resources
    return cfg, resources, render(cfg, job_name("s1", 0), list(overrides), run_dir, resources, LABELS)


def pod_specs(manifest):
    """(pod spec or pod patch, pod count, the container with the image) of each role of the job."""
    spec = manifest["spec"]
    if manifest["kind"] == "TrainJob":
        patch = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
        return [(patch["template"]["spec"]["template"]["spec"], spec["trainer"]["numNodes"], spec["trainer"])]
    return [(role["template"]["spec"], role["replicas"], role["template"]["spec"]["containers"][0])
            for role in spec["pytorchReplicaSpecs"].values()]


@pytest.mark.parametrize("kind", list(API))
@pytest.mark.parametrize("preset", PRESETS)
def test_each_generation_gets_its_nodes_and_the_plans_layout(kind, preset):
    efa_per_node = {"h100": 32, "a100_80g": 4}
    for hardware in ("h100", "a100_80g"):
        cfg, resources, manifest = job(f"hardware={hardware}", f"parallelism={preset}", kind=kind)
        validate(manifest)
        place, layout = cfg.cluster.hardware[hardware], cfg.parallelism
        gpus = layout.devices_per_node
        efa = math.ceil(efa_per_node[hardware] * gpus / 8)
        pods = pod_specs(manifest)
        assert sum(count for _, count, _ in pods) == layout.nodes
        for spec, _, container in pods:
            assert spec["nodeSelector"] == dict(place.node_selector)
            assert spec["nodeSelector"]["node.kubernetes.io/instance-type"] == {
                "h100": "p5.48xlarge", "a100_80g": "p4de.24xlarge"}[hardware]
            assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
            asked = container.get("resources") or container["resourcesPerNode"]
            assert asked["limits"] == {"memory": f"{place.memory_per_gpu_gb * gpus}G", "nvidia.com/gpu": str(gpus),
                                       "vpc.amazonaws.com/efa": str(efa)}
            assert asked["requests"]["cpu"] == str(place.cpus_per_gpu * gpus)
            assert {"name": "runs", "persistentVolumeClaim": {"claimName": "fsx-claim"}} in spec["volumes"]
            assert container["command"][:3] == ["torchrun", "-m", "llmexp"]
            assert container["command"][-1] == "hydra.run.dir=/fsx/multirun/s1/0"
        procs = (manifest["spec"]["trainer"]["numProcPerNode"] if kind == "TrainJob"
                 else int(manifest["spec"]["nprocPerNode"]))
        assert procs == gpus and layout.nodes * procs == make_plan(cfg).world_size
        assert (resources.nodes, resources.procs_per_node, resources.gpus_per_node, resources.efa_per_node) == (
            layout.nodes, gpus, gpus, efa)
        assert manifest["metadata"] == {"name": "llmexp-s1-0", "namespace": "llm", "labels": LABELS}


def test_a_pytorchjob_has_one_master_and_a_worker_per_further_node():
    _, _, one = job("hardware=h100", "parallelism=tp8", kind="PyTorchJob")
    assert {role: spec["replicas"] for role, spec in one["spec"]["pytorchReplicaSpecs"].items()} == {"Master": 1}
    _, _, eight = job("hardware=h100", "parallelism=tp4_pp4_dp4", kind="PyTorchJob")
    assert {role: spec["replicas"] for role, spec in eight["spec"]["pytorchReplicaSpecs"].items()} == {
        "Master": 1, "Worker": 7}
    assert [spec["template"]["spec"]["containers"][0]["name"] for spec in eight["spec"]["pytorchReplicaSpecs"].values()
            ] == ["pytorch", "pytorch"]  # the name the training operator sets PET_* variables in


def test_a_trainjob_runs_on_the_profiles_runtime_with_its_image_env_labels_and_deadline():
    _, _, manifest = job("hardware=h200", "parallelism=tp8_dp2", "+cluster.labels.team=nlp")
    validate(manifest)
    spec = manifest["spec"]
    assert manifest["metadata"]["labels"] == {"team": "nlp", **LABELS}
    assert spec["runtimeRef"] == {"name": "torch-distributed", "apiGroup": "trainer.kubeflow.org",
                                  "kind": "ClusterTrainingRuntime"}
    assert spec["trainer"]["image"].endswith("/llmexp:latest") and spec["activeDeadlineSeconds"] == 240 * 60
    assert {"name": "FI_PROVIDER", "value": "efa"} in spec["trainer"]["env"]
    assert spec["trainer"]["resourcesPerNode"]["limits"]["vpc.amazonaws.com/efa"] == "16"  # p5en
    patch = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert patch["name"] == "node" and patch["template"]["spec"]["template"]["metadata"]["labels"] == {
        "team": "nlp", **LABELS}
    pod = patch["template"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "llmexp-runner" and "nodeSelector" not in pod
    assert pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"] == [
        {"matchExpressions": [{"key": "node.kubernetes.io/instance-type", "operator": "In",
                               "values": ["p5en.48xlarge", "p5e.48xlarge"]}]}]


TRAINJOB_BREAKS = [
    (lambda m: m["spec"]["trainer"].__setitem__("numNodes", "2"),
     "TrainJob field spec.trainer.numNodes: Input should be a valid integer, got '2'."),
    (lambda m: m["spec"]["trainer"].__setitem__("numnodes", 2),
     "TrainJob field spec.trainer.numnodes: TrainerV1alpha1Trainer has no field 'numnodes'"),
    (lambda m: m["spec"]["runtimeRef"].pop("name"), "TrainJob field spec.runtimeRef.name: required, missing."),
    (lambda m: m["spec"]["trainer"]["resourcesPerNode"]["limits"].__setitem__("nvidia.com/gpu", [8]),
     "TrainJob field spec.trainer.resourcesPerNode.limits.nvidia.com/gpu: expects float or str, got [8]."),
    (lambda m: pod_specs(m)[0][0]["tolerations"][0].__setitem__("tolerationSecond", 30),
     "replicatedJobs[0].template.spec.template.spec.tolerations[0].tolerationSecond: IoK8sApiCoreV1Toleration has no "
     "field 'tolerationSecond' (its fields: effect, key, operator, tolerationSeconds, value)."),
    (lambda m: m.__setitem__("apiVersion", "kubeflow.org/v1"),
     "TrainJob field apiVersion: expects trainer.kubeflow.org/v1alpha1, got 'kubeflow.org/v1'."),
]
PYTORCHJOB_BREAKS = [
    (lambda m: m["spec"]["pytorchReplicaSpecs"]["Worker"].__setitem__("replicas", "1"),
     "PyTorchJob field spec.pytorchReplicaSpecs.Worker.replicas: expects int, got '1'."),
    (lambda m: m["spec"].__setitem__("nprocPerNode", 8), "PyTorchJob field spec.nprocPerNode: expects str, got 8."),
    (lambda m: m["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0].pop("name"),
     "PyTorchJob field spec.pytorchReplicaSpecs.Master.template.spec.containers[0].name: required, missing."),
    (lambda m: m["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"].__setitem__("nodeSelecter", {}),
     "PyTorchJob field spec.pytorchReplicaSpecs.Master.template.spec.nodeSelecter: V1PodSpec has no field"),
    (lambda m: m["metadata"].__setitem__("name", "Run_1"), "PyTorchJob field metadata.name: 'Run_1' is not a DNS-1035"),
    (lambda m: m.__setitem__("kind", "TFJob"), "kind: expects one of TrainJob, PyTorchJob, got 'TFJob'."),
]


@pytest.mark.parametrize("kind, break_it, message", [("TrainJob", *case) for case in TRAINJOB_BREAKS]
                         + [("PyTorchJob", *case) for case in PYTORCHJOB_BREAKS])
def test_a_broken_manifest_fails_naming_the_field(kind, break_it, message):
    _, _, manifest = job("hardware=h100", "parallelism=tp8_dp2", kind=kind)
    validate(copy.deepcopy(manifest))
    break_it(manifest)
    with pytest.raises(ValueError) as error:
        validate(manifest)
    assert message in str(error.value)


def test_a_time_limit_of_zero_sets_no_deadline():
    for kind in API:
        _, _, manifest = job("hardware=h100", "cluster.time_limit_min=0", kind=kind)
        validate(manifest)
        assert "activeDeadlineSeconds" not in str(manifest)


def test_cpu_pods_ask_for_cpus_and_memory_per_process_and_no_device():
    _, resources, manifest = job("hardware=cpu", "hardware.accelerator=cpu", "parallelism=dp2")
    validate(manifest)
    assert manifest["spec"]["trainer"]["resourcesPerNode"] == {"requests": {"cpu": "4", "memory": "8G"},
                                                                "limits": {"memory": "8G"}}
    assert (resources.gpus_per_node, resources.efa_per_node, resources.procs_per_node) == (0, 0, 2)
    assert pod_specs(manifest)[0][0]["nodeSelector"] == {"eks.amazonaws.com/nodegroup": "system"}


def test_an_unmapped_hardware_or_a_crowded_node_gives_the_reason_and_the_fix():
    unmapped = kubernetes_resources(compose_config(["cluster=eks_example", "hardware=b200"]))
    assert unmapped == (
        "hardware=b200 has no placement in cluster=eks_example (it maps a100_40g, a100_80g, cpu, h100, h200); add "
        "cluster.hardware.b200 to llmexp/conf/cluster/eks_example.yaml or choose a hardware it maps.")
    crowded = kubernetes_resources(compose_config(
        ["cluster=eks_example", "hardware=h100", "parallelism=tp8", "cluster.hardware.h100.gpus_per_node=4"]))
    assert isinstance(crowded, str) and "puts 8 ranks on each node" in crowded and "has 4 GPUs" in crowded
    assert "parallelism.devices_per_node <= 4" in crowded


@pytest.mark.parametrize("overrides, message", [
    (["cluster=eks_example", "cluster.account=my_project"], "cluster.account is a key of cluster=example and "
     "cluster=localhost; this run has cluster=eks_example, which has no such key"),
    (["cluster=example", "cluster.namespace=llm"], "cluster.namespace=llm: cluster.namespace is a key of "
     "cluster=eks_example; this run has cluster=example, which has no such key: choose cluster=eks_example"),
    (["cluster=localhost", "cluster.hardware.h100.efa_per_node=4"], "efa_per_node"),
    (["cluster=eks_example", "cluster.job_kind=MPIJob"], "cluster.job_kind expects one of TrainJob, PyTorchJob"),
])
def test_compose_refuses_a_key_of_the_other_cluster_kind(overrides, message):
    with pytest.raises(UserError) as error:
        compose_config(overrides)
    assert message in str(error.value)


def test_job_names_are_dns_labels_unique_per_point_and_sweep():
    names = {job_name(sweep, num) for sweep in ("2026-12-07/10-00-00", "2026-12-07/10-00-01", "x" * 80 + "a",
                                                "x" * 80 + "b") for num in (0, 1, 117)}
    assert len(names) == 12
    assert all(re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 40 for name in names)
    assert job_name("2026-12-07/10-00-00", 3) == "llmexp-2026-12-07-10-00-00-3"


def test_the_run_directory_is_where_pods_see_the_shared_volume():
    cfg = compose_config(["cluster=eks_example", "cluster.storage.local_path=/mnt/fsx/"])
    assert pod_path(cfg, "/mnt/fsx/multirun/a/0") == "/fsx/multirun/a/0"
    with pytest.raises(UserError, match="is not on cluster=eks_example's shared volume"):
        pod_path(cfg, "/home/me/multirun/a/0")
    with pytest.raises(UserError):
        pod_path(cfg, "/mnt/fsx2/multirun/a/0")


def test_manifests_print_as_one_yaml_stream_kubectl_applies():
    documents = [job("hardware=h100")[2], job("hardware=a100_80g", kind="PyTorchJob")[2]]
    text = manifests_yaml(documents)
    assert text.count("\n---\n") == 1 and list(yaml.safe_load_all(text)) == documents


EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "kubernetes"


class _Response:
    """What the kubernetes client's ``ApiClient.deserialize`` reads: an HTTP response's body."""

    def __init__(self, document):
        self.data = json.dumps(document)


def test_the_eks_examples_are_valid_objects_that_match_the_profile():
    from kubernetes.client import ApiClient

    client, cluster = ApiClient(), compose_config(["cluster=eks_example"]).cluster
    objects = {}
    for name in ("namespace.yaml", "fsx-pvc.yaml"):
        for document in yaml.safe_load_all((EXAMPLES / name).read_text(encoding="utf-8")):
            model = f"V1{document['kind']}"
            read = client.deserialize(_Response(document), model)
            assert client.sanitize_for_serialization(read) == document, (name, model)  # no key the model lacks
            objects[document["kind"]] = read
    assert objects["Namespace"].metadata.name == cluster.namespace
    assert objects["ServiceAccount"].metadata.name == cluster.service_account
    claim = objects["PersistentVolumeClaim"]
    assert (claim.metadata.name, claim.metadata.namespace) == (cluster.storage.claim, cluster.namespace)
    assert claim.spec.access_modes == ["ReadWriteMany"]
    assert claim.spec.storage_class_name == objects["StorageClass"].metadata.name
    groups = {group["instanceType"]: group for group in
              yaml.safe_load((EXAMPLES / "eks-cluster.yaml").read_text(encoding="utf-8"))["managedNodeGroups"]}
    for hardware in ("h100", "a100_80g"):
        place = cluster.hardware[hardware]
        group = groups[place.node_selector["node.kubernetes.io/instance-type"]]
        assert group["efaEnabled"] and [taint["key"] for taint in group["taints"]] == [
            toleration.key for toleration in place.tolerations]


# A secret typed on the command line, as a sweep writes the job's override (Hydra escapes $, {, } and :)
TYPED_SECRET = r"tracker.uri=https\://$\{oc.env\:LLMEXP_SECRET_2\}@mlflow.example"


@pytest.mark.parametrize("kind", list(API))
def test_secret_env_and_the_sweeps_secret_reach_the_container_as_secret_key_refs(kind):
    cfg = compose_config(["cluster=eks_example", f"cluster.job_kind={kind}", "hardware=h100",
                          "+cluster.secret_env.HF_TOKEN=hf/token"])
    resources = kubernetes_resources(cfg)
    mapped = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    typed = {"name": "LLMEXP_SECRET_2", "valueFrom": {"secretKeyRef": {"name": "llmexp-s1-secrets",
                                                                        "key": "LLMEXP_SECRET_2"}}}
    for arguments, expected in ((["tracker=mlflow", TYPED_SECRET], [mapped, typed]), (["tracker=mlflow"], [mapped])):
        manifest = render(cfg, job_name("s1", 0), arguments, "/fsx/s1/0", resources, LABELS, "llmexp-s1-secrets")
        validate(manifest)
        env = pod_specs(manifest)[0][2]["env"]
        assert env[0] == {"name": "FI_PROVIDER", "value": "efa"} and env[3:] == expected
    with pytest.raises(ValueError, match="read LLMEXP_SECRET_2, but no Secret of the sweep holds them"):
        render(cfg, job_name("s1", 0), [TYPED_SECRET], "/fsx/s1/0", resources, LABELS)


@pytest.mark.parametrize("entry, message", [
    ("WANDB_API_KEY=wandb", "cluster.secret_env.WANDB_API_KEY=wandb is not <secret name>/<key>: it names the key of a "
     "Secret in namespace llm"),
    ("WANDB_API_KEY='Wandb/api key'", "cluster.secret_env.WANDB_API_KEY=Wandb/api key is not <secret name>/<key>"),
    ("NCCL_DEBUG=nccl/debug", "cluster.secret_env.NCCL_DEBUG: NCCL_DEBUG is set by cluster.env too"),
    ("LLMEXP_SECRET_0=a/b", "LLMEXP_SECRET_0 is llmexp's own"),
])
def test_a_wrong_secret_env_is_refused_before_anything_is_submitted(entry, message):
    cfg = compose_config(["cluster=eks_example", f"+cluster.secret_env.{entry}"])
    assert message in launcher_problem(KUBERNETES_LAUNCHER, cfg)
    with pytest.raises(UserError, match="cluster.secret_env"):
        render(cfg, "llmexp-s1-0", [], "/fsx/s1/0", kubernetes_resources(cfg), LABELS)


def test_a_wrong_secret_env_stops_the_sweep_with_exit_2_writing_nothing(tmp_path):
    done = run_llmexp("-m", "hydra/launcher=kubernetes", "cluster=eks_example", "+cluster.secret_env.HF_TOKEN=hf",
                      "hydra.launcher.dry_run=true", "seed=0,1", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    message = " ".join(done.stderr.split())
    assert "cluster.secret_env.HF_TOKEN=hf is not <secret name>/<key>" in message
    assert "`kubectl -n llm create secret generic wandb --from-literal=api-key=<value>`" in message
    assert list(tmp_path.iterdir()) == []


def test_the_pods_llmexp_resolves_the_typed_secret_from_its_variable(monkeypatch):
    """The pod's command line passes through llmexp's own secret hiding first: a reference stays a reference."""
    from llmexp.configuration.secrets import secrets_to_environment

    monkeypatch.setenv("LLMEXP_SECRET_2", "ci:pw-3a9f")  # what secretKeyRef gives the container
    overrides = secrets_to_environment(["tracker=mlflow", TYPED_SECRET])
    assert compose_config(overrides).tracker.uri == "https://ci:pw-3a9f@mlflow.example"
