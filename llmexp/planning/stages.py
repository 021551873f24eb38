"""The one walk over a pipeline's stages: the model each receives and makes, and what it holds per device.

Each stage's technique says it all on itself (``llmexp.techniques.contract.Technique``): the model it makes
(``made_architecture``), its bytes per device (``memory_per_device``) and what it trains
(``trainable_parameters``). Its checks (``plan_problems``) run once the plan is made, since they may read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Tuple

from llmexp.architecture import architecture
from llmexp.configuration.pipeline import model_sources, stage_nodes
from llmexp.errors import UserError
from llmexp.models.checkpoint import model_numbers_from_hf_config, read_hf_config, validate_checkpoint_dir
from llmexp.planning.layout import Layout
from llmexp.techniques.plugin_manager import technique


@dataclass(frozen=True)
class PlannedStage:
    """A stage of the pipeline with the architecture numbers of the model it receives and of the one it hands on."""

    key: str
    node: Any
    technique: type  # its llmexp.techniques.contract.Technique subclass
    received: Dict[str, Any]
    made: Dict[str, Any]


@dataclass(frozen=True)
class StageMemory:
    """What one stage holds per device, by part, and what of it grows with a step's tokens.

    Under pipeline parallelism ``breakdown`` is the busiest pipeline stage's, and ``per_pipeline_stage``
    has every pipeline stage's in order (empty without one, or when the layers do not split evenly).
    """

    stage: PlannedStage
    breakdown: Dict[str, int]
    trainable: int
    step_parts: Tuple[str, ...]  # parts that grow with the tokens of a step (activations, caches), not the model
    per_pipeline_stage: Tuple[Dict[str, int], ...] = ()

    @property
    def total(self) -> int:
        return sum(self.breakdown.values())


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


def planned_stages(cfg, start: Dict[str, Any], problems: List[str]) -> List[PlannedStage]:
    """Every stage in order, ``start`` (the run's model numbers) followed through the stages that change it along
    ``llmexp.configuration.pipeline.model_sources``. A pipeline the planner cannot read is a problem, and its
    stages it can read are planned (``technique`` when none)."""
    try:
        nodes = stage_nodes(cfg)
    except UserError as error:
        problems.append(str(error))
        nodes = stage_nodes(cfg, strict=False)
    sources = model_sources(cfg)
    stages: Dict[str, PlannedStage] = {}
    for key, node in nodes or [("technique", cfg.technique)]:
        cls = technique(node.name)
        source = stages.get(sources.get(key))  # a wrong input: stage_nodes reports it
        received = source.made if source else start
        stages[key] = PlannedStage(key, node, cls, received,
                                   cls.made_architecture(node, received) if cls.produces_model else received)
    return list(stages.values())


def stage_memory(cfg, stage: PlannedStage, model: Dict[str, Any], precision: str, layout: Layout) -> StageMemory:
    """The stage's bytes per device (whole bytes, rounded up) with ``model``'s numbers, and its trainable parameters.

    Under pipeline parallelism each pipeline stage is sized on its own (``Layout.for_stage``) and the busiest
    one is the stage's figure. The step's parts are those that change when the step's sequences are twice as long.
    """
    def bytes_at(at: Layout) -> Dict[str, int]:
        breakdown = stage.technique.memory_per_device(cfg, stage.key, stage.node, model, precision, at)
        return {name: int(math.ceil(value)) for name, value in breakdown.items()}

    pipeline: Tuple[Dict[str, int], ...] = ()
    busiest = layout
    if layout.pp > 1 and model["num_layers"] % layout.pp == 0:
        layouts = [layout.for_stage(model, index) for index in range(layout.pp)]
        pipeline = tuple(bytes_at(at) for at in layouts)
        busiest = layouts[max(range(layout.pp), key=lambda index: (sum(pipeline[index].values()), -index))]
    breakdown = bytes_at(busiest)
    longer = bytes_at(replace(busiest, seq_len=2 * busiest.seq_len))
    step_parts = tuple(name for name, value in breakdown.items() if longer.get(name) != value)
    return StageMemory(stage, breakdown, stage.technique.trainable_parameters(cfg, stage.node, model), step_parts,
                       pipeline)


def heaviest_stage(cfg, stages: List[PlannedStage], model: Dict[str, Any], precision: str,
                   layout: Layout) -> Optional[StageMemory]:
    """The stage needing the most memory (the first of equals): stages run one after another, so the run needs
    what its heaviest stage needs. Every stage is sized with the run's model numbers, ``model``."""
    heaviest = None
    for stage in stages:
        memory = stage_memory(cfg, stage, model, precision, layout)
        if heaviest is None or memory.total > heaviest.total:
            heaviest = memory
    return heaviest
