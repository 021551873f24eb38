"""What stops a job on its devices: device counts, shapes that do not divide, memory that does not fit.

Each problem names the config field, its value and the fix; a fix is offered only where it helps
(a switch that is off, a preset with the memory, the fewest devices that hold the model's state).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

from omegaconf import OmegaConf

from llmexp.architecture import count_parameters
from llmexp.planning.hardware import GIB, hardware_presets
from llmexp.planning.layout import LAYOUT_FIELDS, Layout
from llmexp.techniques.plugin_manager import techniques


def layout_problems(cfg) -> List[str]:
    """Counts must be positive; tp*pp*dp must use exactly the devices the job asks for; a
    node cannot give more GPUs than it has (CPU ranks are processes, so no limit there)."""
    p = cfg.parallelism
    problems = [
        f"parallelism.{name}={p[name]} must be a positive integer; set it to 1 or more."
        for name in LAYOUT_FIELDS if int(p[name]) < 1
    ]
    if problems:
        return problems
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


def divisibility_problems(cfg, model: Dict[str, Any], layout: Layout) -> List[str]:
    """Heads and the MLP split over tp, layers over pp, and a step's batch into whole micro-batches."""
    problems = []
    tp, pp = layout.tp, layout.pp
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
    step = layout.micro_batch * layout.dp
    if layout.global_batch % step:
        problems.append(
            f"parallelism.global_batch={layout.global_batch} is not divisible by "
            f"parallelism.micro_batch*dp = {layout.micro_batch}*{layout.dp} = {step}; each "
            f"data-parallel rank needs whole micro-batches — set parallelism.global_batch to a "
            f"multiple of {step} (e.g. {-(-layout.global_batch // step) * step}) or change "
            f"parallelism.micro_batch."
        )
    return problems


def layout_fixes(cfg, plan) -> List[str]:
    """The switches of ``parallelism`` that would lower this plan's memory, among those not already on."""
    parallelism = cfg.parallelism
    fixes = []
    if parallelism.dp > 1 and str(getattr(parallelism.sharding, "value", parallelism.sharding)) != "fsdp":
        fixes.append("use parallelism.sharding=fsdp")
    if not parallelism.activation_checkpointing and plan.memory_breakdown.get("activations", 0) > plan.memory_per_device_bytes / 2:
        fixes.append("set parallelism.activation_checkpointing=true")
    return fixes


def memory_problems(cfg, plan, model: Dict[str, Any], step_parts: Tuple[str, ...]) -> List[str]:
    """Memory that does not fit, with the fixes that could make it fit.

    When the model's state alone (weights, gradients, optimizer states, frozen copies: every part but the
    ``step_parts``, which grow with a step's tokens) is more than all the job's devices hold together, no
    layout of them helps: that is said first, with the fewest devices that could hold it, and, for full
    training, the techniques that train fewer of ``model``'s parameters.
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
        reason, more_devices = state_beyond_devices(cfg, plan, step_parts)
        if reason:
            fewer = fewer_parameter_techniques(cfg, model) if plan.technique_memory == "full" else []
            fixes = [more_devices] + ([f"train fewer parameters ({', '.join(f'technique={name}' for name in fewer)})"]
                                      if fewer else [])
        roomy = [name for name, gib in hardware_presets() if gib * GIB >= need]
        if roomy:
            fixes.append(f"choose a GPU with more memory (hardware={', '.join(roomy)})")
    return [
        f"Memory per device is {need / GIB:.1f} GiB ({parts}) but {where}, {(need - have) / GIB:.1f} "
        f"GiB short{reason}; {', '.join(fixes[:-1])} or {fixes[-1]}."
    ]


def state_beyond_devices(cfg, plan, step_parts: Tuple[str, ...]) -> Tuple[str, str]:
    """``(reason, fix)`` when the model's state is more than the job's devices hold together, else ``("", "")``.

    The state is what ``Layout.state_shards`` splits; the fix is the fewest full nodes (the same tp and pp, dp
    filling the rest, the state split over it by FSDP) whose devices hold it beside this step's activations.
    """
    layout = Layout.of(cfg)
    step = sum(value for name, value in plan.memory_breakdown.items() if name in step_parts)
    state = (plan.memory_per_device_bytes - step) * layout.state_shards
    devices = layout.world_size
    room = plan.device_memory_bytes - step
    if state <= plan.device_memory_bytes * devices or room <= 0:
        return "", ""
    model_parallel = layout.tp * layout.pp
    per_node = max(layout.devices_per_node, cfg.hardware.gpus_per_node)
    nodes = -(-math.ceil(state / room) // per_node)
    while nodes * per_node % model_parallel:
        nodes += 1
    per_node_override = f" parallelism.devices_per_node={per_node}" if per_node != layout.devices_per_node else ""
    held = "its one device holds" if devices == 1 else f"its {devices} devices hold together"
    reason = (f": the weights, gradients and optimizer states alone come to {state / GIB:.1f} GiB, more than "
              f"{held} ({plan.device_memory_bytes * devices / GIB:.1f} GiB)")
    fix = (f"spread them over more devices (e.g. parallelism.nodes={nodes}{per_node_override} parallelism.dp="
           f"{nodes * per_node // model_parallel} parallelism.sharding=fsdp)")
    return reason, fix


def fewer_parameter_techniques(cfg, model: Dict[str, Any]) -> List[str]:
    """Registered techniques that, with their schema's defaults, train some but not all of ``model``'s parameters."""
    total = count_parameters(model)
    return [name for name, entry in sorted(techniques().items())
            if 0 < entry.technique.trainable_parameters(cfg, OmegaConf.structured(entry.technique.schema), model) < total]


def model_kind(cfg) -> str:
    return cfg.model.name if cfg.model.path is None else f"{cfg.model.name} from {cfg.model.path}"


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
