"""The serving engine: greedy equals ``model.generate`` under continuous batching, batching really
batches, the queue is bounded, cancellation frees slots, LoRA adapters are chosen per request,
and a ModelOpt-quantized checkpoint serves what it computes in-process."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from llmexp.data.embedded import CONTEXT_WORD, build_world
from llmexp.data.tokenizer import word_level_tokenizer
from llmexp.errors import UserError
from llmexp.models.loading import build_model, load_model, save_model
from llmexp.serving.engine import Engine
from llmexp.serving.generation import GenerationFailed, GenerationRequest, QueueFull, RequestFailed, UnknownModel
from llmexp.serving.limits import InvalidRequest
from llmexp.serving.served_models import load_served_models
from tests.conftest import REPO

NAME = "varied"


def build_varied_model(seed: int = 0):
    """The 2-layer tiny Llama with weights drawn wider than at init, so greedy continuations vary with the
    context instead of repeating one token (a test of positions and masks needs that); and its tokenizer."""
    torch.manual_seed(seed)
    model_cfg = OmegaConf.load(REPO / "llmexp/conf/model/tiny_llama.yaml")
    model_cfg.num_layers = 2
    tokenizer = word_level_tokenizer(build_world(0).vocabulary())
    model = build_model(model_cfg, tokenizer)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.2)
    return model, tokenizer


@pytest.fixture(scope="module")
def varied_checkpoint(tmp_path_factory) -> Path:
    model, tokenizer = build_varied_model()
    path = tmp_path_factory.mktemp("serve") / NAME
    save_model(model, tokenizer, path)
    return path


@pytest.fixture(scope="module")
def served(varied_checkpoint):
    return load_served_models(varied_checkpoint)


def random_prompts(count: int, seed: int = 0):
    world = build_world(0)
    # the words of the world's texts (not the names only the knowledge study uses), so prompts stay as they were
    words = [word for word in world.vocabulary() if word not in world.unseen and word != CONTEXT_WORD]
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(2, 40))) for _ in range(count)]


def generate_alone(model, tokenizer, prompt: str, max_new_tokens: int, **kwargs):
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def test_greedy_equals_generate_alone_when_requests_join_and_leave_mid_flight(served):
    prompts = random_prompts(10)
    lengths = [5 + 3 * i for i in range(10)]  # rows leave at different steps
    expected = [generate_alone(served.model, served.tokenizer, p, n) for p, n in zip(prompts, lengths)]
    assert all(len(set(tokens)) > 3 for tokens in expected)  # varied output: a real test of positions
    with Engine(served, max_batch_size=4, max_queue=16) as engine:
        first = [engine.submit(GenerationRequest(NAME, p, n, temperature=0.0)) for p, n in zip(prompts[:3], lengths[:3])]
        first_chunks = [next(iter(first[0]))]  # the batch is decoding: the rest join mid-flight
        rest = [engine.submit(GenerationRequest(NAME, p, n, temperature=0.0)) for p, n in zip(prompts[3:], lengths[3:])]
        outputs = [first_chunks + list(first[0])] + [list(stream) for stream in first[1:] + rest]
        assert engine.prefill_steps >= 3  # several prefills merged into a running batch
    for chunks, tokens, limit in zip(outputs, expected, lengths):
        assert [t for chunk in chunks for t in chunk.token_ids] == tokens
        assert [chunk.finish_reason for chunk in chunks[:-1]] == [None] * (len(chunks) - 1)
        ended_by_eos = tokens[-1] == served.tokenizer.eos_token_id
        assert chunks[-1].finish_reason == ("stop" if ended_by_eos else "length")
        assert ended_by_eos or len(tokens) == limit
        joined = "".join(chunk.text for chunk in chunks)
        assert joined == served.tokenizer.decode(tokens, skip_special_tokens=True)


def test_concurrent_requests_share_forward_steps(served):
    with Engine(served, max_batch_size=8, max_queue=8) as engine:
        with engine.paused():  # all eight queue before the worker looks: one batch
            streams = [engine.submit(GenerationRequest(NAME, p, 16, temperature=0.0, ignore_eos=True))
                       for p in random_prompts(8, seed=1)]
        results = [stream.read_all() for stream in streams]
        assert all(len(result.token_ids) == 16 for result in results)
        # one prefill gives every first token, then 15 decoding steps of all 8 rows: 16 passes, not 8 x 16
        assert (engine.prefill_steps, engine.decode_steps) == (1, 15)
        assert engine.generated_tokens == 128


def test_eos_ends_a_row_with_stop_like_generate(varied_checkpoint):
    served = load_served_models(varied_checkpoint)
    prompt = random_prompts(1, seed=2)[0]
    plain = generate_alone(served.model, served.tokenizer, prompt, 12)
    eos = plain[4]  # make the fifth greedy token the end of sequence
    served.model.generation_config.eos_token_id = eos
    expected = generate_alone(served.model, served.tokenizer, prompt, 12, eos_token_id=eos)
    with Engine(served) as engine:
        result = engine.submit(GenerationRequest(NAME, prompt, 12, temperature=0.0)).read_all()
    assert list(result.token_ids) == expected == plain[: plain.index(eos) + 1]
    assert result.finish_reason == "stop"
    assert result.text == served.tokenizer.decode(expected[:-1])


def test_a_stop_string_ends_the_text_before_it_and_is_never_streamed(served):
    prompt = random_prompts(1, seed=3)[0]
    tokens = generate_alone(served.model, served.tokenizer, prompt, 12)
    words = served.tokenizer.decode(tokens).split(" ")
    stop = f"{words[4]} {words[5]}"
    before = served.tokenizer.decode(tokens).split(stop)[0]
    with Engine(served) as engine:
        chunks = list(engine.submit(GenerationRequest(NAME, prompt, 12, temperature=0.0, stop=(stop, "never-seen"))))
    assert "".join(chunk.text for chunk in chunks) == before
    assert chunks[-1].finish_reason == "stop"
    assert all(words[5] not in chunk.text or chunk is chunks[-1] for chunk in chunks)


def test_the_queue_is_bounded_and_overflow_is_refused_at_once(served):
    with Engine(served, max_batch_size=1, max_queue=2) as engine:
        with engine.paused():
            waiting = [engine.submit(GenerationRequest(NAME, "hello", 4, temperature=0.0)) for _ in range(2)]
            with pytest.raises(QueueFull, match="max_queue=2"):
                engine.submit(GenerationRequest(NAME, "hello", 4, temperature=0.0))
            assert engine.waiting_count == 2
            assert engine.metrics.queue_depth._value.get() == 2
        assert [stream.read_all().finish_reason for stream in waiting] == ["length", "length"]


def test_cancelling_frees_the_slot_for_the_next_request(served):
    with Engine(served, max_batch_size=1, max_queue=4) as engine:
        long = engine.submit(GenerationRequest(NAME, "hello", 200, temperature=0.0, ignore_eos=True))
        chunks = iter(long)
        next(chunks)
        queued = engine.submit(GenerationRequest(NAME, "hello", 3, temperature=0.0))
        long.cancel()
        assert queued.read_all().finish_reason == "length"  # it got the only slot
        rest = list(chunks)
        assert rest[-1].finish_reason == "cancelled"
        assert len(rest) < 199
        assert engine.running_count == 0


def test_bad_requests_are_refused_with_the_reason(served):
    with Engine(served) as engine:
        with pytest.raises(UnknownModel, match=f"served models: {NAME}"):
            engine.submit(GenerationRequest("gpt-4", "hello"))
        context = served.context_length
        with pytest.raises(InvalidRequest, match=f"context is {context} tokens"):
            engine.submit(GenerationRequest(NAME, " ".join(["hello"] * context)))
        with pytest.raises(InvalidRequest, match="max_tokens <= "):
            engine.submit(GenerationRequest(NAME, "hello", context))
        with pytest.raises(InvalidRequest, match="max_tokens=0"):
            engine.submit(GenerationRequest(NAME, "hello", 0))
        with pytest.raises(InvalidRequest, match="top_p=0"):
            engine.submit(GenerationRequest(NAME, "hello", top_p=0))
        with pytest.raises(InvalidRequest, match="outside this model's vocabulary"):
            engine.submit(GenerationRequest(NAME, prompt_ids=[1, 10**6]))
        assert engine.submit(GenerationRequest(NAME, "hello", 2, temperature=0.0)).read_all().finish_reason == "length"


def test_a_seed_makes_sampling_repeatable_whatever_else_is_in_the_batch(served):
    prompt = random_prompts(1, seed=4)[0]
    request = GenerationRequest(NAME, prompt, 12, temperature=1.5, top_p=0.9, seed=7, ignore_eos=True)
    with Engine(served, max_batch_size=8) as engine:
        alone = engine.submit(request).read_all()
        with engine.paused():
            others = [engine.submit(GenerationRequest(NAME, p, 12, temperature=1.0)) for p in random_prompts(3, seed=5)]
            together = engine.submit(request)
        assert together.read_all().token_ids == alone.token_ids
        for stream in others:
            stream.read_all()
        reseeded = engine.submit(GenerationRequest(NAME, prompt, 12, temperature=1.5, top_p=0.9, seed=8,
                                                   ignore_eos=True)).read_all()
    greedy = generate_alone(served.model, served.tokenizer, prompt, 12)
    assert alone.token_ids != tuple(greedy) or reseeded.token_ids != tuple(greedy)  # it did sample


def test_a_stream_is_also_an_async_iterator(served):
    prompt = random_prompts(1, seed=6)[0]
    with Engine(served) as engine:
        async def read():
            stream = engine.submit(GenerationRequest(NAME, prompt, 6, temperature=0.0))
            return [chunk async for chunk in stream]

        chunks = asyncio.run(read())
    assert [t for c in chunks for t in c.token_ids] == generate_alone(served.model, served.tokenizer, prompt, 6)


def save_lora_adapter(checkpoint: Path, path: Path, seed: int) -> Path:
    """A LoRA adapter on every linear layer with random (nonzero) A and B, saved as technique=lora saves one."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_model(checkpoint)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights=False, task_type="CAUSAL_LM"))
    peft_model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def test_each_request_gets_its_adapter_in_one_mixed_batch(varied_checkpoint, tmp_path):
    from peft import PeftModel

    adapters = {name: save_lora_adapter(varied_checkpoint, tmp_path / name, seed)
                for name, seed in (("sql", 1), ("chat", 2))}
    served = load_served_models(varied_checkpoint, adapters=adapters)
    assert served.names == [NAME, "sql", "chat"]
    prompts = random_prompts(3, seed=7)
    with Engine(served, max_batch_size=8) as engine:
        with engine.paused():  # one batch holding the base and both adapters
            streams = {(model, p): engine.submit(GenerationRequest(model, p, 8, temperature=0.0))
                       for model in served.names for p in prompts}
        got = {key: list(stream.read_all().token_ids) for key, stream in streams.items()}
    base, _ = load_model(varied_checkpoint)
    for name, directory in adapters.items():
        reference = PeftModel.from_pretrained(load_model(varied_checkpoint)[0], str(directory)).eval()
        for prompt in prompts:
            assert got[(name, prompt)] == generate_alone(reference, served.tokenizer, prompt, 8)
            assert got[(name, prompt)] != got[(NAME, prompt)]
    for prompt in prompts:
        assert got[(NAME, prompt)] == generate_alone(base, served.tokenizer, prompt, 8)


def test_model_dir_may_be_a_stage_or_an_adapter_but_not_a_whole_run(varied_checkpoint, tmp_path):
    import json
    import shutil

    stage = tmp_path / "run" / "baseline"
    shutil.copytree(varied_checkpoint, stage / "model")
    assert load_served_models(stage).base_name == "baseline"
    with pytest.raises(UserError, match="run directory holding several models"):
        load_served_models(tmp_path / "run")
    adapter = save_lora_adapter(stage / "model", tmp_path / "run" / "lora" / "adapter", seed=3)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == stage / "model"
    served = load_served_models(adapter)
    assert served.names == ["baseline", "lora"]
    with pytest.raises(UserError, match="no such directory"):
        load_served_models(tmp_path / "missing")
    with pytest.raises(UserError, match="no adapter_config.json"):
        load_served_models(stage, adapters={"bad": tmp_path})
    with pytest.raises(UserError, match="base model's served name"):
        load_served_models(stage, adapters={"baseline": adapter})


def test_a_modelopt_int8_checkpoint_serves_what_it_computes_in_process(tmp_path):
    import modelopt.torch.quantization as mtq

    from llmexp.models.loading import enable_modelopt_checkpointing

    model, tokenizer = build_varied_model(seed=1)
    model.eval()
    prompts = random_prompts(4, seed=8)

    def calibrate(m):
        for prompt in prompts:
            m(**tokenizer(prompt, return_tensors="pt"))

    enable_modelopt_checkpointing()
    quantized = mtq.quantize(model, mtq.INT8_DEFAULT_CFG, calibrate)
    save_model(quantized, tokenizer, tmp_path / "int8")
    assert (tmp_path / "int8" / "modelopt_state.pth").is_file()
    restored, _ = load_model(tmp_path / "int8")
    served = load_served_models(tmp_path / "int8")
    with Engine(served, max_batch_size=4) as engine:
        with engine.paused():
            streams = [engine.submit(GenerationRequest("int8", p, 10, temperature=0.0)) for p in prompts]
        got = [list(stream.read_all().token_ids) for stream in streams]
    assert got == [generate_alone(restored, tokenizer, p, 10) for p in prompts]
    assert any(name.endswith("weight_quantizer") for name, _ in served.model.named_modules())  # restored quantized


def test_a_tiny_temperature_samples_like_greedy_instead_of_failing(served):
    prompts = random_prompts(3, seed=20)
    temperatures = (5e-324, 1e-300, 1e-30)  # the smallest positive float, the reported 1e-300, below float32's range
    # top_p's tiny value is a normal float: training in this process (llmexp.training.loop) flushes denormals to zero,
    # and 5e-324 would then read as top_p=0, which is refused
    settings = list(zip(temperatures, (1.0, 1e-300, 0.5)))

    def one_batch(engine, greedy: bool):
        """The nine requests decoded together (a row that failed would take the others with it); greedy: the
        same rows at temperature 0, so both batches compute the same logits and only the sampling differs."""
        with engine.paused():
            streams = {(t, p): engine.submit(GenerationRequest(NAME, p, 8, temperature=0.0 if greedy else t,
                                                               top_p=top_p, seed=1))
                       for t, top_p in settings for p in prompts}
        return {key: list(stream.read_all().token_ids) for key, stream in streams.items()}

    with Engine(served, max_batch_size=9) as engine:
        got, expected = one_batch(engine, greedy=False), one_batch(engine, greedy=True)
        hot = engine.submit(GenerationRequest(NAME, prompts[0], 8, temperature=100.0, seed=1)).read_all()
    assert got == expected
    assert all(len(tokens) >= 1 for tokens in got.values())
    assert hot.finish_reason in ("stop", "length") and len(hot.token_ids) >= 1


@pytest.mark.parametrize("fields, param", [
    ({"seed": 10**30}, "seed"), ({"seed": -(2**63) - 1}, "seed"), ({"seed": 1.5}, "seed"), ({"seed": True}, "seed"),
    ({"temperature": float("nan")}, "temperature"), ({"temperature": float("inf")}, "temperature"),
    ({"temperature": -0.5}, "temperature"), ({"temperature": 101}, "temperature"), ({"temperature": "1"}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": float("nan")}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": True}, "max_tokens"), ({"max_tokens": 2.0}, "max_tokens"), ({"max_tokens": -1}, "max_tokens"),
    ({"stop": ("",)}, "stop"), ({"stop": ("a", "b", "c", "d", "e")}, "stop"), ({"stop": ("x" * 257,)}, "stop"),
    ({"stop": (3,)}, "stop"), ({"prompt": "a \ud800 b"}, "prompt"), ({"prompt": None, "prompt_ids": [1, True]}, "prompt"),
])
def test_every_field_outside_what_the_engine_computes_is_refused_naming_it(served, fields, param):
    with Engine(served) as engine:
        with pytest.raises(InvalidRequest) as error:
            engine.submit(GenerationRequest(**{"model": NAME, "prompt": "hello", "max_tokens": 2, **fields}))
        assert error.value.param == param and str(error.value).startswith(param)
        assert engine.submit(GenerationRequest(NAME, "hello", 2, temperature=0.0)).read_all().finish_reason == "length"
    with Engine(served) as engine:  # the limits themselves are computed
        limits = GenerationRequest(NAME, "hello", 2, temperature=100.0, top_p=1e-300, seed=2**63 - 1, stop=("x" * 256,))
        assert engine.submit(limits).read_all().finish_reason in ("stop", "length")
        assert engine.submit(GenerationRequest(NAME, "hello", 2, seed=-(2**63))).read_all().finish_reason in (
            "stop", "length")


def test_a_failure_no_single_row_reproduces_fails_the_batch_in_flight_but_never_the_queue(served):
    """A model that fails on any batch of two rows: each row runs alone, so the failure is the batch's."""

    def refuse_pairs(module, args):
        if args[0].shape[0] > 1 and args[0].shape[1] == 1:  # decoding two rows at once
            raise RuntimeError("out of memory (two rows)")

    prompts = random_prompts(3, seed=21)
    hook = served.model.get_input_embeddings().register_forward_pre_hook(refuse_pairs)
    try:
        with Engine(served, max_batch_size=2) as engine:
            with engine.paused():
                streams = [engine.submit(GenerationRequest(NAME, p, 6, temperature=0.0)) for p in prompts]
            for stream in streams[:2]:
                with pytest.raises(GenerationFailed, match="out of memory") as error:
                    stream.read_all()
                assert not isinstance(error.value, RequestFailed)
            queued = streams[2].read_all()  # it waited for a slot: the batch's failure is not its own
    finally:
        hook.remove()
    assert list(queued.token_ids) == generate_alone(served.model, served.tokenizer, prompts[2], 6)
