"""Typed schemas for every config group.

Hydra merges each YAML option onto its dataclass, so a misspelled key or a value of
the wrong type fails at compose time, before anything runs. Techniques bring their
own schema (see ``llmexp.techniques.contract``); these are the groups every run shares.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from llmexp.configuration.choice import Choice
from llmexp.configuration.rails import RAILS_OPTIONS, RailsConfig
from llmexp.configuration.retrieval import RETRIEVER_OPTIONS, RetrieverConfig


class Precision(Choice):
    """How a run's training computes (mixed precision keeps fp32 weights); the planner checks it against the
    hardware's dtypes and what the training backend runs there. Stages that only run a model (evaluate, quantize,
    prune, benchmark) compute in the dtype of its weights, on every hardware."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"
    fp8 = "fp8"
    fp4 = "fp4"


class Architecture(Choice):
    """Hugging Face ``model_type`` of a Llama-style decoder."""

    llama = "llama"
    mistral = "mistral"
    qwen2 = "qwen2"


class Accelerator(Choice):
    gpu = "gpu"
    cpu = "cpu"


class Generation(Choice):
    cpu = "cpu"
    volta = "volta"
    turing = "turing"
    ampere = "ampere"
    ada = "ada"
    hopper = "hopper"
    blackwell = "blackwell"


class DType(Choice):
    """What a device computes natively: the planner checks ``precision`` and quantization formats against it."""

    fp32 = "fp32"
    tf32 = "tf32"
    fp16 = "fp16"
    bf16 = "bf16"
    int8 = "int8"
    fp8 = "fp8"
    fp4 = "fp4"
    mxfp8 = "mxfp8"


class Interconnect(Choice):
    """How the devices of one node are linked."""

    none = "none"
    pcie3 = "pcie3"
    pcie4 = "pcie4"
    pcie5 = "pcie5"
    nvlink2 = "nvlink2"
    nvlink3 = "nvlink3"
    nvlink4 = "nvlink4"
    nvlink5 = "nvlink5"


class BackendKind(Choice):
    """What trains (``llmexp.machine.backends.BACKENDS``' training backends); see ``BackendConfig``."""

    torch = "torch"
    megatron = "megatron"


class Sharding(Choice):
    none = "none"
    fsdp = "fsdp"  # weights, grads and optimizer states split over dp


class TransformerImpl(Choice):
    auto = "auto"  # Transformer Engine where it is installed
    transformer_engine = "transformer_engine"
    local = "local"


class FP8Recipe(Choice):
    """Transformer Engine's FP8 scaling recipes (``mxfp8`` needs Blackwell)."""

    delayed = "delayed"
    tensorwise = "tensorwise"
    mxfp8 = "mxfp8"
    blockwise = "blockwise"


class DataKind(Choice):
    """What ``data`` reads; see ``DataConfig``."""

    embedded = "embedded"
    text = "text"
    jsonl = "jsonl"
    preference = "preference"
    noisy_web = "noisy_web"
    word_problems = "word_problems"
    knowledge = "knowledge"


class TrackerKind(Choice):
    """Where a run's results are mirrored (``llmexp.results.tracking.TRACKERS``)."""

    none = "none"
    wandb = "wandb"
    mlflow = "mlflow"


class WandbMode(Choice):
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class ModelConfig:
    """Architecture numbers of a decoder-only transformer, as published, and where its weights come from.

    Weights (``llmexp.models.starting_weights``): ``path``, a local Hugging Face directory whose
    config.json numbers replace these; else ``hub_repo`` at ``revision``, the preset's published
    weights, resolved through the Hugging Face cache (downloaded when the run starts unless
    ``HF_HUB_OFFLINE=1``); else, on the embedded data, ``baseline``: a technique node that trains
    them, run once per configuration and cached (``llmexp.models.embedded_baseline``); else none.
    """

    name: str = MISSING
    architecture: Architecture = Architecture.llama  # HF model_type
    vocab_size: int = MISSING
    hidden_size: int = MISSING
    intermediate_size: int = MISSING
    num_layers: int = MISSING
    num_attention_heads: int = MISSING
    num_key_value_heads: int = MISSING
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    # The sequence length it is trained and tuned at (its pretraining length before any long-context stage):
    # the planner shows memory at it when data.seq_len is far shorter. None: no such reference.
    train_seq_len: Optional[int] = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has biases on q/k/v
    path: Optional[str] = None  # a local Hugging Face checkpoint directory; wins over hub_repo
    hub_repo: Optional[str] = None  # org/name of the published weights on the Hugging Face Hub; null: none
    revision: str = "main"  # of hub_repo: a branch, a tag or a commit hash (a commit pins the weights)
    # how weights are made for a stage that adapts a base when none are given: a technique node
    # (tiny_llama: pretrain on the embedded data); null: none
    baseline: Any = None


@dataclass
class HardwareConfig:
    """One accelerator generation: what it can compute and how much it holds."""

    name: str = MISSING
    accelerator: Accelerator = Accelerator.gpu
    generation: Generation = MISSING
    memory_gb: Optional[float] = None  # per device; None on cpu means "this machine's RAM"
    dtypes: List[DType] = field(default_factory=list)
    gpus_per_node: int = 1
    interconnect: Interconnect = Interconnect.none


@dataclass
class ParallelismConfig:
    """How a job is laid out: tp * pp * dp must equal nodes * devices_per_node."""

    name: str = MISSING
    tp: int = 1
    pp: int = 1
    dp: int = 1
    nodes: int = 1
    devices_per_node: int = 1
    micro_batch: int = 16
    global_batch: int = 16
    sharding: Sharding = Sharding.none
    activation_checkpointing: bool = False
    # with pp > 1 on the torch backend: "1f1b" (one forward, one backward: fewer activations held) or "gpipe"
    pipeline_schedule: str = "1f1b"


@dataclass
class BackendConfig:
    """What trains; each option has a schema of its own (``BACKEND_OPTIONS``), so a key of one is refused in another."""

    name: BackendKind = MISSING


@dataclass
class TorchBackendConfig(BackendConfig):
    """Lightning on torch.distributed (DDP, FSDP2, DTensor tensor parallel): the default, runs on CPU.

    Its layout is all in ``parallelism``; it has no settings of its own.
    """

    name: BackendKind = BackendKind.torch


@dataclass
class MegatronBackendConfig(BackendConfig):
    """megatron-core on CUDA GPUs: tp, pp with virtual stages, sequence parallel, distributed optimizer,
    FP8/FP4 through Transformer Engine. ``llmexp.training.megatron.arguments`` translates these keys, with
    ``model``, ``parallelism`` and ``precision``, into megatron-core's arguments.
    """

    name: BackendKind = BackendKind.megatron
    sequence_parallel: bool = False  # split norm/dropout activations along the sequence over tp
    virtual_pipeline_stages: Optional[int] = None  # model chunks per pipeline rank (interleaved 1F1B)
    distributed_optimizer: bool = True  # optimizer states (and fp32 master weights) split over dp
    overlap_grad_reduce: bool = True  # reduce gradients bucket by bucket during backward
    transformer_impl: TransformerImpl = TransformerImpl.auto
    fp8_recipe: FP8Recipe = FP8Recipe.delayed  # used with precision=fp8


BACKEND_OPTIONS = {"torch": TorchBackendConfig, "megatron": MegatronBackendConfig}  # backend=<option> -> its schema


@dataclass
class DataConfig:
    """Where a run's data comes from; each option has a schema of its own (``DATA_OPTIONS``).

    Every option keeps the embedded world's settings: evaluation's tasks and a from-scratch
    model's tokenizer come from that world whatever the training data is.
    """

    name: DataKind = MISSING
    seed: int = 0
    seq_len: int = 64  # training block length; sft/lora/dpo examples are cut to it
    # embedded world: people with five attributes each, and arithmetic word problems
    num_people: int = 30
    heldout_documents: int = 200
    validation_split: float = 0.1  # share of the training records held out (when validation_path is unset)


@dataclass
class EmbeddedDataConfig(DataConfig):
    """Generated by the package from ``seed``; serves every technique: a text stream for pretrain/cpt, a Text2SQL
    instruction set for sft/lora, preference pairs for dpo."""

    name: DataKind = DataKind.embedded
    word_problem_weight: float = 1.0  # share of word problems in the pretraining stream, relative to the mixture's


@dataclass
class TextDataConfig(DataConfig):
    """The user's plain-text corpus: files or folders of them (.txt/.md: a document per paragraph; .jsonl: a record
    per line, its text in ``text_field``)."""

    name: DataKind = DataKind.text
    paths: List[str] = field(default_factory=list)
    text_field: str = "text"  # the JSONL field holding a record's text


@dataclass
class JsonlDataConfig(DataConfig):
    """The user's instruction records (sft, lora): a JSONL training file and, optionally, a validation file."""

    name: DataKind = DataKind.jsonl
    path: Optional[str] = None
    validation_path: Optional[str] = None


@dataclass
class PreferenceDataConfig(JsonlDataConfig):
    """Preference pairs for dpo (prompt, chosen, rejected); ``path`` unset means the embedded pairs."""

    name: DataKind = DataKind.preference


@dataclass
class NoisyWebDataConfig(DataConfig):
    """The embedded stream's documents as a polluted web crawl (``llmexp.data.noisy_web``): raw text for
    pretraining, and a corpus for technique=curate. Shares are of the clean pages (``documents_per_page``
    documents each)."""

    name: DataKind = DataKind.noisy_web
    word_problem_weight: float = 1.0
    documents: int = 20000  # clean documents of the embedded training stream, every one in the crawl
    documents_per_page: int = 6
    near_duplicate_pages: float = 0.05  # pages copied near_duplicate_copies times with word edits
    near_duplicate_copies: int = 20
    near_duplicate_jaccard: List[float] = field(default_factory=lambda: [1.0, 0.95, 0.9, 0.85])  # cycled per copy
    near_duplicate_ngram: int = 5  # word n-grams the similarity is measured on
    spam_pages: float = 0.5
    spam_kinds: List[str] = field(default_factory=lambda: [
        "navigation", "keyword_spam", "lorem_ipsum", "bullet_list", "symbols", "read_more", "script", "short"])
    foreign_pages: float = 0.2
    foreign_languages: List[str] = field(default_factory=lambda: ["de", "fr"])
    pii_pages: float = 0.1  # clean pages with PII lines written in
    pii_kinds: List[str] = field(default_factory=lambda: ["email", "phone", "ip_address", "credit_card"])
    shards: int = 4


@dataclass
class WordProblemsDataConfig(JsonlDataConfig):
    """Arithmetic word problems with worked answers ending in ``#### N`` (``llmexp.data.word_problems``): prompt ->
    solution for sft/lora, prompt and answer for grpo's verifiable reward. ``path`` (GSM8K's JSONL layout) unset:
    ``problems`` generated from the embedded world, their number triples never in its held-out test."""

    name: DataKind = DataKind.word_problems
    problems: int = 2000


@dataclass
class KnowledgeDataConfig(DataConfig):
    """The knowledge study (``llmexp.data.knowledge``): a second world of people the base never saw. Raw text for
    cpt (its biographies, ``paraphrases`` wordings each), instructions for sft/lora (``instructions``: ``reading``,
    answering from a context about practice people; ``questions``, the second world's facts), its questions for
    evaluation and its biographies for a retriever."""

    name: DataKind = DataKind.knowledge
    seq_len: int = 224  # a question with five biographies before it
    instructions: str = "reading"  # reading | questions
    reading_examples: int = 6000
    context_passages: int = 5  # at most this many biographies in a reading example's context, one the answer's
    closed_book_share: float = 0.2  # reading examples with no context, asking the first world's true facts
    questions_per_context: int = 4  # a reading example's questions: the first in the prompt, the rest after its answer
    paraphrases: int = 8


DATA_OPTIONS = {"embedded": EmbeddedDataConfig, "text": TextDataConfig, "jsonl": JsonlDataConfig,
                "preference": PreferenceDataConfig, "noisy_web": NoisyWebDataConfig,
                "word_problems": WordProblemsDataConfig, "knowledge": KnowledgeDataConfig}  # data=<option> -> its schema


@dataclass
class TrackerConfig:
    """Experiment tracker mirroring results.json; each option has a schema of its own (``TRACKER_OPTIONS``).

    Every option keeps ``tags``: labels of the run, in its results.json and on the tracker's run.
    """

    name: TrackerKind = MISSING
    tags: List[str] = field(default_factory=list)


@dataclass
class NoTrackerConfig(TrackerConfig):
    """No tracker: results.json and Lightning's metrics.csv in the run directory only."""

    name: TrackerKind = TrackerKind.none


@dataclass
class WandbTrackerConfig(TrackerConfig):
    """Weights & Biases: one wandb run per llmexp run, its files in ``<run dir>/wandb/``."""

    name: TrackerKind = TrackerKind.wandb
    project: str = "llmexp"
    mode: Optional[WandbMode] = None  # None: WANDB_MODE, else offline when WANDB_API_KEY is unset


@dataclass
class MlflowTrackerConfig(TrackerConfig):
    """MLflow: one mlflow run per llmexp run, in the experiment ``project``."""

    name: TrackerKind = TrackerKind.mlflow
    project: str = "llmexp"
    uri: Optional[str] = None  # tracking URI (default: sqlite:///mlflow.db in the working directory)


TRACKER_OPTIONS = {"none": NoTrackerConfig, "wandb": WandbTrackerConfig,
                   "mlflow": MlflowTrackerConfig}  # tracker=<option> -> its schema


@dataclass
class PipelineConfig:
    """Stages run in order; each names a technique node (``technique``, ``evaluation`` or one of ``nodes``).

    A stage whose job is to evaluate a model is skipped when the stage before it produced
    no new model (``llmexp technique=evaluate`` evaluates once, not twice).
    """

    name: str = MISSING
    stages: List[str] = field(default_factory=lambda: ["technique", "evaluation"])
    nodes: Dict[str, Any] = field(default_factory=dict)  # a pipeline's own technique nodes, by stage key
    inputs: Dict[str, str] = field(default_factory=dict)  # stage -> the earlier stage whose model it starts from
    data_inputs: Dict[str, str] = field(default_factory=dict)  # stage -> the earlier stage whose corpus it reads
    data_fields: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # stage -> fields of `data` it reads otherwise


@dataclass
class SlurmPlacement:
    """Where one ``hardware`` option's jobs go on a Slurm cluster, and what each GPU brings with it."""

    partition: Optional[str] = None
    constraint: Optional[str] = None  # sbatch --constraint: a node feature, e.g. h100
    gres_type: Optional[str] = None  # the GPU type in gres, e.g. h100 -> --gres=gpu:h100:<n>; None: --gpus-per-node=<n>
    gpus_per_node: int = 8
    cpus_per_gpu: int = 8
    mem_per_gpu_gb: Optional[int] = None  # None: the partition's default


@dataclass
class ClusterConfig:
    """Where a run's jobs go; each kind of cluster has a schema of its own (``CLUSTER_KINDS``), named in its
    profile's defaults (``cluster_<kind>_schema``), so a Slurm key on ``cluster=none`` is refused."""

    name: str = MISSING


@dataclass
class NoClusterConfig(ClusterConfig):
    """``cluster=none`` (the default): no cluster, runs on this machine; no settings of its own."""

    name: str = "none"


@dataclass
class SlurmClusterConfig(ClusterConfig):
    """A Slurm cluster profile for ``hydra/launcher=slurm``: each hardware option's placement, plus job-wide settings."""

    account: Optional[str] = None
    qos: Optional[str] = None
    time_limit_min: int = 240  # per job; the job checkpoints and requeues before it (preemption signal)
    setup: List[str] = field(default_factory=list)  # shell lines run before the job (module load, env)
    hardware: Dict[str, SlurmPlacement] = field(default_factory=dict)  # hardware option name -> placement


class KubernetesJobKind(Choice):
    """The Kubeflow object a job becomes: Trainer v2's TrainJob (on a ClusterTrainingRuntime) or the training
    operator's PyTorchJob."""

    TrainJob = "TrainJob"
    PyTorchJob = "PyTorchJob"


class TolerationOperator(Choice):
    Equal = "Equal"
    Exists = "Exists"


class TaintEffect(Choice):
    NoSchedule = "NoSchedule"
    PreferNoSchedule = "PreferNoSchedule"
    NoExecute = "NoExecute"


@dataclass
class KubernetesToleration:
    """A taint the pods tolerate (core/v1 Toleration); GPU node groups are commonly tainted nvidia.com/gpu."""

    key: Optional[str] = None
    operator: TolerationOperator = TolerationOperator.Equal
    value: Optional[str] = None
    effect: Optional[TaintEffect] = None  # None: every effect


@dataclass
class KubernetesPlacement:
    """Where one ``hardware`` option's pods go on a Kubernetes cluster, and what each GPU brings with it."""

    node_selector: Dict[str, str] = field(default_factory=dict)  # node labels, e.g. node.kubernetes.io/instance-type
    node_affinity: Dict[str, List[str]] = field(default_factory=dict)  # node label -> any of these values
    tolerations: List[KubernetesToleration] = field(default_factory=list)
    gpu_resource: str = "nvidia.com/gpu"  # the device plugin's extended resource
    gpus_per_node: int = 8  # 0: a CPU node, pods ask for no GPU
    cpus_per_gpu: int = 8  # per process when gpus_per_node is 0
    memory_per_gpu_gb: Optional[int] = None  # per process when gpus_per_node is 0; None: no memory request
    efa_per_node: int = 0  # vpc.amazonaws.com/efa devices a node has; a pod asks for its GPUs' share


@dataclass
class KubernetesStorage:
    """The shared volume every pod mounts: run directories live on it, so the launcher reads what pods write."""

    claim: str = MISSING  # the PersistentVolumeClaim (ReadWriteMany: FSx for Lustre, EFS, NFS) in the namespace
    mount_path: str = "/fsx"  # where pods see it
    local_path: Optional[str] = None  # where the launcher's machine sees the same volume; None: at mount_path too


@dataclass
class KubernetesClusterConfig(ClusterConfig):
    """A Kubernetes cluster profile for ``hydra/launcher=kubernetes``: Kubeflow jobs, each hardware option's placement."""

    context: Optional[str] = None  # kubeconfig context; None: the current one
    namespace: str = "default"
    job_kind: KubernetesJobKind = KubernetesJobKind.TrainJob
    runtime: str = "torch-distributed"  # the ClusterTrainingRuntime a TrainJob runs on
    image: str = MISSING  # a container image with llmexp installed (and its CUDA extras)
    service_account: Optional[str] = None
    env: Dict[str, str] = field(default_factory=dict)  # set in every container (NCCL/EFA settings, HF_HOME, ...)
    # variable -> <secret name>/<key> of a Secret in the namespace, e.g. WANDB_API_KEY: wandb/api-key
    secret_env: Dict[str, str] = field(default_factory=dict)
    labels: Dict[str, str] = field(default_factory=dict)  # on every job and pod, e.g. kueue.x-k8s.io/queue-name
    time_limit_min: int = 240  # per job: activeDeadlineSeconds; 0: none
    storage: KubernetesStorage = field(default_factory=KubernetesStorage)
    hardware: Dict[str, KubernetesPlacement] = field(default_factory=dict)  # hardware option name -> placement


CLUSTER_KINDS = {"none": NoClusterConfig, "slurm": SlurmClusterConfig,
                 "kubernetes": KubernetesClusterConfig}  # a profile's kind -> its schema


@dataclass
class RunConfig:
    """The whole experiment: one option from each group plus run-wide keys."""

    model: ModelConfig = MISSING
    hardware: HardwareConfig = MISSING
    parallelism: ParallelismConfig = MISSING
    backend: BackendConfig = MISSING
    data: DataConfig = MISSING
    tracker: TrackerConfig = MISSING
    retriever: RetrieverConfig = MISSING
    rails: RailsConfig = MISSING
    pipeline: PipelineConfig = MISSING
    cluster: ClusterConfig = MISSING
    technique: Any = MISSING  # typed by the selected technique's own schema
    evaluation: Any = MISSING  # the evaluate technique's config, used by the pipeline
    precision: Precision = Precision.fp32
    seed: int = 0

