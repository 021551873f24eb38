"""A run's log holds its progress, its results and the warnings about it, not libraries' notes to their developers."""

from __future__ import annotations

import pytest

from .conftest import run_llmexp

# What a run printed where nothing was wrong: Lightning's srun hint (wherever Slurm is installed) and its
# logging-interval note, transformers' bars and deprecations (some read by PEFT and ModelOpt), megatron-core's
# import-time fallbacks and ModelOpt's note about Megatron models.
NOISE = (
    "The `srun` command is available",
    "smaller than the logging interval",
    "Writing model shards",
    "Loading weights",
    "`torch_dtype` is deprecated",
    "is_gradient_checkpointing",
    "FutureWarning",
    "`use_cache=True` is incompatible with gradient checkpointing",
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "sharded_state_dict",
    "Megatron-FSDP",
    "\r",
)


def _noise(log: str):
    return [needle for needle in NOISE if needle in log]


@pytest.mark.slow
def test_a_lora_run_with_activation_checkpointing_logs_no_library_noise(tmp_path, tiny_checkpoint):
    result = run_llmexp(
        "technique=lora", f"model.path={tiny_checkpoint}", "technique.max_steps=4",
        "parallelism.activation_checkpointing=true", "evaluation.tasks=[perplexity]", "evaluation.limit=4",
        "hydra.run.dir=run", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert _noise(result.stderr) == [], result.stderr
    assert "lora: step 4/4 (100%)" in result.stderr  # its progress stays


@pytest.mark.slow
def test_a_quantize_run_logs_no_library_noise(tmp_path, tiny_checkpoint):
    result = run_llmexp(
        "technique=quantize", "technique.format=fp8", f"model.path={tiny_checkpoint}", "evaluation.tasks=[perplexity]",
        "evaluation.limit=4", "hydra.run.dir=run", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert _noise(result.stderr) == [], result.stderr
    assert "calibrate: batch" in result.stderr and (tmp_path / "run/quantize/export").is_dir()


@pytest.mark.slow
def test_a_server_with_an_adapter_starts_without_library_noise(tmp_path, tiny_checkpoint):
    import os
    import subprocess
    import sys
    import time

    trained = run_llmexp("technique=lora", f"model.path={tiny_checkpoint}", "technique.max_steps=2",
                         "pipeline=technique_only", "hydra.run.dir=run", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert trained.returncode == 0, trained.stderr[-3000:]
    log = tmp_path / "serve.log"
    with log.open("w") as stream:
        server = subprocess.Popen(
            [sys.executable, "-m", "llmexp", "serve", str(tiny_checkpoint), "--adapter", f"sql={tmp_path}/run/lora/adapter",
             "--port", "0"], stdout=stream, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while "llmexp serve: http://" not in log.read_text() and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        server.terminate()
        server.wait(timeout=30)
    text = log.read_text()
    assert "sql (adapter)" in text, text
    assert _noise(text) == [], text
