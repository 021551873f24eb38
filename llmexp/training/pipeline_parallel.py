"""Pipeline parallelism on the torch backend: which layers each stage holds.

``stage_layers`` is pure Python so the planner can show and size the stages without importing torch.
"""
from typing import List


def stage_layers(num_layers: int, pp: int) -> List[range]:
    """Equal contiguous blocks of decoder layers, stage ``i`` holding ``result[i]``.

    The split must be exact (the planner refuses ``num_layers % pp != 0`` at plan time), so every stage
    does the same work and no stage sets the pipeline's pace alone.
    """
    if pp < 1 or num_layers % pp:
        raise ValueError(f"num_layers={num_layers} does not split into pp={pp} equal stages")
    per_stage = num_layers // pp
    return [range(i * per_stage, (i + 1) * per_stage) for i in range(pp)]
