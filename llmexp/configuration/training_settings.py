"""Settings of a training node that cannot work, checked before anything runs.

Pure checks of a node's values: a training technique's plan checks call them, and so does the plan of a
stage that will train the embedded baseline (``model.baseline``), below the training layer.
"""

from __future__ import annotations

from typing import List


def training_problems(node, key: str = "technique", min_steps: int = 1) -> List[str]:
    """Settings of a training node that cannot work (``key``: where the node sits in the config).

    Pure Python: plugins' plan checks call it, so a bad value stops the run before it starts.
    ``min_steps=0``: the technique takes ``max_steps=0`` as "use the starting model as it is".
    """
    problems = []
    for name, least in (("max_steps", min_steps), ("log_every", 1)):
        if node[name] < least:
            problems.append(f"{key}.{name}={node[name]} must be at least {least}; set it to {least} or more.")
    for name in ("val_every", "checkpoint_every"):
        if node[name] < 0:
            problems.append(f"{key}.{name}={node[name]} is negative; set it to 0 (never) or a step count.")
    if node["checkpoint_every"] and node["keep_checkpoints"] < 1:
        problems.append(
            f"{key}.keep_checkpoints={node['keep_checkpoints']} keeps no checkpoint to resume from; set it to 1 "
            f"or more, or turn checkpoints off with {key}.checkpoint_every=0."
        )
    return problems


def splits_model(parallelism) -> bool:
    """Whether the layout splits the model's weights (tensor parallel or FSDP2) rather than replicating them."""
    return parallelism.tp > 1 or (parallelism.sharding == "fsdp" and parallelism.dp > 1)


def validation_problem(node, key: str) -> str:
    """The refusal of ``<key>.val_every`` on a stage that has no validation examples (``key``: where ``node`` sits)."""
    return (
        f"{key}.val_every={node.val_every} asks for validation, but {node.name} has no validation examples: sft, lora "
        "and dpo validate on data.validation_path or a data.validation_split share of their records, while pretrain, "
        f"cpt and distill read no validation set; give it validation data or set {key}.val_every=0."
    )
