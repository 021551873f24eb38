"""The contract between the runner and a technique plugin.

A technique is a class with a name, a config schema and a ``run`` method. Its module
must import without torch (the planner and ``llmexp plugins`` load every plugin), so
heavy imports belong inside ``run``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Tuple

from llmexp.machine.backends import importable


@dataclass
class TechniqueConfig:
    """Base schema; every technique's schema subclasses it and sets ``name``."""

    name: str = ""


@dataclass
class ModelArtifact:
    """A model handed from stage to stage: in memory, and where it was saved (if it was)."""

    model: Any
    tokenizer: Any
    path: Optional[Path] = None
    produced_by: str = ""


def _no_models(stage: str) -> ModelArtifact:
    raise LookupError(f"no stage named {stage!r} made a model in this run")


@dataclass
class StageContext:
    """What a stage gets: the whole config, its own node, its directory, the model so far.

    ``model_of(stage)`` is the model an earlier stage made (loaded from its directory when it
    is no longer in memory): a distillation's teacher, an evaluation's baseline. ``earlier``
    holds the records of the stages before this one (metrics, artifacts, model stats, the
    model each started from), as results.json has them.
    """

    config: Any
    stage_config: Any
    stage_dir: Path
    model: Optional[ModelArtifact]
    tracker: Any
    stage_name: str
    model_of: Callable[[str], ModelArtifact] = _no_models
    earlier: Mapping[str, Dict[str, Any]] = field(default_factory=dict)


class Reads(Enum):
    """What a stage takes from an earlier one (``Technique.consumes``)."""

    MODEL = "model"  # the model it made (``StageContext.model_of``)
    RESULTS = "results"  # its recorded metrics and artifacts (``StageContext.earlier``)


@dataclass(frozen=True)
class Consumed:
    """An earlier stage a stage reads, named by ``field`` (its full config path), checked at plan time
    (``llmexp.planning.data_flow``): the stage must run before, and make a model or be a ``technique`` stage."""

    field: str
    stage: str
    reads: Reads
    technique: Optional[str] = None  # for RESULTS: the technique whose records it reads
    fix: str = ""  # appended to the refusal: another way to give what it reads, or what it is for


@dataclass
class StageResult:
    """What a stage returns; the runner records it in results.json."""

    metrics: Dict[str, float] = field(default_factory=dict)
    model: Optional[ModelArtifact] = None
    artifacts: Dict[str, str] = field(default_factory=dict)
    model_stats: Dict[str, Any] = field(default_factory=dict)


class MetricKind(Enum):
    """What a reported number is to a comparison: the report's table groups columns by it, its plots pair them."""

    QUALITY = "quality"  # how good the model is (a task's accuracy): a Pareto plot's y axis
    COST = "cost"  # what the model or the stage costs (size, speed, memory, time): a Pareto plot's x axis
    INFO = "info"  # anything else worth a column (perplexity, differences from a baseline)


@dataclass(frozen=True)
class Metric:
    """One number a stage reports (``Technique.metrics``): its key in the stage's metrics, whether more is better,
    the label the comparison table and the plots' axes show, and its kind."""

    name: str
    higher_is_better: bool
    label: str
    kind: MetricKind


@dataclass(frozen=True)
class ServedExport:
    """A copy of a stage's model that servers such as vLLM load instead of its ``model/`` (``Technique.served_export``)."""

    folder: str  # in the stage's directory
    written_by: str  # the setting that writes it, for the message when it is missing


class Technique:
    """Subclass, set the class attributes, implement ``run``; return it from ``llmexp_techniques``.

    What a stage of it needs and checks before it runs, the technique says on itself: ``memory_per_device``,
    ``trainable_parameters``, ``made_architecture`` and ``plan_problems``. ``memory`` is how the plan and
    ``llmexp plugins`` name what it holds per device (``inference``: weights and KV cache).
    """

    name: ClassVar[str]
    schema: ClassVar[type]
    memory: ClassVar[str] = "inference"
    produces_model: ClassVar[bool] = False
    # the artifact holding a corpus in data=text's formats that a later stage can read instead of the run's
    # data (``pipeline.data_inputs``: a curated corpus feeding a training stage); None: it makes none
    produces_data: ClassVar[Optional[str]] = None
    # starts from a base model (fine-tuning, continued pretraining, pruning): the run's weights when no stage
    # before it makes one, on the embedded default the embedded baseline, never random weights
    # (``llmexp.models.starting_weights``: refused at plan time when there is no base)
    adapts_base: ClassVar[bool] = False
    requires: ClassVar[Tuple[str, ...]] = ()  # importable modules the technique needs
    extra: ClassVar[Optional[str]] = None  # pip extra that installs them
    # "module:function" taking a StageContext: the heavy code ``run`` imports only when it runs
    entry: ClassVar[Optional[str]] = None
    # a measurement that a run implies after its technique (the top-level evaluation): left out when a stage
    # before it already looked at the same model without changing it (`technique=benchmark` does not also score)
    implied_measurement: ClassVar[bool] = False
    # a copy of the stage's model for external servers, beside its model/ (``llmexp serve --backend vllm``)
    served_export: ClassVar[Optional[ServedExport]] = None

    def run(self, ctx: StageContext) -> StageResult:
        """Calls ``entry``; override instead when the technique has none."""
        if self.entry is None:  # pragma: no cover - interface
            raise NotImplementedError(f"{type(self).__name__} sets neither entry nor run")
        module, function = self.entry.split(":")
        return getattr(importlib.import_module(module), function)(ctx)

    @classmethod
    def made_architecture(cls, node, numbers: Dict[str, Any]) -> Dict[str, Any]:
        """Architecture numbers (``llmexp.architecture.architecture``) of the model this stage makes from one with
        ``numbers``: the same unless the technique changes the shape (pruning). The planner follows them through
        the pipeline, so each stage is checked against the model it will receive. Pure Python."""
        return numbers

    @classmethod
    def memory_per_device(cls, config, key: str, node, model: Dict[str, Any], precision: str,
                          layout) -> Dict[str, float]:
        """Bytes one device holds while the stage ``key`` (``node``) runs, by part (weights, gradients, optimizer,
        activations, kv_cache, ...), for a model with architecture numbers ``model`` in ``precision``.

        ``layout`` (``llmexp.planning.layout.Layout``) has the parallel layout, the step's shape and the building
        blocks; the default is inference: the weights and a KV cache. Pure Python.
        """
        return layout.inference_memory(model, precision)

    @classmethod
    def trainable_parameters(cls, config, node, model: Dict[str, Any]) -> int:
        """How many of the parameters of a model with architecture numbers ``model`` the stage trains: none by
        default. Pure Python."""
        return 0

    @classmethod
    def plan_problems(cls, config, key: str, node, plan) -> List[str]:
        """What stops the stage ``key`` (``node``) before anything runs, one paragraph each naming the field
        (``llmexp.configuration.pipeline.node_path(key)``), its value and the fix. ``plan`` is the plan so far
        (``llmexp.planning.planner.Plan``; ``plan.architectures[key]``: the architecture numbers of the model the
        stage receives and makes). Called once per stage by the planner. Must not import torch."""
        return []

    @classmethod
    def metrics(cls, config, node) -> Tuple[Metric, ...]:
        """The numbers a stage of it (``node``) reports that a comparison shows, most important first within each
        kind; the report takes its columns, their order and labels, and its plots' axes from them. A number a stage
        reports but does not declare stays in results.json, out of the table. Pure Python."""
        return ()

    @classmethod
    def measured_by(cls, config) -> Tuple[str, ...]:
        """Evaluation tasks that score what this technique teaches a model under ``config`` (its data).

        An evaluation of a model this technique made, directly or further up its lineage, scores them
        besides its own tasks, so a run's table shows what the training changed. None by default: a
        technique that teaches nothing a task names (pretraining on the corpus, compression), or one
        trained on the user's own data. Pure Python.
        """
        return ()

    @classmethod
    def consumes(cls, config, key: str, node) -> Tuple[Consumed, ...]:
        """The earlier stages the stage ``key`` (``node``) reads besides the model it starts from (a teacher's
        model, a baseline's results); the planner refuses a pipeline where one cannot run. Pure Python."""
        return ()

    @classmethod
    def planned_as(cls, config, key: str, node) -> str:
        """How the plan's job line names the stage ``key`` (``node``): the technique's name, or more where the name
        alone hides what the stage will do (the tasks an evaluation scores). Pure Python."""
        return cls.name

    @classmethod
    def machine_problems(cls, config, node, field: str) -> List[str]:
        """What this machine lacks to run the stage at ``field`` (a package, a GPU), one paragraph each.

        Checked when a run starts, not by the plan: a plan may be made on a laptop for a cluster.
        Must not import torch.
        """
        return []

    @classmethod
    def missing_requirements(cls) -> Tuple[str, ...]:
        """Modules from ``requires`` that cannot be imported here (found without importing them)."""
        return tuple(m for m in cls.requires if not importable(m))
