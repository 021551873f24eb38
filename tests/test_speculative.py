"""Speculative decoding with a draft model: greedy output is the target's own, token for token (engine and a
round against ``model.generate``); sampled tokens follow the target's distribution (the acceptance rule tested
statistically on fixed distributions); ``llmexp serve --draft-model`` over real HTTP; bad drafts exit 2."""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from llmexp.configuration.compose import compose_config
from llmexp.planning.planner import make_plan

from llmexp.data.embedded import build_world
from llmexp.data.tokenizer import word_level_tokenizer
from llmexp.models.loading import build_model, save_model
from llmexp.errors import UserError
from llmexp.serving.engine import Engine
from llmexp.serving.generation import GenerationRequest, RequestFailed
from llmexp.serving.sampling import token_distribution
from llmexp.serving.served_models import DraftModel, load_served_models
from llmexp.serving.vllm_server import vllm_command
from llmexp.serving.speculative import (
    Sampling, SpeculationCounts, accept, check_same_vocabulary, greedy_start, speculative_round,
)
from tests.conftest import REPO, read_results, run_llmexp
from tests.test_serve import refusal, run_serve
from tests.test_serving_engine import build_varied_model, generate_alone, random_prompts, save_lora_adapter

NAME = "target"
K = 3


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The target (the varied 2-layer model), an untrained draft with its tokenizer, saved as the CLI reads them."""
    root = tmp_path_factory.mktemp("speculative")
    target, tokenizer = build_varied_model(seed=0)
    save_model(target, tokenizer, root / NAME)
    draft, _ = build_varied_model(seed=1)
    save_model(draft, tokenizer, root / "draft" / "model")  # a run's stage directory: <run>/<stage>/model
    return root


def served_with(root, kind: str):
    """The target served with a draft: the untrained one from disk, the target itself (every proposal right) or
    the target with noise in its weights (some right)."""
    if kind == "random":
        return load_served_models(root / NAME, draft_dir=root / "draft", num_speculative_tokens=K)
    served = load_served_models(root / NAME)
    draft = served.model
    if kind == "noisy":  # the target slightly perturbed: accepts some proposals, rejects others
        draft = copy.deepcopy(served.model)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for parameter in draft.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.01)
    served.draft = DraftModel(draft, root / NAME, K)
    return served


@pytest.mark.parametrize("draft", ["random", "target", "noisy"])
def test_greedy_output_with_a_draft_is_the_targets_own(checkpoints, draft):
    served = served_with(checkpoints, draft)
    prompts = random_prompts(6, seed=11)
    lengths = [1, 2, 5, 9, 14, 20]  # budgets below, at and past one round's k + 1
    expected = [generate_alone(served.model, served.tokenizer, p, n) for p, n in zip(prompts, lengths)]
    with Engine(served, max_batch_size=4) as engine:
        streams = [engine.submit(GenerationRequest(NAME, p, n, temperature=0.0)) for p, n in zip(prompts, lengths)]
        outputs = [list(stream) for stream in streams]
        counts = engine.speculation
    for chunks, tokens, limit in zip(outputs, expected, lengths):
        assert [t for chunk in chunks for t in chunk.token_ids] == tokens
        assert all(len(chunk.token_ids) == 1 for chunk in chunks)  # each accepted token streamed as its own chunk
        assert len(tokens) <= limit
        assert chunks[-1].finish_reason == ("stop" if tokens[-1] == served.tokenizer.eos_token_id else "length")
        assert "".join(chunk.text for chunk in chunks) == served.tokenizer.decode(tokens, skip_special_tokens=True)
    assert counts.target_forwards > 0 and counts.proposed > 0
    if draft == "target":
        assert counts.acceptance_rate == 1.0
    elif draft == "noisy":  # rows accept different numbers of proposals: their stacked caches drift apart
        assert 0.2 < counts.acceptance_rate < 0.95, counts
    else:
        assert counts.acceptance_rate < 0.5  # an untrained draft rarely guesses the target's token


def test_a_stop_string_ends_the_text_before_it_mid_round(checkpoints):
    served = served_with(checkpoints, "target")  # every round yields k + 1 tokens: the stop string falls inside one
    prompt = random_prompts(1, seed=3)[0]
    tokens = generate_alone(served.model, served.tokenizer, prompt, 12, eos_token_id=None)
    words = served.tokenizer.decode(tokens).split(" ")
    stop = f"{words[5]} {words[6]}"
    before = served.tokenizer.decode(tokens).split(stop)[0]
    with Engine(served) as engine:
        chunks = list(engine.submit(GenerationRequest(NAME, prompt, 12, temperature=0.0, stop=(stop,),
                                                      ignore_eos=True)))
    assert "".join(chunk.text for chunk in chunks) == before and chunks[-1].finish_reason == "stop"
    assert sum(len(chunk.token_ids) for chunk in chunks) <= 7  # nothing streamed past the token completing it


def test_a_draft_that_is_the_target_gives_k_plus_1_tokens_per_target_forward(checkpoints):
    served = served_with(checkpoints, "target")
    rounds = 4
    with Engine(served) as engine:
        with engine.paused():
            streams = [engine.submit(GenerationRequest(NAME, p, 1 + rounds * (K + 1), temperature=0.0,
                                                       ignore_eos=True)) for p in random_prompts(3, seed=12)]
        assert all(len(stream.read_all().token_ids) == 1 + rounds * (K + 1) for stream in streams)
        counts = engine.speculation
    # the prefill gives each first token; then every round accepts all K proposals and adds the target's own
    assert (counts.target_forwards, counts.proposed, counts.accepted) == (3 * rounds, 3 * rounds * K, 3 * rounds * K)
    assert counts.tokens_per_target_forward == K + 1
    assert engine.decode_steps == 0 and engine.prefill_steps == 1
    assert engine.verify_steps == rounds  # the three rows' rounds ran as one batched target forward each


@pytest.mark.parametrize("where, how", [("prompt", "raise"), ("generated", "raise"), ("generated", "nan")])
def test_a_request_the_target_fails_on_ends_alone_and_the_others_go_on(checkpoints, where, how):
    """Raising fails the batched round, which then runs row by row; NaN logits end their row within the batch."""
    served = served_with(checkpoints, "random")
    prompts = random_prompts(3, seed=16)
    expected = [generate_alone(served.model, served.tokenizer, p, 6, eos_token_id=None) for p in prompts]
    ids = [served.tokenizer(p)["input_ids"] for p in prompts]
    others = {t for i in (1, 2) for t in ids[i] + expected[i]}
    mine = ids[0] if where == "prompt" else expected[0][2:3]  # a prompt token, or the third generated one
    poison = next(t for t in mine if t not in others and t not in served.tokenizer.all_special_ids)

    def fail(module, args, output):
        rows = (args[0] == poison).any(-1)
        if rows.any() and how == "raise":
            raise RuntimeError(f"token {poison} breaks this model")
        output = output.clone()
        output[rows] = float("nan")
        return output

    handle = served.model.get_input_embeddings().register_forward_hook(fail)
    try:
        with Engine(served) as engine:
            with engine.paused():
                streams = [engine.submit(GenerationRequest(NAME, p, 6, temperature=0.0, ignore_eos=True))
                           for p in prompts]
            with pytest.raises(RequestFailed, match="went on"):
                streams[0].read_all()
            assert [stream.read_all().token_ids for stream in streams[1:]] == [tuple(e) for e in expected[1:]]
    finally:
        handle.remove()


def test_a_round_equals_generate_and_its_caches_hold_exactly_the_accepted_tokens(checkpoints):
    served = served_with(checkpoints, "random")
    target, draft, tokenizer = served.model, served.draft.model, served.tokenizer
    for prompt in random_prompts(3, seed=13):
        expected = generate_alone(target, tokenizer, prompt, 24, eos_token_id=None)
        ids = tokenizer(prompt)["input_ids"]
        sequence = greedy_start(target, draft, ids)
        produced, counts = [sequence.last_token], SpeculationCounts()
        while len(produced) < 24:
            produced += speculative_round(target, draft, sequence, min(5, 23 - len(produced)), Sampling(), counts)
            assert sequence.target_cache.get_seq_length() == len(ids) + len(produced) - 1
            assert sequence.draft_cache.get_seq_length() == len(ids) + len(produced) - len(sequence.draft_pending)
        assert produced == expected


def test_the_draft_proposes_nothing_past_an_eos_token(checkpoints):
    served = served_with(checkpoints, "target")
    model, prompt = served.model, random_prompts(1, seed=15)[0]
    plain = generate_alone(model, served.tokenizer, prompt, 8, eos_token_id=None)
    eos = plain[2]  # the third token ends the sequence
    assert eos not in plain[:2]
    counts = SpeculationCounts()
    sequence = greedy_start(model, model, served.tokenizer(prompt)["input_ids"])
    tokens = speculative_round(model, model, sequence, 4, Sampling(), counts, stop_tokens={eos})
    assert tokens[:2] == plain[1:3] and (counts.proposed, counts.accepted) == (2, 2)


def draws(p_logits: torch.Tensor, q_logits: torch.Tensor, sampling: Sampling, count: int):
    """``count`` rounds of the rule with proposals drawn from ``q``: the produced token sequences."""
    q = token_distribution(q_logits, sampling.temperature, sampling.top_p)
    produced = []
    for _ in range(count):
        proposals = [int(torch.multinomial(q[i], 1, generator=sampling.generator)) for i in range(len(q))]
        accepted, token = accept(p_logits, proposals, list(q), sampling)
        produced.append([*proposals[:accepted], token])
    return produced


def chi_square_p_value(observed, expected_probabilities) -> float:
    """Pearson's chi-square test of counts against probabilities (cells with probability 0 must be empty)."""
    from scipy.stats import chisquare

    total = sum(observed)
    cells = [i for i, p in enumerate(expected_probabilities) if p > 0]
    assert all(observed[i] == 0 for i in range(len(observed)) if i not in cells)
    return float(chisquare([observed[i] for i in cells], [total * expected_probabilities[i] for i in cells]).pvalue)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_sampled_tokens_follow_the_targets_distribution_not_the_drafts(temperature, top_p):
    vocabulary, k, count = 8, 2, 20000
    generator = torch.Generator().manual_seed(0)
    p_logits = torch.randn(k + 1, vocabulary, generator=generator) * 1.5
    q_logits = p_logits[:k] + torch.randn(k, vocabulary, generator=generator) * 1.5  # a draft off the target
    sampling = Sampling(temperature, top_p, generator)
    p = token_distribution(p_logits, temperature, top_p)
    q = token_distribution(q_logits, temperature, top_p)
    assert 0.5 * (p[:k] - q).abs().sum(-1).min() > 0.2  # total variation: a rule that accepted always would show
    produced = draws(p_logits, q_logits, sampling, count)
    for position in range(k + 1):
        tokens = [seq[position] for seq in produced if len(seq) > position]
        observed = [tokens.count(t) for t in range(vocabulary)]
        assert chi_square_p_value(observed, p[position].tolist()) > 1e-3
        empirical = torch.tensor(observed, dtype=torch.float64) / len(tokens)
        # within 0.03 of p in total variation, where a rule that always accepted would give q, beyond 0.2 from it
        assert 0.5 * (empirical - p[position]).abs().sum() < 0.03
    assert 0 < len([seq for seq in produced if len(seq) == k + 1]) < count  # rejections and bonuses both


def test_sampling_with_the_target_as_its_own_draft_accepts_every_proposal(checkpoints):
    """p and q go through the same temperature and top-p: equal models give equal distributions, ratio 1."""
    served = served_with(checkpoints, "target")
    request = GenerationRequest(NAME, "hello", 17, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
    with Engine(served) as engine:
        result = engine.submit(request).read_all()
        assert engine.speculation.acceptance_rate == 1.0
    assert len(result.token_ids) == 17


def test_a_seed_repeats_the_sampled_text_alone_or_batched_with_others(checkpoints):
    served = served_with(checkpoints, "noisy")
    request = GenerationRequest(NAME, "hello", 17, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
    with Engine(served) as engine:
        alone = engine.submit(request).read_all()
        with engine.paused():
            others = [engine.submit(GenerationRequest(NAME, p, 12, temperature=1.0)) for p in random_prompts(3, 5)]
            together = engine.submit(request)
        assert together.read_all().token_ids == alone.token_ids
        assert all(stream.read_all().finish_reason in ("stop", "length") for stream in others)
        assert 0 < engine.speculation.acceptance_rate < 1


def test_a_draft_with_another_vocabulary_is_refused_naming_the_field(checkpoints):
    served = load_served_models(checkpoints / NAME)
    model_cfg = OmegaConf.load(REPO / "llmexp/conf/model/tiny_llama.yaml")
    model_cfg.num_layers, model_cfg.vocab_size = 1, 252
    smaller = build_model(model_cfg, served.tokenizer)
    with pytest.raises(UserError, match=r"--draft-model x: the draft model scores 252 tokens and the target 256"):
        check_same_vocabulary(served.model, served.tokenizer, smaller, served.tokenizer, "--draft-model x")
    words = build_world(0).vocabulary()
    shuffled = word_level_tokenizer(random.Random(0).sample(words, len(words)))
    with pytest.raises(UserError, match="the draft's tokenizer maps tokens to other ids than the target's"):
        check_same_vocabulary(served.model, served.tokenizer, served.model, shuffled, "--draft-model x")


def test_serve_with_a_draft_over_http_answers_what_the_target_alone_generates(checkpoints):
    served = load_served_models(checkpoints / NAME)
    prompt = random_prompts(1, seed=14)[0]
    expected = served.tokenizer.decode(generate_alone(served.model, served.tokenizer, prompt, 12),
                                       skip_special_tokens=True)
    process = run_serve(str(checkpoints / NAME), "--port", "0", f"serve.draft_model={checkpoints / 'draft'}",
                        "--num-speculative-tokens", "3")
    try:
        line = process.stdout.readline()
        assert "draft: " in line and "(3 tokens per round)" in line, line
        url = line.split()[2]
        body = {"model": NAME, "prompt": prompt, "max_tokens": 12, "temperature": 0}
        answer = httpx.post(f"{url}/completions", json=body, timeout=60).json()
        assert answer["choices"][0]["text"] == expected
        streamed = httpx.post(f"{url}/completions", json={**body, "stream": True}, timeout=60).text
        assert streamed.count("data: ") >= 3 and streamed.rstrip().endswith("data: [DONE]")
        metrics = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=30).text
        proposed = next(float(line.split()[-1]) for line in metrics.splitlines()
                        if line.startswith('llmexp_serve_speculative_tokens_total{kind="proposed"}'))
        assert proposed > 0
    finally:
        process.terminate()
        process.communicate(timeout=60)


def test_bad_drafts_and_options_exit_2_with_the_field_and_the_fix(checkpoints, tmp_path):
    target = str(checkpoints / NAME)
    missing = refusal(target, "--port", "0", "--draft-model", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and f"--draft-model {tmp_path / 'nothing'}: no such directory" in missing.stderr
    alone = refusal(target, "--port", "0", "--num-speculative-tokens", "3")
    assert alone.returncode == 2 and "--num-speculative-tokens=3" in alone.stderr and "--draft-model" in alone.stderr
    zero = refusal(target, "--port", "0", "--draft-model", str(checkpoints / "draft"), "--num-speculative-tokens", "0")
    assert zero.returncode == 2 and "--num-speculative-tokens=0: give a whole number of at least 1" in zero.stderr
    adapter = save_lora_adapter(checkpoints / NAME, tmp_path / "lora", seed=2)
    as_draft = refusal(target, "--port", "0", "--draft-model", str(adapter))
    assert as_draft.returncode == 2 and "is a LoRA adapter: a draft must be a whole model" in as_draft.stderr
    words = build_world(0).vocabulary()
    model, _ = build_varied_model(seed=3)
    save_model(model, word_level_tokenizer(random.Random(0).sample(words, len(words))), tmp_path / "other")
    other = refusal(target, "--port", "0", "--draft-model", str(tmp_path / "other"))
    assert other.returncode == 2 and "tokenizer maps tokens to other ids" in other.stderr
    model_cfg = OmegaConf.load(REPO / "llmexp/conf/model/tiny_llama.yaml")
    model_cfg.num_layers, model_cfg.vocab_size = 1, 252
    tokenizer = load_served_models(checkpoints / NAME).tokenizer
    save_model(build_model(model_cfg, tokenizer), tokenizer, tmp_path / "smaller")
    smaller = refusal(target, "--port", "0", "--draft-model", str(tmp_path / "smaller"))
    assert smaller.returncode == 2 and "the draft model scores 252 tokens and the target 256" in smaller.stderr
    assert math.isnan(SpeculationCounts().acceptance_rate)


def test_a_pruned_and_distilled_student_is_measured_as_its_baselines_draft_in_the_comparison(tmp_path,
                                                                                              tiny_checkpoint):
    result = run_llmexp(
        "pipeline=prune_distill", f"model.path={tiny_checkpoint}", "pipeline.nodes.baseline.max_steps=0",
        "pipeline.nodes.prune.calibration_size=8", "pipeline.nodes.distill.max_steps=3",
        "pipeline.nodes.baseline_eval.tasks=[perplexity]", "pipeline.nodes.baseline_eval.limit=4",
        "pipeline.nodes.distill_eval.as_draft.num_speculative_tokens=3", "pipeline.nodes.distill_eval.as_draft.prompts=3",
        "pipeline.nodes.distill_eval.as_draft.max_new_tokens=12", "hydra.run.dir=run", cwd=tmp_path, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    stages = read_results(tmp_path / "run")["stages"]
    drafted, pruned = stages["distill_eval"]["metrics"], stages["prune_eval"]["metrics"]
    assert 0 <= drafted["draft_acceptance_rate"] <= 1
    # a round yields the accepted proposals and one token of the target's: 1 + 3 * acceptance per target forward,
    # less only where a prompt's last round proposed fewer than 3
    assert 1 <= drafted["draft_tokens_per_target_forward"] <= 1 + 3 * drafted["draft_acceptance_rate"] + 1e-9
    assert drafted["draft_speedup"] > 0
    assert "draft_acceptance_rate" not in pruned  # measured where asked only
    table = (tmp_path / "run/comparison.md").read_text()
    assert "draft acceptance" in table and "draft speed-up" in table


def test_as_draft_without_a_baseline_is_refused_before_anything_runs(tmp_path, tiny_checkpoint):
    result = run_llmexp("technique=evaluate", f"model.path={tiny_checkpoint}",
                        "technique.as_draft.num_speculative_tokens=3", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "technique.as_draft.num_speculative_tokens=3: the model drafts for the baseline evaluation's model, and " \
           "technique.baseline is unset" in result.stderr
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the same setting on GPU backends (no GPU needed)


def test_vllm_gets_the_draft_as_its_speculative_config(checkpoints, tmp_path):
    command = vllm_command(checkpoints / NAME, draft_dir=checkpoints / "draft", num_speculative_tokens=3)
    config = json.loads(command[command.index("--speculative-config") + 1])
    assert config == {"model": str((checkpoints / "draft" / "model").resolve()), "method": "draft_model",
                      "num_speculative_tokens": 3}
    default = vllm_command(checkpoints / NAME, draft_dir=checkpoints / "draft")
    assert json.loads(default[default.index("--speculative-config") + 1])["num_speculative_tokens"] == 4
    assert "--speculative-config" not in vllm_command(checkpoints / NAME)
    adapter = save_lora_adapter(checkpoints / NAME, tmp_path / "lora", seed=2)
    with pytest.raises(UserError, match="is a LoRA adapter: a draft must be a whole model"):
        vllm_command(checkpoints / NAME, draft_dir=adapter)
    with pytest.raises(UserError, match="no such directory"):
        vllm_command(checkpoints / NAME, draft_dir=tmp_path / "nothing")


def test_the_export_writes_tensorrt_llms_draft_target_options_beside_the_checkpoint(checkpoints, tmp_path):
    from llmexp.running.runner import run_experiment

    results = run_experiment(compose_config([
        "technique=export", f"model.path={checkpoints / NAME}", f"technique.draft_model={checkpoints / 'draft'}",
        "technique.num_speculative_tokens=3"]), tmp_path / "run", multirun=False).to_dict()
    stage = results["stages"]["export"]
    options = yaml.safe_load(Path(stage["artifacts"]["llm_api_options"]).read_text())
    assert options == {"speculative_config": {"decoding_type": "DraftTarget", "max_draft_len": 3,
                                              "speculative_model": str((checkpoints / "draft" / "model").resolve())},
                       "disable_overlap_scheduler": True}
    assert json.loads(Path(stage["artifacts"]["manifest"]).read_text())["llm_api_options"] == \
        stage["artifacts"]["llm_api_options"]


@pytest.mark.parametrize("overrides, expected", [
    (["technique.draft_model=/no/such/draft"], "technique.draft_model=/no/such/draft: no config.json there"),
    (["technique.draft_model={draft}", "technique.num_speculative_tokens=0"],
     "technique.num_speculative_tokens=0 must be at least 1"),
    (["technique.draft_model={draft}", "technique.format=trtllm"],
     "technique.draft_model with format=trtllm: the draft goes to TensorRT-LLM's PyTorch workflow"),
])
def test_the_plan_refuses_a_bad_export_draft_naming_the_field(checkpoints, overrides, expected):
    config = compose_config(["technique=export", f"model.path={checkpoints / NAME}",
                             *(o.format(draft=checkpoints / "draft") for o in overrides)])
    assert any(expected in problem for problem in make_plan(config).problems)
