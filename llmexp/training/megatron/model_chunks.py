"""This rank's megatron-core GPT chunks holding its shard of a Hugging Face model, and the trained weights copied back.

One chunk per virtual pipeline stage, each this rank's tensor-parallel shard of its stage's
layers, wrapped for mixed precision and distributed data parallel. The weights come in and go
back through Megatron-Bridge where it is installed (``bridge``), else through our own
``checkpoint_mapping``. torch and megatron-core are imported inside the functions: megatron-core
is an extra, and the planner imports this package.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List

from llmexp.training import distributed
from llmexp.training.megatron import bridge, checkpoint_mapping


def transformer_config(args):
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    kwargs = dict(args.transformer)
    kwargs["activation_func"] = {"silu": F.silu}[kwargs["activation_func"]]
    kwargs["params_dtype"] = torch_dtype(kwargs["params_dtype"])
    kwargs["pipeline_dtype"] = torch_dtype(kwargs["pipeline_dtype"])
    return TransformerConfig(**kwargs)


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _layer_spec(args):
    from megatron.core.models.gpt import gpt_layer_specs

    if args.layer_spec == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")


def build_chunks(args, hf_model, scratch: Path):
    """This rank's model chunks holding its shard of ``hf_model``'s weights, wrapped for mixed precision and DDP;
    and the Megatron-Bridge converter when Bridge loaded them (None: our ``checkpoint_mapping`` did).

    Bridge converts where it is installed (it maps Transformer Engine's layer spec, and needs the model
    on disk: rank 0 saves it to ``scratch``); our mapping serves elsewhere.
    """
    import torch
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.module import Float16Module

    config = transformer_config(args)
    spec = _layer_spec(args)
    vp = args.parallel_state["virtual_pipeline_model_parallel_size"]
    raw = []
    for vp_rank in range(vp or 1):
        stage = vp_rank if vp else None
        raw.append(GPTModel(
            config, spec, **args.model,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage,
        ))
    converter = None
    if bridge.bridge_available() and args.layer_spec == "transformer_engine":
        if distributed.is_rank_zero():
            hf_model.save_pretrained(str(scratch))
        torch.distributed.barrier()
        converter = bridge.load_hf_weights(raw, hf_model, scratch)
    else:
        _load_with_our_mapping(raw, args, hf_model)
    ddp_config = DistributedDataParallelConfig(**args.ddp)
    chunks = []
    for vp_rank, chunk in enumerate(raw):
        chunk.cuda(torch.cuda.current_device())
        if config.bf16 or config.fp16:
            chunk = Float16Module(config, chunk)
        chunks.append(DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=vp_rank > 0))
    for chunk in chunks:
        chunk.broadcast_params()
    return chunks, config, converter


def _load_with_our_mapping(raw_chunks, args, hf_model) -> None:
    from megatron.core import parallel_state

    numbers = _architecture(args, hf_model)
    hf_state = {key: value.detach().cpu() for key, value in hf_model.state_dict().items()}
    p = args.parallel_state
    for vp_rank, chunk in enumerate(raw_chunks):
        shard = checkpoint_mapping.hf_to_megatron(
            hf_state, numbers, spec=args.layer_spec, tp_size=p["tensor_model_parallel_size"],
            tp_rank=parallel_state.get_tensor_model_parallel_rank(), pp_size=p["pipeline_model_parallel_size"],
            pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
            vp_size=p["virtual_pipeline_model_parallel_size"], vp_rank=vp_rank)
        _load(chunk, shard)


def model_numbers(hf_model) -> SimpleNamespace:
    """The architecture as ModelConfig names it, from the model itself (a checkpoint may differ from the preset)."""
    c = hf_model.config
    return SimpleNamespace(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        tie_word_embeddings=bool(c.tie_word_embeddings),
        attention_bias=bool(getattr(c, "attention_bias", c.model_type == "qwen2")),  # Qwen2 has q/k/v biases, unflagged
        rms_norm_eps=c.rms_norm_eps, rope_theta=_rope_theta(c), max_position_embeddings=c.max_position_embeddings,
    )


def _rope_theta(hf_config) -> float:
    """transformers 5 keeps it in ``rope_parameters``; earlier releases as ``rope_theta``."""
    parameters = getattr(hf_config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def _architecture(args, hf_model) -> Dict[str, Any]:
    """``checkpoint_mapping``'s numbers: the model's, with megatron's padded vocabulary."""
    numbers = vars(model_numbers(hf_model))
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "tie_word_embeddings", "attention_bias")
    return {**{key: numbers[key] for key in keep}, "padded_vocab_size": args.model["vocab_size"]}


def _load(chunk, shard: Dict[str, Any]) -> None:
    checkpoint_mapping.check_against_model(shard, chunk.state_dict())  # every key and shape, or all that differ
    chunk.load_state_dict(shard, strict=False)


def copy_back(chunks, hf_model, args, converter) -> None:
    """Gather the trained weights of every rank's chunks and load them into ``hf_model``.

    Through Megatron-Bridge where it loaded them; otherwise the chunks of data-parallel rank 0 of each
    tp x pp position are gathered to every rank and mapped back with ``checkpoint_mapping``.
    """
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    if args.ddp["use_distributed_optimizer"]:
        for chunk in chunks:
            chunk.start_param_sync(force_sync=True)  # parameters are whole again on every data-parallel rank
    if converter is not None:
        state = bridge.hf_state(converter, chunks)
    else:
        mine = {}
        if parallel_state.get_data_parallel_rank() == 0:
            position = (parallel_state.get_pipeline_model_parallel_rank(),
                        parallel_state.get_tensor_model_parallel_rank())
            for vp_rank, chunk in enumerate(chunks):
                mine[(position[0], vp_rank, position[1])] = {
                    key: value.detach().float().cpu() for key, value in _unwrap(chunk).state_dict().items()
                    if not key.endswith("_extra_state")}
        gathered: List[Dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(gathered, mine)
        p = args.parallel_state
        state = checkpoint_mapping.megatron_to_hf(
            {key: value for part in gathered for key, value in part.items()}, _architecture(args, hf_model),
            spec=args.layer_spec, tp_size=p["tensor_model_parallel_size"], pp_size=p["pipeline_model_parallel_size"],
            vp_size=p["virtual_pipeline_model_parallel_size"])
    reference = hf_model.state_dict()
    if hf_model.config.tie_word_embeddings:  # one tensor under two names; Bridge exports it once
        state.setdefault("lm_head.weight", state.get("model.embed_tokens.weight"))
    with torch.no_grad():
        hf_model.load_state_dict({key: value.to(reference[key].dtype) for key, value in state.items()}, strict=True)


def _unwrap(chunk):
    """The GPTModel inside DDP and Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk
