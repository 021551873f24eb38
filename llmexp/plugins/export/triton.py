"""A Triton model repository serving a TensorRT-LLM engine, as tensorrtllm_backend's
``all_models/inflight_batcher_llm`` lays it out.

Four models: ``preprocessing`` (python backend: text to token ids), ``tensorrt_llm`` (the
``tensorrtllm`` backend running the engine with in-flight batching), ``postprocessing`` (python:
token ids to text) and ``ensemble``, which chains them so that a client sends ``text_input`` and
``max_tokens`` and receives ``text_output`` (streamed when ``decoupled``). Tensor names and types
are the backend's own; the models declare the subset this export wires up. The configs are data
(``repository_configs``), written as ``config.pbtxt`` by ``pbtxt.to_text``.

::

    <repository>/
      preprocessing/{config.pbtxt, 1/model.py, tokenizer/}
      tensorrt_llm/{config.pbtxt, 1/config.json, 1/rank<i>.engine}
      postprocessing/{config.pbtxt, 1/model.py, tokenizer/}
      ensemble/{config.pbtxt, 1/}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Tuple

from llmexp.sdk import UserError
from llmexp.plugins.export import triton_postprocessing, triton_preprocessing
from llmexp.plugins.export.directories import directory_bytes, place_file, place_tree, write_directory
from llmexp.plugins.export.engine_settings import BuiltEngine, engine_fit_problems
from llmexp.plugins.export.pbtxt import Enum, Map, to_text

ENGINE_MODEL = "tensorrt_llm"
TOKENIZER_DIR = "tokenizer"  # beside each python model's config.pbtxt; its model.py resolves it there
PYTHON_MODELS = {"preprocessing": triton_preprocessing, "postprocessing": triton_postprocessing}
SCHEDULER_POLICIES = ("guaranteed_no_evict", "max_utilization")


@dataclass(frozen=True)
class Tensor:
    """One input or output of a model config. ``scalar``: one value per request (``reshape: { shape: [] }``)."""

    name: str
    data_type: str
    dims: Tuple[int, ...]
    optional: bool = False
    scalar: bool = False
    ragged: bool = False

    def config(self) -> Dict[str, Any]:
        entry: Dict[str, Any] = {"name": self.name, "data_type": Enum(self.data_type), "dims": list(self.dims)}
        if self.scalar:
            entry["reshape"] = {"shape": []}
        if self.ragged:
            entry["allow_ragged_batch"] = True
        if self.optional:
            entry["optional"] = True
        return entry


def _option(name: str, data_type: str) -> Tensor:
    """An optional per-request scalar of the engine model (a sampling setting and the like)."""
    return Tensor(name, data_type, (1,), optional=True, scalar=True)


PREPROCESSING_INPUTS = (
    Tensor("QUERY", "TYPE_STRING", (1,)),
    Tensor("REQUEST_OUTPUT_LEN", "TYPE_INT32", (1,)),
    Tensor("STOP_WORDS_DICT", "TYPE_STRING", (-1,), optional=True),
    Tensor("BAD_WORDS_DICT", "TYPE_STRING", (-1,), optional=True),
    Tensor("END_ID", "TYPE_INT32", (1,), optional=True),
    Tensor("PAD_ID", "TYPE_INT32", (1,), optional=True),
)
PREPROCESSING_OUTPUTS = (
    Tensor("INPUT_ID", "TYPE_INT32", (-1,)),
    Tensor("REQUEST_INPUT_LEN", "TYPE_INT32", (1,)),
    Tensor("REQUEST_OUTPUT_LEN", "TYPE_INT32", (-1,)),
    Tensor("STOP_WORDS_IDS", "TYPE_INT32", (2, -1)),
    Tensor("BAD_WORDS_IDS", "TYPE_INT32", (2, -1)),
    Tensor("OUT_END_ID", "TYPE_INT32", (1,)),
    Tensor("OUT_PAD_ID", "TYPE_INT32", (1,)),
)
ENGINE_INPUTS = (
    Tensor("input_ids", "TYPE_INT32", (-1,), ragged=True),
    Tensor("input_lengths", "TYPE_INT32", (1,), scalar=True),
    Tensor("request_output_len", "TYPE_INT32", (1,), scalar=True),
    _option("end_id", "TYPE_INT32"),
    _option("pad_id", "TYPE_INT32"),
    Tensor("stop_words_list", "TYPE_INT32", (2, -1), optional=True, ragged=True),
    Tensor("bad_words_list", "TYPE_INT32", (2, -1), optional=True, ragged=True),
    _option("beam_width", "TYPE_INT32"),
    _option("temperature", "TYPE_FP32"),
    _option("runtime_top_k", "TYPE_INT32"),
    _option("runtime_top_p", "TYPE_FP32"),
    _option("repetition_penalty", "TYPE_FP32"),
    _option("presence_penalty", "TYPE_FP32"),
    _option("frequency_penalty", "TYPE_FP32"),
    _option("min_tokens", "TYPE_INT32"),
    _option("seed", "TYPE_UINT64"),
    _option("return_log_probs", "TYPE_BOOL"),
    _option("exclude_input_in_output", "TYPE_BOOL"),
    _option("streaming", "TYPE_BOOL"),
)
ENGINE_OUTPUTS = (
    Tensor("output_ids", "TYPE_INT32", (-1, -1)),
    Tensor("sequence_length", "TYPE_INT32", (-1,)),
    Tensor("cum_log_probs", "TYPE_FP32", (-1,)),
    Tensor("output_log_probs", "TYPE_FP32", (-1, -1)),
)
POSTPROCESSING_INPUTS = (
    Tensor("TOKENS_BATCH", "TYPE_INT32", (-1, -1)),
    Tensor("SEQUENCE_LENGTH", "TYPE_INT32", (-1,)),
)
POSTPROCESSING_OUTPUTS = (Tensor("OUTPUT", "TYPE_STRING", (-1,)),)
ENSEMBLE_INPUTS = (
    Tensor("text_input", "TYPE_STRING", (1,)),
    Tensor("max_tokens", "TYPE_INT32", (1,)),
    Tensor("stop_words", "TYPE_STRING", (-1,), optional=True),
    Tensor("bad_words", "TYPE_STRING", (-1,), optional=True),
    Tensor("end_id", "TYPE_INT32", (1,), optional=True),
    Tensor("pad_id", "TYPE_INT32", (1,), optional=True),
    Tensor("beam_width", "TYPE_INT32", (1,), optional=True),
    Tensor("temperature", "TYPE_FP32", (1,), optional=True),
    Tensor("top_k", "TYPE_INT32", (1,), optional=True),
    Tensor("top_p", "TYPE_FP32", (1,), optional=True),
    Tensor("repetition_penalty", "TYPE_FP32", (1,), optional=True),
    Tensor("presence_penalty", "TYPE_FP32", (1,), optional=True),
    Tensor("frequency_penalty", "TYPE_FP32", (1,), optional=True),
    Tensor("min_tokens", "TYPE_INT32", (1,), optional=True),
    Tensor("seed", "TYPE_UINT64", (1,), optional=True),
    Tensor("return_log_probs", "TYPE_BOOL", (1,), optional=True),
    Tensor("exclude_input_in_output", "TYPE_BOOL", (1,), optional=True),
    Tensor("stream", "TYPE_BOOL", (1,), optional=True),
)
ENSEMBLE_OUTPUTS = (
    Tensor("text_output", "TYPE_STRING", (-1,)),
    Tensor("cum_log_probs", "TYPE_FP32", (-1,)),
    Tensor("output_log_probs", "TYPE_FP32", (-1, -1)),
)
# (model, {its input: the ensemble tensor it reads}, {its output: the ensemble tensor it writes}), in order;
# names starting with "_" are the ensemble's internal tensors
ENSEMBLE_STEPS = (
    ("preprocessing",
     {"QUERY": "text_input", "REQUEST_OUTPUT_LEN": "max_tokens", "STOP_WORDS_DICT": "stop_words",
      "BAD_WORDS_DICT": "bad_words", "END_ID": "end_id", "PAD_ID": "pad_id"},
     {"INPUT_ID": "_INPUT_ID", "REQUEST_INPUT_LEN": "_REQUEST_INPUT_LEN", "REQUEST_OUTPUT_LEN": "_REQUEST_OUTPUT_LEN",
      "STOP_WORDS_IDS": "_STOP_WORDS_IDS", "BAD_WORDS_IDS": "_BAD_WORDS_IDS", "OUT_END_ID": "_PREPROCESSOR_END_ID",
      "OUT_PAD_ID": "_PREPROCESSOR_PAD_ID"}),
    (ENGINE_MODEL,
     {"input_ids": "_INPUT_ID", "input_lengths": "_REQUEST_INPUT_LEN", "request_output_len": "_REQUEST_OUTPUT_LEN",
      "end_id": "_PREPROCESSOR_END_ID", "pad_id": "_PREPROCESSOR_PAD_ID", "stop_words_list": "_STOP_WORDS_IDS",
      "bad_words_list": "_BAD_WORDS_IDS", "beam_width": "beam_width", "temperature": "temperature",
      "runtime_top_k": "top_k", "runtime_top_p": "top_p", "repetition_penalty": "repetition_penalty",
      "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty", "min_tokens": "min_tokens",
      "seed": "seed", "return_log_probs": "return_log_probs", "exclude_input_in_output": "exclude_input_in_output",
      "streaming": "stream"},
     {"output_ids": "_TOKENS_BATCH", "sequence_length": "_SEQUENCE_LENGTH", "cum_log_probs": "cum_log_probs",
      "output_log_probs": "output_log_probs"}),
    ("postprocessing",
     {"TOKENS_BATCH": "_TOKENS_BATCH", "SEQUENCE_LENGTH": "_SEQUENCE_LENGTH"},
     {"OUTPUT": "text_output"}),
)


def _tensors(tensors) -> List[Dict[str, Any]]:
    return [tensor.config() for tensor in tensors]


def _parameters(values: Dict[str, Any]) -> Map:
    """Triton model parameters: every value a string (the backends parse them)."""
    return Map({key: {"string_value": str(value).lower() if isinstance(value, bool) else str(value)}
                for key, value in values.items()})


def repository_configs(node, engine: BuiltEngine, repository_root: str) -> Dict[str, Dict[str, Any]]:
    """Every model's config as nested values, by model name; ``repository_root``: where the server sees the
    repository (absolute paths inside the configs start there)."""
    batch = int(node.max_batch_size)
    queued = {"preferred_batch_size": [batch], "max_queue_delay_microseconds": 0}
    python_instances = [{"count": int(node.instance_count), "kind": Enum("KIND_CPU")}]
    return {
        "preprocessing": {
            "name": "preprocessing", "backend": "python", "max_batch_size": batch, "dynamic_batching": queued,
            "input": _tensors(PREPROCESSING_INPUTS), "output": _tensors(PREPROCESSING_OUTPUTS),
            "instance_group": python_instances,
            "parameters": _parameters({"tokenizer_dir": TOKENIZER_DIR, "add_special_tokens": True}),
        },
        ENGINE_MODEL: {
            "name": ENGINE_MODEL, "backend": "tensorrtllm", "max_batch_size": batch,
            "model_transaction_policy": {"decoupled": bool(node.decoupled)},
            "dynamic_batching": queued,
            "input": _tensors(ENGINE_INPUTS), "output": _tensors(ENGINE_OUTPUTS),
            # the backend places its work on the GPUs itself; Triton's instance is a CPU-side handle
            "instance_group": [{"count": 1, "kind": Enum("KIND_CPU")}],
            "parameters": _parameters({
                "gpt_model_type": "inflight_fused_batching",
                "gpt_model_path": f"{repository_root.rstrip('/')}/{ENGINE_MODEL}/1",
                "batch_scheduler_policy": node.batch_scheduler_policy,
                "kv_cache_free_gpu_mem_fraction": node.kv_cache_free_gpu_mem_fraction,
                "max_beam_width": engine.max_beam_width,
                "exclude_input_in_output": True,
                "enable_kv_cache_reuse": False,
                "FORCE_CPU_ONLY_INPUT_TENSORS": "no",
            }),
        },
        "postprocessing": {
            "name": "postprocessing", "backend": "python", "max_batch_size": batch, "dynamic_batching": {},
            "input": _tensors(POSTPROCESSING_INPUTS), "output": _tensors(POSTPROCESSING_OUTPUTS),
            "instance_group": python_instances,
            "parameters": _parameters({"tokenizer_dir": TOKENIZER_DIR, "skip_special_tokens": True}),
        },
        "ensemble": {
            "name": "ensemble", "platform": "ensemble", "max_batch_size": batch,
            "input": _tensors(ENSEMBLE_INPUTS), "output": _tensors(ENSEMBLE_OUTPUTS),
            "ensemble_scheduling": {"step": [
                {"model_name": model, "model_version": -1, "input_map": Map(inputs), "output_map": Map(outputs)}
                for model, inputs, outputs in ENSEMBLE_STEPS
            ]},
        },
    }


def write_repository(directory: Path, engine: BuiltEngine, tokenizer, node, parallelism, field: str) -> Dict[str, Any]:
    """Write the repository serving ``engine`` to ``directory`` (atomically) and return its numbers.

    ``tokenizer`` (anything with ``save_pretrained``) is saved beside each python model. The engine
    directory is placed in ``tensorrt_llm/1`` (hard links where possible); only its config.json is read,
    to refuse a repository that would ask more of the engine than it was built for.
    """
    problems = engine_fit_problems(engine, node, parallelism, field)
    if node.repository_root is not None and not str(node.repository_root).startswith("/"):
        problems.append(f"{field}.repository_root={node.repository_root} must be an absolute path: where the server "
                        "mounts the repository (e.g. /models).")
    if problems:
        raise UserError(" ".join(problems))
    directory = Path(directory).resolve()
    configs = repository_configs(node, engine, node.repository_root or str(directory))

    def fill(temporary: Path) -> None:
        for name, config in configs.items():
            (temporary / name / "1").mkdir(parents=True)
            (temporary / name / "config.pbtxt").write_text(to_text(config), encoding="utf-8")
        place_tree(engine.directory, temporary / ENGINE_MODEL / "1")
        for name, module in PYTHON_MODELS.items():
            place_file(Path(module.__file__), temporary / name / "1" / "model.py")
            tokenizer.save_pretrained(str(temporary / name / TOKENIZER_DIR))

    write_directory(directory, fill)
    return {"repository_bytes": directory_bytes(directory), "max_batch_size": int(node.max_batch_size),
            "world_size": engine.world_size}
