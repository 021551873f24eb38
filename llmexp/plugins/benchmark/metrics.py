"""GenAI-Perf's statistics of one benchmark point, from per-request timestamps.

Definitions (GenAI-Perf / AIPerf, which this reproduces so numbers compare across tools):

- **TTFT** (time to first token): request sent -> first response carrying output (an empty
  SSE chunk, such as a chat stream's role-only first delta, does not count).
- **E2E request latency**: request sent -> last response received.
- **ITL** (inter-token latency): ``(e2e - TTFT) / (output tokens - 1)``; a request with a
  single output token has none.
- **TPOT** (time per output token): ``e2e / output tokens``, the inverse of a request's own
  output rate. (vLLM's ``benchmark_serving`` calls GenAI-Perf's ITL "TPOT"; compare ITL with it.)
- **request throughput**: completed requests / benchmark wall time; **output token
  throughput**: output tokens of those requests / the same wall time. The wall time runs from
  the first counted request's send to the last one's final response (warm-up excluded).

Each latency gets avg, min, max and p50/p90/p99, percentiles by linear interpolation between
order statistics (``numpy.percentile``'s default, which GenAI-Perf uses). Failed requests
are counted in ``error_count`` and left out of every statistic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy

PERCENTILES = (50, 90, 99)
LATENCIES = ("ttft", "itl", "tpot", "e2e")  # each reported in ms with STATISTICS
STATISTICS = ("avg", "p50", "p90", "p99", "min", "max")


@dataclass
class RequestRecord:
    """One request's timeline (``time.perf_counter`` seconds) and outcome."""

    sent: float
    first_token: Optional[float] = None  # first response with output; None if none came
    done: Optional[float] = None  # last response (or the failure)
    input_tokens: int = 0
    output_tokens: int = 0
    output_tokens_source: str = "tokenizer"  # tokenizer | usage | engine: who counted output_tokens
    error: Optional[str] = None
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None and self.done is not None and self.first_token is not None

    @property
    def ttft(self) -> float:
        return self.first_token - self.sent

    @property
    def e2e(self) -> float:
        return self.done - self.sent

    @property
    def itl(self) -> Optional[float]:
        if self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @property
    def tpot(self) -> Optional[float]:
        return self.e2e / self.output_tokens if self.output_tokens else None

    def as_row(self, started: float) -> Dict[str, object]:
        """A JSON row for requests.jsonl: times in ms from ``started`` (the point's first send), no text."""

        def ms(moment: Optional[float]) -> Optional[float]:
            return None if moment is None else (moment - started) * 1000.0

        itl = self.itl if self.ok else None
        return {
            "sent_ms": ms(self.sent),
            "first_token_ms": ms(self.first_token),
            "done_ms": ms(self.done),
            "ttft_ms": self.ttft * 1000.0 if self.ok else None,
            "itl_ms": itl * 1000.0 if itl is not None else None,
            "e2e_ms": self.e2e * 1000.0 if self.ok else None,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "output_tokens_source": self.output_tokens_source,
            "error": self.error,
        }


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile by linear interpolation (numpy's default, GenAI-Perf's convention)."""
    return float(numpy.percentile(numpy.asarray(values, dtype=float), q))


def describe(values: Sequence[float], scale: float = 1.0) -> Dict[str, Optional[float]]:
    """avg, p50, p90, p99, min, max of ``values`` times ``scale``; all None when there are none."""
    if len(values) == 0:
        return {name: None for name in STATISTICS}
    array = numpy.asarray(values, dtype=float) * scale
    summary = {"avg": float(array.mean())}
    summary.update({f"p{q}": float(numpy.percentile(array, q)) for q in PERCENTILES})
    summary.update(min=float(array.min()), max=float(array.max()))
    return summary


def benchmark_wall_time(records: Sequence[RequestRecord]) -> float:
    """First send to last response over the completed requests, in seconds (0 when none completed)."""
    done = [r for r in records if r.ok]
    if not done:
        return 0.0
    return max(r.done for r in done) - min(r.sent for r in done)


def summarize(records: Sequence[RequestRecord]) -> Dict[str, Optional[float]]:
    """Every statistic of a point as flat keys: ``ttft_p99_ms``, ``output_tokens_per_s``, ``error_count`` ..."""
    done: List[RequestRecord] = [r for r in records if r.ok]
    wall = benchmark_wall_time(records)
    series = {
        "ttft": [r.ttft for r in done],
        "itl": [r.itl for r in done if r.itl is not None],
        "tpot": [r.tpot for r in done if r.tpot is not None],
        "e2e": [r.e2e for r in done],
    }
    summary: Dict[str, Optional[float]] = {}
    for name in LATENCIES:
        for statistic, value in describe(series[name], scale=1000.0).items():
            summary[f"{name}_{statistic}_ms"] = value
    output_tokens = sum(r.output_tokens for r in done)
    summary.update(
        request_count=float(len(done)),
        error_count=float(len(records) - len(done)),
        benchmark_duration_s=wall,
        request_throughput_per_s=len(done) / wall if wall > 0 else None,
        output_tokens_per_s=output_tokens / wall if wall > 0 else None,
        output_tokens_total=float(output_tokens),
        output_tokens_avg=output_tokens / len(done) if done else None,
        input_tokens_avg=sum(r.input_tokens for r in done) / len(done) if done else None,
    )
    return summary
