"""The Triton model repository for TensorRT-LLM: every config.pbtxt parsed with Triton's own schema, the ensemble's
wiring, the python models' tokenisation run from the copied model.py files, refusals, atomic writes, the stage.

The engine here is a directory built in tmp_path in TensorRT-LLM's layout: a ``config.json`` (an EngineConfig's
``pretrained_config`` with its ``mapping``, and ``build_config`` with the limits) and ``rank<i>.engine`` files of
arbitrary bytes. The writer never reads the engine bytes (it places the files as they are); only config.json.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import json_format, text_format
from omegaconf import OmegaConf
from tritonclient.grpc import model_config_pb2

from llmexp.errors import UserError
from llmexp.plugins.export import ExportConfig, triton_postprocessing, triton_preprocessing
from llmexp.plugins.export.directories import write_directory
from llmexp.plugins.export.engine_settings import read_engine
from llmexp.plugins.export.pbtxt import Enum, Map, to_text
from llmexp.plugins.export.triton import write_repository
from llmexp.configuration.schema import ParallelismConfig
from tests.test_export import run  # one run in this process

MODELS = ("preprocessing", "tensorrt_llm", "postprocessing", "ensemble")


def make_engine(directory: Path, tp=1, pp=1, max_batch_size=16, max_input_len=128, max_seq_len=256,
                max_num_tokens=2048, ranks=None) -> Path:
    """A TensorRT-LLM engine directory's layout: config.json as EngineConfig.to_dict writes it, engine files."""
    directory.mkdir(parents=True)
    config = {
        "version": "0.17.0",
        "pretrained_config": {"architecture": "LlamaForCausalLM", "dtype": "float32",
                              "mapping": {"world_size": tp * pp, "tp_size": tp, "pp_size": pp}},
        "build_config": {"max_batch_size": max_batch_size, "max_input_len": max_input_len, "max_seq_len": max_seq_len,
                         "max_num_tokens": max_num_tokens, "max_beam_width": 1},
    }
    (directory / "config.json").write_text(json.dumps(config))
    for rank in range(tp * pp) if ranks is None else ranks:
        (directory / f"rank{rank}.engine").write_bytes(bytes([rank]) * 1000)
    return directory


def node(**values):
    return OmegaConf.structured(ExportConfig(format="triton", **values))


def layout(tp=1, pp=1):
    return OmegaConf.structured(ParallelismConfig(name=f"tp{tp}_pp{pp}", tp=tp, pp=pp, devices_per_node=tp * pp))


@pytest.fixture(scope="module")
def tokenizer():
    from llmexp.data.embedded import build_world
    from llmexp.data.tokenizer import word_level_tokenizer

    return word_level_tokenizer(build_world(0).vocabulary())


def parse(path: Path) -> model_config_pb2.ModelConfig:
    """Triton's own schema: a misspelled field or a wrongly typed value raises here."""
    return text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())


def configs_of(repository: Path):
    return {name: parse(repository / name / "config.pbtxt") for name in MODELS}


def check_ensemble_wiring(configs) -> None:
    """Each step reads inputs of its model from tensors the ensemble has by then (its own inputs, or what an
    earlier step wrote), with the same data type, feeds every required input, writes outputs of its model
    once each; the ensemble's outputs are all written."""
    ensemble = configs["ensemble"]
    available = {tensor.name: tensor.data_type for tensor in ensemble.input}
    for step in ensemble.ensemble_scheduling.step:
        model = configs[step.model_name]
        inputs = {tensor.name: tensor for tensor in model.input}
        outputs = {tensor.name: tensor for tensor in model.output}
        for key, value in step.input_map.items():
            assert key in inputs, f"{step.model_name} has no input {key}"
            assert value in available, f"{step.model_name}.{key} reads {value} before anything writes it"
            assert available[value] == inputs[key].data_type, f"{step.model_name}.{key}: {value} differs in type"
        required = {name for name, tensor in inputs.items() if not tensor.optional}
        assert required <= set(step.input_map), f"{step.model_name}: {required - set(step.input_map)} not fed"
        for key, value in step.output_map.items():
            assert key in outputs, f"{step.model_name} has no output {key}"
            assert value not in available, f"{value} written twice"
            available[value] = outputs[key].data_type
    for tensor in ensemble.output:
        assert available.get(tensor.name) == tensor.data_type, f"ensemble output {tensor.name} is never written"


@pytest.fixture(scope="module")
def repository(tmp_path_factory, tokenizer):
    base = tmp_path_factory.mktemp("triton")
    engine = read_engine(make_engine(base / "engine"), "technique")
    numbers = write_repository(base / "repo", engine, tokenizer, node(max_batch_size=12, decoupled=False,
                               kv_cache_free_gpu_mem_fraction=0.75, instance_count=3), layout(), "technique")
    return base, numbers


# ---------------------------------------------------------------- the protobuf text writer


def test_the_writer_gives_text_triton_parses_back_to_the_same_values():
    tricky = 'a "quoted" \\ path\nnext line, tab\t, é ✓'
    text = to_text({
        "name": "m", "backend": "python", "max_batch_size": 4,
        "input": [{"name": "x", "data_type": Enum("TYPE_FP32"), "dims": [2, -1], "reshape": {"shape": []},
                   "optional": True}],
        "output": [{"name": "y", "data_type": Enum("TYPE_STRING"), "dims": [-1]}],
        "instance_group": [{"count": 2, "kind": Enum("KIND_CPU")}],
        "dynamic_batching": {"preferred_batch_size": [4], "max_queue_delay_microseconds": 100},
        "model_transaction_policy": {"decoupled": True},
        "parameters": Map({"path": {"string_value": tricky}, "n": {"string_value": "7"}}),
    })
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.parameters["path"].string_value == tricky and config.parameters["n"].string_value == "7"
    (x,) = config.input
    assert (x.name, list(x.dims), list(x.reshape.shape), x.optional) == ("x", [2, -1], [], True)
    assert x.data_type == model_config_pb2.TYPE_FP32 and config.output[0].data_type == model_config_pb2.TYPE_STRING
    (group,) = config.instance_group
    assert group.count == 2 and group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert list(config.dynamic_batching.preferred_batch_size) == [4] and config.model_transaction_policy.decoupled
    with pytest.raises(text_format.ParseError, match="max_batch_sise"):  # the schema catches a misspelled field
        text_format.Parse(text.replace("max_batch_size", "max_batch_sise"), model_config_pb2.ModelConfig())


# ---------------------------------------------------------------- the repository


def test_every_config_parses_with_the_run_values(repository):
    base, numbers = repository
    repo = base / "repo"
    configs = configs_of(repo)
    assert {name: config.name for name, config in configs.items()} == {name: name for name in MODELS}
    assert all(config.max_batch_size == 12 for config in configs.values())
    engine = configs["tensorrt_llm"]
    assert engine.backend == "tensorrtllm" and engine.model_transaction_policy.decoupled is False
    parameters = {key: value.string_value for key, value in engine.parameters.items()}
    assert parameters["gpt_model_type"] == "inflight_fused_batching"
    assert parameters["gpt_model_path"] == f"{repo}/tensorrt_llm/1"  # no repository_root: where it was written
    assert parameters["kv_cache_free_gpu_mem_fraction"] == "0.75"
    assert parameters["batch_scheduler_policy"] == "guaranteed_no_evict" and parameters["max_beam_width"] == "1"
    assert parameters["exclude_input_in_output"] == "true"
    assert [t.name for t in engine.output][:2] == ["output_ids", "sequence_length"]
    for name in ("preprocessing", "postprocessing"):
        assert configs[name].backend == "python"
        assert configs[name].parameters["tokenizer_dir"].string_value == "tokenizer"
        assert [(g.count, g.kind) for g in configs[name].instance_group] == [
            (3, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
    assert configs["ensemble"].platform == "ensemble"
    assert [s.model_name for s in configs["ensemble"].ensemble_scheduling.step] == [
        "preprocessing", "tensorrt_llm", "postprocessing"]
    assert numbers["max_batch_size"] == 12 and numbers["world_size"] == 1
    assert numbers["repository_bytes"] == sum(p.stat().st_size for p in repo.rglob("*") if p.is_file())


def test_the_ensemble_is_wired_consistently_and_the_check_catches_a_break(repository):
    configs = configs_of(repository[0] / "repo")
    check_ensemble_wiring(configs)
    broken = model_config_pb2.ModelConfig()
    broken.CopyFrom(configs["ensemble"])
    step = broken.ensemble_scheduling.step[1]
    step.input_map["input_ids"] = "_TOKENS_BATCH"  # read before the engine writes it
    with pytest.raises(AssertionError, match="reads _TOKENS_BATCH before anything writes it"):
        check_ensemble_wiring({**configs, "ensemble": broken})


def test_the_engine_the_python_models_and_the_tokenizer_are_in_place(repository):
    base, _ = repository
    repo = base / "repo"
    engine_file = repo / "tensorrt_llm" / "1" / "rank0.engine"
    assert engine_file.read_bytes() == (base / "engine" / "rank0.engine").read_bytes() == bytes(1000)
    assert engine_file.stat().st_ino == (base / "engine" / "rank0.engine").stat().st_ino  # hard-linked, not copied
    assert (repo / "tensorrt_llm" / "1" / "config.json").read_text() == (base / "engine" / "config.json").read_text()
    assert (repo / "ensemble" / "1").is_dir()  # Triton loads a model only from a version directory
    for name, module in (("preprocessing", triton_preprocessing), ("postprocessing", triton_postprocessing)):
        assert (repo / name / "1" / "model.py").read_text() == Path(module.__file__).read_text()
        assert (repo / name / "tokenizer" / "tokenizer.json").is_file()
    assert not [p for p in base.iterdir() if p.name.startswith(".")]  # no temporary directory left


def load_model_file(path: Path, name: str):
    """A copied model.py imported from the repository, as Triton's python backend imports it."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def backend_args(repo: Path, model: str) -> dict:
    """What the python backend passes to initialize(): the config as JSON, this model's directory."""
    config = json_format.MessageToDict(parse(repo / model / "config.pbtxt"), preserving_proto_field_name=True)
    return {"model_config": json.dumps(config), "model_repository": str(repo / model), "model_version": "1"}


def test_the_copied_preprocessing_encodes_prompts_for_the_engine(repository, tokenizer):
    repo = repository[0] / "repo"
    pre = load_model_file(repo / "preprocessing" / "1" / "model.py", "pre")
    model = pre.TritonPythonModel()
    model.initialize(backend_args(repo, "preprocessing"))  # loads the tokenizer the repository carries
    assert (model.end_id, model.pad_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id) == (3, 0)
    words = [w for w, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])][4:9]
    prompts = np.array([[f"{words[0]} {words[1]} {words[2]}".encode()], [words[3].encode()]], dtype=np.object_)
    ids, lengths = pre.encode_prompts(model.tokenizer, pre.text_values(prompts), model.pad_id, model.add_special_tokens)
    vocab = tokenizer.get_vocab()
    bos = tokenizer.bos_token_id
    assert ids.dtype == np.int32 and lengths.dtype == np.int32
    assert ids.tolist() == [[bos, vocab[words[0]], vocab[words[1]], vocab[words[2]]], [bos, vocab[words[3]], 0, 0]]
    assert lengths.tolist() == [[4], [2]]
    stops = pre.word_lists(model.tokenizer, [[words[0], f"{words[1]} {words[2]}"], [words[3]]], 2)
    assert stops.dtype == np.int32 and stops.shape == (2, 2, 3)
    assert stops[0].tolist() == [[vocab[words[0]], vocab[words[1]], vocab[words[2]]], [1, 3, -1]]
    assert stops[1].tolist() == [[vocab[words[3]], 0, 0], [1, -1, -1]]
    assert pre.word_lists(model.tokenizer, None, 2).shape == (2, 2, 0)


def test_the_copied_postprocessing_decodes_each_beam_up_to_its_length(repository, tokenizer):
    repo = repository[0] / "repo"
    post = load_model_file(repo / "postprocessing" / "1" / "model.py", "post")
    model = post.TritonPythonModel()
    model.initialize(backend_args(repo, "postprocessing"))
    vocab = tokenizer.get_vocab()
    words = [w for w, _ in sorted(vocab.items(), key=lambda item: item[1])][4:8]
    ids = [vocab[w] for w in words]
    tokens = np.array([[[ids[0], ids[1], tokenizer.eos_token_id, 0], [ids[2], 0, 0, 0]],
                       [[ids[3], ids[2], ids[1], ids[0]], [0, 0, 0, 0]]], dtype=np.int32)
    lengths = np.array([[3, 1], [4, 0]], dtype=np.int32)
    texts = post.decode_batches(model.tokenizer, tokens, lengths, model.skip_special_tokens)
    assert texts == [f"{words[0]} {words[1]}", words[2], " ".join(reversed(words)), ""]


def test_repository_root_is_where_the_server_finds_the_engine(tmp_path, tokenizer):
    engine = read_engine(make_engine(tmp_path / "engine"), "technique")
    write_repository(tmp_path / "repo", engine, tokenizer, node(repository_root="/models"), layout(), "technique")
    parameters = parse(tmp_path / "repo" / "tensorrt_llm" / "config.pbtxt").parameters
    assert parameters["gpt_model_path"].string_value == "/models/tensorrt_llm/1"
    assert parse(tmp_path / "repo" / "tensorrt_llm" / "config.pbtxt").model_transaction_policy.decoupled  # default


@pytest.mark.parametrize("engine, export, parallelism, expected", [
    ({"max_batch_size": 4}, {}, (1, 1),
     r"technique.max_batch_size=8 exceeds the engine's max_batch_size=4 .*Set technique.max_batch_size=4 or less"),
    ({}, {"max_input_len": 512}, (1, 1), r"technique.max_input_len=512 exceeds the engine's max_input_len=128"),
    ({}, {"max_seq_len": 1024}, (1, 1), r"technique.max_seq_len=1024 exceeds the engine's max_seq_len=256"),
    ({"tp": 2}, {}, (1, 1), r"parallelism.tp=1 pp=1 but the engine .* was built for tp_size=2 pp_size=1"),
    ({"tp": 2, "ranks": [0]}, {}, (2, 1), r"built for tp_size=2 x pp_size=1 = 2 GPUs and rank1.engine is missing"),
    ({}, {"repository_root": "models"}, (1, 1), r"technique.repository_root=models must be an absolute path"),
])
def test_a_repository_the_engine_cannot_serve_is_refused(tmp_path, tokenizer, engine, export, parallelism, expected):
    with pytest.raises(UserError, match=expected):
        built = read_engine(make_engine(tmp_path / "engine", **engine), "technique")
        write_repository(tmp_path / "repo", built, tokenizer, node(**export), layout(*parallelism), "technique")
    assert not (tmp_path / "repo").exists()


def test_an_engine_directory_without_config_json_is_refused(tmp_path):
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "rank0.engine").write_bytes(b"x")
    with pytest.raises(UserError, match=r"pipeline.nodes.s.engine_dir=.*config.json does not exist.*llm.save"):
        read_engine(tmp_path / "engine", "pipeline.nodes.s")


def test_a_tp2_engine_serves_on_a_tp2_layout(tmp_path, tokenizer):
    engine = read_engine(make_engine(tmp_path / "engine", tp=2), "technique")
    numbers = write_repository(tmp_path / "repo", engine, tokenizer, node(), layout(tp=2), "technique")
    assert numbers["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "repo" / "tensorrt_llm" / "1").iterdir()) == [
        "config.json", "rank0.engine", "rank1.engine"]


def test_directories_are_replaced_whole_or_left_alone(tmp_path):
    target = tmp_path / "out"
    write_directory(target, lambda d: (d / "a").write_text("first"))
    def fails_midway(directory: Path) -> None:
        (directory / "a").write_text("second")
        raise RuntimeError("midway")

    with pytest.raises(RuntimeError, match="midway"):
        write_directory(target, fails_midway)
    assert (target / "a").read_text() == "first"  # a failed write leaves the old directory as it was
    write_directory(target, lambda d: (d / "b").write_text("third"))
    assert sorted(p.name for p in target.iterdir()) == ["b"]  # replaced, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or old directory left


# ---------------------------------------------------------------- the stage


def test_the_stage_writes_a_repository_for_a_prebuilt_engine(tiny_checkpoint, tmp_path):
    engine = make_engine(tmp_path / "engine")
    results = run(tmp_path / "run", "technique=export", "technique.format=triton", f"model.path={tiny_checkpoint}",
                  f"technique.engine_dir={engine}", "technique.repository_root=/models", "technique.max_batch_size=16")
    stage = results["stages"]["export"]
    repo = Path(stage["artifacts"]["repository"])
    assert repo == tmp_path / "run" / "export" / "triton"
    assert "hf" not in stage["artifacts"]  # a prebuilt engine needs no checkpoint, only the tokenizer
    configs = configs_of(repo)
    check_ensemble_wiring(configs)
    assert configs["ensemble"].max_batch_size == 16 and stage["metrics"]["max_batch_size"] == 16
    assert configs["tensorrt_llm"].parameters["gpt_model_path"].string_value == "/models/tensorrt_llm/1"
    assert (repo / "preprocessing" / "tokenizer" / "tokenizer.json").read_text() == (
        tiny_checkpoint / "tokenizer.json").read_text()
    manifest = json.loads(Path(stage["artifacts"]["manifest"]).read_text())
    assert manifest == {"format": "triton", "repository": str(repo), "engine_served": str(engine),
                        "repository_root": "/models"}


def test_the_plan_checks_a_prebuilt_engine_against_the_repository(tiny_checkpoint, tmp_path):
    from llmexp.configuration.compose import compose_config
    from llmexp.planning.planner import make_plan

    engine = make_engine(tmp_path / "engine", max_batch_size=4)
    problems = make_plan(compose_config(["technique=export", "technique.format=triton", f"model.path={tiny_checkpoint}",
                                         f"technique.engine_dir={engine}"])).problems
    assert any("technique.max_batch_size=8 exceeds the engine's max_batch_size=4" in p for p in problems), problems
    assert not any("tensorrt_llm" in p or "GPU" in p for p in problems)  # serving a prebuilt engine builds nothing
