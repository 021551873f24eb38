"""megatron-core's tensor-parallel layers, loaded with our mapping's shards, compute what the dense HF layers do.

One spawn of 2 CPU processes on gloo with ``initialize_model_parallel(tp=2)``: for each variant,
the MLP of a transformers decoder layer as megatron runs it (fc1 a ColumnParallelLinear with
gather_output=False, SiLU(gate) * up on each rank's slice, fc2 a RowParallelLinear with
input_is_parallel=True), its gradients, and the attention projections (a megatron SelfAttention's
``linear_qkv`` split by its own ``get_query_key_value_tensors``; ``linear_proj``). A shard that
put gate and up on different ranks, or q heads in another group's place, fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmexp.training.megatron.arguments import padded_vocab
from llmexp.training.megatron.checkpoint_mapping import hf_to_megatron

from .test_megatron_checkpoint import TINY, arch_of, free_port, hf_model, transformer_config

VARIANTS = ("tied_gqa", "mqa", "qkv_bias")  # 2 key/value groups; 1 group over 2 ranks; q/k/v biases
LAYERS = {"num_layers": 2}  # of the tiny model: building 8 would double the run
LAYER = 1  # the decoder layer whose weights the layers load
SEQ, BATCH = 5, 3


def parallel_layers_rank(rank: int, world: int, port: int, workdir: str) -> None:
    """One tp rank: run the megatron layers and the dense HF ones on the same input; save both."""
    import torch.distributed as dist
    import torch.nn.functional as F

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import build_module

    parallel_state.initialize_model_parallel(2, 1)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    records = {"tp_rank": tp_rank}
    for variant in VARIANTS:
        arch = arch_of(variant, **LAYERS)
        hf = hf_model(variant, **LAYERS)  # same seed on both ranks: the same dense model
        hidden, ffn = arch["hidden_size"], arch["intermediate_size"]
        mapped = hf_to_megatron(hf.state_dict(), arch, tp_size=2, tp_rank=tp_rank,
                                padded_vocab_size=padded_vocab(arch["vocab_size"], 2))
        prefix = f"decoder.layers.{LAYER}."
        config = transformer_config(arch, tp=2)
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(SEQ, BATCH, hidden, generator=generator)
        probe = torch.randn(SEQ, BATCH, hidden, generator=generator)  # loss = <output, probe>

        fc1 = ColumnParallelLinear(hidden, 2 * ffn, config=config, init_method=config.init_method, bias=False,
                                   gather_output=False)
        fc2 = RowParallelLinear(ffn, hidden, config=config, init_method=config.init_method, bias=False,
                                input_is_parallel=True, skip_bias_add=False)
        fc1.load_state_dict({"weight": mapped[prefix + "mlp.linear_fc1.weight"]})
        fc2.load_state_dict({"weight": mapped[prefix + "mlp.linear_fc2.weight"]})
        x_parallel = x.clone().requires_grad_()
        fused, _ = fc1(x_parallel)
        gate, up = fused.chunk(2, dim=-1)
        out, _ = fc2(F.silu(gate) * up)
        (out * probe).sum().backward()

        mlp = hf.model.layers[LAYER].mlp
        x_dense = x.clone().requires_grad_()
        dense = mlp(x_dense)
        (dense * probe).sum().backward()
        grads = {name: param.grad for name, param in hf.named_parameters()}
        grad_state = {key: grads.get(key) if grads.get(key) is not None else torch.zeros_like(value)
                      for key, value in hf.state_dict().items()}
        expected_grads = hf_to_megatron(grad_state, arch, tp_size=2, tp_rank=tp_rank,
                                        padded_vocab_size=padded_vocab(arch["vocab_size"], 2))

        spec = get_gpt_layer_local_spec(normalization="RMSNorm").submodules.self_attention
        attention = build_module(spec, config=config, layer_number=LAYER + 1)
        qkv_state = {"weight": mapped[prefix + "self_attention.linear_qkv.weight"]}
        if arch["attention_bias"]:
            qkv_state["bias"] = mapped[prefix + "self_attention.linear_qkv.bias"]
        attention.linear_qkv.load_state_dict(qkv_state)
        attention.linear_proj.load_state_dict({"weight": mapped[prefix + "self_attention.linear_proj.weight"]})
        dense_attention = hf.model.layers[LAYER].self_attn
        heads, head_dim = arch["num_attention_heads"], arch["head_dim"]
        own_heads = slice(tp_rank * heads // 2 * head_dim, (tp_rank + 1) * heads // 2 * head_dim)
        context = torch.randn(SEQ, BATCH, heads * head_dim, generator=generator)  # attention output, per head
        with torch.no_grad():
            if arch["num_key_value_heads"] >= 2:
                q, k, v = attention.get_query_key_value_tensors(x)
            else:  # megatron all-gathers a group shared by ranks through CUDA: compare the layer's own rows
                (q, _), k, v = attention.linear_qkv(x), None, None
            proj, _ = attention.linear_proj(context[..., own_heads])
            dense_q, dense_k, dense_v = (getattr(dense_attention, f"{name}_proj")(x).view(SEQ, BATCH, -1, head_dim)
                                         for name in ("q", "k", "v"))
            dense_proj = dense_attention.o_proj(context)
        records[variant] = {
            "mlp": out.detach(), "dense_mlp": dense.detach(),
            "x_grad": x_parallel.grad, "dense_x_grad": x_dense.grad,
            "fc1_grad": fc1.weight.grad, "expected_fc1_grad": expected_grads[prefix + "mlp.linear_fc1.weight"],
            "fc2_grad": fc2.weight.grad, "expected_fc2_grad": expected_grads[prefix + "mlp.linear_fc2.weight"],
            "q": q, "k": k, "v": v, "dense_q": dense_q, "dense_k": dense_k, "dense_v": dense_v,
            "proj": proj, "dense_proj": dense_proj,
        }
    torch.save(records, Path(workdir) / f"rank{rank}.pt")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list:
    """Both ranks' records, by tp rank (one spawn, about 10 s: each process imports megatron-core)."""
    pytest.importorskip("megatron.core")
    import torch.multiprocessing as mp

    workdir = tmp_path_factory.mktemp("tensor_parallel")
    mp.spawn(parallel_layers_rank, args=(2, free_port(), str(workdir)), nprocs=2, join=True)
    records = [torch.load(workdir / f"rank{rank}.pt") for rank in range(2)]
    return sorted(records, key=lambda record: record["tp_rank"])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("variant", VARIANTS)
def test_parallel_swiglu_mlp_equals_the_dense_hf_mlp(ranks, variant):
    for record in ranks:
        run = record[variant]
        assert max_diff(run["mlp"], run["dense_mlp"]) < 1e-5
        assert run["dense_mlp"].abs().max() > 1e-3  # the comparison is not between two zeros


@pytest.mark.parametrize("variant", VARIANTS)
def test_parallel_mlp_gradients_are_the_dense_ones_sharded_the_same_way(ranks, variant):
    for record in ranks:
        run = record[variant]
        assert max_diff(run["fc1_grad"], run["expected_fc1_grad"]) < 1e-5
        assert max_diff(run["fc2_grad"], run["expected_fc2_grad"]) < 1e-5
        assert max_diff(run["x_grad"], run["dense_x_grad"]) < 1e-5  # the column layer all-reduces it
        assert run["expected_fc1_grad"].abs().max() > 1e-3
    full_fc1 = torch.cat([record[variant]["fc1_grad"] for record in ranks])
    assert full_fc1.shape == (2 * TINY["intermediate_size"], TINY["hidden_size"])


@pytest.mark.parametrize("variant", ["tied_gqa", "qkv_bias"])
def test_each_rank_gets_the_q_k_v_of_its_own_query_groups(ranks, variant):
    """4 query heads in 2 groups: rank r gets q heads 2r and 2r+1, and key/value head r (biases added)."""
    for rank, record in enumerate(ranks):
        run = record[variant]
        assert max_diff(run["q"], run["dense_q"][:, :, 2 * rank:2 * rank + 2]) < 1e-5
        assert max_diff(run["k"], run["dense_k"][:, :, rank:rank + 1]) < 1e-5
        assert max_diff(run["v"], run["dense_v"][:, :, rank:rank + 1]) < 1e-5
        assert max_diff(run["proj"], run["dense_proj"]) < 1e-5  # row-parallel linear_proj, all-reduced


def test_one_key_value_group_is_split_within_its_rows(ranks):
    """4 query heads, 1 key/value head: the group's rows [q0 q1 q2 q3 k v] split 3 heads + 3 heads."""
    first, second = (record["mqa"] for record in ranks)
    dense_q, dense_k, dense_v = first["dense_q"], first["dense_k"], first["dense_v"]
    assert max_diff(first["q"], dense_q[:, :, :3].flatten(2)) < 1e-5
    assert max_diff(second["q"], torch.cat([dense_q[:, :, 3], dense_k[:, :, 0], dense_v[:, :, 0]], dim=-1)) < 1e-5
    for record in ranks:
        assert max_diff(record["mqa"]["proj"], record["mqa"]["dense_proj"]) < 1e-5
