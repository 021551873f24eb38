"""``client=aiperf``: time a point with NVIDIA AIPerf (GenAI-Perf's successor) run as a subprocess.

AIPerf is not a dependency of llmexp: it pulls ~140 packages and pins versions of rich and
prometheus-client that clash with ours, so it lives in its own virtual environment and
``aiperf_bin`` names its executable. The driver writes the point's prompts (the same ones the
built-in client sends) as AIPerf's ``single_turn`` JSONL, runs ``aiperf profile`` against the
endpoint with the point's concurrency and budget, and reads back its per-request export
(``profile_export.jsonl``, profiling phase only), so the statistics are computed by
``metrics.summarize`` exactly as for the built-in client. AIPerf's own summary
(``profile_export_aiperf.json``) is kept beside them in the row for comparison. Its warm-up
is AIPerf's (``--warmup-request-count``); its output tokens are counted by AIPerf with the
same tokenizer. The API key goes on AIPerf's command line (AIPerf redacts it in everything
it writes); it, and a ``user:password`` in the URL, are replaced by ``<redacted>`` in the
command line and the AIPerf output recorded here.

Tested with aiperf 0.13.0.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from llmexp.sdk import replace_atomically
from llmexp.data.jsonl import write_jsonl
from llmexp.sdk import UserError
from llmexp.plugins.benchmark.clients import BenchRequest
from llmexp.plugins.benchmark.metrics import RequestRecord
from llmexp.sdk import REDACTED, redact_url_credentials

SUMMARY_FILE = "profile_export_aiperf.json"
RECORDS_FILE = "profile_export.jsonl"
# AIPerf's summary keys -> ours, for the row's "aiperf" entry
SUMMARY_KEYS = {
    "ttft_p50_ms": ("time_to_first_token", "p50"),
    "ttft_p99_ms": ("time_to_first_token", "p99"),
    "itl_avg_ms": ("inter_token_latency", "avg"),
    "e2e_p50_ms": ("request_latency", "p50"),
    "request_throughput_per_s": ("request_throughput", "avg"),
    "output_tokens_per_s": ("output_token_throughput", "avg"),
    "benchmark_duration_s": ("benchmark_duration", "avg"),
}


class AIPerfFailed(RuntimeError):
    """``aiperf profile`` exited with an error; the message holds the end of its output."""


def aiperf_executable(aiperf_bin: str, field: str = "technique") -> str:
    """The path of ``aiperf_bin`` (a name on PATH or a path), or a ``UserError`` saying how to install it."""
    found = shutil.which(str(Path(aiperf_bin).expanduser()))
    if found is None:
        raise UserError(
            f"{field}.client=aiperf: the executable {field}.aiperf_bin={aiperf_bin} was not found (PATH or path). "
            f"Install AIPerf in its own environment (`python3 -m venv ~/venv-aiperf && ~/venv-aiperf/bin/pip install "
            f"aiperf`) and set {field}.aiperf_bin=~/venv-aiperf/bin/aiperf, or use {field}.client=builtin."
        )
    return found


def command(executable: str, *, url: str, model: str, endpoint_type: str, tokenizer_dir: str, input_file: Path,
            artifact_dir: Path, concurrency: int, output_tokens: int, request_count: Optional[int],
            duration_s: Optional[float], warmup_requests: int, timeout_s: float, seed: int,
            extra_inputs: Dict[str, Any], api_key: Optional[str]) -> List[str]:
    """The ``aiperf profile`` argument list for one point."""
    base = url.rstrip("/")
    base = base[: -len("/v1")] if base.endswith("/v1") else base  # AIPerf appends /v1/<route> itself
    args = [
        executable, "profile", "--model", model, "--url", base, "--endpoint-type", endpoint_type, "--streaming",
        "--tokenizer", tokenizer_dir, "--input-file", str(input_file), "--custom-dataset-type", "single_turn",
        "--concurrency", str(concurrency), "--osl", str(output_tokens), "--use-legacy-max-tokens",
        "--warmup-request-count", str(warmup_requests), "--request-timeout-seconds", str(timeout_s),
        "--random-seed", str(seed), "--artifact-dir", str(artifact_dir), "--export-level", "records",
        "--ui-type", "none", "--no-gpu-telemetry", "--no-server-metrics", "--extra-inputs", json.dumps(extra_inputs),
    ]
    if request_count is not None:
        args += ["--request-count", str(request_count)]
    if duration_s is not None:
        args += ["--benchmark-duration", str(duration_s)]
    if api_key:
        args += ["--api-key", api_key]
    return args


def aiperf_environment() -> Dict[str, str]:
    """This process's environment without the Hugging Face offline switches.

    AIPerf 0.13 in offline mode looks every tokenizer up in the hub cache, so it cannot load a
    local tokenizer directory (HFValidationError); online, it loads a local absolute path
    directly without asking the hub. The driver always gives it one, so nothing is downloaded.
    """
    return {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}


def redacted(args: Sequence[str]) -> str:
    """The command line as a shell string with the API key's value and the URL's ``user:password`` replaced."""
    shown = list(args)
    for index, arg in enumerate(shown[:-1]):
        if arg == "--api-key":
            shown[index + 1] = REDACTED
    return redact_url_credentials(shlex.join(shown))


def read_records(artifact_dir: Path) -> List[RequestRecord]:
    """The profiling phase's requests from AIPerf's per-request export, as ``RequestRecord``s (seconds)."""
    path = artifact_dir / RECORDS_FILE
    records = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            entry = json.loads(line)
            meta, values = entry.get("metadata", {}), entry.get("metrics", {})
            if meta.get("benchmark_phase") != "profiling":
                continue

            def value(name: str) -> Optional[float]:
                return (values.get(name) or {}).get("value")

            sent = meta["request_start_ns"] / 1e9
            error = entry.get("error")
            if error:
                records.append(RequestRecord(sent=sent, done=meta.get("request_end_ns", 0) / 1e9 or None,
                                             error=f"{error.get('type')}: {error.get('message')}",
                                             output_tokens_source="aiperf"))
                continue
            records.append(RequestRecord(
                sent=sent, first_token=sent + value("time_to_first_token") / 1000.0,
                done=sent + value("request_latency") / 1000.0, input_tokens=int(value("input_sequence_length") or 0),
                output_tokens=int(value("output_sequence_length") or 0), output_tokens_source="aiperf",
            ))
    return records


def read_summary(artifact_dir: Path) -> Dict[str, Any]:
    """AIPerf's own figures for the point (``SUMMARY_KEYS``) and its version."""
    data = json.loads((artifact_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    summary: Dict[str, Any] = {"version": data.get("aiperf_version")}
    for ours, (name, statistic) in SUMMARY_KEYS.items():
        summary[ours] = (data.get(name) or {}).get(statistic)
    return summary


def run_aiperf(node, field: str, target, artifact_dir: Path, requests: Sequence[BenchRequest], concurrency: int,
               seed: int, api_key: Optional[str]) -> Tuple[List[RequestRecord], Dict[str, Any]]:
    """Time one point with AIPerf; its records and a summary entry for the row. Raises ``AIPerfFailed``."""
    executable = aiperf_executable(node.aiperf_bin, field)
    artifact_dir.mkdir(parents=True, exist_ok=True)
    input_file = write_jsonl(artifact_dir / "prompts.jsonl",
                             [{"text": r.prompt, "output_length": r.max_tokens} for r in requests])
    extra_inputs: Dict[str, Any] = {"temperature": 0.0}
    if requests[0].ignore_eos:
        extra_inputs.update(ignore_eos=True, min_tokens=requests[0].max_tokens)
    extra_inputs.update(dict(node.extra_body))
    args = command(
        executable, url=node.url, model=target.client.model, endpoint_type=node.endpoint_type,
        tokenizer_dir=str(Path(target.tokenizer_dir).resolve()), input_file=input_file,
        artifact_dir=artifact_dir / "export",
        concurrency=concurrency, output_tokens=requests[0].max_tokens, request_count=node.request_count,
        duration_s=node.duration_s, warmup_requests=node.warmup_requests, timeout_s=node.timeout_s, seed=seed,
        extra_inputs=extra_inputs, api_key=api_key,
    )
    shown = redacted(args)
    replace_atomically(artifact_dir / "command.txt", lambda handle: handle.write(shown + "\n"))
    completed = subprocess.run(args, capture_output=True, text=True, env=aiperf_environment())
    output = completed.stdout + completed.stderr
    if api_key:
        output = output.replace(api_key, REDACTED)
    output = redact_url_credentials(output)
    replace_atomically(artifact_dir / "aiperf_output.log", lambda handle: handle.write(output))
    if completed.returncode != 0 or not (artifact_dir / "export" / RECORDS_FILE).is_file():
        tail = " ".join(output.split())[-600:]
        log = artifact_dir / "aiperf_output.log"
        raise AIPerfFailed(f"aiperf exited with code {completed.returncode} (log: {log}): {tail}")
    summary = read_summary(artifact_dir / "export")
    summary["command"] = shown
    return read_records(artifact_dir / "export"), summary
