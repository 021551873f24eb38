"""HF Llama <-> megatron-core GPT weights (llmexp.training.megatron.checkpoint_mapping), checked against megatron-core.

The mapping is plain torch and is checked here on values: round trips over tensor, pipeline and
interleaved layouts, and the fused layouts written out by hand. The models it must fit are real
megatron-core GPTModels, built on CPU by one spawn of 2 gloo processes (tp 2; pp 2; pp 2 x vp 2;
tp 1), whose keys, shapes, layer numbers and checkpoint names the tests compare with the mapping.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from llmexp.errors import UserError
from llmexp.training.megatron.bridge import bridge_available, load_hf_weights
from llmexp.training.megatron.arguments import padded_vocab
from llmexp.training.megatron.checkpoint_mapping import check_against_model, hf_to_megatron, megatron_to_hf
from llmexp.training.megatron.shard_layout import LAYER_SPECS, iter_chunk_ids, layer_numbers
from llmexp.architecture import architecture

from .conftest import REPO

TINY = OmegaConf.to_container(OmegaConf.load(REPO / "llmexp/conf/model/tiny_llama.yaml"))

VARIANTS = {
    "tied_gqa": {},  # tiny_llama as published: tied embeddings, 4 query heads over 2 key/value heads, 8 layers
    "untied_padded": {"tie_word_embeddings": False, "vocab_size": 250},  # megatron pads 250 to 256 rows
    "qkv_bias": {"attention_bias": True, "tie_word_embeddings": False},  # Qwen2: biases on q, k and v only
    "mqa": {"num_key_value_heads": 1},  # one key/value head: tp 2 ranks share it
}
# (tp, pp, vp): every layout the tiny model divides into, up to tp 4 and 8 stages
LAYOUTS = [(1, 1, None), (2, 1, None), (4, 1, None), (1, 2, None), (2, 2, None), (1, 2, 2), (2, 2, 2),
           (1, 4, 2), (2, 8, None)]
GLOO_LAYOUTS = [(2, 1, None), (1, 2, None), (1, 2, 2), (1, 1, None)]  # what 2 processes can build


def arch_of(variant: str, **overrides) -> dict:
    return architecture({**TINY, **VARIANTS[variant], **overrides})


def hf_model(variant: str, seed: int = 0, **overrides):
    """A randomly initialised transformers model with the variant's numbers (Qwen2 where q/k/v have biases)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    arch = arch_of(variant, **overrides)
    numbers = dict(vocab_size=arch["vocab_size"], hidden_size=arch["hidden_size"],
                   intermediate_size=arch["intermediate_size"], num_hidden_layers=arch["num_layers"],
                   num_attention_heads=arch["num_attention_heads"], num_key_value_heads=arch["num_key_value_heads"],
                   tie_word_embeddings=arch["tie_word_embeddings"], rms_norm_eps=TINY["rms_norm_eps"])
    torch.manual_seed(seed)
    if arch["attention_bias"]:
        return Qwen2ForCausalLM(Qwen2Config(**numbers))
    return LlamaForCausalLM(LlamaConfig(head_dim=arch["head_dim"], **numbers))


@pytest.fixture(scope="module")
def hf_states() -> dict:
    return {variant: hf_model(variant).state_dict() for variant in VARIANTS}


def megatron_chunks(state, arch, tp, pp, vp, spec="local") -> dict:
    padded = padded_vocab(arch["vocab_size"], tp)
    return {(p, v, t): hf_to_megatron(state, arch, spec=spec, tp_size=tp, tp_rank=t, pp_size=pp, pp_rank=p,
                                      vp_size=vp, vp_rank=v, padded_vocab_size=padded)
            for p, v, t in iter_chunk_ids(tp, pp, vp)}


# --- the mapping on its own -------------------------------------------------------------------

@pytest.mark.parametrize("spec", LAYER_SPECS)
@pytest.mark.parametrize("tp,pp,vp", LAYOUTS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_gives_back_every_tensor(hf_states, variant, tp, pp, vp, spec):
    state, arch = hf_states[variant], arch_of(variant)
    chunks = megatron_chunks(state, arch, tp, pp, vp, spec)
    back = megatron_to_hf(chunks, arch, spec=spec, tp_size=tp, pp_size=pp, vp_size=vp)
    assert list(back) == list(state)  # LlamaForCausalLM.state_dict()'s keys, in its order
    unequal = [key for key in state if not torch.equal(back[key], state[key])]
    assert unequal == []
    if arch["tie_word_embeddings"]:
        assert back["lm_head.weight"] is back["model.embed_tokens.weight"]
    layers_held = sum(len({k.split(".")[2] for k in chunk if k.startswith("decoder.layers.")})
                      for chunk in chunks.values())
    assert layers_held == arch["num_layers"] * tp


def test_qkv_is_fused_per_query_group_and_tp_ranks_hold_whole_groups(hf_states):
    state, arch = hf_states["qkv_bias"], arch_of("qkv_bias")  # 4 query heads, 2 groups, head_dim 32

    def head(tensor, index):
        return tensor[index * 32:(index + 1) * 32]

    hf = "model.layers.3.self_attn."
    for rank in range(2):
        chunk = hf_to_megatron(state, arch, tp_size=2, tp_rank=rank, pp_size=2, pp_rank=0, padded_vocab_size=256)
        for suffix in ("weight", "bias"):
            q, k, v = (state[f"{hf}{name}_proj.{suffix}"] for name in ("q", "k", "v"))
            expected = torch.cat([head(q, 2 * rank), head(q, 2 * rank + 1), head(k, rank), head(v, rank)])
            assert torch.equal(chunk[f"decoder.layers.3.self_attention.linear_qkv.{suffix}"], expected)
        assert torch.equal(chunk["decoder.layers.3.self_attention.linear_proj.weight"],
                           state[hf + "o_proj.weight"][:, rank * 64:(rank + 1) * 64])


def test_query_groups_split_over_more_ranks_than_key_value_heads(hf_states):
    """One key/value head, tp 2: rank 0 holds q heads 0-2 of the group's 6 rows, rank 1 q head 3, k and v."""
    state, arch = hf_states["mqa"], arch_of("mqa")
    q, k, v = (state[f"model.layers.0.self_attn.{name}_proj.weight"] for name in ("q", "k", "v"))
    ranks = [hf_to_megatron(state, arch, tp_size=2, tp_rank=r)["decoder.layers.0.self_attention.linear_qkv.weight"]
             for r in range(2)]
    assert torch.equal(ranks[0], q[:96]) and torch.equal(ranks[1], torch.cat([q[96:], k, v]))


def test_fc1_shard_is_its_gate_slice_then_its_up_slice(hf_states):
    state, arch = hf_states["tied_gqa"], arch_of("tied_gqa")  # intermediate 384: 192 per rank
    gate, up, down = (state[f"model.layers.5.mlp.{name}_proj.weight"] for name in ("gate", "up", "down"))
    for rank in range(2):
        chunk = hf_to_megatron(state, arch, tp_size=2, tp_rank=rank, pp_size=2, pp_rank=1)  # layers 4-7
        part = slice(rank * 192, (rank + 1) * 192)
        assert torch.equal(chunk["decoder.layers.1.mlp.linear_fc1.weight"], torch.cat([gate[part], up[part]]))
        assert torch.equal(chunk["decoder.layers.1.mlp.linear_fc2.weight"], down[:, part])


def test_vocabulary_is_padded_with_zero_rows_and_split_by_rows(hf_states):
    state, arch = hf_states["untied_padded"], arch_of("untied_padded")
    assert padded_vocab(250, 2) == 256 and padded_vocab(250, 1, make_vocab_size_divisible_by=1) == 250
    last = hf_to_megatron(state, arch, tp_size=2, tp_rank=1, padded_vocab_size=256)
    zeros = torch.zeros(6, 128)
    assert torch.equal(last["embedding.word_embeddings.weight"],
                       torch.cat([state["model.embed_tokens.weight"][128:], zeros]))
    assert torch.equal(last["output_layer.weight"], torch.cat([state["lm_head.weight"][128:], zeros]))


def test_tied_embedding_has_no_output_weight_on_one_stage_and_a_copy_on_the_last_of_several(hf_states):
    state, arch = hf_states["tied_gqa"], arch_of("tied_gqa")
    assert "output_layer.weight" not in hf_to_megatron(state, arch)
    first = hf_to_megatron(state, arch, tp_size=2, tp_rank=1, pp_size=2, pp_rank=0)
    last = hf_to_megatron(state, arch, tp_size=2, tp_rank=1, pp_size=2, pp_rank=1)
    assert "output_layer.weight" not in first and "embedding.word_embeddings.weight" not in last
    assert torch.equal(last["output_layer.weight"], first["embedding.word_embeddings.weight"])
    assert "output_layer.weight" in hf_to_megatron(hf_states["untied_padded"], arch_of("untied_padded"),
                                                   padded_vocab_size=256)


def test_transformer_engine_spec_fuses_the_norms_into_the_next_linear_layer(hf_states):
    state, arch = hf_states["tied_gqa"], arch_of("tied_gqa")
    chunk = hf_to_megatron(state, arch, spec="transformer_engine")
    assert torch.equal(chunk["decoder.layers.2.self_attention.linear_qkv.layer_norm_weight"],
                       state["model.layers.2.input_layernorm.weight"])
    assert torch.equal(chunk["decoder.layers.2.mlp.linear_fc1.layer_norm_weight"],
                       state["model.layers.2.post_attention_layernorm.weight"])
    assert not any("input_layernorm" in key or "pre_mlp_layernorm" in key for key in chunk)


def test_layer_numbers_interleave_chunks_round_robin():
    assert [list(layer_numbers(8, 2, p, 2, v)) for v in range(2) for p in range(2)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert list(layer_numbers(8, 4, 3)) == [6, 7] and list(layer_numbers(8, 1, 0)) == list(range(8))


# --- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch_overrides,layout,field", [
    ({}, dict(tp_size=3), "model.num_attention_heads=4"),
    ({"num_attention_heads": 12, "num_key_value_heads": 4}, dict(tp_size=6), "model.num_key_value_heads=4"),
    ({}, dict(pp_size=3), "model.num_layers=8 does not split evenly over parallelism.pp=3 = 3"),
    ({}, dict(pp_size=2, vp_size=8), "parallelism.pp=2 x backend.virtual_pipeline_stages=8 = 16 model chunks"),
    ({}, dict(vp_size=2), "parallelism.pp=1"),
    ({"vocab_size": 250}, dict(tp_size=4), "padded_vocab(250, 4)"),
])
def test_layouts_that_do_not_divide_are_refused_with_the_field(arch_overrides, layout, field):
    with pytest.raises(UserError, match=re.escape(field)):
        hf_to_megatron({}, architecture({**TINY, **arch_overrides}), **layout)


def test_unknown_spec_is_refused():
    with pytest.raises(UserError, match="local, transformer_engine"):
        hf_to_megatron({}, arch_of("tied_gqa"), spec="te")


def test_hf_keys_that_megatron_cannot_hold_or_that_are_missing_are_named(hf_states):
    llama_with_o_bias = dict(hf_states["tied_gqa"], **{"model.layers.0.self_attn.o_proj.bias": torch.zeros(128)})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.o_proj\.bias.*add_qkv_bias"):
        hf_to_megatron(llama_with_o_bias, arch_of("tied_gqa"))
    incomplete = {k: v for k, v in hf_states["tied_gqa"].items() if k != "model.layers.2.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"missing \['model\.layers\.2\.mlp\.up_proj\.weight'\]"):
        hf_to_megatron(incomplete, arch_of("tied_gqa"))


def test_megatron_chunks_missing_or_unknown_are_named(hf_states):
    arch = arch_of("tied_gqa")
    chunks = megatron_chunks(hf_states["tied_gqa"], arch, 2, 2, None)
    with pytest.raises(ValueError, match=r"missing \[\(1, 0, 1\)\]"):
        megatron_to_hf({k: v for k, v in chunks.items() if k != (1, 0, 1)}, arch, tp_size=2, pp_size=2)
    chunks[(0, 0, 1)] = dict(chunks[(0, 0, 1)], **{"decoder.layers.0.mlp.linear_fc1.bias": torch.zeros(384)})
    del chunks[(1, 0, 0)]["decoder.final_layernorm.weight"]
    chunks[(1, 0, 1)]["decoder.layers.0.mlp.linear_fc1._extra_state"] = None  # carries no weight: ignored
    with pytest.raises(ValueError) as refused:
        megatron_to_hf(chunks, arch, tp_size=2, pp_size=2)
    assert str(refused.value).splitlines()[1:] == [
        "chunk (0, 0, 1): missing none, unknown ['decoder.layers.0.mlp.linear_fc1.bias']",
        "chunk (1, 0, 0): missing ['decoder.final_layernorm.weight'], unknown none",
    ]


def test_check_against_model_lists_every_difference():
    mapped = {"a.weight": torch.zeros(2, 3), "b.weight": torch.zeros(4), "c.weight": torch.zeros(1)}
    model = {"a.weight": torch.zeros(2, 3), "b.weight": torch.zeros(5), "d.weight": torch.zeros(1),
             "a._extra_state": None}
    with pytest.raises(ValueError) as refused:
        check_against_model(mapped, model)
    assert str(refused.value).splitlines()[1:] == [
        "missing (in the model, not mapped): d.weight", "unexpected (mapped, not in the model): c.weight",
        "shape differs: b.weight: mapped (4,), model (5,)"]
    check_against_model(mapped, {**mapped, "c._extra_state": None})


def test_without_megatron_bridge_the_bridge_path_says_what_to_install(tmp_path):
    available = bridge_available()
    assert "megatron.bridge" not in sys.modules  # found without importing it (its import needs TE)
    if available:
        pytest.skip("megatron-bridge is installed here: the AutoBridge path runs instead of the error")
    with pytest.raises(UserError, match=re.escape("pip install megatron-bridge")):
        load_hf_weights([], None, tmp_path)


# --- against megatron-core GPTModels built in a 2-process gloo world ---------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def transformer_config(arch: dict, tp: int = 1, pp: int = 1, vp=None):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=arch["num_layers"], hidden_size=arch["hidden_size"], ffn_hidden_size=arch["intermediate_size"],
        num_attention_heads=arch["num_attention_heads"], num_query_groups=arch["num_key_value_heads"],
        kv_channels=arch["head_dim"], add_qkv_bias=arch["attention_bias"], add_bias_linear=False,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vp,
        pipeline_dtype=torch.float32, use_cpu_initialization=True, perform_initialization=False,
        hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=False, apply_rope_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
    )


def gpt_chunks(arch: dict, tp: int, pp: int, vp) -> list:
    """This rank's model chunks, as megatron-LM's model provider builds them (local layer spec).

    The embedding group is left out: megatron-core syncs a tied output layer with the embedding
    through it by moving the weight to CUDA; without it the model is the same, only not synced.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.process_groups_config import ProcessGroupCollection

    groups = ProcessGroupCollection.use_mpu_process_groups()
    groups.embd = None
    config = transformer_config(arch, tp, pp, vp)
    chunks = []
    for vp_stage in range(vp or 1):
        stage = vp_stage if vp else None
        chunks.append(GPTModel(
            config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=padded_vocab(arch["vocab_size"], tp),
            max_sequence_length=TINY["max_position_embeddings"], position_embedding_type="rope",
            share_embeddings_and_output_weights=arch["tie_word_embeddings"], vp_stage=stage, pg_collection=groups,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
        ))
    return chunks


OFFSET_LAYOUTS = [(8, 2, None), (8, 4, None), (8, 2, 2), (8, 2, 4), (8, 4, 2), (12, 3, 2), (16, 2, 4)]


def build_in_gloo_world(rank: int, world: int, port: int, workdir: str) -> None:
    """One rank: build every GLOO_LAYOUTS model for every variant and record what the tests compare."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    states = torch.load(Path(workdir) / "hf_states.pt")
    results = {"chunks": {}, "loads": {}, "checkpoint_keys": {}, "offsets": {}}
    for tp, pp, vp in GLOO_LAYOUTS:
        parallel_state.initialize_model_parallel(tp, pp, virtual_pipeline_model_parallel_size=vp)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        for variant in VARIANTS:
            arch = arch_of(variant)
            for vp_rank, model in enumerate(gpt_chunks(arch, tp, pp, vp)):
                results["chunks"][(tp, pp, vp, variant, (pp_rank, vp_rank, tp_rank))] = {
                    "shapes": {key: None if value is None else tuple(value.shape)
                               for key, value in model.state_dict().items()},
                    "layer_numbers": [layer.layer_number for layer in model.decoder.layers],
                }
                if (tp, pp) == (1, 1) and rank == 0:
                    mapped = hf_to_megatron(states[variant], arch,
                                            padded_vocab_size=padded_vocab(arch["vocab_size"], 1))
                    model.load_state_dict(mapped, strict=True)
                    loaded = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
                    results["loads"][variant] = sorted(k for k in loaded if not torch.equal(loaded[k], mapped[k]))
                    results["checkpoint_keys"][variant] = {k: v.key for k, v in model.sharded_state_dict().items()}
        parallel_state.destroy_model_parallel()
    if rank == 0:
        for num_layers, pp, vp in OFFSET_LAYOUTS:
            config = transformer_config({**arch_of("tied_gqa"), "num_layers": num_layers}, pp=pp, vp=vp)
            for pp_rank in range(pp):
                for vp_rank in range(vp or 1):
                    stage = vp_rank if vp else None
                    results["offsets"][(num_layers, pp, vp, pp_rank, vp_rank)] = (
                        get_transformer_layer_offset(config, vp_stage=stage, pp_rank=pp_rank),
                        get_num_layers_to_build(config, vp_stage=stage, pp_rank=pp_rank))
    torch.save(results, Path(workdir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def megatron_built(hf_states, tmp_path_factory) -> dict:
    """Every rank's records from one spawn of 2 processes (about 15 s: each imports megatron-core)."""
    pytest.importorskip("megatron.core")
    import torch.multiprocessing as mp

    workdir = tmp_path_factory.mktemp("megatron")
    torch.save(hf_states, workdir / "hf_states.pt")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(build_in_gloo_world, args=(2, free_port(), str(workdir)), nprocs=2, join=True)
    merged = {"chunks": {}, "loads": {}, "checkpoint_keys": {}, "offsets": {}}
    for rank in range(2):
        for name, records in torch.load(workdir / f"rank{rank}.pt").items():
            merged[name].update(records)
    return merged


def meta_state(shapes: dict) -> dict:
    return {key: None if shape is None else torch.empty(shape, device="meta") for key, shape in shapes.items()}


@pytest.mark.parametrize("tp,pp,vp", GLOO_LAYOUTS)
def test_mapped_chunks_have_the_keys_and_shapes_of_megatron_gpt_models(hf_states, megatron_built, tp, pp, vp):
    for variant in VARIANTS:
        arch = arch_of(variant)
        built = {chunk_id: record for (t, p, v, name, chunk_id), record in megatron_built["chunks"].items()
                 if (t, p, v, name) == (tp, pp, vp, variant)}
        mapped = megatron_chunks(hf_states[variant], arch, tp, pp, vp)
        assert sorted(built) == sorted(mapped)
        for chunk_id, state in mapped.items():
            check_against_model(state, meta_state(built[chunk_id]["shapes"]))
            layers = layer_numbers(arch["num_layers"], pp, chunk_id[0], vp, chunk_id[1])
            assert built[chunk_id]["layer_numbers"] == [number + 1 for number in layers]  # megatron counts from 1


def test_tied_output_layer_exists_only_on_a_last_stage_without_the_embedding(megatron_built):
    def has_output_weight(tp, pp, vp, chunk_id):
        return "output_layer.weight" in megatron_built["chunks"][(tp, pp, vp, "tied_gqa", chunk_id)]["shapes"]

    assert not has_output_weight(1, 1, None, (0, 0, 0))
    assert has_output_weight(1, 2, None, (1, 0, 0)) and has_output_weight(1, 2, 2, (1, 1, 0))


def test_mapped_state_loads_strictly_into_a_gpt_model(megatron_built):
    assert megatron_built["loads"] == {variant: [] for variant in VARIANTS}  # no key whose value differs


def test_transformer_engine_names_are_megatrons_checkpoint_names(hf_states, megatron_built):
    """megatron-core saves local-spec layers under the Transformer Engine names (for either spec to load)."""
    for variant in ("tied_gqa", "qkv_bias"):
        state, arch = hf_states[variant], arch_of(variant)
        local = hf_to_megatron(state, arch, padded_vocab_size=256)
        engine = hf_to_megatron(state, arch, spec="transformer_engine", padded_vocab_size=256)
        checkpoint_keys = megatron_built["checkpoint_keys"][variant]
        assert [checkpoint_keys[key] for key in local] == [re.sub(r"layers\.\d+\.", "layers.", key) for key in engine]


def test_layer_numbers_follow_megatrons_offsets(megatron_built):
    offsets = megatron_built["offsets"]
    assert len(offsets) == sum(pp * (vp or 1) for _, pp, vp in OFFSET_LAYOUTS)
    for (num_layers, pp, vp, pp_rank, vp_rank), (offset, count) in offsets.items():
        numbers = layer_numbers(num_layers, pp, pp_rank, vp, vp_rank)
        assert (numbers.start, len(numbers)) == (offset, count), (num_layers, pp, vp, pp_rank, vp_rank)
