"""``llmexp serve --backend vllm``: the vLLM server command built for what the framework writes (checkpoints,
stage directories, a quantize stage's ModelOpt export, LoRA adapters), and the refusals, without vLLM or a GPU."""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmexp.errors import UserError
from llmexp.cli.serve import main, parse_args
from llmexp.serving.vllm_server import (
    lora_module,
    require_cuda,
    require_vllm,
    vllm_command,
    vllm_environment,
    vllm_max_lora_rank,
)
from tests.conftest import REPO, run_llmexp

SERVER = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]


def quantize_stage(tiny_checkpoint: Path, stage: Path, format_name: str) -> None:
    """A quantize stage as ptq.py writes one: ``model/`` (ModelOpt checkpoint) and ``export/`` (unified export)."""
    from llmexp.configuration.compose import compose_config
    from llmexp.data.blocks import calibration_blocks
    from llmexp.models.loading import enable_modelopt_checkpointing, load_model, save_model
    from llmexp.plugins.quantize.formats import FORMATS
    from llmexp.models.unified_checkpoint import export_unified_checkpoint as export
    from llmexp.plugins.quantize.ptq import quantize_model

    model, tokenizer = load_model(tiny_checkpoint)
    blocks = calibration_blocks(compose_config([]), tokenizer, 4, "technique.calibration_size")
    enable_modelopt_checkpointing()
    preset = FORMATS[format_name]
    quantized = quantize_model(copy.deepcopy(model), preset, preset.group_size, blocks, 16)
    save_model(quantized, tokenizer, stage / "model")
    export(quantized, tokenizer, stage / "export")


@pytest.fixture(scope="module")
def run(tiny_checkpoint, tmp_path_factory):
    """A run directory: a baseline stage, quantize stages (fp8, int4 and KV-only), a LoRA and an IA3 adapter."""
    from peft import IA3Config, get_peft_model

    from llmexp.models.loading import load_model
    from tests.test_serving_engine import save_lora_adapter

    root = tmp_path_factory.mktemp("vllm_run")
    shutil.copytree(tiny_checkpoint, root / "baseline" / "model")
    for stage, format_name in (("quantize", "fp8"), ("int4", "int4_rtn"), ("kv_only", "fp8_kv")):
        quantize_stage(tiny_checkpoint, root / stage, format_name)
    save_lora_adapter(tiny_checkpoint, root / "lora" / "adapter", seed=1)
    save_lora_adapter(tiny_checkpoint, root / "chat", seed=2)
    model, _ = load_model(tiny_checkpoint)
    get_peft_model(model, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                    feedforward_modules=["down_proj"], task_type="CAUSAL_LM")).save_pretrained(
        str(root / "ia3"))
    return SimpleNamespace(root=root, tiny=tiny_checkpoint)


def flags(command):
    """Flag -> value of a built command (past the interpreter and module): True without one, a list for several."""
    assert command[:3] == SERVER
    options = {}
    for word in command[3:]:
        if word.startswith("--"):
            flag = word
            options[flag] = []
        else:
            options[flag].append(word)
    return {flag: values[0] if len(values) == 1 else values or True for flag, values in options.items()}


def refused(*args, **kwargs) -> str:
    with pytest.raises(UserError) as error:
        vllm_command(*args, **kwargs)
    return str(error.value)


# ---------------------------------------------------------------- the commands


def test_a_checkpoint_is_served_as_vllms_model_under_its_directory_name(run):
    assert vllm_command(run.tiny) == [*SERVER, "--model", str(run.tiny.resolve()), "--served-model-name", "tiny",
                                      "--host", "127.0.0.1", "--port", "8000", "--disable-fastapi-docs"]
    command = vllm_command(run.tiny, name="base", host="0.0.0.0", port=9001, max_num_seqs=32, max_model_len=256,
                           gpu_memory_utilization=0.5)
    assert flags(command) == {"--model": str(run.tiny.resolve()), "--served-model-name": "base", "--host": "0.0.0.0",
                              "--port": "9001", "--disable-fastapi-docs": True, "--max-num-seqs": "32",
                              "--max-model-len": "256", "--gpu-memory-utilization": "0.5"}


def test_a_stage_directory_serves_its_model_named_after_the_stage(run):
    options = flags(vllm_command(run.root / "baseline"))
    assert options["--model"] == str((run.root / "baseline" / "model").resolve())
    assert options["--served-model-name"] == "baseline" and "--quantization" not in options
    assert flags(vllm_command(run.root / "baseline" / "model"))["--served-model-name"] == "baseline"


def test_a_quantize_stage_serves_its_modelopt_export_with_vllms_method(run):
    stage = run.root / "quantize"
    assert json.loads((stage / "export" / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "FP8"
    for given in (stage, stage / "export"):
        options = flags(vllm_command(given))
        assert options["--model"] == str((stage / "export").resolve())
        assert options["--quantization"] == "modelopt" and options["--served-model-name"] == "quantize"


def test_the_in_process_modelopt_checkpoint_is_refused_naming_the_export(run):
    message = refused(run.root / "quantize" / "model")
    assert "modelopt_state.pth" in message and "vLLM cannot read" in message
    assert f"llmexp serve {run.root / 'quantize' / 'export'} --backend vllm" in message


def test_a_quantize_stage_without_its_export_says_how_to_write_one(run, tmp_path):
    shutil.copytree(run.root / "quantize" / "model", tmp_path / "quantize" / "model")
    message = refused(tmp_path / "quantize")
    assert "technique.export=true" in message and "--backend inprocess" in message


@pytest.mark.parametrize("stage, fragment", [("int4", "quant_algo W4A16_AWQ"),
                                             ("kv_only", "no quantized weights (KV cache only: FP8)")])
def test_exports_vllms_modelopt_loader_cannot_read_are_refused(run, stage, fragment):
    message = refused(run.root / stage)
    assert fragment in message and "technique.format=fp8 or nvfp4" in message


def test_a_checkpoint_without_weights_is_refused(run, tmp_path):
    (tmp_path / "empty").mkdir()
    shutil.copy(run.tiny / "config.json", tmp_path / "empty")
    assert "no weights" in refused(tmp_path / "empty")


def test_adapters_enable_lora_with_room_for_each_and_their_rank(run):
    sql, chat = run.root / "lora" / "adapter", run.root / "chat"
    options = flags(vllm_command(run.tiny, adapters={"sql": sql}))
    assert options["--enable-lora"] is True and options["--max-loras"] == "1"
    assert options["--max-lora-rank"] == "8"  # the adapter's r=4, rounded up to a size vLLM accepts
    assert options["--lora-modules"] == f"sql={sql.resolve()}"
    options = flags(vllm_command(run.tiny, adapters={"sql": sql, "chat": chat}))
    assert options["--max-loras"] == "2" and options["--lora-modules"] == [f"sql={sql.resolve()}",
                                                                         f"chat={chat.resolve()}"]


def test_an_adapter_given_as_model_dir_serves_its_base_with_it_under_its_stage_name(run):
    adapter = run.root / "lora" / "adapter"
    options = flags(vllm_command(adapter))
    assert options["--model"] == str(run.tiny.resolve()) and options["--served-model-name"] == "tiny"
    assert options["--lora-modules"] == f"lora={adapter.resolve()}"


def test_a_path_vllm_would_split_goes_in_its_json_form():
    assert lora_module("sql", Path("/ckpt/a=b/adapter")) == '{"name": "sql", "path": "/ckpt/a=b/adapter"}'
    assert lora_module("sql", Path("/ckpt/adapter")) == "sql=/ckpt/adapter"


def test_the_lora_rank_buffer_is_the_smallest_size_vllm_accepts():
    assert [vllm_max_lora_rank(r) for r in (1, 8, 9, 64, 65, 300, 512)] == [8, 8, 16, 64, 128, 320, 512]


def test_adapters_vllm_cannot_serve_are_refused(run, tmp_path):
    assert "no adapter_config.json" in refused(run.tiny, adapters={"x": run.root / "baseline"})
    assert "PEFT IA3 adapter; vLLM serves LoRA adapters only" in refused(run.tiny, adapters={"x": run.root / "ia3"})
    (tmp_path / "bare").mkdir()
    shutil.copy(run.root / "chat" / "adapter_config.json", tmp_path / "bare")
    assert "no adapter_model.safetensors" in refused(run.tiny, adapters={"x": tmp_path / "bare"})
    assert "the base model's served name" in refused(run.tiny, adapters={"tiny": run.root / "chat"})


def test_tensor_parallelism_must_split_the_attention_heads(run):
    assert flags(vllm_command(run.tiny, tensor_parallel_size=2))["--tensor-parallel-size"] == "2"
    message = refused(run.tiny, tensor_parallel_size=3)
    assert "4 attention heads" in message and "Give one of 1, 2, 4" in message


# ---------------------------------------------------------------- the command line and the machine


def test_backend_equals_is_read_as_the_option_but_not_as_another_options_value():
    assert parse_args(["d", "backend=vllm"]).backend == "vllm"
    args = parse_args(["d", "--adapter", "backend=/a", "backend=inprocess"])
    assert args.adapter == ["backend=/a"] and args.backend == "inprocess"
    with pytest.raises(SystemExit):
        parse_args(["d", "backend=trtllm"])


@pytest.mark.parametrize("options, fragment", [
    (["--backend", "vllm", "--max-queue", "8"], "--max-queue is an option of --backend inprocess only"),
    (["backend=vllm", "--max-tokens-limit", "8"], "bound prompt plus generated tokens with --max-model-len"),
    (["--tensor-parallel-size", "2"], "--tensor-parallel-size is an option of --backend vllm only"),
    (["--max-model-len", "64"], "--max-model-len is an option of --backend vllm only"),
    (["--backend", "vllm", "--gpu-memory-utilization", "1.5"], "a fraction above 0 and at most 1"),
])
def test_options_of_the_other_backend_or_out_of_range_are_refused(run, options, fragment):
    with pytest.raises(UserError, match=fragment):
        main([str(run.tiny), *options])


def test_a_busy_port_is_refused_before_vllm_starts(run):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(UserError, match="cannot listen there"):
            main([str(run.tiny), "--backend", "vllm", "--port", str(busy.getsockname()[1])])


def test_without_cuda_vllm_is_refused_naming_the_cpu_path():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(UserError, match=r"no CUDA GPU is visible .* in-process backend on the CPU"):
        require_cuda(None)


def test_without_vllm_the_command_exits_2_naming_the_install_and_the_in_process_backend(run, tmp_path):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    with pytest.raises(UserError, match="pip install vllm"):
        require_vllm()
    result = run_llmexp("serve", str(run.root / "quantize"), "backend=vllm", "--port", "0", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    assert "vLLM is not installed" in message and "`pip install vllm`" in message
    assert "in-process backend, the CPU path" in message


def test_the_process_becomes_the_server_whose_exit_code_is_its_own_with_the_key_in_its_environment_only():
    key = "vllm-key-0123456789abcdef"
    child = ("import os; key = os.environ['VLLM_API_KEY']; cmdline = open('/proc/self/cmdline', 'rb').read(); "
             "print(key.startswith('vllm-key-'), key.encode() in cmdline); raise SystemExit(7)")
    script = ("import os, sys; from llmexp.serving.vllm_server import exec_vllm, vllm_environment; "
              f"exec_vllm([sys.executable, '-c', {child!r}], 'http://127.0.0.1:1/v1', "
              f"vllm_environment(os.environ, [{key!r}]))")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 7
    assert result.stdout.splitlines() == [
        "llmexp serve: starting vLLM for http://127.0.0.1:1/v1  API key required  (Ctrl-C stops)",
        "True False"]  # vLLM has the key, and its command line (the process list) does not
    assert "SystemExit(7)" in result.stderr and key not in result.stdout + result.stderr


def test_vllm_gets_one_key_at_most_and_none_without_one():
    assert vllm_environment({"PATH": "/bin"}, []) == {"PATH": "/bin"}
    assert vllm_environment({"PATH": "/bin"}, ["k" * 16]) == {"PATH": "/bin", "VLLM_API_KEY": "k" * 16}
    with pytest.raises(UserError, match="vLLM reads one from its environment"):
        vllm_environment({}, ["k" * 16, "j" * 16])
