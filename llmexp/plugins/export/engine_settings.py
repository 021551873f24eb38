"""What a TensorRT-LLM engine is built with, and what a built one holds: pure Python, no tensorrt_llm.

``engine_build_settings`` turns the run's config and an HF checkpoint into the arguments of
TensorRT-LLM's LLM API: the parallel layout from ``parallelism``, the batch and length limits
from the export node (defaults from the checkpoint's config.json), and the quantization the
checkpoint was exported with, read from ModelOpt's ``hf_quant_config.json`` (or the
``quantization_config`` of its config.json) and named as TensorRT-LLM's ``QuantAlgo``.
``read_engine`` reads a built engine directory's ``config.json`` (TensorRT-LLM's
``EngineConfig``: ``pretrained_config`` with its ``mapping``, ``build_config`` with its
limits) so that a Triton repository can be checked against it. Kept free of torch and
tensorrt_llm: the planner calls it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from llmexp.sdk import UserError


@dataclass(frozen=True)
class QuantAlgo:
    """A TensorRT-LLM ``QuantAlgo`` and the ``dtypes`` entry of llmexp/conf/hardware a GPU needs to run it."""

    name: str
    hardware_dtype: str
    description: str


# ModelOpt's ``quant_algo`` (hf_quant_config.json) -> TensorRT-LLM's QuantAlgo, for what its engine builder takes.
QUANT_ALGOS: Dict[str, QuantAlgo] = {
    "FP8": QuantAlgo("FP8", "fp8", "FP8 weights and activations, per-tensor scales"),
    "FP8_PER_CHANNEL_PER_TOKEN": QuantAlgo("FP8_PER_CHANNEL_PER_TOKEN", "fp8", "FP8, per-channel and per-token"),
    "FP8_PB_WO": QuantAlgo("FP8_BLOCK_SCALES", "fp8", "FP8 block-scaled weights"),  # TensorRT-LLM renames it
    "W8A8_SQ_PER_CHANNEL": QuantAlgo("W8A8_SQ_PER_CHANNEL", "int8", "INT8 SmoothQuant, per-channel weights"),
    "W8A16": QuantAlgo("W8A16", "int8", "INT8 weight-only"),
    "W4A16_AWQ": QuantAlgo("W4A16_AWQ", "int8", "INT4 weight-only in groups (AWQ layout)"),
    "W4A8_AWQ": QuantAlgo("W4A8_AWQ", "fp8", "INT4 AWQ weights, FP8 activations"),
    "NVFP4": QuantAlgo("NVFP4", "fp4", "NVFP4 weights and activations"),
}
KV_CACHE_QUANT_ALGOS: Dict[str, QuantAlgo] = {
    "FP8": QuantAlgo("FP8", "fp8", "FP8 KV cache"),
    "INT8": QuantAlgo("INT8", "int8", "INT8 KV cache"),
    "NVFP4": QuantAlgo("NVFP4", "fp4", "NVFP4 KV cache"),
}
# The quant_algo ModelOpt 0.47's export_hf_checkpoint writes for each technique=quantize format
# (llmexp/plugins/quantize/formats.py); None: weights not quantized (fp8_kv quantizes the KV cache only).
# MXFP8 has no TensorRT-LLM engine QuantAlgo: the plan refuses building it.
QUANTIZE_FORMAT_ALGOS: Dict[str, Optional[str]] = {
    "fp8": "FP8", "int8_sq": "W8A8_SQ_PER_CHANNEL", "int8_wo": "W8A16", "int4_awq": "W4A16_AWQ",
    "int4_rtn": "W4A16_AWQ", "w4a8_awq": "W4A8_AWQ", "nvfp4": "NVFP4", "mxfp8": "MXFP8", "fp8_kv": None,
}
# quantization_config.kv_cache_scheme (config.json of newer ModelOpt exports) -> the KV cache algorithm
KV_CACHE_SCHEMES = {("float", 8): "FP8", ("int", 8): "INT8", ("float", 4): "NVFP4"}
# ModelOpt fields TensorRT-LLM's QuantConfig takes from the checkpoint beside the algorithms
QUANT_DETAILS = ("group_size", "has_zero_point", "pre_quant_scale", "exclude_modules")

# TensorRT-LLM's BuildConfig default for max_num_tokens: tokens of all sequences in one forward step
DEFAULT_MAX_NUM_TOKENS = 8192
LIMITS = ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens")


def read_json(path: Path, what: str, fix: str) -> Dict[str, Any]:
    """A JSON object from ``path``; a missing or broken file is a ``UserError`` naming ``what`` and ``fix``."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what}: {path} does not exist. {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{what}: {path} could not be read as JSON ({error}). {fix}") from None
    if not isinstance(value, dict):
        raise UserError(f"{what}: {path} holds no JSON object. {fix}")
    return value


def checkpoint_quantization(checkpoint_dir: Path) -> Optional[Dict[str, Any]]:
    """The checkpoint's quantization in TensorRT-LLM's names, or None for an unquantized checkpoint.

    ``{"quant_algo", "kv_cache_quant_algo", "hardware_dtypes", ...QUANT_DETAILS present}``; the
    algorithms are QuantAlgo names (None: not quantized). ModelOpt's hf_quant_config.json wins over
    config.json's quantization_config, as in TensorRT-LLM's own loader.
    """
    directory = Path(checkpoint_dir)
    hf_quant_file = directory / "hf_quant_config.json"
    fix = "Export the checkpoint again (technique=quantize writes <stage>/export) or remove the file."
    if hf_quant_file.is_file():
        quantization = read_json(hf_quant_file, "the checkpoint's hf_quant_config.json", fix).get("quantization")
        if not isinstance(quantization, dict):
            raise UserError(f"{hf_quant_file} has no \"quantization\" object, as ModelOpt writes it. {fix}")
        return _in_tensorrt_llm_names(quantization.get("quant_algo"), quantization.get("kv_cache_quant_algo"),
                                      quantization, hf_quant_file)
    hf_config = read_json(directory / "config.json", "the checkpoint's config.json",
                          "An HF checkpoint needs config.json beside its weights.")
    inline = hf_config.get("quantization_config")
    if not isinstance(inline, dict):
        return None
    if inline.get("quant_method") != "modelopt":
        raise UserError(
            f"{directory}/config.json says quantization_config.quant_method={inline.get('quant_method')!r}; the "
            "export builds TensorRT-LLM engines from unquantized checkpoints and from ModelOpt's unified export "
            "only. Quantize with technique=quantize (it writes the ModelOpt export) or export the unquantized model."
        )
    scheme = inline.get("kv_cache_scheme") or {}
    kv = KV_CACHE_SCHEMES.get((scheme.get("type"), scheme.get("num_bits"))) if scheme else None
    if scheme and kv is None:
        raise UserError(f"{directory}/config.json: kv_cache_scheme {scheme} is not one TensorRT-LLM builds "
                        f"({', '.join(f'{t} {b}-bit' for t, b in KV_CACHE_SCHEMES)}). {fix}")
    details = {**inline, "exclude_modules": inline.get("ignore")} if "ignore" in inline else inline
    return _in_tensorrt_llm_names(inline.get("quant_algo"), kv, details, directory / "config.json")


def _in_tensorrt_llm_names(quant_algo: Optional[str], kv_cache_quant_algo: Optional[str],
                           details: Dict[str, Any], source: Path) -> Optional[Dict[str, Any]]:
    if quant_algo is None and kv_cache_quant_algo is None:
        return None
    algo = QUANT_ALGOS.get(quant_algo) if quant_algo is not None else None
    if quant_algo is not None and algo is None:
        raise UserError(unbuildable(quant_algo, f"{source} says"))
    kv = KV_CACHE_QUANT_ALGOS.get(kv_cache_quant_algo) if kv_cache_quant_algo is not None else None
    if kv_cache_quant_algo is not None and kv is None:
        raise UserError(f"{source}: kv_cache_quant_algo={kv_cache_quant_algo} is not one TensorRT-LLM builds "
                        f"({', '.join(KV_CACHE_QUANT_ALGOS)}).")
    settings: Dict[str, Any] = {
        "quant_algo": algo.name if algo else None,
        "kv_cache_quant_algo": kv.name if kv else None,
        "hardware_dtypes": sorted({a.hardware_dtype for a in (algo, kv) if a is not None}),
    }
    settings.update({key: details[key] for key in QUANT_DETAILS if details.get(key) is not None})
    return settings


def unbuildable(quant_algo: str, where: str) -> str:
    """Why a checkpoint quantized as ``quant_algo`` builds no TensorRT-LLM engine."""
    takes = [name for name, fmt in QUANTIZE_FORMAT_ALGOS.items() if fmt in QUANT_ALGOS or fmt is None]
    return (f"{where} quant_algo={quant_algo}, which is not one TensorRT-LLM's engine builder takes "
            f"({', '.join(QUANT_ALGOS)}); quantize to a format it takes (technique=quantize with format "
            f"{', '.join(takes)}), or "
            "serve this checkpoint with a runtime that reads it as it is (vLLM, TensorRT-LLM's PyTorch workflow).")


def resolved_limits(node, max_positions: Optional[int], field: str) -> Dict[str, int]:
    """The engine's batch and length limits: the node's, with None filled in.

    ``max_seq_len`` defaults to the model's ``max_position_embeddings`` (its trained context),
    ``max_input_len`` to ``max_seq_len`` (a prompt may fill the context), ``max_num_tokens`` to
    TensorRT-LLM's 8192, no more than every sequence of a full batch at full length.
    """
    max_seq_len = node.max_seq_len if node.max_seq_len is not None else max_positions
    if max_seq_len is None:
        raise UserError(f"{field}.max_seq_len is unset and the checkpoint's config.json has no "
                        f"max_position_embeddings to take it from; set {field}.max_seq_len=<tokens>.")
    max_input_len = node.max_input_len if node.max_input_len is not None else max_seq_len
    max_num_tokens = node.max_num_tokens
    if max_num_tokens is None:
        max_num_tokens = min(DEFAULT_MAX_NUM_TOKENS, node.max_batch_size * max_seq_len)
    return {"max_batch_size": int(node.max_batch_size), "max_input_len": int(max_input_len),
            "max_seq_len": int(max_seq_len), "max_num_tokens": int(max_num_tokens)}


def limit_problems(node, max_positions: Optional[int], field: str) -> List[str]:
    """Limits that cannot build: not positive, a prompt longer than a sequence, a sequence past the model's context."""
    problems = [
        f"{field}.{key}={node[key]} must be a positive number of "
        f"{'sequences' if key == 'max_batch_size' else 'tokens'}."
        for key in LIMITS if node[key] is not None and node[key] < 1
    ]
    if problems:
        return problems
    max_seq_len = node.max_seq_len if node.max_seq_len is not None else max_positions
    if node.max_input_len is not None and max_seq_len is not None and node.max_input_len > max_seq_len:
        problems.append(f"{field}.max_input_len={node.max_input_len} exceeds max_seq_len={max_seq_len} (prompt and "
                        f"output together); lower {field}.max_input_len or raise {field}.max_seq_len.")
    if node.max_seq_len is not None and max_positions is not None and node.max_seq_len > max_positions:
        problems.append(f"{field}.max_seq_len={node.max_seq_len} exceeds the model's context of {max_positions} "
                        f"tokens (max_position_embeddings), past which its positions were never trained; set "
                        f"{field}.max_seq_len={max_positions} or less.")
    return problems


def engine_build_settings(config, node, checkpoint_dir: Path, field: str = "technique") -> Dict[str, Any]:
    """The LLM API's arguments for building ``checkpoint_dir`` into an engine (see ``engine.build_engine``).

    ``{"tensor_parallel_size", "pipeline_parallel_size", "build_config": {max_batch_size, max_input_len,
    max_seq_len, max_num_tokens, max_beam_width}, "quantization": None | {quant_algo, kv_cache_quant_algo,
    hardware_dtypes, group_size, ...}}``. A limit that cannot build or a quantization the hardware lacks is
    a ``UserError`` naming ``field`` (where the node sits in the config).
    """
    hf_config = read_json(Path(checkpoint_dir) / "config.json", "the checkpoint's config.json",
                          "An HF checkpoint needs config.json beside its weights.")
    max_positions = hf_config.get("max_position_embeddings")
    problems = limit_problems(node, max_positions, field)
    quantization = checkpoint_quantization(Path(checkpoint_dir))
    if quantization is not None:
        problems += quantization_hardware_problems(quantization, config.hardware, field)
    if problems:
        raise UserError(" ".join(problems))
    return {
        "tensor_parallel_size": int(config.parallelism.tp),
        "pipeline_parallel_size": int(config.parallelism.pp),
        "build_config": {**resolved_limits(node, max_positions, field), "max_beam_width": 1},
        "quantization": quantization,
    }


def quantization_hardware_problems(quantization: Dict[str, Any], hardware, field: str) -> List[str]:
    """An engine runs its quantized GEMMs and KV cache natively: the GPU must list their dtypes."""
    if hardware.accelerator != "gpu":
        return []  # the plan refuses building on a CPU by itself
    missing = [dtype for dtype in quantization["hardware_dtypes"] if dtype not in hardware.dtypes]
    if not missing:
        return []
    algos = " with ".join(filter(None, (quantization["quant_algo"],
                                        quantization["kv_cache_quant_algo"] and
                                        f"{quantization['kv_cache_quant_algo']} KV cache")))
    return [f"{field}: the checkpoint is quantized as {algos}, whose TensorRT-LLM kernels need "
            f"{' and '.join(missing)}, and hardware={hardware.name} ({hardware.generation}) has "
            f"{', '.join(hardware.dtypes)}; build on a GPU that has them (llmexp/conf/hardware lists each preset's dtypes) "
            f"or export a format this GPU runs."]


@dataclass(frozen=True)
class BuiltEngine:
    """What a TensorRT-LLM engine directory's config.json says it was built for."""

    directory: Path
    tp_size: int
    pp_size: int
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: Optional[int]
    max_beam_width: int

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size


def read_engine(engine_dir, field: str) -> BuiltEngine:
    """The engine at ``engine_dir`` (its config.json, never the engine bytes); a directory that is not one
    (no config.json, no limits, a rank*.engine file missing) is a ``UserError`` naming ``field``."""
    directory = Path(engine_dir)
    fix = (f"Point {field}.engine_dir at a directory written by TensorRT-LLM's `llm.save(dir)` or `trtllm-build "
           f"--output_dir` (config.json and rank<i>.engine per GPU), or unset it to build the engine here.")
    if not directory.is_dir():
        raise UserError(f"{field}.engine_dir={engine_dir} is not a directory. {fix}")
    config = read_json(directory / "config.json", f"{field}.engine_dir={engine_dir}", fix)
    build = config.get("build_config")
    pretrained = config.get("pretrained_config")
    if not isinstance(build, dict) or not isinstance(pretrained, dict):
        raise UserError(f"{field}.engine_dir={engine_dir}: config.json has no build_config and pretrained_config, "
                        f"so it is not a TensorRT-LLM engine's. {fix}")
    mapping = pretrained.get("mapping") or {}
    missing = [key for key in ("max_batch_size", "max_input_len", "max_seq_len") if build.get(key) is None]
    if missing:
        raise UserError(f"{field}.engine_dir={engine_dir}: config.json's build_config lacks "
                        f"{', '.join(missing)}. {fix}")
    engine = BuiltEngine(
        directory=directory,
        tp_size=int(mapping.get("tp_size", 1)),
        pp_size=int(mapping.get("pp_size", 1)),
        max_batch_size=int(build["max_batch_size"]),
        max_input_len=int(build["max_input_len"]),
        max_seq_len=int(build["max_seq_len"]),
        max_num_tokens=None if build.get("max_num_tokens") is None else int(build["max_num_tokens"]),
        max_beam_width=int(build.get("max_beam_width", 1)),
    )
    absent = [f"rank{rank}.engine" for rank in range(engine.world_size)
              if not (directory / f"rank{rank}.engine").is_file()]
    if absent:
        raise UserError(f"{field}.engine_dir={engine_dir}: the engine was built for tp_size={engine.tp_size} x "
                        f"pp_size={engine.pp_size} = {engine.world_size} GPUs and {', '.join(absent)} "
                        f"{'is' if len(absent) == 1 else 'are'} missing. {fix}")
    return engine


def engine_fit_problems(engine: BuiltEngine, node, parallelism, field: str) -> List[str]:
    """A repository serving ``engine`` may ask no more of it than it was built for, on the layout it was built for.

    The repository's ``max_batch_size`` and any limit set on the node must be within the engine's, and
    ``parallelism.tp``/``pp`` must be the engine's (the server runs one rank per engine file).
    """
    problems = []
    if node.max_batch_size > engine.max_batch_size:
        problems.append(
            f"{field}.max_batch_size={node.max_batch_size} exceeds the engine's max_batch_size="
            f"{engine.max_batch_size} ({engine.directory}/config.json): Triton would batch more requests than the "
            f"engine takes. Set {field}.max_batch_size={engine.max_batch_size} or less, or rebuild the engine.")
    built = {"max_input_len": engine.max_input_len, "max_seq_len": engine.max_seq_len,
             "max_num_tokens": engine.max_num_tokens}
    for key, value in built.items():
        if node[key] is not None and value is not None and node[key] > value:
            problems.append(f"{field}.{key}={node[key]} exceeds the engine's {key}={value}; set it to {value} or "
                            f"less (or unset it to take the engine's), or rebuild the engine.")
    if (parallelism.tp, parallelism.pp) != (engine.tp_size, engine.pp_size):
        problems.append(
            f"parallelism.tp={parallelism.tp} pp={parallelism.pp} but the engine at {engine.directory} was built "
            f"for tp_size={engine.tp_size} pp_size={engine.pp_size} ({engine.world_size} GPUs, one rank per "
            f"engine file); choose a parallelism preset with tp={engine.tp_size} pp={engine.pp_size}, or rebuild.")
    return problems
