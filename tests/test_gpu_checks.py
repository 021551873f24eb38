"""benchmarks/gpu_checks.py: its arithmetic, its report, and the script end to end at toy scale on the CPU."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmexp.architecture import training_flops_per_token

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_checks.py"

spec = importlib.util.spec_from_file_location("gpu_checks", SCRIPT)
gpu_checks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_checks)

TINY_CONFIG = {  # what results.json records of tiny_llama at the embedded default's seq_len
    "model": {"vocab_size": 256, "hidden_size": 128, "intermediate_size": 384, "num_layers": 8,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
              "tie_word_embeddings": True},
    "data": {"seq_len": 64},
}


def test_flops_per_token_of_tiny_llama_by_hand():
    # matmul weights per layer: q 128*128 + k, v 128*64 each + o 128*128 + gate, up, down 128*384 each = 196,608;
    # 8 layers + the LM head 256*128 (tied to the embeddings, but a matmul all the same) = 1,605,632; 6N = 9,633,792
    # 12*L*H*Q*T = 12*8*4*32*64 = 786,432
    assert training_flops_per_token(TINY_CONFIG["model"], 64) == 10_420_224
    assert gpu_checks.model_flops_per_token(TINY_CONFIG) == 10_420_224


def test_untied_head_counts_once_and_head_dim_defaults_to_hidden_over_heads():
    config = {"model": {**TINY_CONFIG["model"], "tie_word_embeddings": False, "head_dim": None},
              "data": {"seq_len": 64}}
    assert gpu_checks.model_flops_per_token(config) == 10_420_224


def test_mfu_is_achieved_over_peak_flops():
    # 10,000 tokens/s at 1e9 FLOPs per token on a 1e14 FLOP/s device: 10%
    assert gpu_checks.mfu(10_000, 1e9, 1e14) == pytest.approx(0.1)


def test_loss_curves_compared_at_the_steps_both_logged():
    torch_log = [{"step": 10, "loss": 5.0}, {"step": 20, "loss": 4.0}, {"step": 20, "val_loss": 9.0},
                 {"step": 30, "loss": 3.5}]
    megatron_log = [{"step": 10, "loss": 5.01}, {"step": 20, "loss": 4.25}, {"step": 30, "loss": 3.45},
                    {"step": 35, "loss": 3.0}]
    c = gpu_checks.compare_loss_curves(torch_log, megatron_log)
    assert c["steps_compared"] == 3
    assert c["max_abs_diff"] == pytest.approx(0.25)
    assert c["max_abs_diff_step"] == 20
    assert c["last_step"] == 30
    assert c["last_abs_diff"] == pytest.approx(0.05)


def test_loss_curves_without_a_common_step_compare_nothing():
    c = gpu_checks.compare_loss_curves([{"step": 10, "loss": 1.0}], [{"step": 20, "loss": 1.0}])
    assert c["steps_compared"] == 0 and c["max_abs_diff"] is None and c["last_abs_diff"] is None


def test_device_names_become_file_name_parts():
    assert gpu_checks.slug("NVIDIA H200") == "nvidia-h200"
    assert gpu_checks.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_report_is_written_whole_and_replaced_atomically(tmp_path):
    path = tmp_path / "results" / "gpu_checks-x.json"
    gpu_checks.write_report(path, {"parts": {"peak": {"tflops": 700.5}}})
    gpu_checks.write_report(path, {"parts": {"peak": {"tflops": 701.0}}})
    data = json.loads(path.read_text())
    assert data["parts"]["peak"]["tflops"] == 701.0
    assert data["updated_at"].endswith("+00:00")
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left beside it


def test_a_failing_part_is_recorded_and_the_next_part_still_runs(tmp_path):
    args = argparse.Namespace(cpu_smoke=True, gpu_preset="h200", steps=2, budget_s=60.0)
    checks = gpu_checks.Checks(args, tmp_path / "report.json", tmp_path / "runs", {"name": "test"})

    def broken(entry):
        raise RuntimeError("no megatron here")

    checks.part("train", broken)
    checks.part("peak", lambda entry: entry.update(tflops=1.0))
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["parts"]["train"]["status"] == "failed"
    assert saved["parts"]["train"]["error"] == "RuntimeError: no megatron here"
    assert saved["parts"]["peak"] == {"status": "ok", "tflops": 1.0, "wall_s": saved["parts"]["peak"]["wall_s"]}
    assert saved["failures"] == ["train"]


def run_script(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out),
                           "--work-dir", str(tmp_path / "runs"), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    return done, json.loads(out.read_text())


def test_a_spent_budget_skips_commands_and_says_so(tmp_path):
    done, report = run_script(tmp_path, "--parts", "train", "--budget-s", "0")
    assert done.returncode == 1
    run = report["parts"]["train"]["runs"]["tiny/torch"]
    assert run["status"] == "skipped" and "time budget" in run["error"]
    assert report["failures"] == ["train"]


def test_a_failing_command_keeps_its_error_and_the_parts_after_it_say_why_they_could_not_run(tmp_path):
    done, report = run_script(tmp_path, "--parts", "train,serve", "--steps", "-1")
    assert done.returncode == 1
    run = report["parts"]["train"]["runs"]["tiny/torch"]
    assert run["returncode"] == 2
    assert run["error"] == "exit code 2: error: technique.max_steps=-1 must be at least 0; set it to 0 or more."
    assert report["parts"]["serve"]["error"].startswith("RuntimeError: the torch tiny training made no model")
    assert report["failures"] == ["train", "serve"]
    assert "train tiny/torch: exit code 2: error: technique.max_steps=-1" in done.stdout


def test_summary_table_shows_missing_figures_as_dashes():
    report = {
        "mode": "gpu", "device": {"name": "NVIDIA H200", "torch": "2.9.0", "cuda": "12.8"}, "hardware_preset": "h200",
        "parts": {
            "peak": {"status": "ok", "tflops": 745.3},
            "train": {"status": "failed", "runs": {
                "tiny/torch": {"status": "ok", "metrics": {"tokens_per_s": 90000.0, "final_loss": 2.1}, "mfu": 0.0123,
                               "gpu": {"memory_used_mib_max": 3000.0}, "wall_s": 30.0},
                "1b/megatron": {"status": "skipped", "error": "time budget spent (--budget-s 450)", "metrics": {}}},
                "comparisons": {}},
            "formats": {"status": "failed", "runs": {"formats": {
                "status": "failed", "error": "exit code 1: RuntimeError: nvcc not found",
                "baseline": {"perplexity": 3.2},
                "formats": {"mxfp8": {"status": "not run", "simulated_on": "NVIDIA H200", **dict.fromkeys(
                    ("flip_rate_multiple_choice", "flip_rate_word_problems", "kl_to_baseline", "perplexity",
                     "perplexity_rel_delta"))}}}}},
        },
        "failures": ["train", "formats"],
    }
    lines = gpu_checks.summary_table(report).splitlines()
    assert "peak bf16 matmul (n=8192): 745.3 TFLOP/s  [ok]" in lines
    assert next(l for l in lines if l.startswith("tiny/torch")).split() == \
        ["tiny/torch", "ok", "90000", "1.2%", "2.1000", "3000", "30"]
    assert next(l for l in lines if l.startswith("1b/megatron")).split() == ["1b/megatron", "skipped"] + ["-"] * 5
    assert next(l for l in lines if l.startswith("mxfp8")).split() == ["mxfp8", "not", "run"] + ["-"] * 5 + \
        ["NVIDIA", "H200"]
    assert "  formats formats: exit code 1: RuntimeError: nvcc not found" in lines


def test_cpu_smoke_trains_through_the_cli_and_reports_its_curve(tmp_path):
    done, report = run_script(tmp_path, "--parts", "train", "--steps", "4")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = report["parts"]["train"]["runs"]["tiny/torch"]
    assert run["status"] == "ok" and run["run_status"] == "completed"
    assert [row["step"] for row in run["loss_curve"]] == [1, 2, 3, 4]  # log_every = steps // 3 = 1
    assert run["metrics"]["steps"] == 4 and run["metrics"]["tokens_per_s"] > 0
    assert run["flops_per_token"] == 10_420_224 and run["mfu"] is None  # no peak measured on a CPU
    assert "hardware=cpu" in run["command"] and "backend=torch" in run["command"]
    assert "tiny/torch         ok" in done.stdout


@pytest.mark.slow
def test_cpu_smoke_end_to_end(tmp_path):
    """~40 s on 2 cores: training, serving and the fp8 half of pipeline=gpu_formats."""
    done, report = run_script(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    fp8 = report["parts"]["formats"]["runs"]["formats"]["formats"]["fp8"]
    assert fp8["status"] == "completed" and fp8["simulated_on"] == "CPU"
    assert 0 <= fp8["flip_rate_multiple_choice"] <= 1 and fp8["kl_to_baseline"] >= 0
    points = report["parts"]["serve"]["runs"]["serve"]["points"]
    assert set(points) == {"1", "4"} and all(p["valid"] == 1 and p["output_tokens_per_s"] > 0 for p in points.values())
    assert report["failures"] == []
