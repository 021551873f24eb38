"""The GPU checks of the GPU backends, as one prepared script: a lent GPU machine runs it once, unattended.

    python benchmarks/gpu_checks.py                                  # all parts on the GPU, preset hardware=h200
    python benchmarks/gpu_checks.py --parts train --steps 200 --skip-1b
    python benchmarks/gpu_checks.py --out $OUT/gpu_checks.json --budget-s 420
    python benchmarks/gpu_checks.py --cpu-smoke                      # the same machinery at toy scale on a CPU

What it measures, each through the real ``llmexp`` command line (every command is recorded):

1. **peak**: bf16 ``torch.matmul`` TFLOP/s at n=8192 (warm-up, CUDA-synchronised, median of runs):
   the denominator of MFU below.
2. **train**: the same model, seed and data trained ``--steps`` steps on ``backend=torch`` and on
   ``backend=megatron`` (``technique=pretrain``, bf16), for tiny_llama and for a ~1B model built
   from the tiny preset's numbers on the embedded data. Per run: tokens/s (results.json), the
   loss curve (train_log.jsonl) and MFU; per model: the largest loss difference between the
   backends at the logged steps and at the last step.
3. **formats**: ``pipeline=gpu_formats`` (a baseline, then FP8, NVFP4 and MXFP8 quantizations
   of it, each evaluated against it item by item) with ``hardware=b200``, the only preset
   listing fp4 and mxfp8: on another GPU ModelOpt runs the formats' CUDA fake-quant kernels,
   so the figures are simulated on that GPU. Per format: flip rates, KL to the baseline,
   perplexity and its change.
4. **serve**: ``technique=benchmark`` on the torch tiny run's model at concurrency 1, 8, 32:
   output tokens/s and TTFT p50.

Robust by construction: the parts run in the order peak, tiny training, serve, ~1B training,
formats (cheap first; formats last because its pipeline records each finished stage, so a time
limit that cuts it, say while ModelOpt compiles its MXFP8 kernel, still leaves FP8 and NVFP4),
each command under what is left of ``--budget-s`` (killed at the limit), each part in its own
try/except that records the error, and the JSON is written atomically after every command.
Beside each command, nvidia-smi's GPU memory and utilisation while it ran show whether it used
the GPU at all. Exit code 1 when any command or part failed, 2 when the machine cannot run the
checks (no CUDA, llmexp not installed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from datetime import datetime, timezone
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # importable before setup_problem can say that llmexp is not installed
from llmexp.architecture import training_flops_per_token  # noqa: E402
from llmexp.results.record import write_json_atomic  # noqa: E402

PARTS = ("peak", "train", "formats", "serve")
BACKENDS = ("torch", "megatron")
FORMATS = ("fp8", "nvfp4", "mxfp8")
FORMATS_PRESET = "b200"  # the only hardware preset whose dtypes list fp4 and mxfp8
FORMATS_BASELINE_STEPS = 400  # the formats' baseline: a trained model for a small share of the budget
MIN_COMMAND_S = 20  # a command is not started with less of the budget left

# ~1B parameters from the tiny preset's numbers, on the embedded tokenizer's vocabulary (973.7 M with it):
# Llama-3.2-1B's widths at 16 layers; lr 3e-4, the usual scale at this width (the tiny recipe's 1e-2 is for 128).
ONE_B_OVERRIDES = (
    "model.hidden_size=2048", "model.intermediate_size=8192", "model.num_layers=16",
    "model.num_attention_heads=32", "model.num_key_value_heads=8", "model.head_dim=64",
    "model.max_position_embeddings=512", "data.seq_len=512",
    "parallelism.micro_batch=8", "parallelism.global_batch=32",
    "technique.lr=3e-4", "technique.warmup_steps=10", "technique.save_model=false",
)


# -- pure helpers -------------------------------------------------------------------------


def mfu(tokens_per_s: float, flops_per_token_: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: the FLOP/s the training did, as a share of the peak."""
    return tokens_per_s * flops_per_token_ / peak_flops_per_s


def model_flops_per_token(config: Dict[str, Any]) -> int:
    """``llmexp.architecture.training_flops_per_token`` of a run, from its results.json ``config``."""
    return training_flops_per_token(config["model"], config["data"]["seq_len"])


def compare_loss_curves(a: Sequence[Dict[str, Any]], b: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The loss difference of two train_log.jsonl curves at the steps both logged.

    ``max_abs_diff`` (and its step) over those steps, and ``last_abs_diff`` at the last of them.
    """
    losses_a = {row["step"]: row["loss"] for row in a if "loss" in row}
    losses_b = {row["step"]: row["loss"] for row in b if "loss" in row}
    steps = sorted(set(losses_a) & set(losses_b))
    if not steps:
        return {"steps_compared": 0, "max_abs_diff": None, "max_abs_diff_step": None,
                "last_step": None, "last_abs_diff": None}
    diffs = {step: abs(losses_a[step] - losses_b[step]) for step in steps}
    worst = max(steps, key=diffs.__getitem__)
    return {"steps_compared": len(steps), "max_abs_diff": diffs[worst], "max_abs_diff_step": worst,
            "last_step": steps[-1], "last_abs_diff": diffs[steps[-1]]}


def slug(name: str) -> str:
    """``NVIDIA H200`` -> ``nvidia-h200``: a device name as a file-name part."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def write_report(path: Path, report: Dict[str, Any]) -> Path:
    """The report as JSON, atomically: a run killed at any moment leaves the last complete one."""
    report["updated_at"] = _now()
    return write_json_atomic(path, report)


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


# -- running commands -----------------------------------------------------------------------


class GpuMonitor:
    """nvidia-smi's memory in use and utilisation of GPU 0, sampled while a command runs.

    Shows whether a command used the GPU at all: a stage whose model stays on the CPU still
    "succeeds". Nothing is recorded where nvidia-smi is missing (a CPU machine).
    """

    QUERY = ["nvidia-smi", "--query-gpu=memory.used,utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"]

    def __init__(self, interval_s: float = 0.5):
        self.interval_s, self.samples, self.before = interval_s, [], None
        self.available = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def sample(self) -> Optional[List[float]]:
        try:
            line = subprocess.run(self.QUERY, capture_output=True, text=True, timeout=5).stdout.splitlines()[0]
            return [float(value) for value in line.split(",")]
        except (OSError, subprocess.SubprocessError, IndexError, ValueError):
            return None

    def __enter__(self) -> "GpuMonitor":
        if self.available:
            self.before = self.sample()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if (values := self.sample()) is not None:
                self.samples.append(values)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def summary(self) -> Optional[Dict[str, Any]]:
        if not self.available or not self.samples:
            return None
        return {"memory_used_mib_before": self.before[0] if self.before else None,
                "memory_used_mib_max": max(s[0] for s in self.samples),
                "utilization_pct_max": max(s[1] for s in self.samples),
                "utilization_pct_mean": round(statistics.fmean(s[1] for s in self.samples), 1),
                "samples": len(self.samples)}


class Checks:
    """The report, the time budget and the commands of one invocation."""

    def __init__(self, args: argparse.Namespace, out: Path, work_dir: Path, device: Dict[str, Any]):
        self.args, self.out, self.work_dir = args, out, work_dir
        self.deadline = time.monotonic() + args.budget_s
        self.report: Dict[str, Any] = {
            "script": "benchmarks/gpu_checks.py",
            "argv": sys.argv[1:],
            "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
            "started_at": _now(),
            "device": device,
            "hardware_preset": "cpu" if args.cpu_smoke else args.gpu_preset,
            "steps": args.steps,
            "work_dir": str(work_dir),
            "parts": {},
            "failures": [],
        }

    def save(self) -> None:
        write_report(self.out, self.report)

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def part(self, name: str, body: Callable[[Dict[str, Any]], None]) -> None:
        """Run one part; an exception is recorded in it and the next part still runs."""
        entry = self.report["parts"].setdefault(name, {})
        entry["status"] = "running"
        print(f"\n== {name} ==", flush=True)
        started = time.monotonic()
        try:
            body(entry)
            entry["status"] = "failed" if _any_failed(entry) else "ok"
        except Exception as error:  # noqa: BLE001  a part's failure must not cost the others' figures
            entry.update(status="failed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
            print(f"{name}: FAILED: {type(error).__name__}: {error}", flush=True)
        entry["wall_s"] = round(entry.get("wall_s", 0.0) + time.monotonic() - started, 1)  # train runs in two turns
        failures = self.report["failures"]
        if name in failures:
            failures.remove(name)
        if entry["status"] == "failed":
            failures.append(name)
        self.save()

    def llmexp(self, name: str, overrides: Sequence[str]) -> Dict[str, Any]:
        """``python -m llmexp <overrides> hydra.run.dir=<work>/<name>``, logged, timed and bounded by the budget."""
        run_dir = self.work_dir / name
        argv = [sys.executable, "-m", "llmexp", *overrides, f"hydra.run.dir={run_dir}"]
        record: Dict[str, Any] = {"command": shlex.join(argv), "run_dir": str(run_dir), "log": str(run_dir) + ".log"}
        timeout = self.left_s()
        if timeout < MIN_COMMAND_S:
            record.update(status="skipped", error=f"time budget spent (--budget-s {self.args.budget_s:g})",
                          results=None)
            print(f"{name}: skipped, {record['error']}", flush=True)
            return record
        print(f"{name}: {record['command']}", flush=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))  # ModelOpt compiles its MX kernels on first use
        started = time.monotonic()
        shutil.rmtree(run_dir, ignore_errors=True)  # llmexp would keep a finished run's stages: measure afresh
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(record["log"], "w", encoding="utf-8") as log, GpuMonitor() as gpu:
            process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            try:
                record["returncode"] = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _stop(process)
                record["returncode"] = None
        record["wall_s"] = round(time.monotonic() - started, 1)
        record["gpu"] = gpu.summary()
        if record["returncode"] is None:
            why = f"killed after {timeout:.0f} s: the time budget ran out"
        else:
            why = f"exit code {record['returncode']}" if record["returncode"] else ""
        record["status"] = "failed" if why else "ok"
        if why:
            tail = _tail(Path(record["log"]))
            record.update(error=f"{why}: {tail.splitlines()[-1] if tail else 'no output'}", log_tail=tail)
        results = run_dir / "results.json"
        record["results"] = json.loads(results.read_text()) if results.is_file() else None
        print(f"{name}: {record['status']} in {record['wall_s']} s" + (f" ({why})" if why else ""), flush=True)
        return record


def _stop(process: subprocess.Popen) -> None:
    """End the command and whatever it started (its own session): TERM, then KILL after 10 s."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=wait_s)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(log: Path, lines: int = 25) -> str:
    """The log's last non-empty lines: a failed llmexp command ends with its error paragraph or exception."""
    try:
        return "\n".join([line for line in log.read_text(errors="replace").splitlines() if line.strip()][-lines:])
    except OSError:
        return ""


def _any_failed(entry: Dict[str, Any]) -> bool:
    """A command that failed, or was skipped for lack of time, leaves its figures missing."""
    return any(run.get("status") in ("failed", "skipped") for run in entry.get("runs", {}).values())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _stage(record: Dict[str, Any], stage: str) -> Dict[str, Any]:
    return ((record.get("results") or {}).get("stages") or {}).get(stage) or {}


# -- the parts ------------------------------------------------------------------------------


def measure_peak(entry: Dict[str, Any], n: int = 8192, runs: int = 10, reps: int = 10, warmup: int = 5) -> None:
    """bf16 matmul TFLOP/s: ``reps`` products per timed run between two CUDA synchronisations, median of ``runs``."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(warmup):
        torch.matmul(a, b, out=c)
    torch.cuda.synchronize()
    tflops = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b, out=c)
        torch.cuda.synchronize()
        tflops.append(2 * n**3 * reps / (time.perf_counter() - start) / 1e12)
    del a, b, c
    torch.cuda.empty_cache()
    entry.update(tflops=round(statistics.median(tflops), 1), runs_tflops=[round(t, 1) for t in tflops],
                 command=f"in process: torch.matmul bf16 n={n}, {warmup} warm-up, {runs} runs of {reps} products, "
                         "median")
    print(f"peak: {entry['tflops']} TFLOP/s bf16 (runs {min(tflops):.1f}-{max(tflops):.1f})", flush=True)


def train_overrides(checks: Checks, size: str, backend: str) -> List[str]:
    args = checks.args
    steps = args.steps
    log_every = 10 if steps >= 20 else max(1, steps // 3)
    overrides = ["pipeline=technique_only", "technique=pretrain", "model=tiny_llama", f"backend={backend}",
                 f"technique.max_steps={steps}", f"technique.log_every={log_every}", "technique.checkpoint_every=0"]
    if args.cpu_smoke:
        overrides += ["hardware=cpu", "precision=fp32"]
    else:
        overrides += [f"hardware={args.gpu_preset}", "precision=bf16"]
    return overrides + (list(ONE_B_OVERRIDES) if size == "1b" else [])


def train_run(checks: Checks, entry: Dict[str, Any], size: str, backend: str) -> None:
    """One training command; its tokens/s, loss curve and MFU into ``entry['runs']['<size>/<backend>']``."""
    name = f"train-{size}-{backend}"
    record = checks.llmexp(name, train_overrides(checks, size, backend))
    stage = _stage(record, "pretrain")
    metrics = stage.get("metrics") or {}
    record["metrics"] = {key: metrics.get(key) for key in
                         ("tokens_per_s", "train_tokens", "train_time_s", "final_loss", "steps", "peak_memory_mb",
                          "total_parameters")}
    record["loss_curve"] = [{"step": row["step"], "loss": row["loss"]}
                            for row in read_jsonl(Path(record["run_dir"]) / "pretrain" / "train_log.jsonl")
                            if "loss" in row]
    record["model_dir"] = (stage.get("artifacts") or {}).get("model")
    peak = checks.report["parts"].get("peak", {}).get("tflops")
    if metrics.get("tokens_per_s"):
        per_token = model_flops_per_token(record["results"]["config"])
        record["flops_per_token"] = per_token
        record["mfu"] = round(mfu(metrics["tokens_per_s"], per_token, peak * 1e12), 4) if peak else None
    results = record.pop("results")  # the run directory keeps it; the report keeps what it reads
    record["run_status"] = (results or {}).get("status")
    entry.setdefault("runs", {})[f"{size}/{backend}"] = record
    compare = entry.setdefault("comparisons", {})
    runs = entry["runs"]
    if all(f"{size}/{b}" in runs and runs[f"{size}/{b}"]["loss_curve"] for b in BACKENDS):
        torch_run, megatron_run = (runs[f"{size}/{b}"] for b in BACKENDS)
        comparison = compare_loss_curves(torch_run["loss_curve"], megatron_run["loss_curve"])
        finals = [run["metrics"].get("final_loss") for run in (torch_run, megatron_run)]
        comparison["final_loss_abs_diff"] = abs(finals[0] - finals[1]) if None not in finals else None
        compare[size] = comparison
    checks.save()


def train_part(checks: Checks, entry: Dict[str, Any], sizes: Sequence[str]) -> None:
    for size in sizes:
        for backend in (("torch",) if checks.args.cpu_smoke else BACKENDS):
            train_run(checks, entry, size, backend)


def tiny_torch_model(checks: Checks) -> str:
    """The torch tiny run's saved model: the train part's, or trained now when that part did not run."""
    entry = checks.report["parts"].setdefault("train", {})
    run = entry.get("runs", {}).get("tiny/torch")
    if run is None:
        print("serve: no torch tiny run to serve; training it first", flush=True)
        train_run(checks, entry, "tiny", "torch")
        run = entry["runs"]["tiny/torch"]
        entry["status"] = "failed" if _any_failed(entry) else "ok"
    if not run.get("model_dir"):
        raise RuntimeError(f"the torch tiny training made no model ({run.get('error', 'no error recorded')})")
    return run["model_dir"]


def formats_part(checks: Checks, entry: Dict[str, Any], gpu_name: Optional[str]) -> None:
    smoke = checks.args.cpu_smoke
    formats = ("fp8",) if smoke else FORMATS
    overrides = ["pipeline=gpu_formats", "pipeline.nodes.baseline.checkpoint_every=0"]
    if smoke:  # the CPU simulates fp8 only (nvfp4 and mxfp8 need CUDA kernels)
        overrides += ["hardware=cpu", "precision=fp32", "pipeline.stages=[baseline,baseline_eval,fp8,fp8_eval]",
                      "~pipeline.inputs.nvfp4", "~pipeline.inputs.mxfp8",
                      f"pipeline.nodes.baseline.max_steps={checks.args.steps}", "pipeline.nodes.baseline_eval.limit=8",
                      "pipeline.nodes.fp8.calibration_size=16"]
    else:
        overrides += [f"hardware={FORMATS_PRESET}", "precision=bf16",
                      f"pipeline.nodes.baseline.max_steps={FORMATS_BASELINE_STEPS}"]
    record = checks.llmexp("formats", overrides)
    simulated_on = "CPU" if smoke else gpu_name
    record["simulated_on"] = simulated_on
    base = _stage(record, "baseline_eval").get("metrics") or {}
    record["baseline"] = {key: base.get(key) for key in ("perplexity", "mc_cloze_acc", "word_problem_em")}
    record["formats"] = {}
    for name in formats:
        quantized, evaluated = _stage(record, name), _stage(record, f"{name}_eval")
        m = evaluated.get("metrics") or {}
        record["formats"][name] = {
            "status": evaluated.get("status") or quantized.get("status") or "not run",
            "reason": evaluated.get("reason") or quantized.get("reason"),
            "simulated_on": simulated_on,
            **{key: m.get(key) for key in ("flip_rate_multiple_choice", "flip_rate_word_problems", "kl_to_baseline",
                                           "perplexity", "perplexity_rel_delta", "mc_cloze_acc_delta",
                                           "mc_cloze_acc_delta_se")},
            "calibration_time_s": (quantized.get("metrics") or {}).get("calibration_time_s"),
            "bits_per_weight": (quantized.get("model_stats") or {}).get("bits_per_weight"),
        }
    record["run_status"] = (record.pop("results") or {}).get("status")
    entry.setdefault("runs", {})["formats"] = record
    for name, figures in record["formats"].items():
        print(f"formats: {name}: {figures['status']}, simulated on {simulated_on}", flush=True)


def serve_part(checks: Checks, entry: Dict[str, Any]) -> None:
    smoke = checks.args.cpu_smoke
    concurrency, input_tokens, output_tokens, requests = ((1, 4), 16, 8, 8) if smoke else ((1, 8, 32), 32, 32, 64)
    overrides = ["technique=benchmark", f"model.path={tiny_torch_model(checks)}",
                 f"hardware={'cpu' if smoke else checks.args.gpu_preset}",
                 f"technique.concurrency=[{','.join(map(str, concurrency))}]",
                 f"technique.input_tokens=[{input_tokens}]",
                 f"technique.output_tokens=[{output_tokens}]", f"technique.request_count={requests}",
                 f"technique.max_batch_size={max(concurrency)}",  # the engine batches every request in flight
                 # speed does not depend on what a briefly trained model says (ignore_eos fixes the lengths),
                 # and its greedy text may repeat a token, which the coherence gate would refuse
                 "technique.coherence_prompts=0"]
    record = checks.llmexp("serve", overrides)
    metrics = _stage(record, "benchmark").get("metrics") or {}
    rows = {row["point"]: row for row in read_jsonl(Path(record["run_dir"]) / "benchmark" / "benchmark.jsonl")}
    record["points"] = {}
    for c in concurrency:
        point = f"c{c}_in{input_tokens}_out{output_tokens}"
        record["points"][str(c)] = {"valid": metrics.get(f"{point}_valid"),
                                    "invalid_reason": rows.get(point, {}).get("invalid_reason"),
                                    "output_tokens_per_s": metrics.get(f"{point}_output_tokens_per_s"),
                                    "ttft_p50_ms": metrics.get(f"{point}_ttft_p50_ms"),
                                    "itl_p50_ms": metrics.get(f"{point}_itl_p50_ms")}
    record["run_status"] = (record.pop("results") or {}).get("status")
    entry.setdefault("runs", {})["serve"] = record


# -- the table ------------------------------------------------------------------------------


def summary_table(report: Dict[str, Any]) -> str:
    """The report as plain-text tables, one per part that ran."""
    parts, lines = report["parts"], []
    device = report["device"]
    lines.append(f"# gpu_checks ({report['mode']}): {device.get('name')}, torch {device.get('torch')}, "
                 f"CUDA {device.get('cuda')}; hardware={report['hardware_preset']}")
    if "peak" in parts:
        p = parts["peak"]
        lines.append(f"\npeak bf16 matmul (n=8192): {p.get('tflops', '-')} TFLOP/s  [{p['status']}]")
    if "train" in parts:
        lines.append(f"\n{'training':18s} {'status':8s} {'tokens/s':>10s} {'MFU':>7s} {'final loss':>11s} "
                     f"{'GPU MiB max':>11s} {'wall s':>7s}")
        for key, run in parts["train"].get("runs", {}).items():
            m = run.get("metrics") or {}
            lines.append(f"{key:18s} {run['status']:8s} {_fmt(m.get('tokens_per_s'), '.0f'):>10s} "
                         f"{_fmt(run.get('mfu'), '.1%'):>7s} {_fmt(m.get('final_loss'), '.4f'):>11s} "
                         f"{_fmt((run.get('gpu') or {}).get('memory_used_mib_max'), '.0f'):>11s} "
                         f"{_fmt(run.get('wall_s'), '.0f'):>7s}")
        for size, c in parts["train"].get("comparisons", {}).items():
            lines.append(f"{size}: torch vs megatron |loss diff| max {_fmt(c['max_abs_diff'], '.4f')} (step "
                         f"{c['max_abs_diff_step']}), at step {c['last_step']} {_fmt(c['last_abs_diff'], '.4f')}, "
                         f"final {_fmt(c.get('final_loss_abs_diff'), '.4f')} over {c['steps_compared']} logged steps")
    formats = parts.get("formats", {}).get("runs", {}).get("formats")
    if formats:
        lines.append(f"\n{'format':8s} {'status':10s} {'flip MC':>8s} {'flip WP':>8s} {'KL':>10s} {'perplexity':>10s} "
                     f"{'ppl change':>10s}  simulated on")
        for name, f in formats["formats"].items():
            lines.append(f"{name:8s} {f['status']:10s} {_fmt(f['flip_rate_multiple_choice'], '.3f'):>8s} "
                         f"{_fmt(f['flip_rate_word_problems'], '.3f'):>8s} {_fmt(f['kl_to_baseline'], '.3g'):>10s} "
                         f"{_fmt(f['perplexity'], '.3f'):>10s} {_fmt(f['perplexity_rel_delta'], '+.2%'):>10s}  "
                         f"{f['simulated_on']}")
        lines.append(f"baseline perplexity {_fmt(formats['baseline']['perplexity'], '.3f')}")
    serve = parts.get("serve", {}).get("runs", {}).get("serve")
    if serve:
        lines.append(f"\n{'concurrency':>11s} {'output tok/s':>13s} {'TTFT p50 ms':>12s} {'ITL p50 ms':>11s}"
                     f"   GPU MiB max {_fmt((serve.get('gpu') or {}).get('memory_used_mib_max'), '.0f')}")
        for c, point in serve.get("points", {}).items():
            lines.append(f"{c:>11s} {_fmt(point['output_tokens_per_s'], '.0f'):>13s} "
                         f"{_fmt(point['ttft_p50_ms'], '.1f'):>12s} {_fmt(point['itl_p50_ms'], '.2f'):>11s}")
    failed = report["failures"]
    lines.append(f"\nparts failed: {', '.join(failed) if failed else 'none'}")
    for name, part in parts.items():
        problems = [(name, part.get("error"))] + [(f"{name} {key}", run.get("error"))
                                                  for key, run in part.get("runs", {}).items()]
        lines += [f"  {where}: {error.splitlines()[0]}" for where, error in problems if error]
    return "\n".join(lines)


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# -- main -----------------------------------------------------------------------------------


def device_info(cpu_smoke: bool) -> Dict[str, Any]:
    import torch

    info: Dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    if cpu_smoke:
        return {**info, "name": f"CPU ({platform.machine()}, {os.cpu_count()} cores)"}
    from torch.utils.cpp_extension import CUDA_HOME

    properties = torch.cuda.get_device_properties(0)
    return {**info, "name": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
            "memory_gib": round(properties.total_memory / 2**30, 1), "count": torch.cuda.device_count(),
            "cuda_home": CUDA_HOME}  # where ModelOpt finds nvcc for its MX kernels (None: it cannot build them)


def setup_problem(cpu_smoke: bool) -> Optional[str]:
    """Why this machine cannot run the checks at all, or None."""
    if "pretrain" not in {ep.name for ep in entry_points(group="llmexp")}:
        return ("llmexp's techniques are not registered in this Python (they load through entry points): install "
                f"the checkout first, `{sys.executable} -m pip install --no-deps -e {REPO}`.")
    if not cpu_smoke:
        import torch

        if not torch.cuda.is_available():
            return (f"no CUDA GPU is visible to torch {torch.__version__}; these are the GPU checks. Run "
                    "`python benchmarks/gpu_checks.py --cpu-smoke` to exercise the script on a CPU.")
    return None


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per run (default 100; 6 with --cpu-smoke)")
    parser.add_argument("--gpu-preset", default="h200", help="llmexp/conf/hardware preset of the GPU (training and serving)")
    parser.add_argument("--skip-1b", action="store_true", help="train tiny_llama only")
    parser.add_argument("--out", type=Path, default=None,
                        help="the JSON report (default benchmarks/results/gpu_checks-<device>.json)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the run directories go, each replaced when run again (default: a new temp dir)")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="wall-clock budget: no command starts after it, a running one is killed at it")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="toy scale on this CPU: hardware=cpu, fp32, torch only, fp8 only, no peak/MFU/1B")
    args = parser.parse_args(argv)
    args.parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if args.steps is None:
        args.steps = 6 if args.cpu_smoke else 100
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    problem = setup_problem(args.cpu_smoke)
    if problem:
        print(f"gpu_checks: {problem}", file=sys.stderr)
        return 2
    device = device_info(args.cpu_smoke)
    name = "cpu-smoke" if args.cpu_smoke else slug(device["name"])
    out = args.out or REPO / "benchmarks" / "results" / f"gpu_checks-{name}.json"
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu_checks_"))
    checks = Checks(args, out, work_dir, device)
    parts = [part for part in args.parts if not (args.cpu_smoke and part == "peak")]  # no GPU: no peak, no MFU
    print(f"gpu_checks: {device['name']}; parts {', '.join(parts)}; report {out}; runs in {work_dir}; "
          f"budget {args.budget_s:g} s", flush=True)
    checks.save()
    # the order of the module docstring: a time limit cuts the command that loses least to it
    if "peak" in parts:
        checks.part("peak", lambda entry: measure_peak(entry))
    if "train" in parts:
        checks.part("train", lambda entry: train_part(checks, entry, ["tiny"]))
    if "serve" in parts:
        checks.part("serve", lambda entry: serve_part(checks, entry))
    if "train" in parts and not (args.skip_1b or args.cpu_smoke):
        checks.part("train", lambda entry: train_part(checks, entry, ["1b"]))
    if "formats" in parts:
        checks.part("formats", lambda entry: formats_part(checks, entry, device["name"]))
    checks.report["finished_at"] = _now()
    checks.save()
    print("\n" + summary_table(checks.report))
    print(f"\nreport: {out}")
    return 1 if checks.report["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
