"""Pipeline parallelism on the torch backend: which layers and ranks each stage holds, and what it refuses.

Ranks are laid out data-parallel outermost: rank = data_rank * pp + stage, so the ``pp`` ranks of one
data-parallel replica form one pipeline; each stage holds ``llmexp.planning.layout.stage_layers``'s share of the
layers. Pure Python (plan checks call it); running the stages is ``llmexp.training.pipeline_stages``.
"""
from typing import Any, Dict, List, Optional

from llmexp.planning.layout import stage_layers

SCHEDULES = ("gpipe", "1f1b")  # torch.distributed.pipelining's ScheduleGPipe and Schedule1F1B


def stage_of(rank: int, pp: int) -> int:
    return rank % pp


def data_rank_of(rank: int, pp: int) -> int:
    return rank // pp


def pipeline_stages(num_layers: int, parallelism) -> List[Dict[str, Any]]:
    """Each stage's layers (first and last, inclusive) and the ranks holding it, as the run's metrics report them."""
    pp, dp = parallelism.pp, parallelism.dp
    return [
        {"stage": stage, "layers": [layers[0], layers[-1]], "ranks": [d * pp + stage for d in range(dp)]}
        for stage, layers in enumerate(stage_layers(num_layers, pp))
    ]


def schedule_problem(parallelism) -> Optional[str]:
    if parallelism.pipeline_schedule in SCHEDULES:
        return None
    return (f"parallelism.pipeline_schedule={parallelism.pipeline_schedule} is not a pipeline schedule; choose "
            f"{' or '.join(SCHEDULES)}.")


def pipeline_problems(config, key: str, node, technique_refusal: Optional[str]) -> List[str]:
    """What ``parallelism.pp > 1`` cannot train on the torch backend; ``technique_refusal`` is the technique's own."""
    p = config.parallelism
    if p.pp <= 1:
        return []
    problems = [technique_refusal] if technique_refusal else []
    if p.tp > 1:
        problems.append(
            f"parallelism.pp={p.pp} with parallelism.tp={p.tp} (parallelism={p.name}): the torch backend pipelines "
            "whole layers and does not split them over tensor-parallel ranks as well; set parallelism.tp=1 (pp x dp), "
            "or train with backend=megatron (CUDA GPUs) for pp x tp.")
    if p.sharding == "fsdp":
        problems.append(
            f"parallelism.pp={p.pp} with parallelism.sharding=fsdp: pipeline stages are replicated over dp, not "
            "sharded; set parallelism.sharding=none.")
    micro_batches = p.global_batch // (p.micro_batch * p.dp)
    if micro_batches < p.pp:
        problems.append(
            f"parallelism.pp={p.pp} needs at least {p.pp} micro-batches per step to keep every stage busy, and "
            f"parallelism.global_batch/(micro_batch*dp) = {p.global_batch}/({p.micro_batch}*{p.dp}) gives "
            f"{micro_batches}; raise parallelism.global_batch or lower parallelism.micro_batch.")
    if getattr(config.precision, "value", config.precision) == "fp16":
        problems.append(
            f"precision=fp16 with parallelism.pp={p.pp}: the pipeline's backward runs outside Lightning's loss "
            "scaling, which fp16 needs; train with precision=bf16 (or fp32).")
    if node.get("compile"):
        problems.append(
            f"{key}.compile=true: the torch backend does not compile pipeline stages; set {key}.compile=false.")
    return problems
