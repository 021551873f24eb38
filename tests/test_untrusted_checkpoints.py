"""Untrusted checkpoints and adapters through the real commands: they never run code and never crash.

Each bad checkpoint is a copy of the tiny one with one file broken or replaced, given to
``llmexp technique=evaluate model.path=...`` and to ``llmexp serve``; both must end with exit
code 2 and a paragraph naming the file. A damaged file is found by the plan, before a run
directory exists, and by ``llmexp serve`` before it binds its port. A crafted pickle, whose
unpickling would create a file, is loaded with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` set
(ModelOpt's documentation suggests it): the file must not appear. LoRA adapters given to
``llmexp serve --adapter`` are damaged and crafted the same ways.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmexp.models.checkpoint import MODELOPT_STATE
from tests.conftest import run_llmexp

UNSAFE = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}


class Payload:
    """Unpickling this creates ``path``: what a crafted checkpoint would do instead (run code)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


MODEL_FILES = ("model.safetensors", "pytorch_model.bin")  # a checkpoint's weights: safetensors, or pickled
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # a PEFT adapter's


def as_pickled(directory: Path, files) -> Path:
    """The weights of ``directory`` pickled by torch.save, as older releases saved them, instead of safetensors."""
    safetensors, pickled = (directory / name for name in files)
    torch.save(load_file(safetensors), pickled)
    safetensors.unlink()
    return pickled


def truncated_bin(directory: Path, files, marker: Path) -> str:
    weights = as_pickled(directory, files)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return f"{weights.name} is truncated or corrupt"


def truncated_safetensors(directory: Path, files, marker: Path) -> str:
    weights = directory / files[0]
    weights.write_bytes(weights.read_bytes()[:-1000])
    return f"{weights.name} is truncated or corrupt"


def garbage_safetensors(directory: Path, files, marker: Path) -> str:
    (directory / files[0]).write_bytes(b"\x10" + bytes(7) + b"<html>not found</html>" * 50)
    return f"{files[0]} is truncated or corrupt (header is not valid JSON"


def pickle_payload_in_bin(directory: Path, files, marker: Path) -> str:
    weights = as_pickled(directory, files)
    torch.save({**torch.load(weights, weights_only=True), "extra": Payload(marker)}, weights)
    return f"{weights.name} holds Python objects besides tensors"


def pickle_payload_in_modelopt_state(directory: Path, files, marker: Path) -> str:
    torch.save({"modelopt_state_dict": [], "modelopt_version": Payload(marker)}, directory / MODELOPT_STATE)
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
    expected = damage(checkpoint, MODEL_FILES, marker)
    done = run_llmexp(*COMMANDS[command](checkpoint), cwd=tmp_path, env=UNSAFE, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"model.path={checkpoint}: {expected}" in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr and not marker.exists()
    assert "llmexp serve: http" not in done.stdout  # the server never announced itself
    if damage in DAMAGED:  # found by the plan: nothing was written
        assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGED, ids=lambda damage: damage.__name__)
def test_serve_reports_a_damaged_checkpoint_before_binding_its_port(damage, tiny_checkpoint, tmp_path):
    checkpoint = Path(shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint"))
    expected = damage(checkpoint, MODEL_FILES, tmp_path / "unused")
    with socket.socket() as busy:  # the port is taken: the checkpoint must be reported all the same
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        done = run_llmexp("serve", str(checkpoint), "--port", str(busy.getsockname()[1]), cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"model.path={checkpoint}: {expected}" in " ".join(done.stderr.split())
    assert "cannot listen" not in done.stderr and "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def lora_adapter(tiny_checkpoint, tmp_path_factory) -> Path:
    from tests.test_serving_engine import save_lora_adapter

    return save_lora_adapter(tiny_checkpoint, tmp_path_factory.mktemp("adapter") / "adapter", seed=1)


def adapter_config_nested_too_deeply(adapter: Path, files, marker: Path) -> str:
    (adapter / "adapter_config.json").write_text('{"r": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return "adapter_config.json could not be parsed (nested too deeply to parse)"


def adapter_of_another_shape(adapter: Path, files, marker: Path) -> str:
    """Whole, loadable files whose tensors do not fit the base: refused when loaded, naming the file."""
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({name: torch.zeros(3, 5) for name in tensors}, weights)
    return "adapter_model.safetensors could not be loaded onto the base model"


DAMAGED_ADAPTERS = [truncated_bin, truncated_safetensors, garbage_safetensors, adapter_config_nested_too_deeply]


@pytest.mark.slow
@pytest.mark.parametrize("given", ["--adapter", "MODEL_DIR"])
@pytest.mark.parametrize("damage", DAMAGED_ADAPTERS + [pickle_payload_in_bin, adapter_of_another_shape],
                         ids=lambda damage: damage.__name__)
def test_a_bad_adapter_exits_2_naming_the_file_and_a_damaged_one_before_binding(damage, given, tiny_checkpoint,
                                                                                lora_adapter, tmp_path):
    adapter = Path(shutil.copytree(lora_adapter, tmp_path / "adapter"))
    marker = tmp_path / "payload-ran"
    expected = damage(adapter, ADAPTER_FILES, marker)
    served = [str(tiny_checkpoint), "--adapter", f"lora={adapter}"] if given == "--adapter" else [str(adapter)]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        # a damaged file is found before the port is bound (so a busy one is not what is reported); what only
        # loading finds, once the port is bound (a free one, then)
        port = busy.getsockname()[1] if damage in DAMAGED_ADAPTERS else 0
        done = run_llmexp("serve", *served, "--port", str(port), cwd=tmp_path, env=UNSAFE, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    label = f"--adapter lora={adapter}" if given == "--adapter" else f"MODEL_DIR={adapter}"
    assert f"{label}: {expected}" in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr and not marker.exists()
    assert "llmexp serve: http" not in done.stdout
