"""The benchmark's arithmetic and its parts that need no model: GenAI-Perf statistics on hand-made
timelines, the coherence gate, exact-length prompts, the load driver's concurrency and budget."""

from __future__ import annotations

import asyncio
import time

import numpy
import pytest

from llmexp.plugins.benchmark.clients import BenchRequest, Reply
from llmexp.plugins.benchmark.coherence import degeneracy, gate
from llmexp.plugins.benchmark.load import drive
from llmexp.plugins.benchmark.metrics import RequestRecord, benchmark_wall_time, describe, percentile, summarize
from llmexp.plugins.benchmark.prompts import prompt_pool


# ------------------------------------------------------------------ statistics

def test_percentiles_interpolate_linearly_between_order_statistics():
    values = [4.0, 1.0, 3.0, 2.0]
    # rank q/100 * (n - 1) over the sorted values: p50 -> 1.5 -> 2.5, p90 -> 2.7 -> 3.7, p99 -> 2.97 -> 3.97
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile([7.0], 99) == 7.0
    assert describe([]) == {"avg": None, "p50": None, "p90": None, "p99": None, "min": None, "max": None}


def hand_made_records():
    """Three completed requests and one failure; times in seconds."""
    return [
        RequestRecord(sent=0.0, first_token=0.1, done=0.5, input_tokens=8, output_tokens=5),  # ttft 100, e2e 500
        RequestRecord(sent=0.2, first_token=0.25, done=0.45, input_tokens=8, output_tokens=3),  # ttft 50, e2e 250
        RequestRecord(sent=0.3, first_token=0.6, done=1.0, input_tokens=8, output_tokens=1),  # ttft 300, e2e 700
        RequestRecord(sent=0.1, done=0.2, input_tokens=8, error="HTTP 500"),
    ]


def test_per_request_definitions_follow_genai_perf():
    first, second, single, failed = hand_made_records()
    assert first.ttft == pytest.approx(0.1) and first.e2e == pytest.approx(0.5)
    assert first.itl == pytest.approx((0.5 - 0.1) / (5 - 1))  # (e2e - TTFT) / (output tokens - 1)
    assert second.itl == pytest.approx(0.2 / 2)
    assert single.itl is None  # one output token: no inter-token latency
    assert first.tpot == pytest.approx(0.5 / 5) and single.tpot == pytest.approx(0.7)
    assert not failed.ok and first.ok


def test_summary_of_a_point():
    summary = summarize(hand_made_records())
    # TTFT 100, 50, 300 ms: sorted 50, 100, 300; p90 rank 1.8 -> 100 + 0.8 * 200; p99 rank 1.98
    assert summary["ttft_avg_ms"] == pytest.approx(150.0)
    assert summary["ttft_p50_ms"] == pytest.approx(100.0)
    assert summary["ttft_p90_ms"] == pytest.approx(260.0)
    assert summary["ttft_p99_ms"] == pytest.approx(296.0)
    assert (summary["ttft_min_ms"], summary["ttft_max_ms"]) == (pytest.approx(50.0), pytest.approx(300.0))
    assert summary["itl_avg_ms"] == pytest.approx(100.0) and summary["itl_max_ms"] == pytest.approx(100.0)
    assert summary["e2e_p50_ms"] == pytest.approx(500.0) and summary["e2e_max_ms"] == pytest.approx(700.0)
    assert summary["tpot_avg_ms"] == pytest.approx((100.0 + 250.0 / 3 + 700.0) / 3)
    # wall: first counted send (0.0) to last response (1.0); the failure is not counted
    assert summary["benchmark_duration_s"] == pytest.approx(1.0)
    assert summary["request_throughput_per_s"] == pytest.approx(3.0)
    assert summary["output_tokens_per_s"] == pytest.approx(9.0)
    assert summary["output_tokens_total"] == 9.0 and summary["output_tokens_avg"] == pytest.approx(3.0)
    assert summary["request_count"] == 3.0 and summary["error_count"] == 1.0


def test_summary_matches_numpy_on_many_requests():
    rng = numpy.random.default_rng(0)
    records = []
    for index in range(200):
        sent = index * 0.01
        ttft = float(rng.uniform(0.01, 0.2))
        records.append(RequestRecord(sent=sent, first_token=sent + ttft, done=sent + ttft + 0.3, output_tokens=16))
    summary = summarize(records)
    ttfts = [r.ttft * 1000 for r in records]
    for q in (50, 90, 99):
        assert summary[f"ttft_p{q}_ms"] == pytest.approx(float(numpy.percentile(ttfts, q)))
    assert summary["itl_avg_ms"] == pytest.approx(300.0 / 15)
    assert benchmark_wall_time(records) == pytest.approx(max(r.done for r in records) - records[0].sent)


def test_a_point_where_every_request_failed_has_no_throughput():
    summary = summarize([RequestRecord(sent=0.0, done=0.1, error="refused")])
    assert summary["request_count"] == 0 and summary["error_count"] == 1
    assert summary["output_tokens_per_s"] is None and summary["ttft_p50_ms"] is None


def test_request_rows_are_relative_milliseconds():
    row = hand_made_records()[1].as_row(started=0.2)
    assert row["sent_ms"] == pytest.approx(0.0) and row["done_ms"] == pytest.approx(250.0)
    assert row["ttft_ms"] == pytest.approx(50.0) and row["itl_ms"] == pytest.approx(100.0)
    failed = hand_made_records()[3].as_row(started=0.0)
    assert failed["ttft_ms"] is None and failed["error"] == "HTTP 500"


# ------------------------------------------------------------------ coherence gate

@pytest.mark.parametrize("tokens, expected", [
    ([], "empty output"),
    ([7, 7, 7, 7], "one token (7) repeated 4 times"),
    ([7], None),  # a single token is not a repetition
    ([3, 9, 4, 1, 5], None),
    ([1, 2, 1, 2, 1, 2], None),  # a loop passes unless min_distinct_ratio asks more
])
def test_degeneracy(tokens, expected):
    assert degeneracy(tokens) == expected


def test_min_distinct_ratio_catches_short_loops():
    assert "ratio 0.33 < min_distinct_ratio 0.5" in degeneracy([1, 2, 1, 2, 1, 2], min_distinct_ratio=0.5)
    assert degeneracy([1, 2, 3, 1], min_distinct_ratio=0.5) is None


def test_gate_names_the_first_bad_output():
    assert gate([[1, 2, 3], [4, 5, 6]]) is None
    assert gate([[1, 2, 3], [4, 4, 4], []]) == "coherence gate: greedy output 2 of 3: one token (4) repeated 3 times"


# ------------------------------------------------------------------ prompts of an exact length

@pytest.fixture(scope="module")
def word_tokenizer():
    from llmexp.data.embedded import build_world
    from llmexp.data.tokenizer import word_level_tokenizer

    return word_level_tokenizer(build_world(0).vocabulary())


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE trained here on the embedded world's text: merges make re-encoding differ from the draw."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llmexp.data.embedded import build_world

    world = build_world(0)
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"], show_progress=False)
    core.train_from_iterator(world.heldout_documents(50), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("length", [1, 7, 64])
def test_prompts_have_exactly_the_asked_length(word_tokenizer, bpe_tokenizer, length):
    for tokenizer in (word_tokenizer, bpe_tokenizer):
        for prompt in prompt_pool(tokenizer, length, seed=(0, length), size=20):
            assert len(tokenizer.encode(prompt, add_special_tokens=False)) == length


def test_prompts_are_seeded_and_distinct(word_tokenizer):
    first = prompt_pool(word_tokenizer, 16, seed=(0, 16), size=10)
    assert first == prompt_pool(word_tokenizer, 16, seed=(0, 16), size=10)
    assert first != prompt_pool(word_tokenizer, 16, seed=(1, 16), size=10)
    assert len(set(first)) == 10
    special = set(word_tokenizer.all_special_tokens)
    assert not any(token in special for prompt in first for token in prompt.split())


# ------------------------------------------------------------------ the load driver

class CountingTarget:
    """An async target that takes ``delay_s`` per request and records how many were in flight."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s
        self.in_flight = 0
        self.max_in_flight = 0
        self.prompts = []

    async def send(self, request: BenchRequest) -> Reply:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.prompts.append(request.prompt)
        sent = time.perf_counter()
        await asyncio.sleep(self.delay_s)
        self.in_flight -= 1
        now = time.perf_counter()
        return Reply(RequestRecord(sent=sent, first_token=now, done=now, output_tokens=1), [1])


REQUESTS = [BenchRequest(f"prompt {index}", 2, 1) for index in range(5)]


@pytest.mark.parametrize("concurrency", [1, 3, 8])
def test_driver_keeps_concurrency_in_flight_and_sends_the_count(concurrency):
    target = CountingTarget(0.01)
    replies = asyncio.run(drive(target.send, REQUESTS, concurrency, request_count=20))
    assert len(replies) == 20 and target.max_in_flight == concurrency
    assert target.prompts[:7] == [r.prompt for r in (REQUESTS + REQUESTS)[:7]]  # the pool, in turn


def test_driver_never_exceeds_the_count_with_more_workers_than_requests():
    target = CountingTarget(0.01)
    assert len(asyncio.run(drive(target.send, REQUESTS, 16, request_count=3))) == 3
    assert target.max_in_flight == 3


def test_driver_stops_starting_requests_at_the_duration():
    target = CountingTarget(0.02)
    started = time.perf_counter()
    replies = asyncio.run(drive(target.send, REQUESTS, 2, duration_s=0.2))
    elapsed = time.perf_counter() - started
    assert 0.2 <= elapsed < 0.2 + 0.02 + 0.15  # the last requests drain, nothing starts after the deadline
    assert 8 <= len(replies) <= 22
    assert len(asyncio.run(drive(CountingTarget(0.02).send, REQUESTS, 2, request_count=4, duration_s=10))) == 4
