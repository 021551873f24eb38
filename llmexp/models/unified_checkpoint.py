"""ModelOpt's unified Hugging Face checkpoint: the deployable form of a quantized model.

Packed low-precision weights and their scales, the layout TensorRT-LLM and vLLM load. The quantize
technique writes one next to its saved model; the export technique writes one for a quantized model it
is handed in memory. ModelOpt is imported when a checkpoint is written (it costs seconds per process).
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path


def export_unified_checkpoint(model, tokenizer, directory: Path) -> None:
    """ModelOpt's unified HF checkpoint of ``model`` (packed low-precision weights and scales) and the tokenizer."""
    from modelopt.torch.export import export_hf_checkpoint

    # export_hf_checkpoint packs the weights in place, after which the model no longer runs: export a
    # copy. dtype is given because ModelOpt otherwise reads config.torch_dtype, a string in transformers 5,
    # and then warns that the string differs from the dtype; its tensor-copy warning is its own business.
    # Its logged notice that a tied lm_head is stored once is expected, not a problem: kept off the console.
    quiet = logging.getLogger("modelopt.torch.export")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Model's original dtype .* differs from target dtype")
            warnings.filterwarnings("ignore", message=r"To copy construct from a tensor")
            export_hf_checkpoint(copy.deepcopy(model), dtype=model.dtype, export_dir=directory)
    finally:
        quiet.setLevel(level)
    tokenizer.save_pretrained(str(directory))
