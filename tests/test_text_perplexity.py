"""Sliding-window perplexity: the windows, exact references on a tiny model, the HF guide's loop, the task type."""

import json
import math

import pytest
import torch

from llmexp.errors import UserError
from llmexp.plugins.evaluate.harness import scoring
from llmexp.plugins.evaluate.harness.scoring import Scorer, sliding_windows
from llmexp.sdk import TaskInputs
from llmexp.plugins.evaluate.tasks.text_perplexity import TEXT_PERPLEXITY



@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    from llmexp.models.loading import load_model

    return load_model(tiny_checkpoint)


@pytest.fixture(scope="module")
def text():
    from llmexp.data.embedded import build_world

    return "\n\n".join(build_world(0).heldout_documents(3))


def token_nlls(model, ids):
    """NLL of every token of ``ids`` after the first, from one forward pass over all of them."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return -logits[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_windows_score_every_token_after_the_first_exactly_once():
    assert sliding_windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert sliding_windows(10, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]  # disjoint: each window's first token unscored
    assert sliding_windows(3, 8, 2) == [(0, 3, 1)]
    for length, window, stride in ((37, 8, 1), (37, 8, 3), (37, 8, 7), (64, 16, 5)):
        scored = [t for _, end, start in sliding_windows(length, window, stride) for t in range(start, end)]
        assert scored == list(range(1, length))
    with pytest.raises(ValueError):
        sliding_windows(10, 4, 5)


def test_stride_equal_to_max_length_is_disjoint_windows(loaded, text):
    model, tokenizer = loaded
    ids = tokenizer(text).input_ids
    windows = scoring.sliding_window_nll(model, tokenizer, text, window=16, stride=16, batch_size=3)
    reference = sum(token_nlls(model, ids[start : start + 16]).sum().item() for start in range(0, len(ids), 16)
                    if len(ids[start : start + 16]) > 1)
    assert sum(w.nll for w in windows) == pytest.approx(reference, rel=1e-5)
    assert sum(w.tokens for w in windows) == sum(len(ids[s : s + 16]) - 1 for s in range(0, len(ids), 16))


def test_stride_one_is_token_by_token_nll_with_the_longest_context(loaded, text):
    model, tokenizer = loaded
    ids = tokenizer(text).input_ids[:40]
    short = tokenizer.decode(ids[1:], skip_special_tokens=True)
    assert tokenizer(short).input_ids == ids  # the word-level tokenizer round-trips
    window = 8
    windows = scoring.sliding_window_nll(model, tokenizer, short, window=window, stride=1)
    # each token t predicted from the window - 1 tokens before it, each in its own forward pass
    reference = [token_nlls(model, ids[max(0, t - window + 1) : t + 1])[-1].item() for t in range(1, len(ids))]
    per_window = [w.nll for w in windows]
    assert [w.tokens for w in windows] == [window - 1] + [1] * (len(ids) - window)
    assert per_window[0] == pytest.approx(sum(reference[: window - 1]), rel=1e-5)
    assert per_window[1:] == pytest.approx(reference[window - 1 :], rel=1e-5)


def test_a_text_within_one_window_is_scored_with_full_context(loaded):
    model, tokenizer = loaded
    text = "Miloholm owns a red pet and walks every day"
    ids = tokenizer(text).input_ids
    for stride in (1, 5, 64):
        windows = scoring.sliding_window_nll(model, tokenizer, text, window=64, stride=stride)
        assert sum(w.nll for w in windows) == pytest.approx(token_nlls(model, ids).sum().item(), rel=1e-5)


def guide_perplexity(model, ids, max_length, stride, exact_count):
    """The loop of https://huggingface.co/docs/transformers/perplexity, written out.

    ``exact_count`` False is the guide verbatim (the window's mean loss times its targets less
    one); True counts the targets the shifted labels really score.
    """
    encodings = torch.tensor([ids])
    seq_len = encodings.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        if exact_count:
            num_loss_tokens = int((target_ids[:, 1:] != -100).sum())
        else:
            num_loss_tokens = int((target_ids != -100).sum()) - target_ids.size(0)
        nll_sum += loss.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


@pytest.mark.parametrize("max_length,stride", [(32, 32), (32, 16), (24, 7)])
def test_matches_the_hf_guide_loop(loaded, text, tmp_path, max_length, stride):
    model, tokenizer = loaded
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    spec = {"type": "text_perplexity", "path": str(path), "max_length": max_length, "stride": stride}
    metrics = TEXT_PERPLEXITY.run(spec, TaskInputs(world=None), Scorer(model, tokenizer, batch_size=4)).metrics
    ppl, tokens = guide_perplexity(model, tokenizer(text).input_ids, max_length, stride, exact_count=True)
    assert metrics["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert metrics["tokens"] == tokens
    verbatim, verbatim_tokens = guide_perplexity(model, tokenizer(text).input_ids, max_length, stride, exact_count=False)
    if stride == max_length:  # the guide's count is exact for disjoint windows ...
        assert metrics["perplexity"] == pytest.approx(verbatim, rel=1e-5) and verbatim_tokens == tokens
    else:  # ... and one token short per window after the first otherwise
        windows = len(sliding_windows(len(tokenizer(text).input_ids), max_length, stride))
        assert verbatim_tokens == tokens - (windows - 1)


def test_metrics_agree_and_jsonl_documents_are_joined(loaded, text, tmp_path):
    model, tokenizer = loaded
    documents = text.split("\n\n")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(documents)))
    plain = tmp_path / "docs.txt"
    plain.write_text(" || ".join(documents))
    scorer = Scorer(model, tokenizer, batch_size=8)
    result = TEXT_PERPLEXITY.run(
        {"path": str(jsonl), "text_field": "body", "join": " || ", "max_length": 32, "stride": 8}, TaskInputs(None), scorer
    )
    same = TEXT_PERPLEXITY.run({"path": str(plain), "max_length": 32, "stride": 8}, TaskInputs(None), scorer)
    assert result.metrics == same.metrics
    metrics = result.metrics
    nll = sum(row["nll"] for row in result.rows)
    assert metrics["tokens"] == sum(row["tokens"] for row in result.rows) == len(tokenizer(plain.read_text()).input_ids) - 1
    assert metrics["nll_per_token"] == pytest.approx(nll / metrics["tokens"])
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["nll_per_token"]))
    assert metrics["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(plain.read_bytes()))
    assert all(isinstance(value, float) for value in metrics.values())
    # limit keeps the first documents
    first = TEXT_PERPLEXITY.run({"path": str(jsonl), "text_field": "body"}, TaskInputs(None, limit=1), scorer)
    assert first.metrics["tokens"] == len(tokenizer(documents[0]).input_ids) - 1


def test_defaults_to_the_model_context_and_refuses_longer_windows(loaded, text, tmp_path):
    model, tokenizer = loaded
    path = tmp_path / "corpus.txt"
    path.write_text(text * 3)
    scorer = Scorer(model, tokenizer)
    context = model.config.max_position_embeddings
    rows = TEXT_PERPLEXITY.run({"path": str(path)}, TaskInputs(None), scorer).rows
    assert len(tokenizer(text * 3).input_ids) > context and [row["begin"] for row in rows][:2] == [0, context]
    with pytest.raises(UserError, match=f"max_length={context + 1} .* exceeds the model's context of {context}"):
        TEXT_PERPLEXITY.run({"path": str(path), "max_length": context + 1}, TaskInputs(None), scorer)
    with pytest.raises(UserError, match="stride=300 .* exceeds max_length=256"):
        TEXT_PERPLEXITY.run({"path": str(path), "stride": 300}, TaskInputs(None), scorer)


def test_problems_name_keys_and_lines(tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "a b"}\n{"body": "c"}\n')
    found = TEXT_PERPLEXITY.problems({"path": str(jsonl)}, "technique.tasks[1]")
    assert len(found) == 1 and f"{jsonl}:2" in found[0] and "'text' field is missing" in found[0]
    found = TEXT_PERPLEXITY.problems({"path": str(jsonl), "stride": 64, "max_length": 32}, "t")
    assert found and "t.stride=64 exceeds t.max_length=32" in found[0]
    found = TEXT_PERPLEXITY.problems({"path": str(jsonl), "stride": 0, "max_length": 1.5}, "t")
    assert any("t.max_length=1.5" in p for p in found) and any("t.stride=0" in p for p in found)
    binary = tmp_path / "latin1.txt"
    binary.write_bytes(b"first line\nsecond \xe9t\xe9\n")
    assert f"{binary}:2: not UTF-8" in TEXT_PERPLEXITY.problems({"path": str(binary)}, "t")[0]
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n")
    assert "holds no text" in TEXT_PERPLEXITY.problems({"path": str(blank)}, "t")[0]
    assert "does not exist" in TEXT_PERPLEXITY.problems({"path": str(tmp_path / "none.txt")}, "t")[0]
