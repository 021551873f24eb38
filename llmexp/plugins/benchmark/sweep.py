"""The benchmark stage: open the target, then for every sweep point gate, warm up, time and record.

Per point (``concurrency`` x ``input_tokens`` x ``output_tokens``, concurrency varying slowest):

1. the coherence gate: ``coherence_prompts`` greedy requests whose outputs must not be
   degenerate (``coherence.py``), else the point is ``invalid`` and not timed;
2. ``warmup_requests`` at the point's concurrency, not counted;
3. the timed requests (``load.py``; or AIPerf, ``aiperf_driver.py``), summarized with
   GenAI-Perf's definitions (``metrics.py``).

Writes ``benchmark.jsonl`` (a row per point: every statistic, validity, errors) and
``requests.jsonl`` (a row per timed request), atomically. The stage's metrics are a selection
per point (``c4_in128_out64_ttft_p99_ms`` ...) and the headline figures of the first point
of the sweep (``output_tokens_per_s``, ``ttft_p50_ms`` ...): put the point you compare
models on first.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from llmexp.sdk import context_length
from llmexp.sdk import UserError
from llmexp.plugins.benchmark import config_problems, point_key, points
from llmexp.plugins.benchmark.clients import NO_OUTPUT, BenchRequest, InProcessClient, OpenAIClient, listed_models
from llmexp.plugins.benchmark.coherence import gate
from llmexp.plugins.benchmark.load import drive
from llmexp.plugins.benchmark.metrics import LATENCIES, summarize
from llmexp.plugins.benchmark.prompts import prompt_pool
from llmexp.sdk import split_url_credentials
from llmexp.sdk import has_weights, tokenizer_directory
from llmexp.sdk import StageContext, StageResult

# Per point, these go into the stage's metrics (benchmark.jsonl keeps every statistic).
POINT_METRICS = tuple(f"{name}_{stat}_ms" for name in LATENCIES for stat in ("avg", "p50", "p90", "p99")) + (
    "output_tokens_per_s", "request_throughput_per_s", "error_count",
)
HEADLINE = ("output_tokens_per_s", "request_throughput_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
            "e2e_p50_ms")
SERVED_NAME = "benchmarked"  # the in-process engine's name for the stage's model


@dataclass
class Target:
    """An open target: the client that sends requests, the tokenizer that builds prompts, a description."""

    client: Any
    tokenizer: Any
    description: str
    engine: Any = None
    restore: Any = None
    tokenizer_dir: Optional[str] = None  # endpoint: where the tokenizer was loaded from (AIPerf loads it too)
    api_key: Optional[str] = None  # endpoint: from the environment; never recorded

    async def aclose(self) -> None:
        """Engine first (a request still streaming then ends, freeing its reader), then the client."""
        if self.engine is not None:
            self.engine.close()
        await self.client.aclose()
        if self.restore is not None:
            self.restore()


def benchmark(ctx: StageContext) -> StageResult:
    """The ``technique=benchmark`` stage (the ``Benchmark`` technique's entry)."""
    node, field = ctx.stage_config, node_field(ctx)
    earlier_model = getattr(ctx.model, "model", None)  # a previous stage's, when there is one in memory
    context = (context_length(ctx.config) if ctx.model is None
               else getattr(getattr(earlier_model, "config", None), "max_position_embeddings", None))
    problems = config_problems(node, field, has_weights(ctx.config), context)
    if problems:
        raise UserError(" ".join(problems))
    seed = node.seed if node.seed is not None else ctx.config.seed
    stage_dir = Path(ctx.stage_dir)
    return asyncio.run(_sweep(ctx, node, field, seed, stage_dir))


def node_field(ctx: StageContext) -> str:
    """Where this stage's node sits in the config, for messages: ``pipeline.nodes.<stage>``, ``technique`` or
    ``evaluation`` (a benchmark may run as the evaluation of the technique before it)."""
    from omegaconf import OmegaConf

    from llmexp.sdk import TOP_LEVEL_NODES, node_path

    nodes = OmegaConf.select(ctx.config, "pipeline.nodes", default=None) or {}
    if ctx.stage_name in nodes:
        return node_path(ctx.stage_name)
    return next((key for key in TOP_LEVEL_NODES if OmegaConf.select(ctx.config, key) is ctx.stage_config), "technique")


async def _sweep(ctx: StageContext, node, field: str, seed: int, stage_dir: Path) -> StageResult:
    from llmexp.data.jsonl import write_jsonl
    from llmexp.sdk import Progress

    target = await _open_target(ctx, node, field)
    rows: List[Dict[str, Any]] = []
    request_rows: List[Dict[str, Any]] = []
    progress = Progress(ctx.stage_name, unit="requests")
    try:
        with progress:
            for concurrency, input_tokens, output_tokens in points(node):
                row, timed = await _measure_point(target, node, field, stage_dir, seed, progress,
                                                  concurrency, input_tokens, output_tokens)
                rows.append(row)
                request_rows += timed
    finally:
        await target.aclose()
    artifacts = {
        "benchmark": str(write_jsonl(stage_dir / "benchmark.jsonl", rows)),
        "requests": str(write_jsonl(stage_dir / "requests.jsonl", request_rows)),
    }
    return StageResult(metrics=stage_metrics(rows), artifacts=artifacts)


def stage_metrics(rows: List[Dict[str, Any]]) -> Dict[str, float]:
    """Flat metrics: a selection per valid point, its validity, and the first point's headline figures."""
    metrics: Dict[str, float] = {}
    for row in rows:
        key = row["point"]
        metrics[f"{key}_valid"] = 1.0 if row["valid"] else 0.0
        if row["valid"]:
            metrics.update({f"{key}_{name}": float(row[name]) for name in POINT_METRICS if row.get(name) is not None})
    if rows and rows[0]["valid"]:
        metrics.update({name: float(rows[0][name]) for name in HEADLINE if rows[0].get(name) is not None})
    metrics["valid_points"] = float(sum(row["valid"] for row in rows))
    metrics["invalid_points"] = float(sum(not row["valid"] for row in rows))
    return metrics


async def _open_target(ctx: StageContext, node, field: str) -> Target:
    if node.target == "inprocess":
        return _open_inprocess(ctx, node, field)
    return await _open_endpoint(ctx, node, field)


def _open_inprocess(ctx: StageContext, node, field: str) -> Target:
    """The stage's model behind llmexp's continuous-batching engine, in eval mode for the stage."""
    import copy

    from llmexp.sdk import input_model, run_device
    from llmexp.sdk import Engine
    from llmexp.sdk import ServedModels

    artifact = input_model(ctx)
    if artifact is None:
        raise UserError(f"{field}: nothing to benchmark: no stage before it produced a model and model.path is unset; "
                        "set model.path=<checkpoint>.")
    tokenizer = artifact.tokenizer
    if tokenizer.pad_token_id is None:  # the engine left-pads prompts; the pad id is masked out
        tokenizer = copy.deepcopy(tokenizer)  # not the earlier stage's own
        tokenizer.pad_token = tokenizer.eos_token
    model, was_training = artifact.model, artifact.model.training
    model.eval().to(run_device(ctx.config.hardware))
    served = ServedModels(model=model, tokenizer=tokenizer, base_name=SERVED_NAME)
    engine = Engine(served, max_batch_size=node.max_batch_size, max_queue=max(64, max(node.concurrency)))
    source = str(artifact.path) if artifact.path else artifact.produced_by
    client = InProcessClient(engine, SERVED_NAME, max_in_flight=max(node.concurrency))
    return Target(client, tokenizer, f"in-process engine ({source})", engine=engine,
                  restore=lambda: model.train(was_training))


async def _open_endpoint(ctx: StageContext, node, field: str) -> Target:
    """An OpenAI-compatible server; reachable (``GET /v1/models``, retried) or a ``UserError``.

    A ``user:password`` in ``url`` is sent as HTTP Basic authentication and left out of every URL shown.
    """
    import httpx
    from transformers import AutoTokenizer

    api_key = os.environ.get(node.api_key_env) if node.api_key_env else None
    url, credentials = split_url_credentials(node.url)
    auth = httpx.BasicAuth(*credentials) if credentials else None
    names = await listed_models(url, api_key, field, auth=auth)
    model = node.model
    if model is None:
        if not names:
            raise UserError(f"{field}.model is unset and {url} lists no models at /v1/models; set {field}.model.")
        model = names[0]
    tokenizer_dir = node.tokenizer or tokenizer_directory(ctx.config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise UserError(f"{field}.tokenizer={tokenizer_dir} could not be loaded as a Hugging Face tokenizer "
                        f"({' '.join(str(error).split())[:200]}); give the served model's tokenizer directory."
                        ) from None
    client = OpenAIClient(url, model, node.endpoint_type, tokenizer, api_key=api_key, timeout_s=node.timeout_s,
                          extra_body=dict(node.extra_body), max_connections=max(node.concurrency), auth=auth)
    return Target(client, tokenizer, f"{url} ({model}, {node.endpoint_type})", tokenizer_dir=str(tokenizer_dir),
                  api_key=api_key)


def _ignore_eos(node) -> bool:
    return node.ignore_eos if node.ignore_eos is not None else node.target == "inprocess"


async def _measure_point(target: Target, node, field: str, stage_dir: Path, seed: int, progress, concurrency: int,
                         input_tokens: int, output_tokens: int) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """One point's row for benchmark.jsonl and its timed requests' rows."""
    key = point_key(concurrency, input_tokens, output_tokens)
    label = f"c{concurrency} in{input_tokens} out{output_tokens}"
    ignore_eos = _ignore_eos(node)
    prompts = prompt_pool(target.tokenizer, input_tokens, seed=(seed, input_tokens, output_tokens), field=field)
    requests = [BenchRequest(prompt, input_tokens, output_tokens, ignore_eos) for prompt in prompts]
    row: Dict[str, Any] = {"point": key, "concurrency": concurrency, "input_tokens": input_tokens,
                           "output_tokens": output_tokens, "target": target.description, "client": node.client,
                           "ignore_eos": ignore_eos, "valid": True, "invalid_reason": None}
    task = progress.add_task(f"{label} (gate)", total=node.request_count)

    reason, samples = await _coherence(target, node, requests, concurrency)
    row["coherence_samples"] = samples
    if reason is not None:
        row.update(valid=False, invalid_reason=reason)
        progress.update(task, description=f"{label} invalid")
        return row, []

    if node.client == "aiperf":  # AIPerf warms up itself
        from llmexp.plugins.benchmark.aiperf_driver import AIPerfFailed, run_aiperf

        progress.update(task, description=f"{label} (aiperf)")
        try:
            records, row["aiperf"] = await asyncio.to_thread(
                run_aiperf, node, field, target, stage_dir / "aiperf" / key, requests, concurrency, seed,
                target.api_key)
        except AIPerfFailed as error:
            row.update(valid=False, invalid_reason=str(error))
            progress.update(task, description=f"{label} aiperf failed")
            return row, []
        progress.update(task, completed=len(records))
    else:
        if node.warmup_requests:
            progress.update(task, description=f"{label} (warm-up)")
            await drive(target.client.send, requests, concurrency, request_count=node.warmup_requests)
        progress.update(task, description=label)
        replies = await drive(target.client.send, requests, concurrency, request_count=node.request_count,
                              duration_s=node.duration_s, on_reply=lambda reply: progress.advance(task))
        records = [reply.record for reply in replies]
    summary = summarize(records)
    row.update(summary)
    row["output_tokens_source"] = sorted({r.output_tokens_source for r in records if r.ok}) or None
    errors = sorted({r.error for r in records if r.error})
    row["errors"] = errors[:5]
    if summary["request_count"] == 0:
        row.update(valid=False, invalid_reason=f"every timed request failed: {errors[0] if errors else 'no output'}")
    started = min((r.sent for r in records), default=0.0)
    timed = [{"point": key, "index": index, **record.as_row(started)} for index, record in enumerate(records)]
    progress.update(task, description=f"{label} {'done' if row['valid'] else 'invalid'}")
    return row, timed


async def _coherence(target: Target, node, requests: List[BenchRequest],
                     concurrency: int) -> Tuple[Optional[str], List[str]]:
    """The gate's verdict (None: passed) and the start of each greedy output, for the record."""
    count = node.coherence_prompts
    if count == 0:
        return None, []
    replies = await drive(target.client.send, requests[:count], min(concurrency, count), request_count=count)
    samples = [reply.record.text[:200] for reply in replies]
    failed = [reply.record.error for reply in replies if reply.record.error and reply.record.error != NO_OUTPUT]
    if failed:
        return f"coherence gate: request failed: {failed[0]}", samples
    return gate([reply.token_ids for reply in replies], node.min_distinct_ratio), samples


