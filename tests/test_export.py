"""technique=export: the HF checkpoint each input gives, TensorRT-LLM build settings per quantize format, plan checks.

The engine build itself needs TensorRT-LLM and a GPU, neither of which this suite has: what is
tested is everything up to it (the settings the LLM API is called with) and the refusals.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from llmexp.configuration.compose import compose_config
from llmexp.errors import UserError
from llmexp.planning.planner import make_plan
from llmexp.plugins.export import ExportConfig
from llmexp.plugins.export.engine_settings import QUANTIZE_FORMAT_ALGOS, checkpoint_quantization, engine_build_settings
from llmexp.plugins.quantize.formats import FORMATS
from tests.conftest import REPO

MODELOPT = {"name": "modelopt", "version": "0.47.0"}
EXCLUDED = ["lm_head", "model.embed_tokens"]


def run(run_dir: Path, *overrides: str):
    """One run in this process, as ``llmexp <overrides>`` runs it; its results.json as a dict."""
    from llmexp.running.runner import run_experiment

    return run_experiment(compose_config(list(overrides)), run_dir, multirun=False).to_dict()


def node(**values):
    return OmegaConf.structured(ExportConfig(**values))


def checkpoint_dir(tmp_path: Path, quantization=None, inline=None, max_positions=256, name="ckpt") -> Path:
    """A checkpoint directory holding what the settings read: config.json and, when given, hf_quant_config.json
    in ModelOpt 0.47's layout (the weights are not read, so there are none)."""
    directory = tmp_path / name
    directory.mkdir()
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "max_position_embeddings": max_positions}
    if inline is not None:
        config["quantization_config"] = inline
    (directory / "config.json").write_text(json.dumps(config))
    if quantization is not None:
        written = {"producer": MODELOPT, "quantization": quantization}
        (directory / "hf_quant_config.json").write_text(json.dumps(written))
    return directory


def awq(algo: str, group_size: int) -> dict:
    return {"quant_algo": algo, "kv_cache_quant_algo": None, "group_size": group_size, "has_zero_point": False,
            "pre_quant_scale": True, "exclude_modules": EXCLUDED}


REFUSED = "no TensorRT-LLM engine"
# Each quantize format: the hf_quant_config.json ModelOpt 0.47's export_hf_checkpoint writes for it (as the
# quantize stage's export on the tiny model gave them; nvfp4 and mxfp8, CUDA only, as
# modelopt/torch/export/quant_utils.py writes them), and the TensorRT-LLM QuantAlgo names, group size and
# hardware dtypes the build must use, or REFUSED where TensorRT-LLM's engine builder has no QuantAlgo for it.
BY_FORMAT = {
    "fp8": ({"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": EXCLUDED},
            "FP8", None, None, ["fp8"]),
    "int8_sq": ({"quant_algo": "W8A8_SQ_PER_CHANNEL", "kv_cache_quant_algo": None, "exclude_modules": EXCLUDED},
                "W8A8_SQ_PER_CHANNEL", None, None, ["int8"]),
    "int8_wo": ({"quant_algo": "W8A16", "kv_cache_quant_algo": None, "exclude_modules": EXCLUDED},
                "W8A16", None, None, ["int8"]),
    "int4_awq": (awq("W4A16_AWQ", 128), "W4A16_AWQ", None, 128, ["int8"]),
    "int4_rtn": (awq("W4A16_AWQ", 64), "W4A16_AWQ", None, 64, ["int8"]),
    "w4a8_awq": (awq("W4A8_AWQ", 128), "W4A8_AWQ", None, 128, ["fp8"]),
    "nvfp4": ({"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16, "exclude_modules": EXCLUDED},
              "NVFP4", None, 16, ["fp4"]),
    "mxfp8": ({"quant_algo": "MXFP8", "kv_cache_quant_algo": None, "group_size": 32, "exclude_modules": EXCLUDED},
              REFUSED, None, None, None),
    "fp8_kv": ({"quant_algo": None, "kv_cache_quant_algo": "FP8", "quantized_layers": {}}, None, "FP8", None, ["fp8"]),
}


def test_the_tables_cover_every_quantize_format():
    assert set(BY_FORMAT) == set(FORMATS) == set(QUANTIZE_FORMAT_ALGOS)
    assert {fmt: written["quant_algo"] for fmt, (written, *_) in BY_FORMAT.items()} == QUANTIZE_FORMAT_ALGOS


@pytest.mark.parametrize("fmt", sorted(BY_FORMAT))
def test_each_quantize_format_builds_with_its_tensorrt_llm_algorithm(fmt, tmp_path):
    written, quant_algo, kv_algo, group_size, dtypes = BY_FORMAT[fmt]
    config = compose_config(["hardware=b200", "parallelism=tp2"])  # B200 runs every format
    checkpoint = checkpoint_dir(tmp_path, quantization=written)
    if quant_algo == REFUSED:
        with pytest.raises(UserError, match=rf"quant_algo={written['quant_algo']}, which is not one TensorRT-LLM's "
                                            r"engine builder takes .*vLLM"):
            engine_build_settings(config, node(format="trtllm"), checkpoint)
        return
    settings = engine_build_settings(config, node(format="trtllm"), checkpoint)
    quantization = settings["quantization"]
    assert (quantization["quant_algo"], quantization["kv_cache_quant_algo"]) == (quant_algo, kv_algo)
    assert quantization.get("group_size") == group_size
    assert quantization["hardware_dtypes"] == dtypes
    assert settings["tensor_parallel_size"] == 2 and settings["pipeline_parallel_size"] == 1


def test_an_unquantized_checkpoint_takes_the_limits_from_the_node_and_the_model(tmp_path):
    config = compose_config(["hardware=h100", "parallelism=tp4_pp4_dp4"])
    ckpt = checkpoint_dir(tmp_path)
    settings = engine_build_settings(config, node(format="trtllm"), ckpt)
    assert settings == {
        "tensor_parallel_size": 4, "pipeline_parallel_size": 4, "quantization": None,
        # max_seq_len: the model's 256 positions; a prompt may fill them; 8 sequences x 256 tokens < 8192
        "build_config": {"max_batch_size": 8, "max_input_len": 256, "max_seq_len": 256, "max_num_tokens": 2048,
                         "max_beam_width": 1},
    }
    given = node(format="trtllm", max_batch_size=64, max_input_len=100, max_seq_len=200, max_num_tokens=4096)
    assert engine_build_settings(config, given, ckpt)["build_config"] == {
        "max_batch_size": 64, "max_input_len": 100, "max_seq_len": 200, "max_num_tokens": 4096, "max_beam_width": 1}
    assert engine_build_settings(config, node(format="trtllm", max_batch_size=64), ckpt)["build_config"][
        "max_num_tokens"] == 8192  # TensorRT-LLM's default, below 64 x 256


def test_config_json_quantization_is_read_when_there_is_no_hf_quant_config(tmp_path):
    # newer ModelOpt exports describe themselves in config.json too (these are 0.47's for int4_awq and fp8_kv)
    awq_inline = {"ignore": EXCLUDED, "quant_algo": "W4A16_AWQ", "producer": MODELOPT, "quant_method": "modelopt"}
    quantization = checkpoint_quantization(checkpoint_dir(tmp_path, inline=awq_inline, name="awq"))
    assert quantization["quant_algo"] == "W4A16_AWQ" and quantization["exclude_modules"] == EXCLUDED
    kv_inline = {"ignore": [], "kv_cache_scheme": {"dynamic": False, "num_bits": 8, "type": "float"},
                 "producer": MODELOPT, "quant_method": "modelopt"}
    quantization = checkpoint_quantization(checkpoint_dir(tmp_path, inline=kv_inline, name="kv"))
    assert (quantization["quant_algo"], quantization["kv_cache_quant_algo"]) == (None, "FP8")


def test_what_cannot_build_is_refused_naming_the_field(tmp_path):
    h100 = compose_config(["hardware=h100"])
    gptq = checkpoint_dir(tmp_path, inline={"quant_method": "gptq", "bits": 4}, name="gptq")
    with pytest.raises(UserError, match="quant_method='gptq'.*ModelOpt's unified export only"):
        engine_build_settings(h100, node(format="trtllm"), gptq)
    int3 = checkpoint_dir(tmp_path, quantization={"quant_algo": "INT3", "kv_cache_quant_algo": None}, name="int3")
    with pytest.raises(UserError, match="quant_algo=INT3, which is not one TensorRT-LLM's engine builder takes"):
        engine_build_settings(h100, node(format="trtllm"), int3)
    fp8 = checkpoint_dir(tmp_path, quantization=BY_FORMAT["fp8"][0], name="fp8")
    with pytest.raises(UserError, match=r"quantized as FP8, whose TensorRT-LLM kernels need fp8, and hardware=a100"):
        engine_build_settings(compose_config(["hardware=a100_80g"]), node(format="trtllm"), fp8)
    plain = checkpoint_dir(tmp_path, name="plain")
    with pytest.raises(UserError, match=r"pipeline.nodes.e.max_input_len=300 exceeds max_seq_len=256"):
        engine_build_settings(h100, node(format="trtllm", max_input_len=300), plain, field="pipeline.nodes.e")
    with pytest.raises(UserError, match=r"technique.max_seq_len=512 exceeds the model's context of 256 tokens"):
        engine_build_settings(h100, node(format="trtllm", max_seq_len=512), plain)


def test_building_without_tensorrt_llm_says_how_to_get_it():
    from llmexp.plugins.export.engine import tensorrt_engine_api

    with pytest.raises(UserError, match=r"pip install tensorrt-llm --extra-index-url https://pypi.nvidia.com"):
        tensorrt_engine_api()


# ---------------------------------------------------------------- the checkpoint, from each kind of input


def files_of(directory: Path) -> dict:
    return {path.name: path.read_bytes() for path in sorted(Path(directory).iterdir()) if path.is_file()}


def test_an_unquantized_checkpoint_is_placed_not_loaded(tiny_checkpoint, tmp_path):
    results = run(tmp_path / "run", "technique=export", f"model.path={tiny_checkpoint}")
    assert list(results["stages"]) == ["export"]  # no evaluation of a stage that made no model
    stage = results["stages"]["export"]
    hf = Path(stage["artifacts"]["hf"])
    assert hf == tmp_path / "run" / "export" / "hf"
    assert files_of(hf) == files_of(tiny_checkpoint)
    weights = "model.safetensors"
    assert (hf / weights).stat().st_ino == (tiny_checkpoint / weights).stat().st_ino  # a hard link, no copy
    assert (hf / "config.json").stat().st_ino != (tiny_checkpoint / "config.json").stat().st_ino  # editable apart
    assert stage["metrics"]["checkpoint_bytes"] == sum(len(b) for b in files_of(tiny_checkpoint).values())
    manifest = json.loads(Path(stage["artifacts"]["manifest"]).read_text())
    assert manifest == {"format": "hf", "hf": str(hf), "hf_from": "saved model"}
    assert not any(p.name.startswith(".") for p in hf.parent.iterdir())  # no temporary directory left


@pytest.fixture(scope="module")
def quantized_run(tiny_checkpoint, tmp_path_factory) -> Path:
    """quantize (fp8, simulated on the CPU) then export, as one pipeline."""
    run_dir = tmp_path_factory.mktemp("quantized") / "run"
    results = run(run_dir, f"model.path={tiny_checkpoint}", "pipeline=technique_only", "pipeline.stages=[q,e]",
                  "+technique@pipeline.nodes.q=quantize", "pipeline.nodes.q.calibration_size=4",
                  "+technique@pipeline.nodes.e=export")
    assert [s["status"] for s in results["stages"].values()] == ["completed", "completed"]
    return run_dir


def test_after_quantize_the_unified_export_is_the_checkpoint(quantized_run):
    hf, export = quantized_run / "e" / "hf", quantized_run / "q" / "export"
    assert files_of(hf) == files_of(export)
    assert json.loads((quantized_run / "e" / "export.json").read_text())["hf_from"] == "quantize export"
    settings = engine_build_settings(compose_config(["hardware=h100"]), node(format="trtllm"), hf)
    assert settings["quantization"] == {"quant_algo": "FP8", "kv_cache_quant_algo": None, "hardware_dtypes": ["fp8"],
                                        "exclude_modules": EXCLUDED}


def test_model_path_at_a_quantize_stages_model_uses_the_export_beside_it(quantized_run, tmp_path):
    results = run(tmp_path / "run", "technique=export", f"model.path={quantized_run / 'q' / 'model'}")
    hf = Path(results["stages"]["export"]["artifacts"]["hf"])
    assert files_of(hf) == files_of(quantized_run / "q" / "export")


def test_a_quantized_model_without_an_export_is_exported_through_modelopt(tiny_checkpoint, tmp_path):
    results = run(tmp_path / "run", f"model.path={tiny_checkpoint}", "pipeline=technique_only", "pipeline.stages=[q,e]",
                  "+technique@pipeline.nodes.q=quantize", "pipeline.nodes.q.calibration_size=4",
                  "pipeline.nodes.q.format=int8_wo", "pipeline.nodes.q.export=false",
                  "+technique@pipeline.nodes.e=export")
    assert "export" not in results["stages"]["q"]["artifacts"]
    hf = tmp_path / "run" / "e" / "hf"
    assert json.loads((tmp_path / "run" / "e" / "export.json").read_text())["hf_from"] == "modelopt export"
    assert checkpoint_quantization(hf)["quant_algo"] == "W8A16"
    assert (hf / "tokenizer.json").is_file()


def test_a_model_only_in_memory_is_saved_and_reloads_equal(tmp_path):
    import torch

    from llmexp.data.embedded import build_world
    from llmexp.data.tokenizer import word_level_tokenizer
    from llmexp.models.loading import build_model, load_model
    from llmexp.plugins.export.stage import export
    from llmexp.techniques.contract import ModelArtifact, StageContext

    torch.manual_seed(0)
    config = compose_config(["model.num_layers=1"])
    tokenizer = word_level_tokenizer(build_world(0).vocabulary())
    model = build_model(config.model, tokenizer).eval()
    context = StageContext(config, node(), tmp_path / "export", ModelArtifact(model, tokenizer, None, "pruned"), None,
                           "export", earlier={"pruned": {"artifacts": {}}})
    result = export(context)
    reloaded, _ = load_model(result.artifacts["hf"])
    ids = torch.tensor([[2, 10, 11, 12]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert json.loads(Path(result.artifacts["manifest"]).read_text())["hf_from"] == "save_pretrained"


# ---------------------------------------------------------------- plan checks


def plan_problems(*overrides):
    return make_plan(compose_config(["technique=export", *overrides])).problems


@pytest.mark.parametrize("overrides, expected", [
    (["technique.format=onnx"], "technique.format=onnx is not an export format; choose one of hf, trtllm, triton"),
    (["technique.format=trtllm"], "hardware=cpu is a cpu; choose a GPU preset"),
    (["technique.engine_dir=/some/engine"], "technique.engine_dir is a prebuilt engine for format=triton to serve"),
    (["technique.format=trtllm", "technique.max_input_len=300"], "technique.max_input_len=300 exceeds max_seq_len=256"),
    (["technique.format=trtllm", "technique.max_seq_len=512"],
     "technique.max_seq_len=512 exceeds the model's context of 256 tokens"),
    (["technique.format=trtllm", "technique.max_batch_size=0"], "technique.max_batch_size=0 must be a positive number"),
    (["technique.format=triton", "technique.kv_cache_free_gpu_mem_fraction=1.5"],
     "technique.kv_cache_free_gpu_mem_fraction=1.5 must be more than 0 and at most 1"),
    (["technique.format=triton", "technique.batch_scheduler_policy=fifo"],
     "technique.batch_scheduler_policy=fifo is not one of guaranteed_no_evict, max_utilization"),
    (["technique.format=triton", "technique.instance_count=0"], "technique.instance_count=0 must be at least 1"),
    (["technique.format=triton", "technique.repository_root=models"],
     "technique.repository_root=models must be an absolute path"),
    (["technique.format=triton", "technique.engine_dir=/no/such/engine"],
     "technique.engine_dir=/no/such/engine is not a directory"),
])
def test_the_plan_refuses_naming_the_field(tiny_checkpoint, overrides, expected):
    problems = plan_problems(f"model.path={tiny_checkpoint}", *overrides)
    assert any(expected in problem for problem in problems), problems


def test_the_plan_accepts_hf_and_needs_an_input(tiny_checkpoint):
    assert plan_problems(f"model.path={tiny_checkpoint}") == []
    (nothing,) = plan_problems()
    assert "technique: nothing to export" in nothing and "model.path=<a Hugging Face checkpoint directory>" in nothing
    # after a stage that makes a model, the export's input is that stage's model
    assert make_plan(compose_config([f"model.path={tiny_checkpoint}", "pipeline=technique_only", "pipeline.stages=[q,e]",
                                     "+technique@pipeline.nodes.q=quantize",
                                     "+technique@pipeline.nodes.e=export"])).problems == []


def test_the_plan_refuses_building_a_quantize_format_tensorrt_llm_has_no_engine_for(tiny_checkpoint):
    pipeline = [f"model.path={tiny_checkpoint}", "hardware=b200", "pipeline=technique_only", "pipeline.stages=[q,s,e]",
                "+technique@pipeline.nodes.q=quantize", "pipeline.nodes.q.format=mxfp8",
                "+technique@pipeline.nodes.s=evaluate", "+technique@pipeline.nodes.e=export"]
    problems = make_plan(compose_config([*pipeline, "pipeline.nodes.e.format=trtllm"])).problems
    assert any(p.startswith("pipeline.nodes.e: it builds the quantize stage's format=mxfp8, exported as "
                            "quant_algo=MXFP8, which is not one") for p in problems), problems
    assert not any("MXFP8" in p for p in make_plan(compose_config(pipeline)).problems)  # format=hf builds nothing


def test_the_plan_checks_the_export_it_would_build_against_the_gpu(quantized_run):
    problems = plan_problems(f"model.path={quantized_run / 'q' / 'model'}", "technique.format=trtllm",
                             "hardware=a100_80g")
    assert any("quantized as FP8, whose TensorRT-LLM kernels need fp8, and hardware=a100_80g" in p for p in problems)
    assert not any("kernels need" in p for p in plan_problems(f"model.path={quantized_run / 'q' / 'model'}",
                                                              "technique.format=trtllm", "hardware=h100"))


def test_a_refused_plan_writes_nothing(tiny_checkpoint, tmp_path):
    with pytest.raises(UserError, match="builds a TensorRT-LLM engine"):
        run(tmp_path / "run", "technique=export", "technique.format=trtllm", f"model.path={tiny_checkpoint}")
    assert not (tmp_path / "run" / "export").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is not None, reason="TensorRT-LLM is installed here")
@pytest.mark.parametrize("fmt, needle", [
    ("trtllm", "technique.format=hf writes the checkpoint alone"),
    ("triton", "or give a prebuilt engine with technique.engine_dir=<dir>"),
])
def test_a_machine_without_tensorrt_llm_stops_the_run_before_it_writes(fmt, needle, tiny_checkpoint, tmp_path):
    """The plan (for an H100) is fine, as it would be on a cluster's login node; this machine cannot build."""
    overrides = ["technique=export", f"technique.format={fmt}", "hardware=h100", f"model.path={tiny_checkpoint}"]
    assert plan_problems(*overrides[1:], f"model.path={tiny_checkpoint}") == []
    with pytest.raises(UserError) as error:
        run(tmp_path / "run", *overrides)
    message = str(error.value)
    assert "tensorrt_llm package is not importable here: install TensorRT-LLM on a Linux machine with an NVIDIA GPU " \
           "and CUDA (`pip install tensorrt-llm --extra-index-url https://pypi.nvidia.com`)" in message
    assert needle in message
    assert not (tmp_path / "run" / "export").exists()


def test_the_plugin_and_its_plan_check_import_neither_torch_nor_tensorrt_llm():
    code = (
        "import sys; import llmexp.plugins.export as p\n"
        "from llmexp.configuration.compose import compose_config\n"
        "cfg = compose_config(['technique=export', 'technique.format=triton', 'hardware=h100'])\n"
        "assert p.Export.plan_problems(cfg, 'technique', cfg.technique, None)\n"
        "assert 'torch' not in sys.modules and 'tensorrt_llm' not in sys.modules, 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)
