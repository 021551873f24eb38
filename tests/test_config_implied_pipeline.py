"""Which pipeline a command line means: naming a technique, its evaluation or a model implies pipeline=technique_then_evaluation."""

from __future__ import annotations

import pytest
import yaml

from llmexp.configuration.compose import compose_config, implied_pipeline, with_implied_pipeline

from .conftest import REPO, run_llmexp


@pytest.mark.parametrize(
    "argv, implied_by, pipeline",
    [
        ([], None, "compress"),
        (["seed=1", "hydra.run.dir=x", "hardware=h100", "data.num_people=20"], None, "compress"),
        (["model.hidden_size=256", "model.intermediate_size=768"], None, "compress"),  # the embedded model, resized
        (["technique=lora"], "technique=lora", "technique_then_evaluation"),
        (["seed=1", "technique.max_steps=5"], "technique.max_steps=5", "technique_then_evaluation"),
        (["evaluation.limit=5"], "evaluation.limit=5", "technique_then_evaluation"),
        (["technique@evaluation=benchmark"], "technique@evaluation=benchmark", "technique_then_evaluation"),
        (["hardware=a100_80g", "model=llama3_1_70b"], "model=llama3_1_70b", "technique_then_evaluation"),
        (["model=llama3_1_70b", "technique.rank=8", "technique=lora"], "technique=lora", "technique_then_evaluation"),  # the technique
        (["model=tiny_llama"], "model=tiny_llama", "technique_then_evaluation"),  # keys, not values: the same rule for every sweep job
        (["model.path=/ckpt/llama"], "model.path=/ckpt/llama", "technique_then_evaluation"),
        (["model=llama3_1_70b", "pipeline=compress"], None, "compress"),
        (["model=llama3_1_8b", "pipeline.nodes.baseline.max_steps=0"], None, "compress"),
        (["technique=sft", "pipeline=technique_only"], None, "technique_only"),
    ],
)
def test_what_a_command_line_names_decides_its_pipeline(argv, implied_by, pipeline):
    assert implied_pipeline(argv) == implied_by
    assert with_implied_pipeline(argv) == (argv if implied_by is None else [*argv, "pipeline=technique_then_evaluation"])
    assert compose_config(argv).pipeline.name == pipeline


def test_a_primary_config_of_ones_own_keeps_its_pipeline():
    """A sweep file chooses its pipeline; `model=` on its command line names the model it runs on."""
    argv = ["-m", "--config-dir", "sweeps", "--config-name", "prune_distill", "model=llama3_1_8b"]
    assert implied_pipeline(argv) is None and with_implied_pipeline(argv) == argv
    assert implied_pipeline(["model=llama3_1_8b"], config_name="prune_distill") is None
    assert compose_config(["model=llama3_1_8b"], "prune_distill", str(REPO / "sweeps")).pipeline.name == "prune_distill"


def composed(*argv, cwd):
    result = run_llmexp("--cfg", "job", *argv, cwd=cwd, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return yaml.safe_load(result.stdout)


def test_the_command_runs_the_pipeline_its_overrides_imply(tmp_path):
    assert composed("model=llama3_1_8b", cwd=tmp_path)["pipeline"]["name"] == "technique_then_evaluation"
    assert composed("model=llama3_1_8b", "pipeline=compress", cwd=tmp_path)["pipeline"]["name"] == "compress"
    sweep_file = composed("--config-dir", str(REPO / "sweeps"), "--config-name", "prune_distill", "model=llama3_1_8b",
                          cwd=tmp_path)
    assert sweep_file["pipeline"]["name"] == "prune_distill" and sweep_file["model"]["name"] == "llama3_1_8b"
    assert list(tmp_path.iterdir()) == []
