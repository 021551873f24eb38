"""Post-training quantization through NVIDIA ModelOpt: ``technique=quantize technique.format=<name>``.

The formats (fp8, int8_sq, int8_wo, int4_awq, w4a8_awq, nvfp4, mxfp8, fp8_kv, int4_rtn) are presets in
``formats.py``; ``ptq.py`` calibrates on the run's data, quantizes, saves the model so that
``llmexp.models.loading.load_model`` restores it exactly, and writes ModelOpt's unified HF export for
deployment engines. The planner refuses a format the chosen hardware cannot run; on
``hardware=cpu`` every format ModelOpt can fake-quantize without CUDA runs, labelled simulated.

This module imports without torch or modelopt: the planner loads every plugin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, Dict, List, Optional

import yaml

from llmexp.data.text import raw_text_problems, read_text_documents, text_corpus
from llmexp.plugins.quantize.formats import FORMATS, Format
from llmexp.sdk import (
    PRECISION_NEEDS, Metric, MetricKind, ServedExport, Technique, TechniqueConfig, has_weights, hookimpl, local_directory, model_sources, node_path,
)


NO_MODEL = (
    "{field}: nothing to quantize: no stage before it produced a model and model.path is unset. Set "
    "model.path=<a Hugging Face checkpoint directory> or put a stage that makes a model before it "
    "(e.g. pipeline.stages=[base, quantize, ...] with a pretrain node named base)."
)


@dataclass
class QuantizeConfig(TechniqueConfig):
    """Which ModelOpt format, calibrated on how much of the run's data; see llmexp/plugins/quantize/README.md."""

    name: str = "quantize"
    format: str = "fp8"  # fp8 | int8_sq | int8_wo | int4_awq | w4a8_awq | nvfp4 | mxfp8 | fp8_kv | int4_rtn
    # weights per scale of the block formats (int4_awq, int4_rtn, w4a8_awq); None: the preset's 128.
    # Formats without blocks ignore it, so one sweep can cover every format.
    group_size: Optional[int] = None
    calibration_size: int = 128  # calibration sequences of data.seq_len tokens from the run's data
    export: bool = True  # write ModelOpt's unified HF checkpoint (TensorRT-LLM, vLLM) to <stage dir>/export


class Quantize(Technique):
    name = "quantize"
    schema = QuantizeConfig
    produces_model = True  # planned as inference: the weights, a calibration forward pass, a copy while exporting
    requires = ("torch", "transformers", "modelopt")

    entry = "llmexp.plugins.quantize.ptq:quantize"
    served_export = ServedExport("export", "technique.export=true")  # ModelOpt's unified checkpoint (ptq.export)

    @classmethod
    def metrics(cls, config, node):
        """What calibrating and exporting took; the model's bits per weight are its model stats."""
        return (Metric("calibration_time_s", False, "calibration_time_s", MetricKind.COST),
                Metric("export_time_s", False, "export_time_s", MetricKind.COST))

    @classmethod
    def plan_problems(cls, config, key: str, node, plan) -> List[str]:
        """Format, hardware, group size against the model the stage receives (pruned or not), calibration data."""
        first = model_sources(config).get(key) is None
        return stage_problems(config, node, node_path(key), plan.architectures[key][0], first=first)


def block_size(node, preset: Format) -> Optional[int]:
    """The block (group) size a node quantizes with: its ``group_size``, else the preset's; None for other formats."""
    if preset.group_size is None:
        return None
    return node.group_size if node.group_size is not None else preset.group_size


def runs_natively(preset: Format, hardware) -> bool:
    """Whether the hardware can deploy the format in low precision; if not, the run is a simulation.

    A CPU never can: there the model is only ModelOpt's fake quantization (quantize, dequantize,
    compute in the model's precision), an accuracy study without the format's speed or memory.
    """
    return hardware.accelerator != "cpu" and preset.hardware_dtype in hardware.dtypes


@hookimpl
def llmexp_techniques():
    return [Quantize]


def stage_problems(config, node, field: str, numbers: Dict[str, Any], first: bool) -> List[str]:
    """Problems of the quantize node at ``field`` (its path in the config) on a model with architecture ``numbers``."""
    problems = []
    if first and not has_weights(config):
        problems.append(NO_MODEL.format(field=field))
    preset = FORMATS.get(node.format)
    if preset is None:
        problems.append(f"{field}.format={node.format} is not a known format; choose one of {', '.join(FORMATS)}.")
    else:
        problems += hardware_problems(node.format, preset, config.hardware, field)
        problems += group_size_problems(node, preset, numbers, field)
    if node.calibration_size < 1:
        problems.append(f"{field}.calibration_size={node.calibration_size} must be at least 1 (128 is the default).")
    else:
        problems += data_problems(config, node, field)
    return problems


def hardware_problems(name: str, preset: Format, hardware, field: str) -> List[str]:
    """A GPU must have the format's dtype; a CPU simulates every format except those ModelOpt runs only on CUDA."""
    if hardware.accelerator == "cpu":
        if not preset.cuda_only:
            return []
        simulated = [other for other, p in FORMATS.items() if not p.cuda_only]
        return [
            f"{field}.format={name} cannot run on hardware={hardware.name}: ModelOpt's {name} kernels exist only "
            f"for CUDA, so not even its simulation runs on a CPU — run it on a GPU "
            f"(hardware={' or '.join(hardware_with(preset.hardware_dtype))}) or choose a format the CPU simulates "
            f"({', '.join(simulated)})."
        ]
    if preset.hardware_dtype in hardware.dtypes:
        return []
    native = [other for other, p in FORMATS.items() if p.hardware_dtype in hardware.dtypes]
    alternative = f", or a format it runs natively ({', '.join(native)})" if native else ""
    return [
        f"{field}.format={name} is not supported by hardware={hardware.name} ({hardware.generation}: "
        f"{', '.join(hardware.dtypes)}); {native_needs(preset.hardware_dtype)} — choose "
        f"hardware={' or '.join(hardware_with(preset.hardware_dtype))}{alternative}."
    ]


def native_needs(dtype: str) -> str:
    """Which GPU generation a dtype needs, in the planner's words (``llmexp.planning.hardware.PRECISION_NEEDS``)."""
    if dtype in PRECISION_NEEDS:
        return PRECISION_NEEDS[dtype][0]
    return "MXFP8 needs Blackwell" if dtype == "mxfp8" else "INT8 and INT4 kernels need Turing or newer"


def hardware_with(dtype: str) -> List[str]:
    """The GPU presets of llmexp/conf/hardware whose ``dtypes`` list ``dtype``, by name."""
    names = []
    for entry in sorted(files("llmexp.conf").joinpath("hardware").iterdir(), key=lambda e: e.name):
        preset = yaml.safe_load(entry.read_text(encoding="utf-8")) if entry.name.endswith(".yaml") else None
        if preset and preset.get("accelerator") == "gpu" and dtype in preset.get("dtypes", ()):
            names.append(entry.name[: -len(".yaml")])
    return names


def group_size_problems(node, preset: Format, numbers: Dict[str, Any], field: str) -> List[str]:
    """Positive, and for block formats a divisor of every linear layer's input width (ModelOpt needs whole blocks)."""
    if node.group_size is not None and node.group_size < 1:
        return [f"{field}.group_size={node.group_size} must be a positive number of weights per scale (e.g. 128)."]
    size = block_size(node, preset)
    if size is None:
        return []
    widths = {
        "hidden_size": numbers["hidden_size"],
        "intermediate_size": numbers["intermediate_size"],
        "num_attention_heads*head_dim": numbers["num_attention_heads"] * numbers["head_dim"],
    }
    if all(width % size == 0 for width in widths.values()):
        return []
    common = math.gcd(*widths.values())
    choices = [str(d) for d in (16, 32, 64, 128, 256) if common % d == 0] or [f"a divisor of {common}"]
    shown = ", ".join(f"{name}={width}" for name, width in widths.items())
    where = "" if node.group_size is not None else f" (the {node.format} preset's default)"
    return [
        f"{field}.group_size={size}{where} does not divide the input width of every linear layer of the model "
        f"({shown}); ModelOpt quantizes whole blocks — set {field}.group_size to {' or '.join(choices)}."
    ]


def data_problems(config, node, field: str) -> List[str]:
    """Calibration runs the model on raw text: embedded, or data=text's files, enough for ``calibration_size``."""
    data = config.data
    problems = raw_text_problems(data, (
        f"{field}: quantization calibrates on raw text, data=embedded or data=text (data.paths=[...]), and "
        f"data={data.name} holds records of another kind; choose one of those."
    ))
    if problems or data.name == "embedded":
        return problems
    documents = read_text_documents(*text_corpus(data))
    available = text_blocks_available(config, documents)
    if available is None or available >= node.calibration_size:
        return []
    return [
        f"{field}.calibration_size={node.calibration_size} asks for more calibration sequences than data.paths "
        f"holds: {available} of data.seq_len={data.seq_len} tokens. Set {field}.calibration_size={available} or "
        "less, or add text."
    ]


def text_blocks_available(config, documents: List[str]) -> Optional[int]:
    """How many ``data.seq_len`` blocks ``documents`` fill, tokenized as the run will (each ended by EOS).

    Counted with the run's weights' tokenizer.json (``model.path``, or the published weights' cached snapshot)
    through the ``tokenizers`` library (transformers would import torch); None when there is none to count with,
    and the run checks instead.
    """
    directory = local_directory(config)
    tokenizer_file = directory / "tokenizer.json" if directory is not None else None
    if tokenizer_file is None or not tokenizer_file.is_file():
        return None
    from tokenizers import Tokenizer  # only where a plan counts a user's text: its native library loads slowly

    encodings = Tokenizer.from_file(str(tokenizer_file)).encode_batch(documents)
    return sum(len(encoding.ids) + 1 for encoding in encodings) // config.data.seq_len
