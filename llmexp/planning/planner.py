"""Will it fit, will it run? The plan of a composed config, in pure Python.

The planner turns architecture numbers, precision, the pipeline's stages and parallelism into a
parameter count, a per-device memory estimate and a list of problems, each naming the config
field, its value and the fix. What a stage holds and checks, its technique says on itself
(``llmexp.planning.stages``); the planner names no technique. It never imports torch,
transformers or lightning, so ``llmexp plan`` answers in well under a second and every sweep
point can be checked before a job is queued.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, List, Optional

from llmexp.architecture import count_parameters
from llmexp.configuration.rails import rails_problems
from llmexp.configuration.retrieval import retriever_problems
from llmexp.data.embedded import build_world
from llmexp.data.tokenizer import SPECIAL_TOKENS
from llmexp.models import starting_weights
from llmexp.models.vocabulary import vocabulary_problem
from llmexp.planning.data_flow import data_flow_problems
from llmexp.planning.feasibility import divisibility_problems, layout_problems, memory_problems
from llmexp.planning.hardware import GIB, device_memory_bytes, precision_problems, precision_value
from llmexp.planning.layout import Layout, stage_layers
from llmexp.planning.stages import PlannedStage, StageMemory, heaviest_stage, model_numbers, planned_stages
from llmexp.techniques import plugin_manager

# data.seq_len below this share of the model's training length (``model.train_seq_len``) is far from
# any real job on that model: the embedded data's 64-token sequences planned on a named model, say.
SHORT_SEQUENCE_SHARE = 1 / 8


@dataclass
class Plan:
    """What a config needs: parameters, bytes per device by kind, and what stops it running."""

    parameters: int
    memory_per_device_bytes: int
    memory_breakdown: Dict[str, int]  # weights, gradients, optimizer, activations, kv_cache, adapter, ...
    world_size: int  # tp * pp * dp
    device_memory_bytes: int
    technique_memory: str  # the heaviest stage's technique's ``memory`` label: inference, full, adapter, ...
    problems: List[str] = field(default_factory=list)
    trainable_parameters: int = 0  # all of them in full training, the adapter's, or none
    warnings: List[str] = field(default_factory=list)  # what does not stop the run but misleads its figures
    # Memory at model.train_seq_len, when data.seq_len is far shorter: seq_len, memory_breakdown,
    # memory_per_device_bytes, fits.
    at_train_seq_len: Optional[Dict[str, Any]] = None
    # Under pipeline parallelism (pp > 1): schedule, micro_batches per step, bubble_fraction, and stages,
    # each {stage, layers: [first, last], ranks, memory_per_device_bytes, memory_breakdown}.
    pipeline: Optional[Dict[str, Any]] = None
    # Each stage's (received, made) architecture numbers by key, for the stages' checks; not recorded.
    architectures: Dict[str, tuple] = field(default_factory=dict, repr=False)

    @property
    def feasible(self) -> bool:
        return not self.problems

    def to_dict(self) -> Dict[str, Any]:
        recorded = asdict(replace(self, architectures={}))
        del recorded["architectures"]
        return {**recorded, "feasible": self.feasible}


def make_plan(cfg) -> Plan:
    """The plan of a composed config (``llmexp.configuration.schema.RunConfig``), problems included.

    Memory is that of the pipeline stage that holds the most. Each stage's own checks
    (``Technique.plan_problems``), then the cross-cutting ones of the ``llmexp_plan_problems``
    hook, run last and see the plan so far; a problem two stages share is said once.
    """
    problems: List[str] = []
    model = model_numbers(cfg, problems)
    stages = planned_stages(cfg, model, problems)
    problems += data_flow_problems(cfg)
    problems += embedded_vocabulary_problem(cfg, stages)
    problems += starting_weights.problems(cfg)
    problems += retriever_problems(cfg) + rails_problems(cfg)
    precision = precision_value(cfg.precision)
    problems += layout_problems(cfg)
    layout = Layout.of(cfg)
    problems += precision_problems(cfg, precision)
    problems += divisibility_problems(cfg, model, layout)

    heaviest = heaviest_stage(cfg, stages, model, precision, layout)
    plan = Plan(
        parameters=count_parameters(model),
        memory_per_device_bytes=heaviest.total,
        memory_breakdown=heaviest.breakdown,
        world_size=layout.world_size,
        device_memory_bytes=device_memory_bytes(cfg, layout.devices_per_node),
        technique_memory=heaviest.stage.technique.memory,
        problems=problems,
        trainable_parameters=heaviest.trainable,
        pipeline=pipeline_plan(layout, heaviest, model) if layout.pp > 1 else None,
        architectures={stage.key: (stage.received, stage.made) for stage in stages},
    )
    plan.problems += memory_problems(cfg, plan, model, heaviest.step_parts)
    plan.at_train_seq_len = train_length_memory(cfg, stages, model, precision, layout, plan.device_memory_bytes)
    plan.warnings += short_sequence_warning(cfg, plan)
    for stage in stages:
        plan.problems += stage.technique.plan_problems(cfg, stage.key, stage.node, plan)
    plan.problems += plugin_manager.plan_problems(cfg, plan)
    plan.problems = list(dict.fromkeys(plan.problems))
    return plan


def pipeline_plan(layout: Layout, heaviest: StageMemory, model: Dict[str, Any]) -> Dict[str, Any]:
    """What each pipeline stage holds (layers, ranks, bytes per device) and the share of a step it idles."""
    stages = [
        {"stage": index, "layers": [layers.start, layers.stop - 1],
         "ranks": layout.ranks_of(index),
         "memory_per_device_bytes": sum(breakdown.values()), "memory_breakdown": breakdown}
        for index, (layers, breakdown) in enumerate(zip(
            stage_layers(model["num_layers"], layout.pp) if heaviest.per_pipeline_stage else [],
            heaviest.per_pipeline_stage))
    ]
    return {"schedule": layout.schedule, "micro_batches": layout.micro_batches,
            "bubble_fraction": layout.bubble_fraction, "stages": stages}


def train_length_memory(cfg, stages: List[PlannedStage], model, precision: str, layout: Layout,
                        device_bytes: int) -> Optional[Dict[str, Any]]:
    """Memory per device with sequences of ``model.train_seq_len`` tokens, when ``data.seq_len`` is far
    shorter (``SHORT_SEQUENCE_SHARE``); else None.

    The run's own figures stay those of ``data.seq_len``, which is what it trains on: these show what
    the same job needs on data of the length the model is used at.
    """
    length = cfg.model.get("train_seq_len")
    if not length or layout.seq_len >= length * SHORT_SEQUENCE_SHARE:
        return None
    heaviest = heaviest_stage(cfg, stages, model, precision, replace(layout, seq_len=length))
    return {"seq_len": length, "memory_breakdown": heaviest.breakdown, "memory_per_device_bytes": heaviest.total,
            "fits": heaviest.total <= device_bytes}


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


def embedded_vocabulary_problem(cfg, stages: List[PlannedStage]) -> List[str]:
    """A model built from scratch (``model.path`` unset) gets the embedded world's word-level tokenizer, whose size
    grows with ``data.num_people``; ``model.vocab_size`` must hold it (``llmexp.models.loading.build_model`` refuses less)."""
    if cfg.model.path or not any(stage.technique.produces_model for stage in stages):
        return []
    tokens = len(SPECIAL_TOKENS) + len(build_world(cfg.data.seed, cfg.data.num_people).vocabulary())
    problem = vocabulary_problem(cfg.model.vocab_size, tokens, "the embedded tokenizer's")
    return [f"{problem} The embedded world's words grow with data.num_people={cfg.data.num_people}; fewer people "
            "need fewer tokens."] if problem else []
