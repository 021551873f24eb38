"""What a training technique is: its shared settings, its plan, the loss it hands the loop, its refusals.

A technique that trains subclasses ``TrainingTechnique`` and its schema ``TrainingConfig``; the loop
that runs it is ``llmexp.training.loop.train``. Pure Python: the planner and ``llmexp plugins`` load
every technique's schema without torch, and plugins' plan checks call the refusals here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple

from llmexp.architecture import count_parameters
from llmexp.machine.backends import BACKENDS, unavailable_reason
from llmexp.techniques.contract import Metric, MetricKind, Technique, TechniqueConfig
from llmexp.techniques.plugin_manager import techniques
from llmexp.training.compilation import compile_problems
from llmexp.training.megatron.arguments import megatron_problems
from llmexp.training.pipeline_parallel import pipeline_problems, schedule_problem

# Our precision names -> Lightning's. Mixed precision keeps fp32 master weights.
LIGHTNING_PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}
# What trains on a CPU: it has no FP16 autocast, and Lightning trains a CPU 16-mixed run in bf16 with only a warning.
CPU_TRAINING_PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainingConfig(TechniqueConfig):
    """What every training technique's schema shares; batch sizes come from ``parallelism``.

    The defaults are the embedded default's recipe: AdamW (0.9, 0.95, wd 0.1), lr 1e-2 with
    50 warm-up steps and a cosine decay to 10%, 1,000 steps, clip 1.0.
    """

    max_steps: int = 1000  # optimiser steps; each sees parallelism.global_batch examples
    lr: float = 1e-2
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1  # not applied to norms and biases
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # gradient-norm clipping; 0 turns it off
    log_every: int = 10  # steps between rows of train_log.jsonl and points of the tracker's curve
    val_every: int = 0  # validate every N optimiser steps on the validation set, and after the last (0: never)
    checkpoint_every: int = 200  # resumable checkpoint every N optimiser steps (0: never)
    keep_checkpoints: int = 2  # the newest K are kept
    save_model: bool = True  # write the HF checkpoint to <stage dir>/model
    compile: bool = False  # torch.compile the training step: faster steps for a one-off compile (llmexp.training.compilation)


class TrainingTechnique(Technique):
    """Base class of a technique that trains through ``train``: it makes a model and needs the stack."""

    memory: ClassVar[str] = "full"
    produces_model: ClassVar[bool] = True
    requires: ClassVar[Tuple[str, ...]] = ("torch", "transformers", "lightning")
    # training backends (``backend=``) whose loop can run its loss: megatron's computes next-token loss only
    backends: ClassVar[Tuple[str, ...]] = ("torch",)
    # whether its loss trains through pipeline stages on torch (parallelism.pp > 1): it calls the model once per
    # micro-batch for logits and the HF loss on its labels (``llmexp.training.pipeline_stages``)
    pipelines: ClassVar[bool] = False

    @classmethod
    def memory_per_device(cls, config, key: str, node, model: Dict[str, Any], precision: str,
                          layout) -> Dict[str, float]:
        """Full training: weights and grads in the run's precision, Adam states, activations of the busiest stage."""
        return layout.training_memory(model, precision)

    @classmethod
    def trainable_parameters(cls, config, node, model: Dict[str, Any]) -> int:
        return count_parameters(model)

    @classmethod
    def metrics(cls, config, node) -> Tuple[Metric, ...]:
        """What training cost (``llmexp.training.loop.train`` reports it): a comparison row shows it beside the
        evaluation of the model it made, its time first."""
        return (
            Metric("train_time_s", False, "train_time_s", MetricKind.COST),
            Metric("trainable_parameters", False, "trainable_parameters", MetricKind.COST),
            Metric("peak_memory_mb", False, "peak_memory_mb", MetricKind.COST),
            Metric("tokens_per_s", True, "training throughput", MetricKind.COST),
        ) + ((Metric("compile_time_s", False, "compile_time_s", MetricKind.COST),) if node.get("compile") else ())

    @classmethod
    def plan_problems(cls, config, key: str, node, plan) -> List[str]:
        """What the run's training backend cannot train: on torch (``llmexp.training.loop``) FP8/FP4 and what pipeline
        stages cannot run (``llmexp.training.pipeline_parallel``); on megatron what megatron-core cannot run (``llmexp.training.megatron.arguments``) and a technique
        whose loss it does not compute. Whether the backend's packages and a GPU are on this machine is checked when
        the run starts (``machine_problems``): a plan may be for a cluster."""
        if config.backend.name == "megatron":
            problems = megatron_problems(config) + compile_problems(config, key, node)
            if "megatron" not in cls.backends:
                trained = sorted(name for name, entry in techniques().items()
                                 if issubclass(entry.technique, TrainingTechnique)
                                 and "megatron" in entry.technique.backends)
                problems.append(
                    f"{key}: technique={cls.name} trains on backend={', '.join(cls.backends)} only; run it with "
                    f"backend=torch (backend=megatron trains {', '.join(trained)}).")
            return problems
        if config.backend.name != "torch":
            return []
        precision = getattr(config.precision, "value", config.precision)
        problems = [problem for problem in [torch_precision_problem(precision, config.hardware)] if problem]
        schedule = schedule_problem(config.parallelism)
        problems += [schedule] if schedule else []
        problems += pipeline_problems(config, key, node, cls.pipeline_refusal(config, key, node))
        return problems + compile_problems(config, key, node)

    @classmethod
    def pipeline_refusal(cls, config, key: str, node) -> Optional[str]:
        """Why this technique cannot train through pipeline stages on torch (``parallelism.pp > 1``), or None."""
        if cls.pipelines:
            return None
        trained = sorted(name for name, entry in techniques().items()
                         if issubclass(entry.technique, TrainingTechnique) and entry.technique.pipelines)
        return (f"{key}: technique={cls.name} does not train through pipeline stages on the torch backend (parallelism."
                f"pp={config.parallelism.pp}; pipelines train {', '.join(trained)}); set parallelism.pp=1, e.g. "
                "parallelism=dp2 or parallelism=fsdp2.")

    @classmethod
    def machine_problems(cls, config, node, field: str) -> List[str]:
        """The run's training backend must be able to run here (its packages; a GPU where it needs one)."""
        reason = unavailable_reason(BACKENDS[config.backend.name])
        if reason is None:
            return []
        return [f"backend={config.backend.name} cannot train on this machine ({field}: technique={node.name}): "
                f"{reason}. Run on a machine that has it (hydra/launcher=slurm cluster=... for a GPU cluster), or "
                "train here with backend=torch."]


@dataclass
class LossOutput:
    """A technique's loss on one micro-batch."""

    loss: Any  # scalar tensor to minimise
    tokens: int  # tokens it covers: throughput, and the weight of this batch in the validation mean
    logs: Dict[str, Any] = field(default_factory=dict)  # floats or 0-d tensors, logged as train/<k> or val/<k>


LossFn = Callable[[Any, Any], LossOutput]


def torch_precision_problem(precision: str, hardware) -> Optional[str]:
    """Why the torch backend cannot train in ``precision`` on ``hardware`` as asked, or None: Lightning has no
    FP8/FP4 training, and a CPU no FP16 one (Lightning would train in bf16 while the run records fp16)."""
    if precision not in LIGHTNING_PRECISION:
        return (
            f"precision={precision} is not available for training on the torch backend (it trains in "
            f"{', '.join(LIGHTNING_PRECISION)}); train with precision=bf16 and quantize afterwards "
            "(technique=quantize), or train with backend=megatron, whose Transformer Engine kernels train in "
            "FP8/FP4 on GPUs that have them."
        )
    if hardware.accelerator == "cpu" and precision not in CPU_TRAINING_PRECISIONS:
        return (
            f"precision={precision} is not available for training on hardware={hardware.name}: a CPU has no "
            f"{precision.upper()} mixed precision (Lightning would train in bf16 instead); train with "
            f"{' or '.join(f'precision={name}' for name in CPU_TRAINING_PRECISIONS[::-1])}, or in {precision} on a GPU "
            "preset."
        )
    return None
