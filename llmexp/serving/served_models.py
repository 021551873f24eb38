"""What one ``llmexp serve`` process serves: a base model and any LoRA adapters on it, by name.

The base is any checkpoint the framework writes (``save_pretrained``, a ModelOpt-quantized
one included: ``llmexp.models.loading.load_model`` restores its quantizers). Adapters are PEFT
directories (what ``technique=lora`` saves as ``<stage>/adapter``), all loaded into one
``PeftModel`` over the one base, as NIM serves LoRA: a request picks the base or an adapter
by its ``model`` name, and one batch may mix them (PEFT's ``adapter_names`` per row).

Adapters are as untrusted as checkpoints: ``check_served_files`` looks at every file in pure
Python before ``llmexp serve`` binds its port, and adapters load under
``llmexp.models.loading.weights_only_loading``, any failure a ``UserError`` naming the file.

A draft model (``--draft-model``) is served beside the base for speculative decoding: a checkpoint
or a run's stage directory (the compress pipeline's distilled student of the base), checked like
the base, and refused unless its tokenizer and vocabulary are the base's.
"""

from __future__ import annotations

import json
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from llmexp.models.checkpoint import safetensors_problem, torch_archive_problem, validate_checkpoint_dir
from llmexp.models.loading import load_model, weights_only_loading
from llmexp.errors import UserError

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT reads the first one present
DEFAULT_SPECULATIVE_TOKENS = 4  # a draft's proposals per round: vLLM's and TensorRT-LLM's examples use 3 to 5


@dataclass
class DraftModel:
    """A smaller model with the base's tokenizer that proposes tokens for the base to check
    (``llmexp.serving.speculative``)."""

    model: Any
    directory: Path
    num_speculative_tokens: int = DEFAULT_SPECULATIVE_TOKENS


@dataclass
class ServedModels:
    """The loaded model (a ``PeftModel`` when adapters are served), its tokenizer and the names requests use."""

    model: Any
    tokenizer: Any
    base_name: str
    adapter_dirs: Dict[str, Path] = field(default_factory=dict)
    base_dir: Optional[Path] = None
    draft: Optional[DraftModel] = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def names(self) -> List[str]:
        """Every name a request may give as ``model``: the base first, then the adapters."""
        return [self.base_name, *self.adapter_dirs]

    @property
    def context_length(self) -> int:
        """The most tokens (prompt plus generated) one sequence may hold."""
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 2048)

    @property
    def eos_token_ids(self) -> Tuple[int, ...]:
        """The ids that end a generation: the generation config's EOS (one or several), else the tokenizer's."""
        generation_config = getattr(self.model, "generation_config", None)
        eos = getattr(generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)

    def adapter_for(self, name: str) -> Optional[str]:
        """PEFT's adapter name for the served ``name`` (``__base__`` for the base), None when nothing has that name."""
        if name == self.base_name:
            return BASE_ADAPTER
        return name if name in self.adapter_dirs else None

    @property
    def has_adapters(self) -> bool:
        return bool(self.adapter_dirs)


def load_served_models(
    model_dir: str | Path, adapters: Optional[Mapping[str, str | Path]] = None, name: Optional[str] = None,
    draft_dir: Optional[str | Path] = None, num_speculative_tokens: int = DEFAULT_SPECULATIVE_TOKENS,
) -> ServedModels:
    """Load ``model_dir`` (a checkpoint, a stage directory holding ``model/``, or a LoRA adapter whose base is
    on disk), the ``adapters`` ({served name: PEFT directory}) on it and the draft model in ``draft_dir`` (a
    checkpoint or stage directory, proposing ``num_speculative_tokens`` per round); bad input is a ``UserError``."""
    base_dir, implied_adapter = resolve_model_dir(Path(model_dir))
    base_name = name or _default_name(base_dir)
    given = _given_adapters(implied_adapter, adapters)
    for adapter_name in given:
        if adapter_name == base_name:
            raise UserError(
                f"--adapter {adapter_name}=...: the name {adapter_name!r} is the base model's served name; "
                "give the adapter another name, or the base one with --name."
            )
        if adapter_name == BASE_ADAPTER or not adapter_name:
            raise UserError(f"--adapter {adapter_name!r}=...: that name is reserved or empty; choose another.")
    for directory, label in given.values():
        check_adapter_dir(directory, label)
    draft_checkpoint = None if draft_dir is None else resolve_draft_dir(Path(draft_dir))
    model, tokenizer = load_model(base_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # left padding needs some id; masked out, its value is unseen
    if given:
        model = _attach_adapters(model, given)
    model.eval().requires_grad_(False)
    adapter_dirs = {adapter_name: directory for adapter_name, (directory, _) in given.items()}
    draft = None if draft_checkpoint is None else _load_draft(draft_checkpoint, model, tokenizer, draft_dir,
                                                              num_speculative_tokens)
    return ServedModels(model=model, tokenizer=tokenizer, base_name=base_name, adapter_dirs=adapter_dirs,
                        base_dir=base_dir, draft=draft)


def _load_draft(checkpoint: Path, model, tokenizer, given, num_speculative_tokens: int) -> DraftModel:
    from llmexp.serving.speculative import check_same_vocabulary  # imports torch

    draft, draft_tokenizer = load_model(checkpoint)
    check_same_vocabulary(model, tokenizer, draft, draft_tokenizer, f"--draft-model {given}")
    return DraftModel(draft.eval().requires_grad_(False), checkpoint, num_speculative_tokens)


def vocabulary_mismatch(field: str, draft_size: int, target_size: int) -> UserError:
    """The refusal of a draft whose output layer scores another number of tokens than the target's."""
    return UserError(
        f"{field}: the draft model scores {draft_size} tokens and the target {target_size}, so its proposals "
        "cannot be checked against the target's distribution. Give a draft with the target's tokenizer and "
        "vocabulary (a pruned or distilled model of the target, or one trained with its tokenizer)."
    )


def resolve_draft_dir(path: Path) -> Path:
    """The checkpoint directory of a draft given as a checkpoint or a run's stage directory; a LoRA adapter,
    whose base would be as large as the target, is refused."""
    if (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file():
        raise UserError(f"--draft-model {path} is a LoRA adapter: a draft must be a whole model, smaller than the "
                        "one served (e.g. the compress pipeline's distilled student: --draft-model <run>/distill).")
    return resolve_model_dir(path, f"--draft-model {path}")[0]


def check_served_files(model_dir: str | Path, adapters: Optional[Mapping[str, str | Path]] = None,
                       draft_dir: Optional[str | Path] = None) -> None:
    """Refuse (``UserError``) a damaged checkpoint, adapter or draft before anything binds a port or loads: the
    checks of ``validate_checkpoint_dir`` and ``check_adapter_dir``, in pure Python (no torch)."""
    base_dir, implied_adapter = resolve_model_dir(Path(model_dir))
    validate_checkpoint_dir(base_dir)
    if draft_dir is not None:
        draft_checkpoint = resolve_draft_dir(Path(draft_dir))
        validate_checkpoint_dir(draft_checkpoint)
        target_size, draft_size = (json.loads((d / "config.json").read_text(encoding="utf-8")).get("vocab_size")
                                   for d in (base_dir, draft_checkpoint))
        if None not in (target_size, draft_size) and target_size != draft_size:
            raise vocabulary_mismatch(f"--draft-model {draft_dir}", draft_size, target_size)
    for directory, label in _given_adapters(implied_adapter, adapters).values():
        check_adapter_dir(directory, label)


def check_adapter_dir(directory: Path, label: str) -> Dict[str, Any]:
    """The parsed ``adapter_config.json`` of the PEFT adapter in ``directory``, after checking that its weights
    are there and whole (as ``validate_checkpoint_dir`` checks a model's); ``label`` says how the user gave it."""
    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{label}: no {ADAPTER_CONFIG} there. Give a PEFT adapter directory "
                        "(what technique=lora writes to <run>/<stage>/adapter).") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        problem = "nested too deeply to parse" if isinstance(error, RecursionError) else str(error)
        raise UserError(f"{label}: {ADAPTER_CONFIG} could not be parsed ({problem}). Save the adapter again "
                        "(PEFT's save_pretrained) or copy the file again from where it was trained.") from None
    if not isinstance(config, dict):
        raise UserError(f"{label}: {ADAPTER_CONFIG} is not a JSON object. Save the adapter again (PEFT's "
                        "save_pretrained).")
    weights = _adapter_weights(directory)
    if weights is None:
        raise UserError(f"{label}: no {' or '.join(ADAPTER_WEIGHTS)} beside {ADAPTER_CONFIG}. Give the whole "
                        "adapter directory that PEFT's save_pretrained wrote.")
    problem = safetensors_problem(weights)[0] if weights.suffix == ".safetensors" else torch_archive_problem(weights)
    if problem:
        raise UserError(f"{label}: {weights.name} is truncated or corrupt ({problem}). Copy that file again from "
                        "where the adapter was trained, or train the adapter again.")
    return config


def _adapter_weights(directory: Path) -> Optional[Path]:
    return next((directory / name for name in ADAPTER_WEIGHTS if (directory / name).is_file()), None)


def _given_adapters(implied_adapter: Optional[Path],
                    adapters: Optional[Mapping[str, str | Path]]) -> Dict[str, Tuple[Path, str]]:
    """{served name: (adapter directory, how the user gave it)}: the adapter MODEL_DIR is, if it is one (named
    after its directory, or its stage's for ``<stage>/adapter``), then the ``--adapter`` ones."""
    given: Dict[str, Tuple[Path, str]] = {}
    if implied_adapter is not None:
        implied_name = implied_adapter.parent.name if implied_adapter.name == "adapter" else implied_adapter.name
        given[implied_name] = (implied_adapter, f"MODEL_DIR={implied_adapter}")
    for adapter_name, path in (adapters or {}).items():
        given[adapter_name] = (Path(path), f"--adapter {adapter_name}={path}")
    return given


def resolve_model_dir(path: Path, label: Optional[str] = None) -> Tuple[Path, Optional[Path]]:
    """(checkpoint directory, adapter directory or None) for what a user gave as MODEL_DIR (``label``: how they
    gave it, for the messages).

    A checkpoint is itself; a stage directory (``<run>/<stage>``) serves its ``model/``; a PEFT
    adapter directory serves its base (``base_model_name_or_path``, when that is on disk) with
    the adapter. A run directory, which holds several models, is refused with the list of them.
    """
    label = label or f"MODEL_DIR={path}"
    if not path.is_dir():
        raise UserError(f"{label}: no such directory. Give a checkpoint directory written by save_pretrained.")
    if (path / "config.json").is_file():
        return path, None
    if (path / "model" / "config.json").is_file():
        return path / "model", None
    if (path / ADAPTER_CONFIG).is_file():
        recorded = check_adapter_dir(path, label).get("base_model_name_or_path")
        base = Path(recorded) if isinstance(recorded, str) and recorded else None
        if base is None or not (base / "config.json").is_file():
            raise UserError(
                f"{label} is a LoRA adapter whose base ({base or 'not recorded'}) is not a checkpoint "
                "directory here. Serve the base and add the adapter: `llmexp serve BASE_DIR --adapter NAME=" f"{path}`."
            )
        return base, path
    stages = sorted(str(p.parent) for p in path.glob("*/model/config.json"))
    if stages:
        raise UserError(
            f"{label} is a run directory holding several models: {', '.join(stages)}. "
            "Give one of them (a stage directory or its model/ folder)."
        )
    raise UserError(
        f"{label} holds no config.json, model/ or adapter_config.json. Give a checkpoint directory "
        "written by save_pretrained (config.json, weights, tokenizer), a run's stage directory, or a LoRA adapter."
    )


def _default_name(base_dir: Path) -> str:
    """The checkpoint directory's name, or its stage's for ``<stage>/model`` (``model`` says nothing)."""
    directory = base_dir.resolve()
    return directory.parent.name if directory.name == "model" else directory.name


def _attach_adapters(model, adapters: Mapping[str, Tuple[Path, str]]):
    """One ``PeftModel`` holding every adapter under its served name (none active: each request picks its own).

    Loaded as checkpoints are (``weights_only_loading``): a pickled ``adapter_model.bin`` gives tensors or is
    refused, never runs code, whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says.
    """
    from peft import PeftModel  # heavy: imported when adapters are served

    peft_model = None
    for adapter_name, (adapter_dir, label) in adapters.items():
        weights = _adapter_weights(adapter_dir)
        try:
            with weights_only_loading():
                if peft_model is None:
                    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name)
                else:
                    peft_model.load_adapter(str(adapter_dir), adapter_name=adapter_name)
        except pickle.UnpicklingError as error:
            if "Weights only load failed" not in str(error):  # torch's words for a refused global; else damage
                raise _unloadable(label, weights, error) from None
            raise UserError(
                f"{label}: {weights.name} holds Python objects besides tensors, which could run code when loaded; "
                "llmexp loads adapters with weights_only=True and never runs code from them. Take the adapter from "
                "a source you trust, or save it again: PEFT's save_pretrained writes adapter_model.safetensors."
            ) from None
        except Exception as error:  # whatever a file of the directory makes PEFT or torch raise is bad input
            raise _unloadable(label, weights, error) from None
    return peft_model


def _unloadable(label: str, weights: Path, error: Exception) -> UserError:
    return UserError(f"{label}: {weights.name} could not be loaded onto the base model ({type(error).__name__}: "
                     f"{' '.join(str(error).split())[:400]}). Give an adapter trained on this base, saved whole.")
