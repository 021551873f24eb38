"""Each option's keys are its own, and closed choices list their values: refused when the config is composed."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from llmexp.machine.backends import BACKENDS
from llmexp.configuration.compose import compose_config
from llmexp.errors import UserError
from llmexp.configuration.schema import BACKEND_OPTIONS, TRACKER_OPTIONS, SlurmClusterConfig, TrackerKind
from llmexp.results.tracking import TRACKERS

from .conftest import run_llmexp


@pytest.mark.parametrize("overrides, message", [
    (["backend=torch", "backend.transformer_impl=te"],
     "backend.transformer_impl is a key of backend=megatron; this run has backend=torch, which has no such key: "
     "choose backend=megatron or drop the override."),
    (["backend.sequence_parallel=true"], "backend.sequence_parallel is a key of backend=megatron;"),
    (["technique=sft", "technique.rank=4"],
     "technique.rank is a key of technique=lora; this run has technique=sft, which has no such key"),
    (["evaluation.rank=4"], "choose technique@evaluation=lora or drop the override"),
    (["pipeline.nodes.fp8.rank=4"],
     "pipeline.nodes.fp8.rank is a key of technique=lora; pipeline.nodes.fp8 is technique=quantize, which has no such "
     "key: choose technique@pipeline.nodes.fp8=lora or drop the override."),
    (["data=text", "data.path=train.jsonl"], "data.path is a key of data=jsonl, data=preference and data=word_problems; "
     "this run has "
     "data=text, which has no such key: choose data=jsonl or drop the override."),
    (["data.paths=[corpus]"], "data.paths is a key of data=text; this run has data=embedded"),
    (["tracker=mlflow", "tracker.mode=offline"], "tracker.mode is a key of tracker=wandb; this run has "
     "tracker=mlflow, which has no such key: choose tracker=wandb or drop the override."),
    (["tracker=none", "tracker.uri=http://mlflow.example:5000"], "tracker.uri is a key of tracker=mlflow; this run "
     "has tracker=none, which has no such key: choose tracker=mlflow or drop the override."),
    (["tracker.project=p"], "tracker.project is a key of tracker=wandb and tracker=mlflow; this run has tracker=none"),
    (["cluster=none", "cluster.account=my_project"], "cluster.account is a key of cluster=example and "
     "cluster=localhost; this run has cluster=none, which has no such key: choose cluster=example or drop the override."),
    (["cluster=localhost", "cluster.acount=my_project"],
     "cluster.acount is not a key of cluster=localhost; did you mean cluster.account=my_project?"),
    (["parallelism.shardin=fsdp"],
     "parallelism.shardin is not a key of parallelism; did you mean parallelism.sharding=fsdp?"),
])
def test_a_key_of_another_option_names_the_option_that_has_it(overrides, message):
    with pytest.raises(UserError) as error:
        compose_config(overrides)
    assert message in str(error.value)


@pytest.mark.parametrize("overrides, message", [
    (["parallelism.sharding=fdsp"], "parallelism.sharding=fdsp: parallelism.sharding expects one of none, fsdp "
     "(now none), got 'fdsp'; did you mean parallelism.sharding=fsdp?"),
    (["backend=megatron", "backend.transformer_impl=te"], "backend.transformer_impl expects one of auto, "
     "transformer_engine, local (now auto), got 'te'; give one of them, e.g. backend.transformer_impl=auto."),
    (["backend=megatron", "backend.fp8_recipe=x"],
     "backend.fp8_recipe expects one of delayed, tensorwise, mxfp8, blockwise (now delayed), got 'x';"),
    (["hardware.accelerator=tpu"], "hardware.accelerator expects one of gpu, cpu (now cpu), got 'tpu'; give one of "
     "them"),
    (["hardware.generation=pascal"], "expects one of cpu, volta, turing, ampere, ada, hopper, blackwell (now cpu)"),
    (["hardware.dtypes=[fp32,fp9]"], "hardware.dtypes expects a list of values from fp32, tf32, fp16, bf16, int8, fp8, "
     "fp4, mxfp8, got 'fp9' as hardware.dtypes[1]; give each item as one of them."),
    (["hardware.dtypes=[fp32,bf61]"], "got 'bf61' as hardware.dtypes[1]; did you mean bf16?"),
    (["model.architecture=gpt2"], "model.architecture expects one of llama, mistral, qwen2 (now llama), got 'gpt2';"),
    (["tracker=wandb", "tracker.mode=onlin"], "tracker.mode expects one of online, offline, disabled or null "
     "(now null), got 'onlin'; did you mean tracker.mode=online?"),
    (["precision=fp9"], "precision=fp9: precision expects one of fp32, bf16, fp16, fp8, fp4 (now fp32), got 'fp9';"),
    (["tracker.name=tensorboard"], "tracker.name expects one of none, wandb, mlflow (now none), got 'tensorboard';"),
    (["data.name=csv"], "data.name expects one of embedded, text, jsonl, preference, noisy_web, word_problems, knowledge (now embedded), got 'csv';"),
    (["backend.name=foo"], "backend.name=foo: backend.name expects one of torch, megatron (now torch), got 'foo';"),
    (["hardware.interconnect=nvlnk4"], "hardware.interconnect expects one of none, pcie3, pcie4, pcie5, nvlink2, "
     "nvlink3, nvlink4, nvlink5 (now none), got 'nvlnk4'; did you mean hardware.interconnect=nvlink4?"),
])
def test_a_value_outside_a_closed_choice_lists_the_allowed_values(overrides, message):
    with pytest.raises(UserError) as error:
        compose_config(overrides)
    assert message in str(error.value)


@pytest.mark.parametrize("overrides, message", [
    (["backend.name=megatron"], "backend.name=megatron: backend is backend=torch and has its keys, so renaming it "
     "would run megatron with torch's settings; choose the option instead (backend=megatron) and drop backend.name."),
    (["data=jsonl", "data.name=text"], "choose the option instead (data=text) and drop data.name."),
    (["tracker.name=wandb"], "choose the option instead (tracker=wandb) and drop tracker.name."),
    (["pipeline=customize", "pipeline.nodes.sft.name=lora"],
     "choose the option instead (technique@pipeline.nodes.sft=lora) and drop pipeline.nodes.sft.name."),
])
def test_a_name_that_is_not_its_option_is_refused(overrides, message):
    with pytest.raises(UserError) as error:
        compose_config(overrides)
    assert message in str(error.value)


def test_each_option_composes_with_only_its_own_keys():
    torch_backend = compose_config(["backend=torch"]).backend
    megatron = compose_config(["backend=megatron", "backend.transformer_impl=local"]).backend
    assert list(torch_backend) == ["name"]
    assert megatron.transformer_impl == "local" and f"{megatron.transformer_impl}" == "local"
    assert compose_config(["technique@evaluation=lora"]).evaluation.rank == 16  # choosing the option brings its keys
    mlflow = compose_config(["tracker=mlflow", "tracker.tags=[ci]"]).tracker
    assert list(compose_config(["tracker=none"]).tracker) == ["name", "tags"]
    assert (list(mlflow), list(mlflow.tags)) == (["name", "tags", "project", "uri"], ["ci"])
    assert set(BACKEND_OPTIONS) == {name for name, backend in BACKENDS.items() if backend.role == "training"}
    assert {kind.value for kind in TrackerKind} == set(TRACKER_OPTIONS) == set(TRACKERS)


def test_no_cluster_has_no_slurm_settings_and_every_slurm_profile_has_them():
    assert list(compose_config([]).cluster) == ["name"]
    for profile in ("localhost", "example"):
        cluster = compose_config([f"cluster={profile}"]).cluster
        assert OmegaConf.get_type(cluster) is SlurmClusterConfig and cluster.name == profile
        assert list(cluster) == ["name", "account", "qos", "time_limit_min", "setup", "hardware"]
    assert compose_config(["cluster=localhost"]).cluster.hardware.cpu.partition == "debug"
    assert compose_config(["cluster=localhost", "cluster.name=mycluster"]).cluster.name == "mycluster"  # a label


@pytest.mark.parametrize("overrides, message", [
    (["backend=torch", "backend.transformer_impl=te"], "backend.transformer_impl is a key of backend=megatron"),
    (["tracker=mlflow", "tracker.mode=offline"], "tracker.mode is a key of tracker=wandb; this run has tracker=mlflow"),
])
def test_the_command_refuses_a_leaked_key_before_writing_anything(overrides, message, tmp_path):
    result = run_llmexp(*overrides, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_plan_lists_the_choices_of_a_misspelled_value(tmp_path):
    result = run_llmexp("plan", "parallelism.sharding=fdsp", cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "parallelism.sharding expects one of none, fsdp (now none), got 'fdsp'" in result.stderr
    assert list(tmp_path.iterdir()) == []
