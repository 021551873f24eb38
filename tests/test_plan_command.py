"""``llmexp plan``: the table, the JSON, the exit codes, in-process and as a real process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from llmexp import plan_command
from llmexp.planner import GIB

REPO = Path(__file__).resolve().parents[1]
FITS_70B_TP8 = ["model=llama3_1_70b", "hardware=a100_80g", "parallelism=tp8", "technique=evaluate",
                "precision=bf16"]


def llama_70b_checkpoint(tmp_path):
    """Llama-3.1-70B's published config.json beside a small real safetensors file."""
    directory = tmp_path / "llama-3.1-70b"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
        "rope_theta": 500000.0, "tie_word_embeddings": False,
    }))
    save_file({"placeholder": np.zeros((4,), dtype=np.float16)}, str(directory / "model.safetensors"))
    return directory


def run_module(*args):
    return subprocess.run([sys.executable, "-m", "llmexp.plan_command", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=120)


def test_default_plan_prints_a_table_and_exits_0(capsys):
    assert plan_command.main([]) == 0
    out = capsys.readouterr().out
    assert "model=tiny_llama pipeline=compress (distill)" in out  # the heaviest stage of `llmexp`'s pipeline
    assert plan_command.main(["technique=pretrain"]) == 0
    out = capsys.readouterr().out
    assert "model=tiny_llama technique=pretrain (full)" in out
    assert "1.61 M" in out  # parameters
    for row in ("weights", "gradients", "optimizer", "activations", "memory per device", "world size"):
        assert row in out
    assert "fits and runs" in out


def test_json_output_of_a_plan_that_does_not_fit(capsys):
    code = plan_command.main(["--json", "technique=pretrain", "model=llama3_1_70b", "hardware=a100_80g", "parallelism=tp8"])
    assert code == 2
    plan = json.loads(capsys.readouterr().out)
    assert plan["parameters"] == 70_553_706_496
    assert isinstance(plan["memory_per_device_bytes"], int)
    assert plan["memory_per_device_bytes"] == sum(plan["memory_breakdown"].values())
    assert plan["memory_per_device_bytes"] > 80 * GIB == plan["device_memory_bytes"]
    assert plan["world_size"] == 8 and plan["technique_memory"] == "full" and plan["feasible"] is False
    assert len(plan["problems"]) == 1 and plan["problems"][0].startswith("Memory per device")
    assert plan["config"]["parallelism"]["tp"] == 8 and plan["config"]["hardware"] == "a100_80g"


def test_json_output_of_a_plan_that_fits(capsys, tmp_path):
    code = plan_command.main(["--json", *FITS_70B_TP8, f"model.path={llama_70b_checkpoint(tmp_path)}"])
    plan = json.loads(capsys.readouterr().out)
    assert code == 0, plan["problems"]
    assert plan["problems"] == [] and plan["feasible"] is True
    assert set(plan["memory_breakdown"]) == {"weights", "kv_cache"}
    assert plan["memory_per_device_bytes"] < 20 * GIB


def test_problems_are_printed_one_per_line(capsys):
    assert plan_command.main(["technique=pretrain", "model=qwen2_5_7b", "hardware=a100_80g", "parallelism=tp8",
                              "precision=fp8"]) == 2
    out = capsys.readouterr().out
    assert "4 problem(s)" in out
    lines = [line for line in out.splitlines() if line.startswith("  - ")]
    assert len(lines) == 4
    assert lines[0].endswith("FP8 needs Ada/Hopper or newer — choose hardware=h100 or precision=bf16.")
    assert "model.num_attention_heads=28" in lines[1] and "model.num_key_value_heads=4" in lines[2]
    assert "precision=fp8 is not available for training on the torch backend" in lines[3]


def test_a_config_that_does_not_compose_is_one_message_on_stderr(capsys):
    assert plan_command.main(["model=llama_99b"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "model=llama_99b" in captured.err and "llama3_1_70b" in captured.err  # the options there are
    assert "Traceback" not in captured.err


def test_help_exits_0(capsys):
    assert plan_command.main(["--help"]) == 0
    assert "--json" in capsys.readouterr().out


def test_as_a_process_exit_codes_and_json(tmp_path):
    fits = run_module("--json", *FITS_70B_TP8, f"model.path={llama_70b_checkpoint(tmp_path)}")
    assert fits.returncode == 0, fits.stderr
    assert json.loads(fits.stdout)["parameters"] == 70_553_706_496

    too_big = run_module("model=llama3_1_70b", "hardware=a100_80g", "parallelism=tp8")
    assert too_big.returncode == 2
    assert "Memory per device is" in too_big.stdout and "hardware=a100_80g holds 80.0 GiB" in too_big.stdout

    bad_key = run_module("parallelism.tpp=2")
    assert bad_key.returncode == 2
    assert "tpp" in bad_key.stderr and "Traceback" not in bad_key.stderr


def test_a_corrupt_checkpoint_fails_the_plan(tmp_path):
    checkpoint = llama_70b_checkpoint(tmp_path)
    (checkpoint / "model.safetensors").write_bytes(b"\x00" * 4)
    result = run_module(*FITS_70B_TP8, f"model.path={checkpoint}")
    assert result.returncode == 2
    assert f"model.path={checkpoint}: model.safetensors is truncated or corrupt" in result.stdout
