"""What one ``llmexp serve`` process serves: a base model and any LoRA adapters on it, by name.

The base is any checkpoint the framework writes (``save_pretrained``, a ModelOpt-quantized
one included: ``llmexp.models.load_model`` restores its quantizers). Adapters are PEFT
directories (what ``technique=lora`` saves as ``<stage>/adapter``), all loaded into one
``PeftModel`` over the one base, as NIM serves LoRA: a request picks the base or an adapter
by its ``model`` name, and one batch may mix them (PEFT's ``adapter_names`` per row).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from llmexp.errors import UserError

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class ServedModels:
    """The loaded model (a ``PeftModel`` when adapters are served), its tokenizer and the names requests use."""

    model: Any
    tokenizer: Any
    base_name: str
    adapter_dirs: Dict[str, Path] = field(default_factory=dict)
    base_dir: Optional[Path] = None
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
    model_dir: str | Path, adapters: Optional[Mapping[str, str | Path]] = None, name: Optional[str] = None
) -> ServedModels:
    """Load ``model_dir`` (a checkpoint, a stage directory holding ``model/``, or a LoRA adapter whose base is
    on disk) and the ``adapters`` ({served name: PEFT directory}) on it; bad input is a ``UserError``."""
    from llmexp.models import load_model

    adapters = {adapter_name: Path(path) for adapter_name, path in (adapters or {}).items()}
    base_dir, implied_adapter = resolve_model_dir(Path(model_dir))
    base_name = name or _default_name(base_dir)
    if implied_adapter is not None:
        adapters = {implied_adapter.parent.name if implied_adapter.name == "adapter" else implied_adapter.name:
                    implied_adapter, **adapters}
    for adapter_name in adapters:
        if adapter_name == base_name:
            raise UserError(
                f"--adapter {adapter_name}=...: the name {adapter_name!r} is the base model's served name; "
                "give the adapter another name, or the base one with --name."
            )
        if adapter_name == BASE_ADAPTER or not adapter_name:
            raise UserError(f"--adapter {adapter_name!r}=...: that name is reserved or empty; choose another.")
    model, tokenizer = load_model(base_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # left padding needs some id; masked out, its value is unseen
    if adapters:
        model = _attach_adapters(model, adapters)
    model.eval().requires_grad_(False)
    return ServedModels(model=model, tokenizer=tokenizer, base_name=base_name, adapter_dirs=adapters, base_dir=base_dir)


def resolve_model_dir(path: Path) -> Tuple[Path, Optional[Path]]:
    """(checkpoint directory, adapter directory or None) for what a user gave as MODEL_DIR.

    A checkpoint is itself; a stage directory (``<run>/<stage>``) serves its ``model/``; a PEFT
    adapter directory serves its base (``base_model_name_or_path``, when that is on disk) with
    the adapter. A run directory, which holds several models, is refused with the list of them.
    """
    if not path.is_dir():
        raise UserError(f"MODEL_DIR={path}: no such directory. Give a checkpoint directory written by save_pretrained.")
    if (path / "config.json").is_file():
        return path, None
    if (path / "model" / "config.json").is_file():
        return path / "model", None
    if (path / ADAPTER_CONFIG).is_file():
        base = _adapter_base(path)
        if base is None or not (base / "config.json").is_file():
            raise UserError(
                f"MODEL_DIR={path} is a LoRA adapter whose base ({base or 'not recorded'}) is not a checkpoint "
                "directory here. Serve the base and add the adapter: `llmexp serve BASE_DIR --adapter NAME=" f"{path}`."
            )
        return base, path
    stages = sorted(str(p.parent) for p in path.glob("*/model/config.json"))
    if stages:
        raise UserError(
            f"MODEL_DIR={path} is a run directory holding several models: {', '.join(stages)}. "
            "Give one of them (a stage directory or its model/ folder)."
        )
    raise UserError(
        f"MODEL_DIR={path} holds no config.json, model/ or adapter_config.json. Give a checkpoint directory "
        "written by save_pretrained (config.json, weights, tokenizer), a run's stage directory, or a LoRA adapter."
    )


def _adapter_base(adapter_dir: Path) -> Optional[Path]:
    try:
        recorded = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None
    return Path(recorded) if recorded else None


def _default_name(base_dir: Path) -> str:
    """The checkpoint directory's name, or its stage's for ``<stage>/model`` (``model`` says nothing)."""
    directory = base_dir.resolve()
    return directory.parent.name if directory.name == "model" else directory.name


def _attach_adapters(model, adapters: Mapping[str, Path]):
    """One ``PeftModel`` holding every adapter under its served name (none active: each request picks its own)."""
    from peft import PeftModel

    peft_model = None
    for adapter_name, adapter_dir in adapters.items():
        if not (adapter_dir / ADAPTER_CONFIG).is_file():
            raise UserError(
                f"--adapter {adapter_name}={adapter_dir}: no {ADAPTER_CONFIG} there. Give a PEFT adapter directory "
                "(what technique=lora writes to <run>/<stage>/adapter)."
            )
        try:
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name)
            else:
                peft_model.load_adapter(str(adapter_dir), adapter_name=adapter_name)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise UserError(
                f"--adapter {adapter_name}={adapter_dir} could not be loaded onto the base model: "
                f"{' '.join(str(error).split())[:400]} Give an adapter trained on this base."
            ) from None
    return peft_model
