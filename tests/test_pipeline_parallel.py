"""Pipeline parallelism on the torch backend (torch.distributed.pipelining): real gloo ranks on CPU, checked
against one process, as tests/test_distributed.py checks dp2/fsdp2/tp2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import read_results, run_llmexp
from .test_distributed import COMMAND, losses, metrics
from .test_planner import only, plan_of

LAYOUTS = {"pp2": ["parallelism=pp2"], "pp2_gpipe": ["parallelism=pp2", "parallelism.pipeline_schedule=gpipe"],
           "pp2_dp2": ["parallelism=pp2_dp2"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The command of tests/test_distributed.py (pretrain, 6 steps of 16 blocks) on one process and each layout."""
    cwd = tmp_path_factory.mktemp("pipeline")
    for name, overrides in {"single": ["parallelism=single"], **LAYOUTS}.items():
        result = run_llmexp(*COMMAND, *overrides, f"hydra.run.dir={name}", cwd=cwd)
        assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"
    return cwd


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pipeline_stages_train_as_one_process_does(runs, layout):
    single, parallel = runs / "single", runs / layout
    expected = losses(single)
    assert expected[-1] < expected[0] - 0.5  # it learned: the comparison is of a moving loss
    assert losses(parallel) == pytest.approx(expected, abs=1e-4)
    figures = metrics(parallel)
    assert figures["train_tokens"] == metrics(single)["train_tokens"] == 6 * 16 * 32
    weights, reference = (load_file(run / "pretrain/model/model.safetensors") for run in (parallel, single))
    assert weights.keys() == reference.keys()
    assert max((weights[name] - reference[name]).abs().max().item() for name in reference) < 1e-3
    dp = 2 if layout == "pp2_dp2" else 1
    assert figures["pipeline_stages"] == [{"stage": 0, "layers": [0, 0], "ranks": [2 * d for d in range(dp)]},
                                          {"stage": 1, "layers": [1, 1], "ranks": [2 * d + 1 for d in range(dp)]}]
    assert len(figures["peak_memory_mb_per_rank"]) == 2 * dp and min(figures["peak_memory_mb_per_rank"]) > 0
    assert sorted(p.name for p in (parallel / "pretrain/checkpoints").iterdir()) == [
        "step-00000003.ckpt", "step-00000006.ckpt"]


@pytest.mark.slow
def test_a_checkpoint_holds_the_full_model_and_loads_into_a_plain_hf_model(runs):
    from transformers import AutoModelForCausalLM

    saved = runs / "pp2/pretrain/model"
    checkpoint = torch.load(runs / "pp2/pretrain/checkpoints/step-00000006.ckpt", weights_only=True)
    state = {key.removeprefix("model."): value for key, value in checkpoint["state_dict"].items()}
    plain = AutoModelForCausalLM.from_pretrained(saved)
    reference = {key: value.clone() for key, value in plain.state_dict().items()}
    plain.load_state_dict(state)  # strict: every layer of both stages is there
    assert all(torch.equal(plain.state_dict()[key], reference[key]) for key in reference)  # the final model's weights
    assert len(checkpoint["optimizer_states"][0]["ranks"]) == 2  # each stage's optimiser state, for the resume


def _killed_after_first_checkpoint(command, run_dir: Path, cwd: Path) -> None:
    """Start ``llmexp`` and SIGKILL it (all its ranks) as soon as its first checkpoint is written."""
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "llmexp", *command, f"hydra.run.dir={run_dir}"], cwd=cwd,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoints = run_dir / "pretrain/checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints.is_dir() and any(checkpoints.glob("step-*.ckpt"))):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_a_killed_pipeline_run_resumes_to_the_uninterrupted_runs_loss(tmp_path):
    command = [*COMMAND, "parallelism=pp2", "technique.max_steps=30", "technique.checkpoint_every=3"]
    clean = run_llmexp(*command, "hydra.run.dir=clean", cwd=tmp_path)
    assert clean.returncode == 0, clean.stderr[-3000:]
    run_dir = tmp_path / "killed"
    _killed_after_first_checkpoint(command, run_dir, tmp_path)
    assert not (run_dir / "results.json").exists() or read_results(run_dir)["status"] != "completed"

    resumed = run_llmexp(*command, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after, uninterrupted = metrics(run_dir), metrics(tmp_path / "clean")
    assert 3 <= after["resumed_from_step"] < 30 and after["steps"] == 30
    assert after["final_loss"] == pytest.approx(uninterrupted["final_loss"], abs=1e-5)
    assert after["train_tokens"] == uninterrupted["train_tokens"]
    assert losses(run_dir) == pytest.approx(losses(tmp_path / "clean"), abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("technique", ["sft", "lora"])
def test_fine_tuning_through_pipeline_stages_matches_one_process(tmp_path, tiny_checkpoint, technique):
    """Padded micro-batches of different lengths, an attention mask, labels, validation through the stages."""
    command = [f"technique={technique}", "pipeline=technique_only", f"model.path={tiny_checkpoint}",
               "data.seq_len=32", "technique.max_steps=4", "technique.log_every=1", "technique.warmup_steps=2",
               "technique.checkpoint_every=0", "technique.val_every=2", "parallelism.micro_batch=8"]
    for layout in ("single", "pp2"):
        result = run_llmexp(*command, f"parallelism={layout}", f"hydra.run.dir={layout}", cwd=tmp_path)
        assert result.returncode == 0, f"{layout}: {result.stderr[-3000:]}"
    rows = {layout: [json.loads(line) for line in (tmp_path / layout / technique / "train_log.jsonl").open()]
            for layout in ("single", "pp2")}
    assert [sorted(row) for row in rows["pp2"]] == [sorted(row) for row in rows["single"]]
    for row, expected in zip(rows["pp2"], rows["single"]):
        assert row == pytest.approx(expected, abs=1e-4)
    validations = [row["val_loss"] for row in rows["pp2"] if "val_loss" in row]
    assert len(validations) == 2 and validations[1] < validations[0]  # validated after steps 2 and 4; it learned


@pytest.mark.parametrize("overrides, names", [
    (["technique=dpo", "parallelism=pp2"], ["technique=dpo does not train through pipeline stages",
                                            "set parallelism.pp=1"]),
    (["technique=distill", "technique.teacher.path=/nowhere", "technique.hidden_weight=0.5", "parallelism=pp2"],
     ["technique.hidden_weight=0.5", "set technique.hidden_weight=0"]),
    (["parallelism=pp2", "parallelism.global_batch=8"], ["needs at least 2 micro-batches", "parallelism.global_batch"]),
    (["parallelism=pp2", "technique.compile=true"], ["does not compile pipeline stages", "technique.compile=false"]),
    (["parallelism=pp2", "parallelism.sharding=fsdp"], ["parallelism.sharding=none"]),
    (["parallelism=pp2", "hardware=h100", "precision=fp16"], ["precision=fp16 with parallelism.pp=2", "bf16"]),
    (["parallelism=pp2", "parallelism.pipeline_schedule=zb"], ["parallelism.pipeline_schedule=zb", "gpipe or 1f1b"]),
])
def test_what_pipeline_stages_cannot_train_is_refused_at_plan_time(overrides, names):
    problems = [problem for problem in plan_of(*overrides).problems if all(name in problem for name in names)]
    assert len(problems) == 1, plan_of(*overrides).problems


def test_pipeline_layouts_plan_without_problems():
    for layout in ("pp2", "pp2_dp2"):
        assert plan_of(f"parallelism={layout}").problems == []
    only(plan_of("parallelism=pp2", "parallelism.tp=2", "parallelism.devices_per_node=4").problems,
         "parallelism.tp=1 (pp x dp)")
