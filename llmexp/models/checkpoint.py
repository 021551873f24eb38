"""Checks a local Hugging Face checkpoint directory before anything loads it.

Loading a 140 GB checkpoint only to fail on its last shard wastes an hour of a GPU
allocation, so the planner validates ``model.path`` up front, in pure Python (no torch):
the directory exists, ``config.json`` parses and names a ``model_type``, weights are
there, and every safetensors file is whole (its header parses and the tensor offsets it
declares fit in the file). The architecture numbers in ``config.json`` then replace the
preset's, so the plan describes the checkpoint actually given.

Files only torch's unpickler reads (``pytorch_model*.bin``, ``modelopt_state.pth``) are
checked here as containers (torch writes a zip archive; a truncated copy has lost its
central directory); what they hold is checked by loading them with ``weights_only=True``
(``llmexp.models.loading.load_model``), which never runs code a file names.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from llmexp.errors import UserError

FIELD = "model.path"
MODELOPT_STATE = "modelopt_state.pth"  # ModelOpt's HF checkpointing writes it beside the weights
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"

# Bytes per element of the whole-byte safetensors dtypes; sub-byte ones (F4, F6_*) are
# only checked for fitting in the file, not for their exact size.
SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}

# Our ModelConfig field <- the Hugging Face config.json key it comes from.
HF_KEYS = {
    "architecture": "model_type",
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "max_position_embeddings": "max_position_embeddings",
    "rope_theta": "rope_theta",
    "rms_norm_eps": "rms_norm_eps",
    "tie_word_embeddings": "tie_word_embeddings",
    "attention_bias": "attention_bias",
}
REQUIRED_HF_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                    "num_hidden_layers", "num_attention_heads")

# What transformers assumes when config.json leaves a key out, per model_type. Qwen2 has
# no ``attention_bias`` key: its q/k/v projections always carry a bias.
HF_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "*": {"tie_word_embeddings": False, "attention_bias": False, "head_dim": None},
    "qwen2": {"attention_bias": True},
}


def _error(path: Any, problem: str, fix: str) -> UserError:
    return UserError(f"{FIELD}={path}: {problem}. {fix}")


def read_hf_config(path) -> Dict[str, Any]:
    """The parsed ``config.json`` of the checkpoint at ``path``; it must name a ``model_type``."""
    directory = Path(path)
    if not directory.is_dir():
        raise _error(path, "is a file, not a directory" if directory.exists() else "no such directory",
                     "Point model.path at a local Hugging Face checkpoint directory "
                     "(the folder holding config.json and *.safetensors), or set model.path=null "
                     "to use the preset's architecture without weights.")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise _error(path, "the directory has no config.json",
                     "A Hugging Face checkpoint needs config.json beside its weights; save the model "
                     "with `model.save_pretrained(dir)` or copy config.json from the model's release.")
    try:
        hf_config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise _error(path, f"config.json could not be parsed ({_json_problem(error)})",
                     "Replace it with the config.json of the model's release.") from None
    if not isinstance(hf_config, dict) or not hf_config.get("model_type"):
        raise _error(path, "config.json has no model_type",
                     "Add the model family (for example \"model_type\": \"llama\") or replace "
                     "config.json with the one from the model's release.")
    return hf_config


def context_length(config) -> Optional[int]:
    """The run's model context (max_position_embeddings): model.path's config.json, else the model preset's.

    None when model.path is unreadable: the core planner reports the broken path itself.
    """
    if config.model.path:
        try:
            return read_hf_config(config.model.path).get("max_position_embeddings")
        except UserError:
            return None
    return config.model.get("max_position_embeddings")


def validate_checkpoint_dir(path) -> None:
    """Raise a ``UserError`` unless ``path`` is a loadable-looking Hugging Face checkpoint.

    Checks config.json (see ``read_hf_config``), that the directory is not a ModelOpt deployment
    export (``is_modelopt_export``: transformers would load it without its scales), that weights
    exist (``*.safetensors``, ``pytorch_model*.bin`` or an index of either), that every shard an
    index names is present and holds the tensors the index puts there, that each safetensors
    file is complete, and that each file torch would unpickle (``pickled_files``) is a whole
    archive.
    """
    directory = Path(path)
    if is_modelopt_export(directory, read_hf_config(path)):
        raise _error(path, "is a ModelOpt unified HF export: a deployment checkpoint for TensorRT-LLM or vLLM, "
                     "whose quantization scales transformers silently drops (it would load a wrong model)",
                     "Point model.path at the quantize stage's `model` directory beside it "
                     "(<run>/<stage>/model, saved with modelopt_state.pth), which reloads exactly; serve the "
                     "export with TensorRT-LLM or vLLM.")
    safetensors = sorted(directory.glob("*.safetensors"))
    indexes = [directory / name for name in (SAFETENSORS_INDEX, PICKLE_INDEX) if (directory / name).is_file()]
    if not (safetensors or indexes or sorted(directory.glob("pytorch_model*.bin"))):
        raise _error(path, "no weights found (no *.safetensors, model.safetensors.index.json "
                     "or pytorch_model*.bin)",
                     "Download or copy the weight files into this directory, or save the model "
                     "there with `model.save_pretrained(dir)`.")
    headers = {}
    for file in safetensors:
        problem, headers[file.name] = safetensors_problem(file)
        if problem:
            raise _error(path, f"{file.name} is truncated or corrupt ({problem})",
                         "Download or copy that file again and compare its size with the source's.")
    for index in indexes:
        _check_index(path, index, headers)
    for file in pickled_files(directory):
        problem = torch_archive_problem(file)
        if problem:
            raise _error(path, f"{file.name} is truncated or corrupt ({problem})",
                         "Download or copy that file again, or use the model's safetensors weights.")


def pickled_files(directory: Path) -> List[Path]:
    """The files of a checkpoint that torch unpickles: ``modelopt_state.pth``, and ``pytorch_model*.bin``
    unless safetensors weights are there (transformers then reads those and ignores the ``.bin``)."""
    directory = Path(directory)
    files = []
    if not (any(directory.glob("*.safetensors")) or (directory / SAFETENSORS_INDEX).is_file()):
        files = sorted(directory.glob("pytorch_model*.bin"))
    state = directory / MODELOPT_STATE
    return files + [state] if state.is_file() else files


def torch_archive_problem(file: Path) -> str:
    """What is wrong with a file ``torch.save`` wrote, or "" when its zip container is whole.

    torch writes a zip archive (``<name>/data.pkl`` and one record per tensor) whose central
    directory, at the end, lists every record; a truncated copy has lost it. Files of torch's
    format from before 1.6 (a bare pickle stream) cannot be checked without torch and pass.
    """
    with file.open("rb") as handle:
        first = handle.read(2)
    if first[:1] == b"\x80":  # a pickle protocol opcode: the legacy format
        return ""
    size = file.stat().st_size
    try:
        with zipfile.ZipFile(file) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        return f"not a whole zip archive as torch.save writes ({error}; {size} bytes)"
    if not any(record.filename.rsplit("/", 1)[-1] == "data.pkl" for record in records):
        return "the archive holds no data.pkl"
    for record in records:
        end = record.header_offset + 30 + len(record.filename.encode()) + record.compress_size
        if end > size:
            return f"record {record.filename} ends past the end of the file ({end} > {size} bytes)"
    return ""


def is_modelopt_export(directory: Path, hf_config: Dict[str, Any]) -> bool:
    """Whether a directory is ModelOpt's unified HF export (``export_hf_checkpoint``): its config.json
    says ``quant_method: modelopt``, or it has ModelOpt's hf_quant_config.json."""
    quantization = hf_config.get("quantization_config")
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    return method == "modelopt" or (directory / "hf_quant_config.json").is_file()


def _check_index(path, index: Path, headers: Dict[str, Dict[str, Any]]) -> None:
    """Every shard ``index`` names is present and, for safetensors, holds the tensors the index puts in it."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        placed = {tensor: str(shard) for tensor, shard in weight_map.items()}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, KeyError, TypeError, AttributeError):
        raise _error(path, f"{index.name} could not be parsed or has no weight_map",
                     "Replace it with the index from the model's release.") from None
    missing = sorted({shard for shard in placed.values() if not (index.parent / shard).is_file()})
    if missing:
        raise _error(path, f"{index.name} names shards that are missing ({', '.join(missing)})",
                     "Copy every shard listed in the index into the directory.")
    absent = [f"{tensor} (in {shard})" for tensor, shard in placed.items()
              if shard in headers and tensor not in headers[shard]]
    if absent:
        raise _error(path, f"{index.name} places tensors in shards that do not hold them: {', '.join(absent[:3])}"
                     f"{' ...' if len(absent) > 3 else ''}",
                     "The shards and the index come from different saves; copy both again from one release.")


def safetensors_problem(file: Path) -> Tuple[str, Dict[str, Any]]:
    """(what is wrong with a safetensors file or "", its tensors by name) from its header alone.

    The format is an 8-byte little-endian header length, a JSON header mapping each tensor
    to its dtype, shape and ``data_offsets`` (relative to the end of the header), then the
    data. A truncated copy shows up as offsets beyond the end of the file.
    """
    size = file.stat().st_size
    if size < 8:
        return f"{size} bytes, shorter than the 8-byte header length", {}
    with file.open("rb") as handle:
        (header_length,) = struct.unpack("<Q", handle.read(8))
        if header_length > size - 8:
            return f"header of {header_length} bytes declared, file has {size} bytes", {}
        raw = handle.read(header_length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        return f"header is not valid JSON: {_json_problem(error)}", {}
    if not isinstance(header, dict):
        return "header is not a JSON object", {}
    tensors = {name: info for name, info in header.items() if name != "__metadata__"}
    data_bytes = size - 8 - header_length
    for name, info in tensors.items():
        try:
            begin, end = (int(offset) for offset in info["data_offsets"])
            shape = [int(dim) for dim in info["shape"]]
            dtype = info["dtype"]
        except (KeyError, TypeError, ValueError):
            return f"tensor {name!r} has no valid dtype, shape and data_offsets", tensors
        if not 0 <= begin <= end <= data_bytes:
            return f"tensor {name!r} ends at byte {end} of the data, which has only {data_bytes}", tensors
        if dtype in SAFETENSORS_DTYPE_BYTES:
            expected = SAFETENSORS_DTYPE_BYTES[dtype]
            for dim in shape:
                expected *= dim
            if end - begin != expected:
                return f"tensor {name!r} holds {end - begin} bytes, its dtype and shape need {expected}", tensors
    return "", tensors


def _json_problem(error: Exception) -> str:
    """A JSON parse error in a few words; nesting too deep for Python's parser is one."""
    if isinstance(error, RecursionError):
        return "nested too deeply to parse"
    return str(error)


def model_numbers_from_hf_config(hf_config: Dict[str, Any]) -> Dict[str, Any]:
    """Map a Hugging Face config.json onto ``ModelConfig`` field names.

    Keys the file leaves out take transformers' defaults for that model_type (see
    ``HF_DEFAULTS``); ``num_key_value_heads`` defaults to the attention heads (no GQA).
    """
    missing = [key for key in REQUIRED_HF_KEYS if hf_config.get(key) is None]
    if missing:
        raise UserError(
            f"The checkpoint's config.json lacks {', '.join(missing)}, which the planner needs to "
            f"size the model ({FIELD}). Replace config.json with the one from the model's release."
        )
    defaults = {**HF_DEFAULTS["*"], **HF_DEFAULTS.get(hf_config["model_type"], {})}
    defaults["num_key_value_heads"] = hf_config["num_attention_heads"]
    numbers = {}
    for field_name, hf_key in HF_KEYS.items():
        value = hf_config.get(hf_key)
        if value is None and hf_key in defaults:
            value = defaults[hf_key]
        if value is not None or hf_key == "head_dim":
            numbers[field_name] = value
    return numbers
