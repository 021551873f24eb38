"""TensorRT-LLM's draft-target speculative decoding for an exported checkpoint: the LLM API options that serve it
with a smaller draft model, as ``llmexp serve --draft-model`` does in process and vLLM's ``speculative_config`` does.

TensorRT-LLM's PyTorch workflow (``tensorrt_llm.LLM``, ``trtllm-serve``) takes the draft as
``speculative_config=DraftTargetDecodingConfig(max_draft_len=k, speculative_model=<draft dir>)``
and runs the draft beside the target with the overlap scheduler off; ``trtllm-serve`` reads the
same options from a YAML file (``--extra_llm_api_options``), whose ``speculative_config``
mapping names the class by its ``decoding_type``, ``DraftTarget``. The export writes that file
beside the checkpoint (``OPTIONS_FILE``); ``llm_api_arguments`` turns it into ``LLM(...)``
keyword arguments where TensorRT-LLM is installed. No torch or tensorrt_llm at import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from llmexp.sdk import UserError, validate_checkpoint_dir

OPTIONS_FILE = "trtllm_llm_api_options.yaml"  # trtllm-serve <stage>/hf --extra_llm_api_options <stage>/<this>
DECODING_TYPE = "DraftTarget"


def draft_checkpoint(draft_model: str, field: str) -> Path:
    """The draft's checkpoint directory: ``draft_model`` itself, or the ``model/`` of a run's stage directory."""
    path = Path(draft_model)
    checkpoint = path / "model" if (path / "model" / "config.json").is_file() else path
    if not (checkpoint / "config.json").is_file():
        raise UserError(f"{field}.draft_model={draft_model}: no config.json there or in its model/. Give the draft's "
                        "checkpoint directory or a run's stage directory (e.g. <run>/distill).")
    validate_checkpoint_dir(checkpoint)
    return checkpoint


def draft_target_problems(node, field: str) -> List[str]:
    """What the plan refuses in a node's draft settings: a draft that is not a checkpoint, a count below 1, or a
    format whose engine this export would build without the draft's (the engine workflow's draft-target)."""
    if not node.draft_model:
        return []
    problems = []
    try:
        draft_checkpoint(node.draft_model, field)
    except UserError as error:
        problems.append(str(error))
    if node.num_speculative_tokens < 1:
        problems.append(f"{field}.num_speculative_tokens={node.num_speculative_tokens} must be at least 1.")
    if node.format != "hf":
        problems.append(
            f"{field}.draft_model with format={node.format}: the draft goes to TensorRT-LLM's PyTorch workflow, which "
            f"serves the HF checkpoint (trtllm-serve <stage>/hf --extra_llm_api_options <stage>/{OPTIONS_FILE}); this "
            f"export builds no draft engine. Use {field}.format=hf, or drop {field}.draft_model."
        )
    return problems


def draft_target_options(draft_dir: Path, num_speculative_tokens: int) -> Dict[str, Any]:
    """The LLM API options (``trtllm-serve``'s YAML) serving a target with ``draft_dir`` proposing ``k`` tokens."""
    return {
        "speculative_config": {"decoding_type": DECODING_TYPE, "max_draft_len": int(num_speculative_tokens),
                               "speculative_model": str(Path(draft_dir).resolve())},
        "disable_overlap_scheduler": True,  # the two-model draft-target runs without it
    }


def llm_api_arguments(options: Dict[str, Any]) -> Dict[str, Any]:
    """``LLM(model, **these)``: ``options`` with ``speculative_config`` as TensorRT-LLM's ``DraftTargetDecodingConfig``."""
    try:
        from tensorrt_llm.llmapi import DraftTargetDecodingConfig
    except ImportError as error:
        raise UserError(f"tensorrt_llm could not be imported ({error}); install TensorRT-LLM on a machine with an "
                        "NVIDIA GPU to serve with a draft model.") from None
    settings = {key: value for key, value in options["speculative_config"].items() if key != "decoding_type"}
    return {**options, "speculative_config": DraftTargetDecodingConfig(**settings)}
