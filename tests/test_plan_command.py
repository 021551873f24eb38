"""``llmexp plan``: the table, the JSON, the exit codes, in-process and as a real process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from llmexp.cli import plan as plan_command
from llmexp.planning.hardware import GIB

from .conftest import run_llmexp

REPO = Path(__file__).resolve().parents[1]
FITS_70B_TP8 = ["model=llama3_1_70b", "hardware=a100_80g", "parallelism=tp8", "technique=evaluate",
                "precision=bf16"]
# The README's example: no technique or pipeline named, so model= implies the default technique and its evaluation.
README_70B = ["model=llama3_1_70b", "hardware=a100_80g", "parallelism=tp8", "precision=bf16"]
README_70B_PLANNED = ("planned: technique=pretrain then evaluate (pipeline=technique_then_evaluation, implied by model=llama3_1_70b; "
                      "name pipeline=compress for the whole workflow)")
# 2 + 2 + 12 bytes per parameter of 70.55 B is 1051.3 GiB: more than eight 80 GiB devices hold, whatever the layout.
README_70B_REFUSAL = (
    "Memory per device is 132.4 GiB (weights 16.4, gradients 16.4, optimizer 98.6, activations 1.0) but "
    "hardware=a100_80g holds 80.0 GiB, 52.4 GiB short: the weights, gradients and optimizer states alone come to "
    "1051.3 GiB, more than its 8 devices hold together (640.0 GiB); spread them over more devices (e.g. "
    "parallelism.nodes=2 parallelism.dp=2 parallelism.sharding=fsdp), train fewer parameters (technique=lora) or "
    "choose a GPU with more memory (hardware=h200, b200)."
)


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
    return subprocess.run([sys.executable, "-m", "llmexp.cli.plan", *args], capture_output=True,
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


def test_the_readme_example_plans_the_technique_a_named_model_implies_and_says_so():
    """Not the embedded default's compress pipeline (whose FP8 nodes an A100 cannot run): pretraining 70B, then
    its evaluation, refused for the reason that holds: its states do not fit eight A100s."""
    result = run_module(*README_70B)
    assert result.returncode == 2, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == README_70B_PLANNED
    problems = [line[4:] for line in lines if line.startswith("  - ")]
    assert README_70B_REFUSAL in problems
    assert not any("fp8" in problem or "pipeline.nodes" in problem for problem in problems), problems
    assert any(line.startswith("⚠ data.seq_len=64 (data=embedded) is far shorter than the 8192 tokens "
                               "model=llama3_1_70b is trained at") for line in lines)
    assert any(line.startswith("│   at 8192 tokens ") for line in lines)


def test_the_json_plan_says_which_job_and_why(capsys):
    assert plan_command.main(["--json", *README_70B]) == 2
    plan = json.loads(capsys.readouterr().out)
    assert plan["planned"] == README_70B_PLANNED
    assert plan["config"]["pipeline"] == "technique_then_evaluation" and plan["config"]["technique"] == "pretrain"
    assert plan["config"]["pipeline_implied_by"] == "model=llama3_1_70b"
    assert README_70B_REFUSAL in plan["problems"]
    longer = plan["at_train_seq_len"]
    assert longer["seq_len"] == 8192 and longer["fits"] is False
    assert longer["memory_breakdown"]["activations"] == pytest.approx(
        128 * plan["memory_breakdown"]["activations"], abs=128)
    assert len(plan["warnings"]) == 1 and "data.seq_len=8192 for the model's" in plan["warnings"][0]

    assert plan_command.main(["--json"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert default["planned"].startswith("planned: pipeline=compress, 14 stages: baseline → baseline_eval → fp8")
    assert default["planned"].endswith("(llmexp's default: its whole workflow, built for the embedded model)")
    assert default["config"]["pipeline_implied_by"] is None
    assert default["warnings"] == [] and default["at_train_seq_len"] is None

    assert plan_command.main(["--json", *README_70B, "pipeline=customize"]) == 2  # naming a pipeline wins
    named = json.loads(capsys.readouterr().out)
    assert named["planned"].startswith("planned: pipeline=customize, 7 stages: base → zero_shot")
    assert named["planned"].endswith("(pipeline=customize, as named)")


def test_the_70b_example_spread_over_two_nodes_at_the_models_length_plans_clean(capsys, tmp_path):
    checkpoint = f"model.path={llama_70b_checkpoint(tmp_path)}"
    spread = ["parallelism.nodes=2", "parallelism.dp=2", "parallelism.sharding=fsdp", "data.seq_len=8192",
              "parallelism.activation_checkpointing=true"]
    code = plan_command.main([*README_70B, checkpoint, *spread])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.splitlines()[0] == README_70B_PLANNED
    assert "4 × 8192 tokens (global 16)" in out and "74.63 GiB of 80.00 GiB (93%)" in out
    assert "⚠" not in out and "fits and runs" in out


def test_the_run_refuses_the_readme_example_as_its_plan_does_before_writing_anything(tmp_path):
    result = run_llmexp(*README_70B, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert README_70B_REFUSAL in " ".join(result.stderr.split())
    assert "fp8" not in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []
