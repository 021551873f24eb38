"""The formats ``technique.format`` names: NVIDIA ModelOpt quantization presets, as data.

Each preset names the ModelOpt config it starts from (``modelopt.torch.quantization.<NAME>``,
checked against nvidia-modelopt 0.47 by tests/test_quantize.py) and the changes made to it,
how many bits it stores weights, activations and the KV cache in (None: left in the model's
precision), the ``dtypes`` entry of llmexp/conf/hardware/*.yaml a GPU needs to run it natively, and
whether ModelOpt's fake quantization needs CUDA even to simulate it. Pure data: the planner
reads it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional


@dataclass(frozen=True)
class Format:
    description: str
    modelopt_config: str  # the name of a config dict in modelopt.torch.quantization
    weight_bits: Optional[int]
    activation_bits: Optional[int]
    kv_cache_bits: Optional[int]
    hardware_dtype: str  # fp8 | mxfp8 | fp4 | int8: what llmexp/conf/hardware `dtypes` must list to run it natively
    # block formats: weights sharing one scale along the input dimension (ModelOpt's block_sizes[-1]);
    # technique.group_size overrides it. None: not a block format (per-tensor or per-channel scales).
    group_size: Optional[int] = None
    # the config lists only some quantizers and is meant to be merged into another: turn the rest
    # off, or they keep ModelOpt's default 8-bit settings
    only_listed_quantizers: bool = False
    cuda_only: bool = False  # ModelOpt's kernels for it exist only on CUDA: no simulation on a CPU
    # ModelOpt calibration algorithm replacing the config's own (None: keep it)
    algorithm: Optional[str] = None


FORMATS: Dict[str, Format] = {
    "fp8": Format("FP8 E4M3 weights and activations (W8A8), per-tensor scales",
                  "FP8_DEFAULT_CFG", 8, 8, None, "fp8"),
    "int8_sq": Format("INT8 SmoothQuant (W8A8): per-channel weights, per-tensor activations, outliers smoothed",
                      "INT8_SMOOTHQUANT_CFG", 8, 8, None, "int8"),
    "int8_wo": Format("INT8 weight-only (W8A16), per-channel scales",
                      "INT8_WEIGHT_ONLY_CFG", 8, None, None, "int8"),
    # AWQ as its paper defines it: the activation-aware scale search and the weight-clipping search
    # (ModelOpt's awq_full; INT4_AWQ_CFG's own awq_lite searches scales only, and on the tiny
    # default loses to round-to-nearest on KL to the baseline)
    "int4_awq": Format("INT4 weight-only AWQ (W4A16), a scale per group_size weights",
                       "INT4_AWQ_CFG", 4, None, None, "int8", group_size=128, algorithm="awq_full"),
    "w4a8_awq": Format("INT4 AWQ weights with FP8 activations (W4A8)",
                       "W4A8_AWQ_BETA_CFG", 4, 8, None, "fp8", group_size=128),
    "nvfp4": Format("NVFP4 weights and activations (E2M1, an FP8 scale per 16 values)",
                    "NVFP4_DEFAULT_CFG", 4, 4, None, "fp4", cuda_only=True),
    "mxfp8": Format("MXFP8 (OCP microscaling): FP8 E4M3 weights and activations, an E8M0 scale per 32 values",
                    "MXFP8_DEFAULT_CFG", 8, 8, None, "mxfp8", cuda_only=True),
    "fp8_kv": Format("FP8 KV cache only; weights and activations unchanged",
                     "FP8_KV_CFG", None, None, 8, "fp8", only_listed_quantizers=True),
    # AWQ's baseline (Lin et al. 2024): the same INT4 blocks, scales from each block's max, no search
    "int4_rtn": Format("INT4 weight-only, round-to-nearest (W4A16, max calibration): AWQ's baseline",
                       "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", 4, None, None, "int8", group_size=128),
}
