"""``llmexp serve --backend vllm``: hand a model the framework produced to vLLM's own OpenAI-compatible server.

vLLM schedules, batches and serves on the GPU far beyond the in-process engine, so this backend
only decides *what* to serve and *how to ask for it*: the directory vLLM can read (a quantize
stage's ModelOpt unified export rather than its ``mto.restore`` checkpoint), the PEFT LoRA
adapters, the quantization method vLLM's ModelOpt loader names, and the flags of
``python -m vllm.entrypoints.openai.api_server`` (vLLM 0.10+). The process then becomes vLLM
(``os.execvpe``), so signals, logs and the exit code are vLLM's own.

An API key goes to vLLM in its environment (``VLLM_API_KEY``), never on its command line, which
every local user can read in the process list. vLLM checks it on ``/v1/*`` only (its ``/metrics``,
``/health``, ``/tokenize`` and other paths stay open), and reads one key from that variable.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, NoReturn, Optional, Sequence, Tuple

from llmexp.machine.backends import importable
from llmexp.errors import UserError
from llmexp.models.loading import MODELOPT_STATE
from llmexp.serving.served_models import DEFAULT_SPECULATIVE_TOKENS, check_adapter_dir, resolve_draft_dir, resolve_model_dir
from llmexp.techniques.contract import ServedExport
from llmexp.techniques.plugin_manager import techniques

VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
HF_QUANT_CONFIG = "hf_quant_config.json"

# ModelOpt's quant_algo -> the name vLLM's ModelOpt loader detects it as. vLLM refuses a --quantization
# that differs from what it detects, so the name must be the exact sibling, not always "modelopt".
VLLM_MODELOPT_METHODS = {
    "FP8": "modelopt",
    "FP8_PER_CHANNEL_PER_TOKEN": "modelopt",
    "FP8_PB_WO": "modelopt",
    "NVFP4": "modelopt_fp4",
    "W4A16_NVFP4": "modelopt_fp4",
    "MXFP8": "modelopt_mxfp8",
    "MIXED_PRECISION": "modelopt_mixed",
}

# --max-lora-rank takes one of these (vLLM's LoRAConfig); 1 is missing from older releases, so it is left out
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
WEIGHT_PATTERNS = ("*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin")


def vllm_command(
    model_dir: str | Path,
    *,
    adapters: Optional[Mapping[str, str | Path]] = None,
    name: Optional[str] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_num_seqs: Optional[int] = None,
    tensor_parallel_size: Optional[int] = None,
    gpu_memory_utilization: Optional[float] = None,
    max_model_len: Optional[int] = None,
    draft_dir: Optional[str | Path] = None,
    num_speculative_tokens: Optional[int] = None,
    python: str = sys.executable,
) -> List[str]:
    """The argument list that starts vLLM's OpenAI server for MODEL_DIR and its adapters; bad input is a ``UserError``.

    Reads the directories and starts nothing, so the command can be checked (and shown) anywhere.
    Options left None are vLLM's defaults. A ``draft_dir`` becomes vLLM's draft-model speculative decoding
    (``speculative_config``), ``num_speculative_tokens`` proposed per step.
    """
    checkpoint, implied_adapter = servable_checkpoint(Path(model_dir))
    base_name = name or served_name(checkpoint)
    adapter_dirs = {name_of_implied_adapter(implied_adapter): implied_adapter} if implied_adapter else {}
    adapter_dirs.update({adapter_name: Path(path) for adapter_name, path in (adapters or {}).items()})
    ranks = [lora_rank(adapter_name, path, base_name) for adapter_name, path in adapter_dirs.items()]

    command = [python, "-m", VLLM_SERVER_MODULE, "--model", str(checkpoint.resolve()),
               "--served-model-name", base_name, "--host", host, "--port", str(port),
               "--disable-fastapi-docs"]  # as in process: no API description for whoever reaches the port
    quantization = vllm_quantization(checkpoint)
    if quantization:
        command += ["--quantization", quantization]
    if tensor_parallel_size is not None:
        check_tensor_parallel_size(checkpoint, tensor_parallel_size)
        command += ["--tensor-parallel-size", str(tensor_parallel_size)]
    for flag, value in (("--max-num-seqs", max_num_seqs), ("--max-model-len", max_model_len),
                        ("--gpu-memory-utilization", gpu_memory_utilization)):
        if value is not None:
            command += [flag, str(value)]
    if draft_dir is not None:
        command += ["--speculative-config", json.dumps(speculative_config(draft_dir, num_speculative_tokens))]
    if adapter_dirs:
        # every adapter resident at once (vLLM's default is 1 per batch), ranks up to the largest one
        command += ["--enable-lora", "--max-loras", str(len(adapter_dirs)),
                    "--max-lora-rank", str(vllm_max_lora_rank(max(ranks))),
                    "--lora-modules", *(lora_module(n, p) for n, p in adapter_dirs.items())]
    return command


def speculative_config(draft_dir: str | Path, num_speculative_tokens: Optional[int]) -> Dict[str, Any]:
    """vLLM's ``speculative_config`` for a draft model (``vllm serve --speculative-config``, ``LLM(speculative_config=)``):
    the draft's directory as vLLM reads it (a stage's served export, like the target's), the tokens it proposes per
    step (``DEFAULT_SPECULATIVE_TOKENS`` when not given), and the draft-model method."""
    resolve_draft_dir(Path(draft_dir))  # what the in-process backend refuses (an adapter, no model) vLLM refuses too
    checkpoint = servable_checkpoint(Path(draft_dir))[0]
    return {"model": str(checkpoint.resolve()), "method": "draft_model",
            "num_speculative_tokens": num_speculative_tokens or DEFAULT_SPECULATIVE_TOKENS}


def servable_checkpoint(path: Path) -> Tuple[Path, Optional[Path]]:
    """(the directory vLLM loads, an adapter MODEL_DIR implied or None), refusing what vLLM cannot read.

    Like the in-process backend (``resolve_model_dir``), except that a stage directory serves the
    export its technique writes for servers (``Technique.served_export``: a quantize stage's ModelOpt
    unified checkpoint, which vLLM reads) and that a ModelOpt ``mto.restore`` checkpoint
    (``modelopt_state.pth``: fake-quantized, our in-process format) is refused.
    """
    export = next((path / e.folder for e in served_exports() if (path / e.folder / "config.json").is_file()), None)
    if path.is_dir() and export is not None:
        checkpoint, implied_adapter = export, None
    else:
        checkpoint, implied_adapter = resolve_model_dir(path)
    if (checkpoint / MODELOPT_STATE).is_file():
        beside = [(checkpoint.parent / e.folder, e) for e in served_exports()]
        written = next((folder for folder, _ in beside if (folder / "config.json").is_file()), None)
        where = (f"Serve the unified export written beside it: `llmexp serve {written} --backend vllm`."
                 if written is not None else
                 f"No export is beside it ({', '.join(str(folder) for folder, _ in beside) or 'none declared'}): "
                 f"re-run its stage with {' or '.join(e.written_by for _, e in beside) or 'an export'} "
                 "to write one, or serve this checkpoint with --backend inprocess.")
        raise UserError(
            f"MODEL_DIR={path}: {checkpoint} is a ModelOpt checkpoint for in-process use ({MODELOPT_STATE}, "
            f"restored by mto.restore into fake-quantized layers), which vLLM cannot read. {where}"
        )
    if not any(next(checkpoint.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise UserError(
            f"MODEL_DIR={path}: {checkpoint} has config.json but no weights (*.safetensors or pytorch_model*.bin). "
            "Give a checkpoint saved with save_pretrained, weights included."
        )
    return checkpoint, implied_adapter


def served_name(checkpoint: Path) -> str:
    """The checkpoint directory's name, or its stage's for ``<stage>/model`` and a stage's served export."""
    directory = checkpoint.resolve()
    return directory.parent.name if directory.name in ("model", *(e.folder for e in served_exports())) else directory.name


def served_exports() -> List[ServedExport]:
    """The exports for servers that the installed techniques write into their stage directories."""
    return list(dict.fromkeys(entry.technique.served_export for entry in techniques().values()
                              if entry.technique.served_export is not None))


def name_of_implied_adapter(adapter_dir: Path) -> str:
    """An adapter given as MODEL_DIR is served under its stage's name (``<stage>/adapter``), as in process."""
    return adapter_dir.parent.name if adapter_dir.name == "adapter" else adapter_dir.name


def modelopt_quantization(checkpoint: Path) -> Optional[Dict[str, Any]]:
    """ModelOpt's ``quantization`` record of a unified export (quant_algo, kv_cache_quant_algo ...), None for
    a checkpoint ModelOpt did not export: its hf_quant_config.json, else config.json's quantization_config."""
    quant_config = checkpoint / HF_QUANT_CONFIG
    if quant_config.is_file():
        record = _read_json(quant_config).get("quantization")
        return record if isinstance(record, dict) else {}
    quantization = _read_json(checkpoint / "config.json").get("quantization_config")
    if isinstance(quantization, dict) and str(quantization.get("quant_method", "")).startswith("modelopt"):
        return quantization
    return None


def vllm_quantization(checkpoint: Path) -> Optional[str]:
    """vLLM's ``--quantization`` for a ModelOpt export (None: not one; vLLM detects any other format itself)."""
    record = modelopt_quantization(checkpoint)
    if record is None:
        return None
    algo = str(record.get("quant_algo") or "").upper()
    if algo in VLLM_MODELOPT_METHODS:
        return VLLM_MODELOPT_METHODS[algo]
    kv_cache = record.get("kv_cache_quant_algo")
    what = f"quant_algo {algo}" if algo else f"no quantized weights (KV cache only: {kv_cache})"
    raise UserError(
        f"MODEL_DIR={checkpoint} is a ModelOpt export with {what}, which vLLM's ModelOpt loader does not read: it "
        "reads FP8 and NVFP4 exports (technique.format=fp8 or nvfp4) and ModelOpt's FP8 variants, MXFP8 and mixed "
        "precision. Quantize to one of those, serve this export with TensorRT-LLM, or serve the stage's model/ "
        "with --backend inprocess."
    )


def lora_rank(adapter_name: str, adapter_dir: Path, base_name: str) -> int:
    """The rank of the PEFT LoRA adapter in ``adapter_dir``, refusing anything vLLM cannot serve as ``adapter_name``."""
    given = f"--adapter {adapter_name}={adapter_dir}"
    if adapter_name == base_name:
        raise UserError(f"{given}: the name {adapter_name!r} is the base model's served name; give the adapter "
                        "another name, or the base one with --name.")
    config = check_adapter_dir(adapter_dir, given)
    kind = config.get("peft_type")
    if kind != "LORA":
        raise UserError(f"{given} is a PEFT {kind or 'untyped'} adapter; vLLM serves LoRA adapters only. "
                        "Give a LoRA adapter (technique=lora), or merge this one into the model and serve that.")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1 or rank > VLLM_LORA_RANKS[-1]:
        raise UserError(f"{given}: its rank r={rank!r} is not one vLLM serves (a whole number from 1 to "
                        f"{VLLM_LORA_RANKS[-1]}). Train the adapter with a rank in that range.")
    return rank


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds ``rank`` (it sizes the LoRA buffers)."""
    return next(allowed for allowed in VLLM_LORA_RANKS if allowed >= rank)


def lora_module(adapter_name: str, adapter_dir: Path) -> str:
    """One ``--lora-modules`` value: ``name=path``, or vLLM's JSON form where ``=`` or ``,`` would split the path."""
    path = str(adapter_dir.resolve())
    if "=" in path or "," in path:
        return json.dumps({"name": adapter_name, "path": path})
    return f"{adapter_name}={path}"


def check_tensor_parallel_size(checkpoint: Path, size: int) -> None:
    """vLLM splits attention heads across the GPUs: refuse a size that does not divide them, before loading."""
    heads = _read_json(checkpoint / "config.json").get("num_attention_heads")
    if isinstance(heads, int) and heads % size:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0]
        raise UserError(f"--tensor-parallel-size {size}: the model's {heads} attention heads do not split evenly "
                        f"over {size} GPUs. Give one of {', '.join(map(str, divisors))}.")


def require_vllm() -> None:
    """vLLM must be installed in this Python (looked up, not imported: importing it takes seconds)."""
    if not importable("vllm"):
        raise UserError(
            f"--backend vllm: vLLM is not installed in this Python ({sys.executable}). On a machine with an NVIDIA "
            "GPU, `pip install vllm` (it brings its own CUDA build of torch: a separate virtual environment is "
            "wise) and run llmexp serve from there; here, drop --backend vllm to use the in-process backend, "
            "the CPU path."
        )


def require_cuda(tensor_parallel_size: Optional[int]) -> None:
    """vLLM's server needs CUDA GPUs, as many as the tensor-parallel size; torch is imported only here."""
    import torch

    if not torch.cuda.is_available():
        raise UserError(
            f"--backend vllm: no CUDA GPU is visible (torch {torch.__version__}: torch.cuda.is_available() is "
            "false), and vLLM's server runs on GPUs. Run it on a GPU machine (check nvidia-smi and "
            "CUDA_VISIBLE_DEVICES), or drop --backend vllm to serve with the in-process backend on the CPU."
        )
    visible = torch.cuda.device_count()
    if tensor_parallel_size is not None and tensor_parallel_size > visible:
        raise UserError(f"--tensor-parallel-size {tensor_parallel_size}: only {visible} CUDA GPU(s) are visible. "
                        f"Give at most {visible}, or make more GPUs visible (CUDA_VISIBLE_DEVICES).")


def vllm_environment(environ: Mapping[str, str], api_keys: Sequence[str]) -> Dict[str, str]:
    """vLLM's environment: this one, with llmexp's API key as ``VLLM_API_KEY`` (which takes the whole value as one
    key, so several keys are refused: vLLM takes more only on its command line)."""
    if len(api_keys) > 1:
        raise UserError(f"--backend vllm: {len(api_keys)} API keys are set, and vLLM reads one from its environment "
                        "(VLLM_API_KEY); a second one would go on its command line, which the process list shows. "
                        "Give one key, or serve several with --backend inprocess.")
    return {**environ, "VLLM_API_KEY": api_keys[0]} if api_keys else dict(environ)


def exec_vllm(command: List[str], url: str, environment: Mapping[str, str]) -> NoReturn:
    """Become vLLM's server with ``environment``: say where it will listen, then replace this process so Ctrl-C and
    the exit code are vLLM's. vLLM logs 'Application startup complete' once the model is loaded and serving."""
    keyed = "API key required" if environment.get("VLLM_API_KEY") else "no API key"
    print(f"llmexp serve: starting vLLM for {url}  {keyed}  (Ctrl-C stops)", flush=True)
    print(f"llmexp serve: {shlex.join(command)}", file=sys.stderr, flush=True)
    try:
        os.execvpe(command[0], command, dict(environment))
    except OSError as error:
        raise UserError(f"--backend vllm: could not start {command[0]} ({error.strerror or error}). "
                        "Check that this Python can run, then try again.") from None


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path} could not be read as JSON ({error}). Re-save the directory it belongs to.") from None
    return data if isinstance(data, dict) else {}
