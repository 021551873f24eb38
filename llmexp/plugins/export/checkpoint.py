"""The HF checkpoint a deployment engine takes, written to ``<stage dir>/hf``.

Where it comes from, first match wins:

1. the unified export of the quantize stage that made the input model (its ``export``
   artifact, or the ``export`` directory beside the ``model`` directory ``model.path`` names):
   placed as it is, since ModelOpt wrote it for exactly this;
2. an unquantized model already saved as an HF directory (``model.path``, a preset's
   published weights in the Hugging Face cache, or an earlier stage's saved model): its files
   placed as they are, nothing loaded;
3. a ModelOpt-quantized model without an export (``technique.export=false``, or a saved
   ``model`` directory alone): exported with ModelOpt's ``export_hf_checkpoint``, as the
   quantize stage does (``llmexp/plugins/quantize/ptq.export``);
4. a model only in memory: ``save_pretrained`` with its tokenizer.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Tuple

from llmexp.sdk import is_modelopt_export, read_hf_config
from llmexp.sdk import UserError
from llmexp.sdk import MODELOPT_STATE
from llmexp.plugins.export.directories import place_file, write_directory
from llmexp.sdk import weights_directory

# how the checkpoint was made, as recorded in the stage's artifacts
FROM_QUANTIZE_EXPORT = "quantize export"
FROM_SAVED_MODEL = "saved model"
MODELOPT_EXPORT = "modelopt export"
SAVED_NOW = "save_pretrained"


def input_directory(ctx) -> Optional[Path]:
    """Where the stage's input model is saved: the earlier stage's directory (None: in memory only), else the run's
    own weights' (``model.path``, or the published weights' snapshot, fetched into the cache when it lacks them)."""
    if ctx.model is not None:
        return Path(ctx.model.path) if ctx.model.path else None
    return weights_directory(ctx.config)


def quantize_export_of(ctx, path: Optional[Path]) -> Optional[Path]:
    """The ModelOpt unified export written alongside the stage's input model (saved at ``path``), if there is one."""
    model = ctx.model
    if model is not None:
        recorded = (ctx.earlier.get(model.produced_by) or {}).get("artifacts", {}).get("export")
        if recorded and _is_export(Path(recorded)):
            return Path(recorded)
    return sibling_export(path) if path else None


def sibling_export(model_dir: Path) -> Optional[Path]:
    """``<stage>/export`` beside a quantize stage's ``<stage>/model`` (one holding modelopt_state.pth), if written."""
    export = Path(model_dir).parent / "export"
    if (Path(model_dir) / MODELOPT_STATE).is_file() and _is_export(export):
        return export
    return None


def _is_export(directory: Path) -> bool:
    try:
        return directory.is_dir() and is_modelopt_export(directory, read_hf_config(directory))
    except UserError:
        return False


def write_hf_checkpoint(ctx, directory: Path, field: str) -> Tuple[Path, str]:
    """Write the stage's input model to ``directory`` as a deployable HF checkpoint; ``(directory, how)``."""
    path = input_directory(ctx)
    export = quantize_export_of(ctx, path)
    if export is not None:
        write_directory(directory, lambda temporary: _place_checkpoint(export, temporary))
        return directory, FROM_QUANTIZE_EXPORT
    saved = _saved_unquantized(path)
    if saved is not None:
        write_directory(directory, lambda temporary: _place_checkpoint(saved, temporary))
        return directory, FROM_SAVED_MODEL
    from llmexp.sdk import input_model

    artifact = input_model(ctx)
    if artifact is None:
        raise UserError(f"{field}: nothing to export: no stage before it produced a model and model.path is unset. "
                        "Set model.path=<a Hugging Face checkpoint directory> or put a stage that makes a model "
                        "before it.")
    if is_modelopt_quantized(artifact.model):
        from llmexp.sdk import export_unified_checkpoint

        write_directory(directory, lambda temporary: export_unified_checkpoint(artifact.model, artifact.tokenizer, temporary))
        return directory, MODELOPT_EXPORT
    from llmexp.sdk import save_model

    write_directory(directory, lambda temporary: save_model(artifact.model, artifact.tokenizer, temporary))
    return directory, SAVED_NOW


def _saved_unquantized(path: Optional[Path]) -> Optional[Path]:
    """``path`` when it is an HF directory holding the input model unquantized: placed without loading it."""
    if path is None or (path / MODELOPT_STATE).is_file() or not path.is_dir():
        return None
    return path


def _place_checkpoint(source: Path, destination: Path) -> None:
    """The checkpoint's own files (config, weights, tokenizer), not whatever else shares its directory."""
    for path in sorted(source.iterdir()):
        if path.is_file() and path.name != MODELOPT_STATE and not path.name.startswith("."):
            place_file(path, destination / path.name)


def is_modelopt_quantized(model) -> bool:
    """Whether ModelOpt converted ``model`` (quantizers inserted). Only possible once modelopt is imported,
    so an unquantized run never pays for importing it here."""
    if "modelopt.torch.opt" not in sys.modules:
        return False
    from modelopt.torch.opt import ModeloptStateManager

    return ModeloptStateManager.is_converted(model)
