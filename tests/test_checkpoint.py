"""Validation of local Hugging Face checkpoint directories, on real files built in tmp_path."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from llmexp.models.checkpoint import (
    MODELOPT_STATE,
    model_numbers_from_hf_config,
    pickled_files,
    read_hf_config,
    safetensors_problem,
    torch_archive_problem,
    validate_checkpoint_dir,
)
from llmexp.errors import UserError
from llmexp.architecture import count_parameters

TINY_HF_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}


def write_checkpoint(directory, hf_config=None, weights=True):
    """A small but real checkpoint: config.json and a safetensors file that safetensors wrote."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config or TINY_HF_CONFIG))
    if weights:
        save_file(
            {
                "model.embed_tokens.weight": np.zeros((256, 64), dtype=np.float32),
                "model.norm.weight": np.ones((64,), dtype=np.float16),
            },
            str(directory / "model.safetensors"),
        )
    return directory


def assert_user_error(path, *fragments):
    with pytest.raises(UserError) as caught:
        validate_checkpoint_dir(path)
    message = str(caught.value)
    assert message.startswith(f"model.path={path}: ")
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message


def test_a_complete_checkpoint_passes(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "ckpt")
    validate_checkpoint_dir(checkpoint)
    validate_checkpoint_dir(str(checkpoint))
    assert read_hf_config(checkpoint)["hidden_size"] == 64
    assert safetensors_problem(checkpoint / "model.safetensors")[0] == ""


def test_missing_directory(tmp_path):
    assert_user_error(tmp_path / "nowhere", "no such directory", "model.path=null")
    (tmp_path / "a_file").write_text("")
    assert_user_error(tmp_path / "a_file", "is a file, not a directory")


def test_no_config_json(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "ckpt")
    (checkpoint / "config.json").unlink()
    assert_user_error(checkpoint, "has no config.json", "save_pretrained")


def test_unparsable_config_json(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "ckpt")
    (checkpoint / "config.json").write_text('{"model_type": "llama",')
    assert_user_error(checkpoint, "config.json could not be parsed")


def test_config_json_without_model_type(tmp_path):
    config = {k: v for k, v in TINY_HF_CONFIG.items() if k != "model_type"}
    checkpoint = write_checkpoint(tmp_path / "ckpt", hf_config=config)
    assert_user_error(checkpoint, "config.json has no model_type", '"model_type": "llama"')
    with pytest.raises(UserError):
        read_hf_config(checkpoint)


def test_no_weights(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "ckpt", weights=False)
    assert_user_error(checkpoint, "no weights found", "*.safetensors")


def write_pytorch_bin(checkpoint, name="pytorch_model.bin"):
    import torch

    torch.save({"model.norm.weight": torch.ones(64)}, checkpoint / name)
    return checkpoint / name


def test_pytorch_bin_weights_count_as_weights_and_their_archive_is_checked(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "ckpt", weights=False)
    weights = write_pytorch_bin(checkpoint)
    validate_checkpoint_dir(checkpoint)
    assert pickled_files(checkpoint) == [weights]
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 200])  # the central directory is at the end
    assert_user_error(checkpoint, "pytorch_model.bin is truncated or corrupt", "not a whole zip archive")
    weights.write_bytes(b"<html>404 Not Found</html>")
    assert_user_error(checkpoint, "pytorch_model.bin is truncated or corrupt")
    weights.write_bytes(b"\x80\x02" + data[2:])  # torch's format before 1.6, a bare pickle: torch checks it
    assert torch_archive_problem(weights) == ""


def test_a_bin_beside_safetensors_is_not_read_but_modelopt_state_always_is(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "ckpt")
    (checkpoint / "pytorch_model.bin").write_bytes(b"transformers reads model.safetensors instead")
    validate_checkpoint_dir(checkpoint)
    assert pickled_files(checkpoint) == []
    state = checkpoint / MODELOPT_STATE
    state.write_bytes(b"PK\x03\x04 cut short")
    assert pickled_files(checkpoint) == [state]
    assert_user_error(checkpoint, f"{MODELOPT_STATE} is truncated or corrupt")


def test_a_pytorch_bin_index_names_its_shards(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "ckpt", weights=False)
    write_pytorch_bin(checkpoint, "pytorch_model-00001-of-00002.bin")
    index = {"weight_map": {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}
    (checkpoint / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert_user_error(checkpoint, "pytorch_model.bin.index.json names shards that are missing",
                      "pytorch_model-00002-of-00002.bin")


def test_an_index_placing_a_tensor_in_a_shard_without_it_is_refused(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "ckpt", weights=False)
    shard = "model-00001-of-00001.safetensors"
    save_file({"a": np.zeros((2,), dtype=np.float32)}, str(checkpoint / shard))
    index = {"weight_map": {"a": shard, "lm_head.weight": shard}}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_user_error(checkpoint, "places tensors in shards that do not hold them",
                      "lm_head.weight (in model-00001-of-00001.safetensors)")


def test_json_nested_too_deeply_is_a_user_error_not_a_crash(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    checkpoint = write_checkpoint(tmp_path / "ckpt", weights=False)
    (checkpoint / "config.json").write_text('{"model_type": "llama", "x": ' + deep + "}")
    assert_user_error(checkpoint, "config.json could not be parsed (nested too deeply to parse)")
    header = ('{"x": ' + deep + "}").encode()
    weights = tmp_path / "deep.safetensors"
    weights.write_bytes(struct.pack("<Q", len(header)) + header)
    assert safetensors_problem(weights)[0] == "header is not valid JSON: nested too deeply to parse"


def test_truncated_safetensors_is_reported_with_its_name(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "ckpt")
    weights = checkpoint / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    message = assert_user_error(checkpoint, "model.safetensors is truncated or corrupt", "Download or copy")
    assert "ends at byte" in message and "which has only" in message


def test_safetensors_cut_inside_its_header(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "ckpt")
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    assert "header of" in safetensors_problem(weights)[0]
    assert_user_error(checkpoint, "truncated or corrupt")
    weights.write_bytes(b"\x01\x02")
    assert "shorter than the 8-byte header length" in safetensors_problem(weights)[0]


def test_hand_written_header_with_wrong_sizes(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    file = tmp_path / "bad.safetensors"
    file.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 12)
    assert "holds 12 bytes, its dtype and shape need 16" in safetensors_problem(file)[0]
    file.write_bytes(struct.pack("<Q", 5) + b"not{}" + b"\x00" * 4)
    assert safetensors_problem(file)[0].startswith("header is not valid JSON")


def test_sharded_checkpoint_with_a_missing_shard(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "ckpt", weights=False)
    save_file({"a": np.zeros((2,), dtype=np.float32)}, str(checkpoint / "model-00001-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_user_error(checkpoint, "model-00002-of-00002.safetensors", "missing")
    save_file({"b": np.zeros((2,), dtype=np.float32)}, str(checkpoint / "model-00002-of-00002.safetensors"))
    validate_checkpoint_dir(checkpoint)


def test_model_numbers_use_our_field_names():
    numbers = model_numbers_from_hf_config(TINY_HF_CONFIG)
    assert numbers == {
        "architecture": "llama",
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": None,
        "max_position_embeddings": 128,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "attention_bias": False,
    }


def test_model_numbers_fill_transformers_defaults():
    qwen = {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
            "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4}
    numbers = model_numbers_from_hf_config(qwen)
    assert numbers["attention_bias"] is True  # Qwen2 always has q/k/v biases
    assert numbers["tie_word_embeddings"] is False
    assert abs(count_parameters(numbers) - 7.62e9) / 7.62e9 < 0.01
    no_gqa = {**TINY_HF_CONFIG}
    del no_gqa["num_key_value_heads"]
    assert model_numbers_from_hf_config(no_gqa)["num_key_value_heads"] == 4


def test_llama_3_1_8b_config_json_matches_the_preset():
    published = {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-05,
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
    }
    assert count_parameters(model_numbers_from_hf_config(published)) == 8_030_261_248


def test_model_numbers_name_missing_keys():
    with pytest.raises(UserError, match="lacks hidden_size, num_hidden_layers"):
        model_numbers_from_hf_config({"model_type": "llama", "vocab_size": 1, "intermediate_size": 1,
                                      "num_attention_heads": 1})
