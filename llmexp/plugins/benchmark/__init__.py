"""Inference benchmarking, GenAI-Perf style: ``technique=benchmark``.

Sweeps ``concurrency`` x ``input_tokens`` x ``output_tokens`` against a target, the model of
the previous stage (or ``model.path``) served by llmexp's engine in this process, or any
OpenAI-compatible endpoint, and reports TTFT, ITL, TPOT and end-to-end latency (avg, p50,
p90, p99, min, max) with request and output-token throughput per point, under GenAI-Perf's
definitions (``metrics.py``). Each point is timed only after a coherence gate
(``coherence.py``) passes, so a broken model is never reported as fast. ``client=aiperf``
drives NVIDIA's AIPerf instead of the built-in client against an endpoint
(``aiperf_driver.py``). See llmexp/plugins/benchmark/README.md.

This module imports without torch: the planner loads every plugin.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional
from urllib.parse import urlparse

from llmexp.sdk import (
    Metric, MetricKind, Technique, TechniqueConfig, context_length, has_weights, hookimpl, job_environment, model_sources, node_path,
    redact_url_credentials,
)

TARGETS = ("inprocess", "endpoint")
CLIENTS = ("builtin", "aiperf")
ENDPOINT_TYPES = ("completions", "chat")
# Bounds past which a value is a typo rather than an experiment; each names its reason in the refusal.
LIMITS = {
    "concurrency": (1, 10_000, "requests in flight"),
    "input_tokens": (1, 1_048_576, "tokens (a 1M-token context)"),
    "output_tokens": (1, 1_048_576, "tokens (a 1M-token context)"),
    "request_count": (1, 1_000_000, "requests per point"),
    "duration_s": (0, 86_400, "seconds per point (a day)"),
    "warmup_requests": (0, 100_000, "requests"),
    "coherence_prompts": (0, 100, "prompts"),
    "max_batch_size": (1, 4096, "sequences"),
    "timeout_s": (0, 86_400, "seconds"),
}


@dataclass
class BenchmarkConfig(TechniqueConfig):
    """What to measure and against what. ``llmexp technique=benchmark technique.concurrency=[1,4,16]``"""

    name: str = "benchmark"
    target: str = "inprocess"  # inprocess (the stage's model, llmexp's engine) | endpoint (an OpenAI-compatible url)
    client: str = "builtin"  # builtin (asyncio + httpx) | aiperf (NVIDIA AIPerf as a subprocess; endpoint only)
    # endpoint target
    url: Optional[str] = None  # http://host:port (or .../v1)
    model: Optional[str] = None  # the served model's name; None: the first one GET /v1/models lists
    api_key_env: Optional[str] = None  # NAME of the environment variable holding the API key (never the key)
    endpoint_type: str = "completions"  # completions | chat
    tokenizer: Optional[str] = None  # HF tokenizer dir for prompts and token counts; None: the model's (model.path)
    extra_body: Dict[str, Any] = field(default_factory=dict)  # merged into every request body (endpoint)
    # the sweep: every combination is a point
    concurrency: List[int] = field(default_factory=lambda: [1, 4])
    input_tokens: List[int] = field(default_factory=lambda: [32])
    output_tokens: List[int] = field(default_factory=lambda: [16])
    # per point: warm-up (not counted), then request_count requests or duration_s seconds (both: the first reached)
    request_count: Optional[int] = 32
    duration_s: Optional[float] = None
    warmup_requests: int = 2
    # generate exactly output_tokens (no early EOS): None = where the target surely allows it (in-process yes;
    # endpoint no, since ignore_eos/min_tokens are vLLM extras a strict server refuses)
    ignore_eos: Optional[bool] = None
    # coherence gate before timing each point: this many greedy outputs must be non-degenerate (0: no gate)
    coherence_prompts: int = 3
    min_distinct_ratio: float = 0.0  # distinct tokens / output tokens each gate output needs (0: off)
    max_batch_size: int = 16  # in-process engine: sequences decoded together
    timeout_s: float = 600.0  # per request
    aiperf_bin: str = "aiperf"  # the aiperf executable (client=aiperf): a name on PATH or a path
    seed: Optional[int] = None  # prompt draws; None: the run's seed


class Benchmark(Technique):
    """Measures a model's serving latency and throughput; produces metrics and per-request logs, not a model."""

    name = "benchmark"
    schema = BenchmarkConfig
    produces_model = False
    requires = ("torch", "transformers", "httpx")
    entry = "llmexp.plugins.benchmark.sweep:benchmark"

    @classmethod
    def metrics(cls, config, node):
        """The first point's generation throughput and latencies (``sweep.HEADLINE``): what serving the model costs."""
        return (
            Metric("output_tokens_per_s", True, "generation", MetricKind.COST),
            Metric("request_throughput_per_s", True, "request_throughput_per_s", MetricKind.COST),
            *(Metric(name, False, name, MetricKind.COST) for name in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
                                                                    "e2e_p50_ms")),
        )

    @classmethod
    def plan_problems(cls, config, key: str, node, plan) -> List[str]:
        """Target, sweep values and their bounds, endpoint settings, aiperf; a model to benchmark in process."""
        field = node_path(key)
        problems: List[str] = []
        if model_sources(config).get(key) is None and node.target == "inprocess" and not has_weights(config):
            problems.append(
                f"{field}: nothing to benchmark in process: no stage before it produced a model and model.path is "
                f"unset. Set model.path=<a Hugging Face checkpoint directory>, put a stage that makes a model before "
                f"it, or benchmark a server with {field}.target=endpoint {field}.url=http://127.0.0.1:8000.")
        return problems + config_problems(node, field, has_weights(config), context_length(config))


def points(node) -> List[tuple]:
    """``(concurrency, input_tokens, output_tokens)`` of every point, in sweep order (concurrency varies slowest)."""
    return [(c, i, o) for c in node.concurrency for i in node.input_tokens for o in node.output_tokens]


def point_key(concurrency: int, input_tokens: int, output_tokens: int) -> str:
    return f"c{concurrency}_in{input_tokens}_out{output_tokens}"


def config_problems(node, field: str, own_weights: bool, context_length: Optional[int]) -> List[str]:
    """Problems of one benchmark node at ``field``; ``own_weights``: the run has weights of its own, whose tokenizer
    an endpoint benchmark may count with; ``context_length`` bounds a prompt and its answer in process (None:
    unknown)."""
    problems: List[str] = []
    for key, allowed in (("target", TARGETS), ("client", CLIENTS), ("endpoint_type", ENDPOINT_TYPES)):
        if node[key] not in allowed:
            problems.append(f"{field}.{key}={node[key]} is not one of {', '.join(allowed)}; choose one.")
    for key in ("concurrency", "input_tokens", "output_tokens"):
        values = list(node[key])
        if not values:
            problems.append(f"{field}.{key} is empty; give at least one value, e.g. {field}.{key}=[{_example(key)}].")
        problems += [_out_of_range(field, key, value) for value in values if _out_of_range(field, key, value)]
        repeated = sorted({value for value in values if values.count(value) > 1})
        if repeated:
            problems.append(f"{field}.{key}={values} repeats {', '.join(map(str, repeated))}; each point is measured "
                            "once, so list each value once.")
    if node.request_count is None and node.duration_s is None:
        problems.append(f"{field}: neither request_count nor duration_s is set, so a point would never end; set "
                        f"{field}.request_count=100 or {field}.duration_s=60.")
    for key in ("request_count", "duration_s", "warmup_requests", "coherence_prompts", "max_batch_size", "timeout_s"):
        if node[key] is not None and _out_of_range(field, key, node[key]):
            problems.append(_out_of_range(field, key, node[key]))
    if not 0.0 <= node.min_distinct_ratio <= 1.0:
        problems.append(f"{field}.min_distinct_ratio={node.min_distinct_ratio} must be between 0 (off) and 1.")
    if node.target == "endpoint":
        problems += _endpoint_problems(node, field, own_weights)
    elif node.target == "inprocess":
        if node.client == "aiperf":
            problems.append(f"{field}.client=aiperf drives an HTTP endpoint, and target=inprocess has none; use "
                            f"{field}.client=builtin, or serve the model (`llmexp serve`) and set "
                            f"{field}.target=endpoint {field}.url=http://127.0.0.1:8000.")
        if context_length is not None and list(node.input_tokens) and list(node.output_tokens):
            # +1: the engine tokenizes the prompt as a user's would, with the BOS token the tokenizer adds
            longest = max(node.input_tokens) + 1 + max(node.output_tokens)
            if longest > context_length:
                problems.append(
                    f"{field}: input_tokens {max(node.input_tokens)} + a BOS token + output_tokens "
                    f"{max(node.output_tokens)} = {longest} exceeds the model's context of {context_length} tokens "
                    f"(max_position_embeddings); lower {field}.input_tokens or {field}.output_tokens.")
    return problems


def _example(key: str) -> str:
    return {"concurrency": "1,4,16", "input_tokens": "128", "output_tokens": "64"}[key]


def _out_of_range(field: str, key: str, value) -> Optional[str]:
    low, high, unit = LIMITS[key]
    exclusive_low = key in ("duration_s", "timeout_s")
    if (value <= low if exclusive_low else value < low) or value > high:
        bound = f"more than {low}" if exclusive_low else f"at least {low}"
        return f"{field}.{key}={value} is out of range: it must be {bound} and at most {high:,} {unit}."
    return None


def _endpoint_problems(node, field: str, own_weights: bool) -> List[str]:
    problems = []
    if not node.url:
        problems.append(f"{field}.target=endpoint needs {field}.url, the server's address, e.g. "
                        f"{field}.url=http://127.0.0.1:8000 (what `llmexp serve` prints).")
    else:
        parsed = urlparse(node.url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            problems.append(redact_url_credentials(
                f"{field}.url={node.url} is not an http(s) URL; give one like http://127.0.0.1:8000."))
    if node.api_key_env and node.api_key_env not in job_environment():
        problems.append(f"{field}.api_key_env={node.api_key_env} names an environment variable that is not set; "
                        f"export {node.api_key_env}=<the key> (the key itself never goes in the config).")
    if not node.tokenizer and not own_weights:
        problems.append(f"{field}.target=endpoint needs a tokenizer to build prompts of exact token lengths and to "
                        f"count tokens: set {field}.tokenizer=<HF tokenizer dir> (or model.path=<checkpoint>).")
    if node.client == "aiperf":
        from llmexp.sdk import UserError
        from llmexp.plugins.benchmark.aiperf_driver import aiperf_executable

        try:
            aiperf_executable(node.aiperf_bin, field)
        except UserError as error:
            problems.append(str(error))
    return problems


@hookimpl
def llmexp_techniques():
    return [Benchmark]
