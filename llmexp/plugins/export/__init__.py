"""Deployment export: ``technique=export technique.format=hf|trtllm|triton``.

``hf`` writes the checkpoint a deployment engine takes (ModelOpt's unified export after a
quantize stage, else the model's HF checkpoint; ``checkpoint.py``); ``trtllm`` builds it into a
TensorRT-LLM engine with TensorRT-LLM's LLM API (``engine_settings.py``: the build's arguments,
pure; ``engine.py``: the build); ``triton`` writes a Triton model repository serving that engine,
or a prebuilt one (``triton.py``, with the python models ``triton_preprocessing.py`` and
``triton_postprocessing.py``). See llmexp/plugins/export/README.md.

This module imports without torch or tensorrt_llm: the planner loads every plugin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from llmexp.sdk import (
    Metric, MetricKind, Technique, TechniqueConfig, context_length, has_weights, hookimpl, local_directory, node_path, stage_nodes,
)

FORMATS = ("hf", "trtllm", "triton")


@dataclass
class ExportConfig(TechniqueConfig):
    """What to export the stage's input model to; see llmexp/plugins/export/README.md."""

    name: str = "export"
    format: str = "hf"  # hf (checkpoint) | trtllm (+ TensorRT-LLM engine) | triton (+ Triton model repository)
    # engine limits (trtllm, triton): sequences per batch, and tokens
    max_batch_size: int = 8
    max_input_len: Optional[int] = None  # prompt tokens; None: max_seq_len
    max_seq_len: Optional[int] = None  # prompt + output tokens; None: the model's max_position_embeddings
    max_num_tokens: Optional[int] = None  # tokens of one forward step over the batch; None: min(8192, batch*seq)
    # triton
    kv_cache_free_gpu_mem_fraction: float = 0.9  # of the GPU memory free after loading the engine
    decoupled: bool = True  # streaming responses (the tensorrt_llm model's transaction policy)
    batch_scheduler_policy: str = "guaranteed_no_evict"  # or max_utilization (more in flight, may pause some)
    instance_count: int = 1  # instances of the preprocessing and postprocessing python models
    engine_dir: Optional[str] = None  # a prebuilt engine to serve instead of building one (no tensorrt_llm needed)
    repository_root: Optional[str] = None  # where the server mounts the repository (e.g. /models); None: where written
    # hf: serve with this smaller draft model (a checkpoint or a run's stage directory, same tokenizer) by
    # TensorRT-LLM's draft-target speculative decoding: writes the LLM API options beside the checkpoint (draft_target.py)
    draft_model: Optional[str] = None
    num_speculative_tokens: int = 4  # tokens the draft proposes per step (TensorRT-LLM's max_draft_len)


class Export(Technique):
    """Writes deployment artifacts (checkpoint, engine, model repository), not a new model."""

    name = "export"
    schema = ExportConfig
    produces_model = False
    requires = ("torch", "transformers")
    entry = "llmexp.plugins.export.stage:export"

    @classmethod
    def metrics(cls, config, node):
        """What the deployable files weigh and took to write (``stage.export``)."""
        return tuple(Metric(name, False, name, MetricKind.COST) for name in (
            "checkpoint_bytes", "checkpoint_time_s", "engine_bytes", "engine_build_time_s"))

    @classmethod
    def plan_problems(cls, config, key: str, node, plan) -> List[str]:
        """Format, limits, TensorRT-LLM and a GPU where an engine is built, a prebuilt engine."""
        stages = stage_nodes(config, strict=False)  # the stages before it: which one's model it exports
        index = [stage for stage, _ in stages].index(key) if key in dict(stages) else 0
        return export_problems(config, node, node_path(key), _source_node(config, stages, index))

    @classmethod
    def machine_problems(cls, config, node, field: str) -> List[str]:
        """An engine build needs TensorRT-LLM and an NVIDIA GPU on the machine that runs it."""
        from llmexp.sdk import gpu_driver_present
        from llmexp.plugins.export.engine import tensorrt_llm_problem

        if not builds_engine(node):
            return []
        problem = tensorrt_llm_problem(field, node.format)
        problems = [problem] if problem else []
        if not gpu_driver_present():
            problems.append(f"{field}.format={node.format} builds a TensorRT-LLM engine on an NVIDIA GPU and this "
                            "machine has no NVIDIA driver; run it on a GPU machine, or export with format=hf here "
                            "and build there.")
        return problems


def builds_engine(node) -> bool:
    """Whether the node builds a TensorRT-LLM engine here (format=triton with engine_dir serves a prebuilt one)."""
    return node.format == "trtllm" or (node.format == "triton" and not node.engine_dir)


@hookimpl
def llmexp_techniques():
    return [Export]


def _source_node(config, stages, index: int):
    """The node of the stage whose model the export at ``stages[index]`` starts from (None: model.path)."""
    from llmexp.sdk import UserError
    from llmexp.sdk import input_stage
    from llmexp.sdk import technique

    named = input_stage(config, stages[index][0])
    for key, node in reversed(stages[:index]):
        if named is not None:
            if key == named:
                return node
            continue
        try:
            if technique(node.name).produces_model:
                return node
        except UserError:
            return None  # an unknown technique: the planner reports it
    return None


def export_problems(config, node, field: str, source=None) -> List[str]:
    """Problems of the export node at ``field``; ``source``: the node of the stage whose model it starts from
    (None: no stage before it makes one, so its input is ``model.path``)."""
    from llmexp.plugins.export.draft_target import draft_target_problems
    from llmexp.plugins.export.engine import gpu_problem
    from llmexp.plugins.export.engine_settings import limit_problems
    from llmexp.plugins.export.triton import SCHEDULER_POLICIES

    if node.format not in FORMATS:
        return [f"{field}.format={node.format} is not an export format; choose one of {', '.join(FORMATS)}."]
    problems = []
    if source is None and not has_weights(config):
        needs = "the model's tokenizer for the repository" if node.format == "triton" and node.engine_dir else "a model"
        problems.append(f"{field}: nothing to export: it needs {needs}, no stage before it produced a model and "
                        "model.path is unset. Set model.path=<a Hugging Face checkpoint directory> (after "
                        "technique=quantize: <run>/quantize/model, whose export beside it is used) or put a stage "
                        "that makes a model before it.")
    if node.engine_dir and node.format != "triton":
        problems.append(f"{field}.engine_dir is a prebuilt engine for format=triton to serve; with "
                        f"format={node.format} unset it ({field}.engine_dir=null).")
    problems += draft_target_problems(node, field)
    if node.format == "hf":
        return problems
    problems += limit_problems(node, context_length(config), field)
    if node.format == "triton":
        if not 0.0 < node.kv_cache_free_gpu_mem_fraction <= 1.0:
            problems.append(f"{field}.kv_cache_free_gpu_mem_fraction={node.kv_cache_free_gpu_mem_fraction} must be "
                            "more than 0 and at most 1 (0.9: 90% of the memory left after the engine loads).")
        if node.batch_scheduler_policy not in SCHEDULER_POLICIES:
            problems.append(f"{field}.batch_scheduler_policy={node.batch_scheduler_policy} is not one of "
                            f"{', '.join(SCHEDULER_POLICIES)}.")
        if node.instance_count < 1:
            problems.append(f"{field}.instance_count={node.instance_count} must be at least 1.")
        if node.repository_root is not None and not str(node.repository_root).startswith("/"):
            problems.append(f"{field}.repository_root={node.repository_root} must be an absolute path: where the "
                            "server mounts the repository (e.g. /models).")
        if node.engine_dir:
            problems += _prebuilt_engine_problems(config, node, field)
    if builds_engine(node):
        problem = gpu_problem(config.hardware, field, node.format)
        problems += [problem] if problem else []
        if source is None:
            problems += _quantization_problems(config, field)
        elif source.get("name") == "quantize":
            problems += _quantize_format_problems(source, field)
    return problems


def _quantize_format_problems(quantize_node, field: str) -> List[str]:
    """A quantize format whose export TensorRT-LLM's engine builder does not take, refused before calibrating."""
    from llmexp.plugins.export.engine_settings import QUANT_ALGOS, QUANTIZE_FORMAT_ALGOS, unbuildable

    algo = QUANTIZE_FORMAT_ALGOS.get(quantize_node.format)
    if algo is None or algo in QUANT_ALGOS:
        return []
    return [unbuildable(algo, f"{field}: it builds the quantize stage's format={quantize_node.format}, exported as")]


def _prebuilt_engine_problems(config, node, field: str) -> List[str]:
    from llmexp.sdk import UserError
    from llmexp.plugins.export.engine_settings import engine_fit_problems, read_engine

    try:
        engine = read_engine(node.engine_dir, field)
    except UserError as error:
        return [str(error)]
    return engine_fit_problems(engine, node, config.parallelism, field)


def _quantization_problems(config, field: str) -> List[str]:
    """The checkpoint an engine would be built from, when known before the run: its quantization on this GPU."""
    from llmexp.sdk import read_hf_config
    from llmexp.sdk import UserError
    from llmexp.sdk import MODELOPT_STATE
    from llmexp.plugins.export.checkpoint import sibling_export
    from llmexp.plugins.export.engine_settings import checkpoint_quantization, quantization_hardware_problems

    checkpoint = local_directory(config)  # published weights not yet downloaded are checked when the run has them
    if checkpoint is None:
        return []
    try:
        read_hf_config(checkpoint)
    except UserError:
        return []  # the core planner reports a broken model.path
    if (checkpoint / MODELOPT_STATE).is_file():
        # a quantize stage's model: the export beside it is what gets built; without one, it is exported at run time
        checkpoint = sibling_export(checkpoint)
        if checkpoint is None:
            return []
    try:
        quantization = checkpoint_quantization(checkpoint)
    except UserError as error:
        return [str(error)]
    return quantization_hardware_problems(quantization, config.hardware, field) if quantization else []
