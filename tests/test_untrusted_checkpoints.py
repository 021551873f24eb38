"""Untrusted checkpoints through the real commands: they never run code and never crash.

Each bad checkpoint is a copy of the tiny one with one file broken or replaced, given to
``llmexp technique=evaluate model.path=...`` and to ``llmexp serve``; both must end with exit
code 2 and a paragraph naming the file. A damaged file is found by the plan, before a run
directory exists. A crafted pickle, whose unpickling would create a file, is loaded with
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` set (ModelOpt's documentation suggests it): the file
must not appear.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmexp.checkpoint import MODELOPT_STATE
from tests.conftest import run_llmexp

UNSAFE = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}


class Payload:
    """Unpickling this creates ``path``: what a crafted checkpoint would do instead (run code)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def as_pytorch_bin(checkpoint: Path) -> Path:
    """The checkpoint with its weights as ``pytorch_model.bin`` (torch.save) instead of safetensors."""
    weights = checkpoint / "model.safetensors"
    torch.save(load_file(weights), checkpoint / "pytorch_model.bin")
    weights.unlink()
    return checkpoint / "pytorch_model.bin"


def truncated_bin(checkpoint: Path, marker: Path) -> str:
    weights = as_pytorch_bin(checkpoint)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return "pytorch_model.bin is truncated or corrupt"


def truncated_safetensors(checkpoint: Path, marker: Path) -> str:
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])
    return "model.safetensors is truncated or corrupt"


def garbage_safetensors(checkpoint: Path, marker: Path) -> str:
    (checkpoint / "model.safetensors").write_bytes(b"\x10" + bytes(7) + b"<html>not found</html>" * 50)
    return "model.safetensors is truncated or corrupt (header is not valid JSON"


def pickle_payload_in_bin(checkpoint: Path, marker: Path) -> str:
    weights = as_pytorch_bin(checkpoint)
    torch.save({**torch.load(weights, weights_only=True), "extra": Payload(marker)}, weights)
    return "pytorch_model.bin holds Python objects besides tensors"


def pickle_payload_in_modelopt_state(checkpoint: Path, marker: Path) -> str:
    torch.save({"modelopt_state_dict": [], "modelopt_version": Payload(marker)}, checkpoint / MODELOPT_STATE)
    return f"{MODELOPT_STATE} holds Python objects besides tensors"


DAMAGED = [truncated_bin, truncated_safetensors, garbage_safetensors]
CRAFTED = [pickle_payload_in_bin, pickle_payload_in_modelopt_state]
COMMANDS = {
    "evaluate": lambda checkpoint: ["technique=evaluate", f"model.path={checkpoint}"],
    "serve": lambda checkpoint: ["serve", str(checkpoint), "--port", "0"],
}


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("damage", DAMAGED + CRAFTED, ids=lambda damage: damage.__name__)
def test_a_bad_checkpoint_exits_2_naming_the_file(damage, command, tiny_checkpoint, tmp_path):
    checkpoint = Path(shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint"))
    marker = tmp_path / "payload-ran"
    expected = damage(checkpoint, marker)
    done = run_llmexp(*COMMANDS[command](checkpoint), cwd=tmp_path, env=UNSAFE, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"model.path={checkpoint}: {expected}" in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr and not marker.exists()
    assert "llmexp serve: http" not in done.stdout  # the server never announced itself
    if damage in DAMAGED:  # found by the plan: nothing was written
        assert not (tmp_path / "outputs").exists()
