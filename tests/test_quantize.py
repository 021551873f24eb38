"""technique=quantize: ModelOpt formats on a tiny model, exact reload, the export trap, plan checks, the CLI."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmexp.configuration.compose import compose_config
from llmexp.errors import UserError
from llmexp.models.loading import enable_modelopt_checkpointing, load_model, save_model
from llmexp.planning.planner import make_plan
from llmexp.data.blocks import calibration_blocks
from llmexp.plugins.quantize import text_blocks_available
from llmexp.plugins.quantize.formats import FORMATS
from llmexp.models.unified_checkpoint import export_unified_checkpoint as export
from llmexp.plugins.quantize.ptq import _device, modelopt_config, quantize_model, quantized_modules
from tests.conftest import read_results, run_llmexp

ON_CPU = [name for name, preset in FORMATS.items() if not preset.cuda_only]


def relative_error(logits, reference) -> float:
    return float((logits - reference).norm() / reference.norm())


@pytest.fixture(scope="module")
def base(tiny_checkpoint):
    """The tiny checkpoint, 8 calibration sequences of the embedded stream, and its logits on 4 of them."""
    model, tokenizer = load_model(tiny_checkpoint)
    blocks = calibration_blocks(compose_config([]), tokenizer, 8, "technique.calibration_size")
    with torch.no_grad():
        logits = model(blocks[:4]).logits
    return SimpleNamespace(model=model.eval(), tokenizer=tokenizer, blocks=blocks, logits=logits)


@pytest.fixture(scope="module")
def quantized(base):
    """Every format ModelOpt simulates on a CPU, quantized once: name -> (model, logits on the probe)."""
    enable_modelopt_checkpointing()
    models = {}
    for name in ON_CPU:
        preset = FORMATS[name]
        model = quantize_model(copy.deepcopy(base.model), preset, preset.group_size, base.blocks, 16)
        with torch.no_grad():
            models[name] = (model, model(base.blocks[:4]).logits)
    return models


# ---------------------------------------------------------------- presets against ModelOpt 0.47


def test_presets_name_modelopt_configs_and_apply_their_changes():
    import modelopt.torch.quantization as mtq

    for name, preset in FORMATS.items():
        assert isinstance(getattr(mtq, preset.modelopt_config), dict), name
    awq, rtn = modelopt_config(FORMATS["int4_awq"], 64), modelopt_config(FORMATS["int4_rtn"], 64)
    weights = [entry["cfg"] for entry in rtn["quant_cfg"] if entry["quantizer_name"] == "*weight_quantizer"]
    assert rtn["algorithm"] == "max" and awq["algorithm"]["method"] == "awq_full"
    assert weights == [entry["cfg"] for entry in awq["quant_cfg"] if entry["quantizer_name"] == "*weight_quantizer"]
    assert weights[0]["block_sizes"][-1] == 64 and weights[0]["num_bits"] == 4
    w4a8 = modelopt_config(FORMATS["w4a8_awq"], 32)["quant_cfg"]
    assert [e["cfg"][0]["block_sizes"][-1] for e in w4a8 if e["quantizer_name"] == "*weight_quantizer"] == [32]
    assert mtq.W4A8_AWQ_BETA_CFG["quant_cfg"][1]["cfg"][0]["block_sizes"][-1] == 128  # ModelOpt's own left alone
    assert modelopt_config(FORMATS["fp8_kv"], None)["quant_cfg"][0] == {"quantizer_name": "*", "enable": False}


# ---------------------------------------------------------------- quantizing, reloading, exporting


@pytest.mark.parametrize("name", ON_CPU)
def test_each_cpu_format_changes_the_logits_a_little(base, quantized, name):
    model, logits = quantized[name]
    assert 1e-4 < relative_error(logits, base.logits) < 0.35
    kv_only = FORMATS[name].weight_bits is None
    assert quantized_modules(model) == (2 if kv_only else 2 * 7)  # 2 attentions, or every linear of 2 layers


def test_awq_beats_round_to_nearest_at_the_same_block_size(base, quantized):
    assert relative_error(quantized["int4_awq"][1], base.logits) < relative_error(quantized["int4_rtn"][1], base.logits)


@pytest.mark.parametrize("name", ["fp8", "int4_awq", "w4a8_awq"])
def test_a_saved_quantized_model_reloads_with_equal_logits(base, quantized, name, tmp_path):
    model, logits = quantized[name]
    save_model(model, base.tokenizer, tmp_path)
    assert (tmp_path / "modelopt_state.pth").is_file()
    reloaded, _ = load_model(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(base.blocks[:4]).logits, logits)


def test_the_export_leaves_the_model_alone_and_loading_it_back_is_refused(base, quantized, tmp_path):
    model, logits = quantized["fp8"]
    export(model, base.tokenizer, tmp_path)
    with torch.no_grad():
        assert torch.equal(model(base.blocks[:4]).logits, logits)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == "modelopt"
    with pytest.raises(UserError, match=r"model.path=.*TensorRT-LLM or vLLM.*`model` directory"):
        load_model(tmp_path)
    # the trap is real: plain transformers loads the FP8 weights without their scales, and says nothing
    trap = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        assert relative_error(trap(base.blocks[:4]).logits, logits) > 0.5
    problems = make_plan(compose_config(["technique=evaluate", f"model.path={tmp_path}"])).problems
    assert any("ModelOpt unified HF export" in problem for problem in problems)


def test_a_cuda_only_format_without_cuda_is_refused_at_run_time():
    b200 = SimpleNamespace(name="b200", accelerator="gpu", dtypes=["fp4"])
    with pytest.raises(UserError, match="hardware=b200 needs a CUDA GPU.*format=nvfp4 runs only on CUDA"):
        _device(b200, "nvfp4", FORMATS["nvfp4"])


# ---------------------------------------------------------------- plan checks


def problems_of(*overrides):
    return [p for p in make_plan(compose_config(["technique=quantize", *overrides])).problems]


def test_the_plan_refuses_what_the_hardware_cannot_run(tiny_checkpoint):
    ckpt = f"model.path={tiny_checkpoint}"
    (fp8_on_ampere,) = problems_of(ckpt, "hardware=a100_80g")
    assert "technique.format=fp8" in fp8_on_ampere and "FP8 needs Ada/Hopper" in fp8_on_ampere
    assert "choose hardware=b200 or h100 or h200 or l40s" in fp8_on_ampere and "int8_sq" in fp8_on_ampere
    (nvfp4_on_cpu,) = problems_of(ckpt, "hardware=cpu", "technique.format=nvfp4")
    assert "CUDA" in nvfp4_on_cpu and "hardware=b200" in nvfp4_on_cpu
    assert problems_of(ckpt, "hardware=cpu", "technique.format=fp8") == []  # simulated: see the CLI test
    assert problems_of(ckpt, "hardware=b200", "technique.format=nvfp4") == []
    (unknown,) = problems_of(ckpt, "technique.format=int3")
    assert "technique.format=int3 is not a known format" in unknown and "int4_awq" in unknown


def test_the_plan_checks_group_size_calibration_data_and_input(tiny_checkpoint):
    ckpt = f"model.path={tiny_checkpoint}"
    (group,) = problems_of(ckpt, "technique.format=int4_awq", "technique.group_size=96")
    assert "technique.group_size=96 does not divide" in group and "64 or 128" in group
    assert problems_of(ckpt, "technique.format=int4_awq", "technique.group_size=64") == []
    assert problems_of(ckpt, "technique.format=fp8", "technique.group_size=96") == []  # no blocks: ignored
    (size,) = problems_of(ckpt, "technique.calibration_size=0")
    assert "technique.calibration_size=0 must be at least 1" in size
    (data,) = problems_of(ckpt, "data=jsonl")
    assert "data=jsonl" in data
    (nothing,) = problems_of()
    assert "nothing to quantize" in nothing
    nodes = ["pipeline=technique_only", "pipeline.stages=[base,q]", "+technique@pipeline.nodes.base=pretrain",
             "+technique@pipeline.nodes.q=quantize", "pipeline.nodes.q.format=fp7"]
    (node,) = make_plan(compose_config(nodes)).problems  # no model.path: base makes the model
    assert node.startswith("pipeline.nodes.q.format=fp7 is not a known format")


@pytest.fixture
def small_corpus(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Kalo loves the colour red and keeps a cat number {i} ." for i in range(40)))
    return corpus


def test_the_plan_counts_text_blocks_as_the_run_does(tiny_checkpoint, small_corpus):
    from llmexp.data.text import read_text_documents
    from llmexp.data.blocks import text_blocks

    config = compose_config([f"model.path={tiny_checkpoint}", "data=text", f"data.paths=[{small_corpus}]"])
    documents = read_text_documents(config.data.paths)
    _, tokenizer = load_model(tiny_checkpoint)
    assert text_blocks_available(config, documents) == len(text_blocks(documents, tokenizer, 64)) > 0


def test_too_little_calibration_text_stops_before_anything_is_written(tiny_checkpoint, small_corpus, tmp_path):
    run = run_llmexp("technique=quantize", f"model.path={tiny_checkpoint}", "data=text",
                     f"data.paths=[{small_corpus}]", "technique.calibration_size=500", cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert "technique.calibration_size=500 asks for more calibration sequences" in " ".join(run.stderr.split())
    assert not (tmp_path / "outputs").exists()


# ---------------------------------------------------------------- the command


def test_quantize_then_evaluate_from_the_command_line(tiny_checkpoint, tmp_path):
    run = run_llmexp("technique=quantize", "technique.format=int8_sq", f"model.path={tiny_checkpoint}",
                     "technique.calibration_size=8", "evaluation.limit=5", "hydra.run.dir=run", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    record = read_results(tmp_path / "run")
    stage = record["stages"]["quantize"]
    stats = stage["model_stats"]
    fp32_bytes = sum(f.stat().st_size for f in tiny_checkpoint.glob("*.safetensors"))
    assert stats["precision"] == "int8_sq" and stats["simulated"] is True
    assert 0 < stats["bytes_on_disk"] < fp32_bytes / 2 and 8 < stats["bits_per_weight"] < 16
    assert stage["metrics"]["calibration_tokens"] == 8 * 64 and stage["metrics"]["quantized_modules"] == 14
    export_dir = tmp_path / "run/quantize/export"
    assert stats["export_path"] == str(export_dir) and stage["artifacts"]["export"] == str(export_dir)
    quant_algo = json.loads((export_dir / "hf_quant_config.json").read_text())["quantization"]["quant_algo"]
    assert quant_algo == "W8A8_SQ_PER_CHANNEL" and (export_dir / "tokenizer.json").is_file()
    # a fresh process restores the saved model through ModelOpt: the same perplexity to the last digit
    again = run_llmexp("technique=evaluate", "technique.tasks=[perplexity]", "technique.limit=5",
                       f"model.path={tmp_path / 'run/quantize/model'}", "hydra.run.dir=again", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    perplexity = read_results(tmp_path / "again")["stages"]["evaluate"]["metrics"]["perplexity"]
    assert perplexity == record["stages"]["evaluate"]["metrics"]["perplexity"]
