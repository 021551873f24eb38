"""What libraries print for their own developers, kept off a run's console; their warnings about the run stay.

``quiet_libraries`` is called once where a run starts work (``llmexp.running.runner``) and before a server loads its models. Each entry
names a notice that appears on runs where nothing is wrong:

* transformers' own tqdm bars, ``Writing model shards`` on every save and ``Loading weights``
  on every load: transient on a terminal, off elsewhere, where tqdm's redrawn bar is a run of
  carriage returns in the log. Through transformers' tqdm hook, so huggingface_hub's download
  bars, which a person waiting on a download wants, stay as they are.
* transformers' ``torch_dtype`` deprecation: llmexp passes ``dtype``; ModelOpt's export reads
  ``config.torch_dtype`` itself.
* transformers' deprecation of ``is_gradient_checkpointing``, which PEFT reads on every adapter
  it wraps a model in, and its notice that a training forward under activation checkpointing
  builds no KV cache (training never uses one).
* megatron-core's notices, at import, that it falls back to torch without Transformer Engine
  or Apex and which Megatron-FSDP it found (logged at INFO, which Hydra's job logging shows),
  and ModelOpt's about a Megatron ``sharded_state_dict`` it does not patch: they come whenever
  ModelOpt loads its Megatron plugin, whatever the model. ``backend=megatron``'s own checks say
  when Transformer Engine is needed.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Dict, Tuple

from llmexp.display.progress import is_live

WARNINGS = (  # (message regex, module regex of the code that warns)
    (r"`is_gradient_checkpointing` is deprecated", r"transformers\."),
    (r"(Transformer Engine and )?Apex (is|are) not installed", r"megatron\."),
    (r"GPTModel\.sharded_state_dict is not the version ModelOpt patches", r"modelopt\."),
)
QUIETER = ("megatron.core.distributed.fsdp",)  # loggers whose INFO is for their developers: WARNING and up shown
LOGGED = (  # (logger, text of the messages it drops)
    ("transformers.configuration_utils", "`torch_dtype` is deprecated"),
    ("transformers.utils.generic", "`use_cache=True` is incompatible with gradient checkpointing"),
)


def quiet_libraries() -> None:
    """Install the filters above (idempotent). Imports transformers (seconds): call it where a run starts work."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_tqdm_hook(_library_bar)
    for message, module in WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)
    for name in QUIETER:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name, message in LOGGED:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Dropping) and f.message == message for f in logger.filters):
            logger.addFilter(_Dropping(message))


def _library_bar(factory: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    return factory(*args, **{**kwargs, "leave": False, "disable": not is_live()})


class _Dropping(logging.Filter):
    """Drops the records whose message contains ``message``."""

    def __init__(self, message: str):
        super().__init__()
        self.message = message

    def filter(self, record: logging.LogRecord) -> bool:
        return self.message not in record.getMessage()
