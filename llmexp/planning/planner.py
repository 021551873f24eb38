"""Will it fit, will it run? The plan of a composed config, in pure Python.

The planner turns architecture numbers, precision, technique and parallelism into a
parameter count, a per-device memory estimate and a list of problems, each naming the
config field, its value and the fix. It never imports torch, transformers or lightning,
so ``llmexp plan`` answers in well under a second and every sweep point can be checked
before a job is queued.

Units: ``hardware.memory_gb`` is read as GiB (2**30 bytes), which is what nvidia-smi
reports (an "80 GB" A100 shows 81920 MiB); every byte figure here is exact bytes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional

from llmexp.techniques import plugin_manager

from llmexp.models import starting_weights
from llmexp.models.checkpoint import model_numbers_from_hf_config, read_hf_config, validate_checkpoint_dir
from llmexp.errors import UserError
from llmexp.configuration.pipeline import model_sources, stage_nodes

GIB = 2**30

# Bytes per stored value for each ``precision``. Weights (and, in full training, their
# gradients) are held in the run's precision. Activations of fp8/fp4 runs stay 16-bit, as
# Transformer Engine keeps them; serving stacks have FP8 KV caches but no FP4 one.
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "fp4": 0.5}
ACTIVATION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 2, "fp4": 2}
KV_CACHE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "fp4": 1}

ADAM_MOMENT_BYTES = 8  # two fp32 moments per trained parameter
MASTER_WEIGHT_BYTES = 4  # the fp32 copy a mixed-precision optimizer steps on
ADAPTER_VALUE_BYTES = 4  # PEFT keeps adapter weights (and so their grads) in fp32

# What a precision needs from the hardware and which preset has it; the check itself is
# ``hardware.dtypes``, this only explains a failure and suggests a way out.
PRECISION_NEEDS = {
    "fp32": ("FP32 runs everywhere", "cpu"),
    "fp16": ("FP16 needs Volta or newer", "v100"),
    "bf16": ("BF16 needs Ampere or newer", "a100_80g"),
    "fp8": ("FP8 needs Ada/Hopper or newer", "h100"),
    "fp4": ("FP4 needs Blackwell", "b200"),
}
# Fewest bits first: the suggested fallback is the next entry the hardware supports.
PRECISION_FALLBACK = ["fp4", "fp8", "bf16", "fp16", "fp32"]

# (in_features, out_features) of each linear layer of a Llama-style decoder layer, as PEFT
# names them in ``target_modules``; "all-linear" targets every one.
LINEAR_SHAPES: Dict[str, Callable[[Dict[str, Any]], tuple]] = {
    "q_proj": lambda m: (m["hidden_size"], m["num_attention_heads"] * m["head_dim"]),
    "k_proj": lambda m: (m["hidden_size"], m["num_key_value_heads"] * m["head_dim"]),
    "v_proj": lambda m: (m["hidden_size"], m["num_key_value_heads"] * m["head_dim"]),
    "o_proj": lambda m: (m["num_attention_heads"] * m["head_dim"], m["hidden_size"]),
    "gate_proj": lambda m: (m["hidden_size"], m["intermediate_size"]),
    "up_proj": lambda m: (m["hidden_size"], m["intermediate_size"]),
    "down_proj": lambda m: (m["intermediate_size"], m["hidden_size"]),
}
DEFAULT_ADAPTER_RANK = 16
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]

# Activations the torch backend keeps for backward, per token, in values of the activation
# dtype: counted with torch.autograd.graph.saved_tensors_hooks on transformers'
# LlamaForCausalLM (SDPA attention, which keeps no s-by-s scores) at several hidden,
# intermediate, kv and vocabulary sizes, and fitted to within 5%. A decoder layer keeps
# ~9 per hidden unit (norm inputs and outputs, q, rotated q and k, attention output,
# residuals), ~4.4 per MLP unit (gate, up, SiLU, their product) and ~2.25 per k/v unit;
# outside the layers, ~3 per hidden unit (embeddings, final norm) and ~1.1 per vocabulary
# entry (the fp32 logits the loss reads). With activation checkpointing a layer keeps its
# input (1 per hidden unit) and one layer at a time is recomputed in full.
LAYER_VALUES_PER_HIDDEN = 9
LAYER_VALUES_PER_INTERMEDIATE = 4.375
LAYER_VALUES_PER_KV = 2.25
CHECKPOINTED_VALUES_PER_HIDDEN = 1
OUTSIDE_VALUES_PER_HIDDEN = 3
LOGIT_VALUES_PER_VOCAB = 1.125
LOGIT_BYTES = 4  # logits are fp32 whatever the precision
# Distillation's extra fp32 values per token and vocabulary entry: the teacher's logits and
# log-probabilities, and the student's tempered log-probabilities kept for backward.
DISTILL_VALUES_PER_VOCAB = 3

LAYOUT_FIELDS = ("tp", "pp", "dp", "nodes", "devices_per_node", "micro_batch", "global_batch")

# data.seq_len below this share of the model's training length (``model.train_seq_len``) is far from
# any real job on that model: the embedded data's 64-token sequences planned on a named model, say.
SHORT_SEQUENCE_SHARE = 1 / 8


@dataclass
class Plan:
    """What a config needs: parameters, bytes per device by kind, and what stops it running."""

    parameters: int
    memory_per_device_bytes: int
    memory_breakdown: Dict[str, int]  # weights, gradients, optimizer, activations, kv_cache, adapter
    world_size: int  # tp * pp * dp
    device_memory_bytes: int
    technique_memory: str  # inference | full | adapter | preference (of the heaviest stage)
    problems: List[str] = field(default_factory=list)
    trainable_parameters: int = 0  # all of them in full training, the adapter's, or none
    warnings: List[str] = field(default_factory=list)  # what does not stop the run but misleads its figures
    # Memory at model.train_seq_len, when data.seq_len is far shorter: seq_len, memory_breakdown,
    # memory_per_device_bytes, fits.
    at_train_seq_len: Optional[Dict[str, Any]] = None

    @property
    def feasible(self) -> bool:
        return not self.problems

    def to_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "feasible": self.feasible}


def architecture(model: Any) -> Dict[str, Any]:
    """Architecture numbers from a dict or a ModelConfig-like object, ``head_dim`` resolved."""
    names = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "tie_word_embeddings", "attention_bias")
    if isinstance(model, Mapping):
        numbers = {name: model.get(name) for name in names}
    else:
        numbers = {name: getattr(model, name, None) for name in names}
    if numbers["num_key_value_heads"] is None:
        numbers["num_key_value_heads"] = numbers["num_attention_heads"]
    if numbers["head_dim"] is None:
        numbers["head_dim"] = numbers["hidden_size"] // numbers["num_attention_heads"]
    numbers["tie_word_embeddings"] = bool(numbers["tie_word_embeddings"])
    numbers["attention_bias"] = bool(numbers["attention_bias"])
    return numbers


def count_parameters(model_numbers: Any) -> int:
    """Parameters of a Llama-style decoder (GQA attention, SwiGLU MLP, RMSNorm).

    Embeddings V*H, the LM head V*H unless tied, and per layer: q H*(nh*hd), k and v
    H*(nkv*hd) each, o (nh*hd)*H, biases on q/k/v when ``attention_bias``, the gate/up/down
    MLP 3*H*I and two RMSNorm weights 2*H; then the final norm H.
    """
    m = architecture(model_numbers)
    h, heads, kv_heads, head_dim = (m["hidden_size"], m["num_attention_heads"],
                                    m["num_key_value_heads"], m["head_dim"])
    attention = 2 * h * heads * head_dim + 2 * h * kv_heads * head_dim
    if m["attention_bias"]:
        attention += heads * head_dim + 2 * kv_heads * head_dim
    per_layer = attention + 3 * h * m["intermediate_size"] + 2 * h
    embeddings = m["vocab_size"] * h * (1 if m["tie_word_embeddings"] else 2)
    return embeddings + m["num_layers"] * per_layer + h


def pruned_numbers(model_numbers: Any, node: Any) -> Dict[str, Any]:
    """Architecture numbers of what a ``prune`` node (``llmexp.plugins.prune``) makes of a model with ``model_numbers``.

    ``method=depth``: fewer layers, by the length of ``drop_layers`` or by ``num_layers_to_drop``
    (unset: a quarter of them, rounded half up). ``method=width``: ``ffn_hidden_size``,
    ``num_heads`` and ``hidden_size`` where set; with ``target_parameters``, the sizes this rule
    reaches: shrink the MLP, then the hidden size (each to the next lower multiple of 8, down
    to half its size), then the query heads (one per KV group at a time, down to one per
    group), each only until the count is at or below the target. MLP and hidden channels go
    first because Minitron (Muralidharan et al. 2024) found them cheaper to prune than heads.
    Where the rule cannot reach the target, the smallest sizes it allows are returned.
    """
    numbers = architecture(model_numbers)
    if node.get("method", "depth") == "depth":
        dropped = node.get("drop_layers")
        count = len(set(dropped)) if dropped else node.get("num_layers_to_drop")
        if count is None:
            count = math.floor(numbers["num_layers"] / 4 + 0.5)
        return {**numbers, "num_layers": numbers["num_layers"] - count}
    target = node.get("target_parameters")
    if target is None:
        sizes = {"intermediate_size": "ffn_hidden_size", "num_attention_heads": "num_heads",
                 "hidden_size": "hidden_size"}
        return {**numbers, **{ours: node[key] for ours, key in sizes.items() if node.get(key) is not None}}
    kv_heads = numbers["num_key_value_heads"]
    steps = (("intermediate_size", 8, numbers["intermediate_size"] // 2),
             ("hidden_size", 8, numbers["hidden_size"] // 2),
             ("num_attention_heads", kv_heads, kv_heads))
    for name, step, floor in steps:
        while count_parameters(numbers) > target and (numbers[name] - 1) // step * step >= max(floor, step):
            numbers[name] = (numbers[name] - 1) // step * step
    return numbers


def make_plan(cfg) -> Plan:
    """The plan of a composed config (``llmexp.configuration.schema.RunConfig``), problems included.

    Memory is that of the pipeline stage that holds the most (``heaviest_stage``). Plugin
    checks (the ``llmexp_plan_problems`` hook) run last and see the plan so far.
    """
    problems: List[str] = []
    model = model_numbers(cfg, problems)
    problems += embedded_vocabulary_problem(cfg)
    problems += starting_weights.problems(cfg)
    precision = _value(cfg.precision)
    layout = {name: int(cfg.parallelism[name]) for name in LAYOUT_FIELDS}
    problems += layout_problems(cfg, layout)
    layout = {name: max(1, value) for name, value in layout.items()}  # keep the arithmetic defined
    layout["seq_len"] = int(cfg.data.seq_len)  # with the batch sizes, the shape of a step
    problems += precision_problems(cfg, precision)
    problems += divisibility_problems(cfg, model, layout)
    problems += torch_training_problems(cfg, layout, precision)
    problems += megatron_training_problems(cfg)

    memory_mode, breakdown, trainable = heaviest_stage(cfg, model, precision, layout, problems)
    plan = Plan(
        parameters=count_parameters(model),
        memory_per_device_bytes=sum(breakdown.values()),
        memory_breakdown=breakdown,
        world_size=layout["tp"] * layout["pp"] * layout["dp"],
        device_memory_bytes=device_memory_bytes(cfg, layout),
        technique_memory=memory_mode,
        problems=problems,
        trainable_parameters=trainable,
    )
    plan.problems += memory_problems(cfg, plan)
    plan.at_train_seq_len = train_length_memory(cfg, model, precision, layout, plan.device_memory_bytes)
    plan.warnings += short_sequence_warning(cfg, plan)
    plan.problems += plugin_manager.plan_problems(cfg, plan)
    return plan


def heaviest_stage(cfg, model, precision, layout, problems: List[str]):
    """``(memory mode, breakdown, trainable parameters)`` of the stage needing the most memory.

    Stages run one after another, so the run needs what its heaviest stage needs. A
    pipeline the planner cannot read (see ``llmexp.configuration.pipeline``) is planned by ``technique``.
    """
    try:
        stages = stage_nodes(cfg)
    except UserError as error:
        problems.append(str(error))
        stages = [("technique", cfg.technique)]
    best = None
    for key, node in stages or [("technique", cfg.technique)]:
        mode = plugin_manager.technique(node.name).memory
        estimate = MEMORY_ESTIMATES.get(mode)
        if estimate is None:
            problems.append(
                f"technique={node.name} declares memory={mode!r}, which the planner does not know; the "
                f"technique's class must set memory to one of {', '.join(MEMORY_ESTIMATES)}."
            )
            continue
        breakdown, trainable = estimate(cfg, node, key, model, precision, layout, problems)
        breakdown = {name: int(math.ceil(value)) for name, value in breakdown.items()}
        if best is None or sum(breakdown.values()) > sum(best[1].values()):
            best = (mode, breakdown, trainable)
    return best or ("inference", {}, 0)


def train_length_memory(cfg, model, precision, layout, device_bytes: int) -> Optional[Dict[str, Any]]:
    """Memory per device with sequences of ``model.train_seq_len`` tokens, when ``data.seq_len`` is far
    shorter (``SHORT_SEQUENCE_SHARE``); else None.

    The run's own figures stay those of ``data.seq_len``, which is what it trains on: these show what
    the same job needs on data of the length the model is used at.
    """
    length = cfg.model.get("train_seq_len")
    if not length or layout["seq_len"] >= length * SHORT_SEQUENCE_SHARE:
        return None
    _, breakdown, _ = heaviest_stage(cfg, model, precision, {**layout, "seq_len": length}, [])
    need = sum(breakdown.values())
    return {"seq_len": length, "memory_breakdown": breakdown, "memory_per_device_bytes": need,
            "fits": need <= device_bytes}


def short_sequence_warning(cfg, plan: Plan) -> List[str]:
    """The warning that the plan's activations are those of sequences far shorter than the model is used at."""
    longer = plan.at_train_seq_len
    if longer is None:
        return []
    length, need = longer["seq_len"], longer["memory_per_device_bytes"]
    verdict = "fits" if longer["fits"] else f"does not fit: {(need - plan.device_memory_bytes) / GIB:.1f} GiB short"
    at_length = ", ".join(f"{name} {value / GIB:.1f}" for name, value in longer["memory_breakdown"].items())
    return [
        f"data.seq_len={cfg.data.seq_len} (data={cfg.data.name}) is far shorter than the {length} tokens "
        f"model={cfg.model.name} is trained at (model.train_seq_len), so these figures are those of toy sequences. "
        f"At {length} tokens the same job needs {need / GIB:.1f} GiB per device ({at_length}) of "
        f"{plan.device_memory_bytes / GIB:.1f} GiB, and {verdict}. Plan the length your data will have with "
        f"data.seq_len=<tokens> (data.seq_len={length} for the model's)."
    ]


def model_numbers(cfg, problems: List[str]) -> Dict[str, Any]:
    """The preset's numbers, or the checkpoint's config.json ones when ``model.path`` is set."""
    numbers = architecture(cfg.model)
    path = cfg.model.path
    if path is None:
        return numbers
    try:
        validate_checkpoint_dir(path)
    except UserError as error:
        problems.append(str(error))
    try:
        return architecture(model_numbers_from_hf_config(read_hf_config(path)))
    except UserError as error:
        if str(error) not in problems:
            problems.append(str(error))
        return numbers


def stage_architectures(cfg) -> Dict[str, tuple]:
    """``(input, output)`` architecture numbers of each stage by key: the run's model (``model_numbers``) as the
    stages before it change it (``Technique.made_architecture``), along ``llmexp.configuration.pipeline.model_sources``.

    A stage whose technique makes no model hands on nothing; its output is its input.
    """
    shapes: Dict[str, tuple] = {}
    start, sources = model_numbers(cfg, []), model_sources(cfg)  # a broken model.path is reported by make_plan
    for key, node in stage_nodes(cfg, strict=False):
        cls = plugin_manager.technique(node.name)
        numbers = shapes[sources[key]][1] if sources[key] in shapes else start  # a wrong input: make_plan says so
        shapes[key] = (numbers, cls.made_architecture(node, numbers) if cls.produces_model else numbers)
    return shapes


def embedded_vocabulary_problem(cfg) -> List[str]:
    """A model built from scratch (``model.path`` unset) gets the embedded world's word-level tokenizer, whose size
    grows with ``data.num_people``; ``model.vocab_size`` must hold it (``llmexp.models.loading.build_model`` refuses less)."""
    from llmexp.data.embedded import build_world
    from llmexp.data.tokenizer import SPECIAL_TOKENS

    makers = [node for _, node in stage_nodes(cfg, strict=False) if plugin_manager.technique(node.name).produces_model]
    if cfg.model.path or not makers:
        return []
    tokens = len(SPECIAL_TOKENS) + len(build_world(cfg.data.seed, cfg.data.num_people).vocabulary())
    problem = vocabulary_problem(cfg.model.vocab_size, tokens, "the embedded tokenizer's")
    return [f"{problem} The embedded world's words grow with data.num_people={cfg.data.num_people}; fewer people "
            "need fewer tokens."] if problem else []


def vocabulary_problem(vocab_size: int, tokens: int, tokenizer: str = "the tokenizer's") -> str | None:
    """The refusal of a model with ``vocab_size`` embedding rows for a tokenizer of ``tokens`` tokens, or None."""
    if tokens <= vocab_size:
        return None
    return (f"model.vocab_size={vocab_size} is smaller than {tokenizer} {tokens} tokens; set model.vocab_size="
            f"{-(-tokens // 64) * 64} or more.")


# ---------------------------------------------------------------- memory per device


def _state_shards(cfg, layout) -> int:
    """How many ways weights, grads and optimizer states are split: tp*pp, times dp under FSDP."""
    shards = layout["tp"] * layout["pp"]
    return shards * layout["dp"] if cfg.parallelism.sharding == "fsdp" else shards


def inference_memory(cfg, node, key, model, precision, layout, problems):
    """Weights in the run's precision plus the KV cache; forward activations are transient.

    KV cache: 2 (k and v) * layers * kv_heads * head_dim * seq_len * micro_batch values,
    split over tp (by kv head) and pp (by layer).
    """
    weights = count_parameters(model) * WEIGHT_BYTES[precision] / _state_shards(cfg, layout)
    kv_cache = (2 * model["num_layers"] * model["num_key_value_heads"] * model["head_dim"]
                * layout["seq_len"] * layout["micro_batch"] * KV_CACHE_BYTES[precision]
                / (layout["tp"] * layout["pp"]))
    return {"weights": weights, "kv_cache": kv_cache}, 0


def full_memory(cfg, node, key, model, precision, layout, problems):
    """Weights and grads in the run's precision, Adam states, activations of the busiest stage.

    Adam keeps two fp32 moments per parameter, and an fp32 master copy unless the run is
    already fp32. Activations: see ``activation_bytes``.
    """
    parameters = count_parameters(model)
    shards = _state_shards(cfg, layout)
    optimizer = ADAM_MOMENT_BYTES + (0 if precision == "fp32" else MASTER_WEIGHT_BYTES)
    optimizer_shards = shards
    if cfg.backend.name == "megatron" and cfg.backend.distributed_optimizer and cfg.parallelism.sharding != "fsdp":
        optimizer_shards *= layout["dp"]  # megatron's distributed optimizer splits its states over dp
    return {
        "weights": parameters * WEIGHT_BYTES[precision] / shards,
        "gradients": parameters * WEIGHT_BYTES[precision] / shards,
        "optimizer": parameters * optimizer / optimizer_shards,
        "activations": activation_bytes(cfg, model, precision, layout),
    }, parameters


def adapter_memory(cfg, node, key, model, precision, layout, problems):
    """Frozen weights in the run's precision; the adapter, its grads and Adam states in fp32.

    An adapter of rank r on a linear layer (in -> out) has r*(in + out) parameters, for each
    of the node's ``target_modules`` in every layer. ``gradients`` and ``optimizer`` here are
    the adapter's only. Activations are those of full training: backward still runs through
    every frozen layer.
    """
    rank = node.get("rank", DEFAULT_ADAPTER_RANK)
    targets = list(node.get("target_modules", None) or DEFAULT_TARGET_MODULES)
    targets = list(LINEAR_SHAPES) if targets == ["all-linear"] else targets
    unknown = [name for name in targets if name not in LINEAR_SHAPES]
    if unknown:
        problems.append(
            f"{key}.target_modules names {', '.join(unknown)}, which a {model_kind(cfg)} layer does "
            f"not have; choose from {', '.join(LINEAR_SHAPES)} or [all-linear]."
        )
    per_layer = sum(rank * sum(LINEAR_SHAPES[name](model)) for name in targets if name in LINEAR_SHAPES)
    adapter = per_layer * model["num_layers"]
    shards = _state_shards(cfg, layout)
    return {
        "weights": count_parameters(model) * WEIGHT_BYTES[precision] / shards,
        "adapter": adapter * ADAPTER_VALUE_BYTES / shards,
        "gradients": adapter * ADAPTER_VALUE_BYTES / shards,
        "optimizer": adapter * ADAM_MOMENT_BYTES / shards,
        "activations": activation_bytes(cfg, model, precision, layout),
    }, adapter


def preference_memory(cfg, node, key, model, precision, layout, problems):
    """Full training of the policy plus a frozen reference model (DPO).

    Each micro-batch holds a chosen and a rejected sequence per pair, so activations are
    those of twice the micro-batch; the reference runs without grad and keeps none.
    """
    breakdown, trainable = full_memory(cfg, node, key, model, precision, layout, problems)
    breakdown["reference"] = count_parameters(model) * WEIGHT_BYTES[precision] / _state_shards(cfg, layout)
    breakdown["activations"] = activation_bytes(cfg, model, precision, layout, sequences_per_example=2)
    return breakdown, trainable


def distill_memory(cfg, node, key, model, precision, layout, problems):
    """Full training of the student plus a frozen teacher and its fp32 logits (distillation).

    The teacher's weights are held in the run's precision; it runs without grad, so of its
    forward pass only what the loss reads stays: its logits, its log-probabilities and the
    student's tempered log-probabilities (``DISTILL_VALUES_PER_VOCAB``). Its architecture is
    ``teacher.path``'s config.json, else the run's model (an earlier stage's model is the
    run's model or one made smaller from it); the student is counted as the run's model too.
    """
    breakdown, trainable = full_memory(cfg, node, key, model, precision, layout, problems)
    teacher = model
    if node.teacher.path:
        try:
            teacher = architecture(model_numbers_from_hf_config(read_hf_config(node.teacher.path)))
        except UserError:
            pass  # the distill plugin's check reports a bad teacher.path
    breakdown["teacher"] = count_parameters(teacher) * WEIGHT_BYTES[precision] / _state_shards(cfg, layout)
    tokens = layout["seq_len"] * layout["micro_batch"]
    breakdown["teacher_logits"] = tokens * DISTILL_VALUES_PER_VOCAB * teacher["vocab_size"] * LOGIT_BYTES / layout["tp"]
    return breakdown, trainable


MEMORY_ESTIMATES = {
    "inference": inference_memory,
    "full": full_memory,
    "adapter": adapter_memory,
    "preference": preference_memory,
    "distill": distill_memory,
}


def activation_bytes(cfg, model, precision, layout, sequences_per_example: int = 1) -> float:
    """Activations kept for backward on the busiest pipeline stage.

    Per layer and token the values of ``LAYER_VALUES_PER_*`` in the activation dtype, split
    over tp as sequence parallelism does. Under the 1F1B schedule the first stage holds
    min(pp, micro-batches per step) micro-batches of its layers; the last holds one plus
    the embeddings, final norm and fp32 logits. ``sequences_per_example``: DPO runs a chosen
    and a rejected sequence per example.
    """
    tokens = layout["seq_len"] * layout["micro_batch"] * sequences_per_example
    h, kv = model["hidden_size"], model["num_key_value_heads"] * model["head_dim"]
    value_bytes = ACTIVATION_BYTES[precision]
    layer_values = (LAYER_VALUES_PER_HIDDEN * h + LAYER_VALUES_PER_INTERMEDIATE * model["intermediate_size"]
                    + LAYER_VALUES_PER_KV * kv)
    full_layer = tokens * layer_values * value_bytes / layout["tp"]
    if cfg.parallelism.activation_checkpointing:
        kept_layer = tokens * CHECKPOINTED_VALUES_PER_HIDDEN * h * value_bytes / layout["tp"]
        recompute = full_layer
    else:
        kept_layer, recompute = full_layer, 0
    outside = tokens * (OUTSIDE_VALUES_PER_HIDDEN * h * value_bytes
                        + LOGIT_VALUES_PER_VOCAB * model["vocab_size"] * LOGIT_BYTES) / layout["tp"]
    stage_layers = model["num_layers"] / layout["pp"]
    micro_batches = max(1, layout["global_batch"] // (layout["micro_batch"] * layout["dp"]))
    first_stage = stage_layers * min(layout["pp"], micro_batches) * kept_layer
    last_stage = stage_layers * kept_layer + outside
    return max(first_stage, last_stage) + recompute


def device_memory_bytes(cfg, layout) -> int:
    """One device's memory: ``hardware.memory_gb`` GiB, or on CPU this machine's RAM shared
    by the ``devices_per_node`` processes that run on it."""
    if cfg.hardware.memory_gb is not None:
        return int(cfg.hardware.memory_gb * GIB)
    return machine_ram_bytes() // layout["devices_per_node"]


def machine_ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ---------------------------------------------------------------- problems


def layout_problems(cfg, layout) -> List[str]:
    """Counts must be positive; tp*pp*dp must use exactly the devices the job asks for; a
    node cannot give more GPUs than it has (CPU ranks are processes, so no limit there)."""
    problems = [
        f"parallelism.{name}={value} must be a positive integer; set it to 1 or more."
        for name, value in layout.items() if value < 1
    ]
    if problems:
        return problems
    p = cfg.parallelism
    world, devices = p.tp * p.pp * p.dp, p.nodes * p.devices_per_node
    if world != devices:
        fixes = []
        if world % p.nodes == 0:
            fixes.append(f"set parallelism.devices_per_node={world // p.nodes}")
        if devices % (p.tp * p.pp) == 0:
            fixes.append(f"set parallelism.dp={devices // (p.tp * p.pp)}")
        fix = " or ".join(fixes) or (
            f"set parallelism.nodes and parallelism.devices_per_node so their product is {world}")
        problems.append(
            f"parallelism.tp*pp*dp = {p.tp}*{p.pp}*{p.dp} = {world} ranks but parallelism.nodes*"
            f"devices_per_node = {p.nodes}*{p.devices_per_node} = {devices} devices (parallelism="
            f"{p.name}); they must be equal — {fix}."
        )
    if cfg.hardware.accelerator == "gpu" and p.devices_per_node > cfg.hardware.gpus_per_node:
        gpn = cfg.hardware.gpus_per_node
        problems.append(
            f"parallelism.devices_per_node={p.devices_per_node} but hardware={cfg.hardware.name} has "
            f"hardware.gpus_per_node={gpn}; spread the job over more nodes (parallelism.nodes="
            f"{-(-p.nodes * p.devices_per_node // gpn)} with devices_per_node={gpn}) or choose "
            f"hardware with {p.devices_per_node} GPUs per node."
        )
    return problems


def precision_problems(cfg, precision: str) -> List[str]:
    hardware = cfg.hardware
    dtypes = list(hardware.dtypes)
    if precision in dtypes:
        return []
    rule, preset = PRECISION_NEEDS[precision]
    fallback = next((p for p in PRECISION_FALLBACK[PRECISION_FALLBACK.index(precision) + 1:]
                     if p in dtypes), "fp32")
    return [
        f"precision={precision} is not supported by hardware={hardware.name} ({hardware.generation}: "
        f"{', '.join(dtypes)}); {rule} — choose hardware={preset} or precision={fallback}."
    ]


def divisibility_problems(cfg, model, layout) -> List[str]:
    """Heads and the MLP split over tp, layers over pp, and a step's batch into whole micro-batches."""
    problems = []
    tp, pp = layout["tp"], layout["pp"]
    heads, kv_heads = model["num_attention_heads"], model["num_key_value_heads"]
    intermediate = model["intermediate_size"]
    tp_choices = ", ".join(map(str, _divisors(math.gcd(heads, kv_heads, intermediate))))
    for field_name, value, what in (("num_attention_heads", heads, "whole heads"),
                                    ("num_key_value_heads", kv_heads, "whole heads"),
                                    ("intermediate_size", intermediate, "an equal share of the MLP")):
        if value % tp:
            problems.append(
                f"model.{field_name}={value} is not divisible by parallelism.tp={tp} "
                f"(model={model_kind(cfg)}); every tensor-parallel rank needs {what} — choose "
                f"parallelism.tp from {tp_choices}."
            )
    if model["num_layers"] % pp:
        choices = ", ".join(str(d) for d in _divisors(model["num_layers"]) if d <= 16)
        problems.append(
            f"model.num_layers={model['num_layers']} is not divisible by parallelism.pp={pp} "
            f"(model={model_kind(cfg)}); pipeline stages need equal whole layers — choose "
            f"parallelism.pp from {choices}."
        )
    step = layout["micro_batch"] * layout["dp"]
    if layout["global_batch"] % step:
        problems.append(
            f"parallelism.global_batch={layout['global_batch']} is not divisible by "
            f"parallelism.micro_batch*dp = {layout['micro_batch']}*{layout['dp']} = {step}; each "
            f"data-parallel rank needs whole micro-batches — set parallelism.global_batch to a "
            f"multiple of {step} (e.g. {-(-layout['global_batch'] // step) * step}) or change "
            f"parallelism.micro_batch."
        )
    return problems


def torch_training_problems(cfg, layout, precision: str) -> List[str]:
    """What the torch backend's training loop (``llmexp.training.loop``) cannot run: FP8/FP4, pipeline stages, and
    tensor-parallel LoRA adapters (PEFT's adapter layers are not the linear layers tp splits)."""
    from llmexp.training.loop import TrainingTechnique, pipeline_training_problem, torch_precision_problem

    if cfg.backend.name != "torch":
        return []
    stages = [plugin_manager.technique(node.name) for _, node in stage_nodes(cfg, strict=False)]
    training = [cls for cls in stages if issubclass(cls, TrainingTechnique)]
    if not training:
        return []
    problems = [problem for problem in [torch_precision_problem(precision, cfg.hardware)] if problem]
    if layout["pp"] > 1:
        problems.append(pipeline_training_problem(cfg.parallelism))
    adapters = [cls.name for cls in training if cls.memory == "adapter"]
    if adapters and layout["tp"] > 1:
        problems.append(
            f"parallelism.tp={layout['tp']} with technique={adapters[0]}: tensor parallelism splits a model's linear "
            f"layers, and {adapters[0]}'s adapters wrap them; train it with parallelism.tp=1 (parallelism.dp for "
            "data parallel, with parallelism.sharding=fsdp to split the frozen weights too)."
        )
    return problems


def megatron_training_problems(cfg) -> List[str]:
    """On backend=megatron, what megatron-core cannot run (``llmexp.training.megatron.arguments``) and techniques that do
    not train there. Whether its packages and a GPU are on this machine is checked when the run starts: a plan
    may be for a cluster."""
    from llmexp.training.megatron.arguments import megatron_problems
    from llmexp.training.loop import TrainingTechnique

    if cfg.backend.name != "megatron":
        return []
    stages = [(key, plugin_manager.technique(node.name)) for key, node in stage_nodes(cfg, strict=False)]
    training = [(key, cls) for key, cls in stages if issubclass(cls, TrainingTechnique)]
    if not training:
        return []
    problems = megatron_problems(cfg)
    for key, cls in training:
        if "megatron" not in cls.backends:
            problems.append(
                f"{key}: technique={cls.name} trains on backend={', '.join(cls.backends)} only; run it with "
                f"backend=torch (backend=megatron trains {', '.join(_megatron_techniques())}).")
    return problems


def _megatron_techniques() -> List[str]:
    from llmexp.training.loop import TrainingTechnique

    return sorted(name for name, entry in plugin_manager.techniques().items()
                  if issubclass(entry.technique, TrainingTechnique) and "megatron" in entry.technique.backends)


# Parts of a device's memory that belong to the step (its tokens), not to the model's state.
STEP_PARTS = ("activations", "kv_cache", "teacher_logits")


def layout_fixes(cfg, plan: Plan) -> List[str]:
    """The switches of ``parallelism`` that would lower this plan's memory, among those not already on."""
    parallelism = cfg.parallelism
    fixes = []
    if parallelism.dp > 1 and str(getattr(parallelism.sharding, "value", parallelism.sharding)) != "fsdp":
        fixes.append("use parallelism.sharding=fsdp")
    if not parallelism.activation_checkpointing and plan.memory_breakdown.get("activations", 0) > plan.memory_per_device_bytes / 2:
        fixes.append("set parallelism.activation_checkpointing=true")
    return fixes


def memory_problems(cfg, plan: Plan) -> List[str]:
    """Memory that does not fit, with the fixes that could make it fit.

    When the model's state alone (weights, gradients, optimizer states, frozen copies) is more than
    all the job's devices hold together, no layout of them helps: that is said first, with the
    fewest devices that could hold it.
    """
    need, have = plan.memory_per_device_bytes, plan.device_memory_bytes
    if need <= have:
        return []
    parts = ", ".join(f"{name} {value / GIB:.1f}" for name, value in plan.memory_breakdown.items())
    fixes = ["raise parallelism.tp or parallelism.pp", *layout_fixes(cfg, plan),
             f"lower parallelism.micro_batch (now {cfg.parallelism.micro_batch})"]
    reason = ""
    if cfg.hardware.accelerator == "cpu":
        where = f"hardware={cfg.hardware.name} has {have / GIB:.1f} GiB of RAM per process"
        fixes.append("use a machine with more RAM")
    else:
        where = f"hardware={cfg.hardware.name} holds {have / GIB:.1f} GiB"
        reason, more_devices = state_beyond_devices(cfg, plan)
        if reason:
            fixes = [more_devices] + (["train fewer parameters (technique=lora)"] if plan.technique_memory == "full"
                                      else [])
        roomy = [name for name, gib in hardware_presets() if gib * GIB >= need]
        if roomy:
            fixes.append(f"choose a GPU with more memory (hardware={', '.join(roomy)})")
    return [
        f"Memory per device is {need / GIB:.1f} GiB ({parts}) but {where}, {(need - have) / GIB:.1f} "
        f"GiB short{reason}; {', '.join(fixes[:-1])} or {fixes[-1]}."
    ]


def state_beyond_devices(cfg, plan: Plan) -> tuple:
    """``(reason, fix)`` when the model's state is more than the job's devices hold together, else ``("", "")``.

    The state is what ``_state_shards`` splits; the fix is the fewest full nodes (the same tp and pp, dp
    filling the rest, the state split over it by FSDP) whose devices hold it beside this step's activations.
    """
    p = cfg.parallelism
    layout = {name: max(1, int(p[name])) for name in LAYOUT_FIELDS}
    step = sum(value for name, value in plan.memory_breakdown.items() if name in STEP_PARTS)
    state = (plan.memory_per_device_bytes - step) * _state_shards(cfg, layout)
    devices = layout["tp"] * layout["pp"] * layout["dp"]
    room = plan.device_memory_bytes - step
    if state <= plan.device_memory_bytes * devices or room <= 0:
        return "", ""
    model_parallel = layout["tp"] * layout["pp"]
    per_node = max(layout["devices_per_node"], cfg.hardware.gpus_per_node)
    nodes = -(-math.ceil(state / room) // per_node)
    while nodes * per_node % model_parallel:
        nodes += 1
    per_node_override = f" parallelism.devices_per_node={per_node}" if per_node != layout["devices_per_node"] else ""
    held = "its one device holds" if devices == 1 else f"its {devices} devices hold together"
    reason = (f": the weights, gradients and optimizer states alone come to {state / GIB:.1f} GiB, more than "
              f"{held} ({plan.device_memory_bytes * devices / GIB:.1f} GiB)")
    fix = (f"spread them over more devices (e.g. parallelism.nodes={nodes}{per_node_override} parallelism.dp="
           f"{nodes * per_node // model_parallel} parallelism.sharding=fsdp)")
    return reason, fix


def hardware_presets() -> List[tuple]:
    """(name, memory GiB) of each GPU preset in llmexp/conf/hardware, smallest first."""
    from importlib.resources import files

    import yaml

    presets = []
    for entry in files("llmexp.conf").joinpath("hardware").iterdir():
        if entry.name.endswith(".yaml"):
            preset = yaml.safe_load(entry.read_text(encoding="utf-8")) or {}
            if preset.get("memory_gb"):
                presets.append((entry.name[:-5], preset["memory_gb"]))
    return sorted(presets, key=lambda preset: (preset[1], preset[0]))


def model_kind(cfg) -> str:
    return cfg.model.name if cfg.model.path is None else f"{cfg.model.name} from {cfg.model.path}"


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _value(precision: Any) -> str:
    return getattr(precision, "value", precision)
