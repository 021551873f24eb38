"""Backends and whether they can run here: ``llmexp plugins`` lists them, a run on a missing one stops clearly."""

from __future__ import annotations

import importlib.util
import io

import pytest
from rich.console import Console

from llmexp.machine.backends import BACKENDS, Backend, gpu_driver_present, unavailable_reason
from llmexp.configuration.compose import compose_config
from llmexp.errors import UserError
from llmexp.cli.plugins import backends_table

from .conftest import run_llmexp


def test_a_missing_package_names_how_to_install_it():
    backend = Backend("megatron", "training", "backend=megatron", "", ("megatron_not_here.core",),
                      "pip install 'llmexp[megatron]'", needs_gpu=True)
    assert unavailable_reason(backend) == "missing megatron_not_here.core: pip install 'llmexp[megatron]'"


def test_gpu_backends_say_why_they_cannot_run_here():
    megatron = BACKENDS["megatron"]
    reason = unavailable_reason(megatron)
    if importlib.util.find_spec("megatron") is None:
        assert reason.startswith("missing megatron.core: pip install 'llmexp[megatron]'")
    elif not gpu_driver_present():
        assert reason == "needs a CUDA GPU; this machine has no NVIDIA driver"
    else:
        assert reason is None
    assert unavailable_reason(BACKENDS["torch"]) is None
    assert unavailable_reason(BACKENDS["inprocess"]) is None


def test_the_backends_table_shows_each_backend_and_its_status():
    stream = io.StringIO()
    Console(file=stream, width=400).print(backends_table())
    text = stream.getvalue()
    for name in BACKENDS:
        assert name in text
    lines = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") > 2}
    assert "available" in lines["torch"] and "unavailable" not in lines["torch"]
    if not gpu_driver_present():
        assert "unavailable: needs a CUDA GPU" in lines["megatron"] or "missing megatron.core" in lines["megatron"]


def test_megatron_refuses_at_run_time_without_a_gpu():
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from llmexp.training.megatron.train import require_megatron

    with pytest.raises(UserError) as error:
        require_megatron(compose_config(["backend=megatron", "hardware=h100"]))
    message = str(error.value)
    if importlib.util.find_spec("megatron") is None:
        assert "pip install 'llmexp[megatron]'" in message
    else:
        assert "needs a CUDA GPU and this machine has none (hardware=h100)" in message


def test_llmexp_backend_megatron_without_a_gpu_exits_2_before_any_stage(tmp_path):
    """The plan (for an H100) is fine; this machine cannot run it: one paragraph, exit 2, no stage started."""
    if gpu_driver_present():
        pytest.skip("this machine has an NVIDIA driver")
    result = run_llmexp("backend=megatron", "hardware=h100", "precision=bf16", "technique=pretrain",
                        f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "backend=megatron cannot train on this machine" in result.stderr
    assert "pip install 'llmexp[megatron]'" in result.stderr or "needs a CUDA GPU" in result.stderr
    assert not (tmp_path / "run" / "pretrain").exists() and not (tmp_path / "run" / "results.json").exists()


def test_stages_compute_on_the_hardware_they_name():
    import torch

    from llmexp.models.loading import run_device

    assert run_device(compose_config([]).hardware) == torch.device("cpu")
    if torch.cuda.is_available():
        assert run_device(compose_config(["hardware=h100"]).hardware).type == "cuda"
    else:
        with pytest.raises(UserError, match=r"hardware=h100 needs a CUDA GPU and this machine has none; for FP8"):
            run_device(compose_config(["hardware=h100"]).hardware, "; for FP8")


def test_serve_in_process_refuses_cuda_without_a_gpu_and_device_with_vllm(tiny_checkpoint):
    import torch

    from llmexp.cli.serve import main

    with pytest.raises(UserError, match="--device is an option of --backend inprocess only"):
        main([str(tiny_checkpoint), "--backend", "vllm", "--device", "cuda"])
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda: torch sees no CUDA GPU"):
            main([str(tiny_checkpoint), "--device", "cuda", "--port", "0"])


def test_a_gpu_preset_on_a_machine_without_a_gpu_stops_before_any_stage(tiny_checkpoint, tmp_path):
    if gpu_driver_present():
        pytest.skip("this machine has an NVIDIA driver")
    from llmexp.running.runner import run_experiment

    with pytest.raises(UserError, match=r"hardware=h100 is a GPU and this machine has no NVIDIA driver"):
        run_experiment(compose_config(["hardware=h100", "technique=evaluate", "technique.limit=2",
                                       f"model.path={tiny_checkpoint}"]), tmp_path / "run", multirun=False)
    assert not (tmp_path / "run" / "evaluate").exists()
