"""What a precision costs and needs, and what one device holds: the hardware facts the planner sizes with.

Units: ``hardware.memory_gb`` is read as GiB (2**30 bytes), which is what nvidia-smi reports
(an "80 GB" A100 shows 81920 MiB); every byte figure of the planner is exact bytes.
"""

from __future__ import annotations

import os
from importlib.resources import files
from typing import Any, List, Tuple

import yaml

GIB = 2**30

# Bytes per stored value for each ``precision``. Weights (and, in full training, their
# gradients) are held in the run's precision. Activations of fp8/fp4 runs stay 16-bit, as
# Transformer Engine keeps them; serving stacks have FP8 KV caches but no FP4 one.
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "fp4": 0.5}
ACTIVATION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 2, "fp4": 2}
KV_CACHE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "fp4": 1}
FP32_BYTES = 4  # logits, optimizer moments and master weights are fp32 whatever the precision

ADAM_MOMENT_BYTES = 2 * FP32_BYTES  # two fp32 moments per trained parameter
MASTER_WEIGHT_BYTES = FP32_BYTES  # the fp32 copy a mixed-precision optimizer steps on

# What a precision needs from the hardware and which preset has it; the check itself is
# ``hardware.dtypes``, this only explains a failure and suggests a way out.
PRECISION_NEEDS = {
    "fp32": ("FP32 runs everywhere", "cpu"),
    "fp16": ("FP16 needs Volta or newer", "v100"),
    "bf16": ("BF16 needs Ampere or newer", "a100_80g"),
    "fp8": ("FP8 needs Ada/Hopper or newer", "h100"),
    "fp4": ("FP4 needs Blackwell", "b200"),
}
# Fewest bits first: the suggested fallback is the next entry the hardware supports.
PRECISION_FALLBACK = ["fp4", "fp8", "bf16", "fp16", "fp32"]


def precision_value(precision: Any) -> str:
    """``precision`` as its name, whether the config holds the Enum or the string."""
    return getattr(precision, "value", precision)


def precision_problems(cfg, precision: str) -> List[str]:
    hardware = cfg.hardware
    dtypes = list(hardware.dtypes)
    if precision in dtypes:
        return []
    rule, preset = PRECISION_NEEDS[precision]
    fallback = next((p for p in PRECISION_FALLBACK[PRECISION_FALLBACK.index(precision) + 1:]
                     if p in dtypes), "fp32")
    return [
        f"precision={precision} is not supported by hardware={hardware.name} ({hardware.generation}: "
        f"{', '.join(dtypes)}); {rule} — choose hardware={preset} or precision={fallback}."
    ]


def device_memory_bytes(cfg, devices_per_node: int) -> int:
    """One device's memory: ``hardware.memory_gb`` GiB, or on CPU this machine's RAM shared
    by the ``devices_per_node`` processes that run on it."""
    if cfg.hardware.memory_gb is not None:
        return int(cfg.hardware.memory_gb * GIB)
    return machine_ram_bytes() // devices_per_node


def machine_ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def hardware_presets() -> List[Tuple[str, float]]:
    """(name, memory GiB) of each GPU preset in llmexp/conf/hardware, smallest first."""
    presets = []
    for entry in files("llmexp.conf").joinpath("hardware").iterdir():
        if entry.name.endswith(".yaml"):
            preset = yaml.safe_load(entry.read_text(encoding="utf-8")) or {}
            if preset.get("memory_gb"):
                presets.append((entry.name[:-5], preset["memory_gb"]))
    return sorted(presets, key=lambda preset: (preset[1], preset[0]))
