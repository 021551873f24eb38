"""Models are Hugging Face transformers models; checkpoints are HF directories (safetensors).

Anything saved here loads with plain ``AutoModelForCausalLM.from_pretrained``. Imports of
torch and transformers stay inside the functions: the planner imports this package too.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

from llmexp.data.embedded import build_world
from llmexp.models import starting_weights
from llmexp.models.checkpoint import HF_KEYS, MODELOPT_STATE, pickled_files, validate_checkpoint_dir
from llmexp.errors import UserError
from llmexp.models.vocabulary import vocabulary_problem
from llmexp.techniques.contract import ModelArtifact


@contextlib.contextmanager
def evaluating(model) -> Iterator[None]:
    """Eval mode and no autograd for the block; the model's training flag is restored after."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def run_device(hardware, why: str = ""):
    """Where a stage computes: the CPU on ``hardware=cpu``, else this machine's GPU, which must exist.

    ``why`` adds the stage's own reason a GPU is needed to the error.
    """
    import torch

    if hardware.accelerator == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    raise UserError(
        f"hardware={hardware.name} needs a CUDA GPU and this machine has none{why}. Run it on a GPU machine "
        "(hydra/launcher=slurm cluster=...), or with hardware=cpu; `llmexp plan` checks a configuration without "
        "running it."
    )


def build_model(model_cfg, tokenizer=None):
    """A freshly initialised causal LM with ``model_cfg``'s architecture numbers (call after seeding)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {
        hf: model_cfg[ours]
        for ours, hf in HF_KEYS.items()
        if ours != "architecture" and model_cfg.get(ours) is not None
    }
    if model_cfg.architecture == "qwen2":
        kwargs.pop("attention_bias", None)  # Qwen2 always has q/k/v biases
    if tokenizer is not None:
        problem = vocabulary_problem(model_cfg.vocab_size, len(tokenizer))
        if problem:
            raise UserError(problem)
        kwargs.update(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
        )
    config = AutoConfig.for_model(model_cfg.architecture, **kwargs)
    model = AutoModelForCausalLM.from_config(config)
    model.config.architectures = [type(model).__name__]  # from_config leaves it unset; exporters need it
    return model


def load_model(path: str | Path) -> Tuple[Any, Any]:
    """Model and tokenizer from a local HF directory; a broken or unsafe directory is a ``UserError``.

    A directory holding ``modelopt_state.pth`` (what the quantize stage saves) is restored
    through ModelOpt: the same quantizers, calibrated the same, so the same logits.

    Nothing in the directory runs code: safetensors weights are preferred, every file torch
    unpickles is read with ``weights_only=True`` (tensors and plain containers only), the
    libraries' own reads too (``weights_only_loading``), and a checkpoint's Python modules
    (``auto_map``, ``trust_remote_code``) are never imported.
    """
    validate_checkpoint_dir(path)  # refuses a ModelOpt deployment export, whose scales transformers drops
    with weights_only_loading():
        if (Path(path) / MODELOPT_STATE).is_file():
            enable_modelopt_checkpointing()  # first: importing ModelOpt allows the types its state holds
        for file in pickled_files(Path(path)):
            _read_weights_only(path, file)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(
                str(path), local_files_only=True, dtype="auto", trust_remote_code=False
            )
        except Exception as error:  # whatever a file of the directory makes a library raise is bad input
            raise UserError(
                f"model.path={path} could not be loaded as a Hugging Face checkpoint "
                f"({type(error).__name__}: {_first_line(error)}). Point model.path at a directory written by "
                "`save_pretrained` (config.json, weights and tokenizer files)."
            ) from None
    return model, tokenizer


@contextlib.contextmanager
def weights_only_loading() -> Iterator[None]:
    """Every ``torch.load`` in the block unpickles tensors and plain containers only, whatever its caller passes.

    ModelOpt restores ``modelopt_state.pth`` with ``torch.load`` and no ``weights_only``, which
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` (ModelOpt's documentation suggests it) turns into a
    full unpickling that runs whatever the file names. torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``
    wins over any argument, so it is set for the block and the other unset.
    """
    saved = {name: os.environ.pop(name, None) for name in _WEIGHTS_ONLY_SWITCHES}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


_WEIGHTS_ONLY_SWITCHES = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")


def _read_weights_only(path, file: Path) -> None:
    """Unpickle ``file`` as torch's weights-only loader does (tensors on the meta device: no data is read)."""
    import pickle

    import torch

    try:
        torch.load(file, map_location="meta", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        raise UserError(
            f"model.path={path}: {file.name} holds Python objects besides tensors"
            f"{f' ({refused.group(1)})' if refused else ''}, which could run code when loaded; llmexp loads "
            "checkpoints with weights_only=True and never runs code from them. Take the checkpoint from a source "
            "you trust, or make it again: save_pretrained writes safetensors, technique=quantize a "
            f"{MODELOPT_STATE} that loads this way."
        ) from None
    except Exception as error:  # a damaged archive, a record torch cannot read
        raise UserError(
            f"model.path={path}: {file.name} cannot be read ({type(error).__name__}: {_first_line(error)}). "
            "Download or copy that file again, or use the model's safetensors weights."
        ) from None


def _first_line(error: Exception) -> str:
    return " ".join(str(error).split(". ")[0].split())[:300]


def enable_modelopt_checkpointing() -> None:
    """From now on ``save_pretrained`` of a ModelOpt-converted model also writes its ``modelopt_state.pth``,
    and ``from_pretrained`` of a directory holding one restores it before loading the weights.

    Process-wide (ModelOpt patches transformers' classes) and idempotent; a model ModelOpt never
    converted saves and loads as before. Imports modelopt (seconds): call it only when needed.
    """
    import contextlib
    import sys
    import warnings

    # modelopt warns on import that it was not tested with transformers 5; the save/restore round trip
    # used here is (tests/test_quantize.py)
    warnings.filterwarnings("ignore", message=r"transformers .* is not tested with current version of modelopt")
    import modelopt.torch.opt as mto
    import modelopt.torch.quantization  # noqa: F401  registers the quantize mode a restore replays

    with contextlib.redirect_stdout(sys.stderr):  # its notice is not a result: stdout keeps those
        mto.enable_huggingface_checkpointing()


def save_model(model, tokenizer, path: Path) -> Dict[str, Any]:
    """Save as an HF directory (safetensors + tokenizer) and return its model stats."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return model_stats(model, path)


def model_stats(model, path: Optional[Path] = None, precision: Optional[str] = None) -> Dict[str, Any]:
    """Parameters (unique tensors, tied ones once), layers, precision, bytes on disk of the weights, bits per weight.

    ``precision`` defaults to the weights' dtype (``fp32``, ``bf16`` ...); a quantized model names its format.
    """
    seen, parameters = set(), 0
    for tensor in model.parameters():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            parameters += tensor.numel()
    stats: Dict[str, Any] = {
        "parameters": parameters,
        "layers": getattr(model.config, "num_hidden_layers", None),
        "precision": precision or DTYPE_NAMES.get(str(model.dtype), str(model.dtype)),
    }
    if path is not None:
        weight_bytes = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
        stats["bytes_on_disk"] = weight_bytes
        stats["bits_per_weight"] = round(8 * weight_bytes / parameters, 3)
    return stats


DTYPE_NAMES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


def input_model(ctx) -> Optional["ModelArtifact"]:
    """The model a stage starts from: the previous stage's, else the run's weights, else None.

    The run's weights are ``model.path``'s, else the preset's published ones (``model.hub_repo``,
    fetched through the Hugging Face cache): ``llmexp.models.starting_weights.weights_directory``.
    """
    if ctx.model is not None:
        return ctx.model
    path = starting_weights.weights_directory(ctx.config)
    if path is None:
        return None
    model, tokenizer = load_model(path)
    return ModelArtifact(model, tokenizer, path, produced_by=starting_weights.source(ctx.config))


def starting_model(ctx) -> Optional["ModelArtifact"]:
    """A private copy of the model a training stage starts from (see ``input_model``), or None.

    A copy, because training changes weights in place and an earlier stage's model may
    still be needed: the ``customize`` pipeline fine-tunes the same base twice.
    """
    import copy

    artifact = input_model(ctx)
    if artifact is None or ctx.model is None:
        return artifact  # a model read from the run's weights is this stage's own already
    model = copy.deepcopy(artifact.model).requires_grad_(True)  # a merged LoRA model arrives frozen
    return ModelArtifact(model, artifact.tokenizer, artifact.path, artifact.produced_by)


def new_embedded_model(config) -> "ModelArtifact":
    """A randomly initialised ``model`` with the embedded world's tokenizer, seeded by ``config.seed``."""
    import torch

    from llmexp.data.tokenizer import word_level_tokenizer  # imports transformers

    torch.manual_seed(config.seed)
    tokenizer = word_level_tokenizer(build_world(config.data.seed, config.data.num_people).vocabulary())
    return ModelArtifact(build_model(config.model, tokenizer), tokenizer, None, produced_by="random init")
