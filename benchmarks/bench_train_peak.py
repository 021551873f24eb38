"""Training speed against the machine: achieved model FLOP/s as a share of the matmul peak, side by side.

Run from the repository root, alone on the machine::

    python benchmarks/bench_train_peak.py                 # 3 rounds of 120 steps, eager and compiled
    python benchmarks/bench_train_peak.py --rounds 5 --steps 200 --no-compile
    python benchmarks/bench_train_peak.py --backend megatron      # on a GPU: MFU of megatron-core's loop

What is measured, in one process, the parts taking turns each round
-------------------------------------------------------------------
* **peak**: the fp32 matmul rate of square matrices, n = 2048, on the threads the run uses
  (``llmexp.machine.cpu_threads.use_share_of_cores``); on a GPU bf16 at n = 8192 (the runs
  train in bf16 there: the shares are MFU). Measured every round: the denominator of that
  round's shares.
* **llmexp eager**: ``llmexp.training.loop.train`` training the embedded default (pretrain on
  the packed embedded corpus, fp32, the default recipe) as ``llmexp`` runs it.
* **llmexp compiled**: the same with ``technique.compile=true``. Its first round compiles with
  an empty TorchInductor cache (``TORCHINDUCTOR_CACHE_DIR`` is a fresh directory): the cost on a
  fresh machine; later rounds find the cache (another process's cost once the cache holds it).
* **llmexp megatron** (``--backend megatron``, a GPU only): megatron-core's loop instead, its
  run's own tokens/s (warm-up steps included: its loop takes no step callback).
* **compact Llama**: the same model written out compactly in this file (fused QKV and
  gate-up projections, ``F.rms_norm``, ``F.scaled_dot_product_attention`` with GQA), its weights
  copied from the framework's starting model, the same batches, AdamW with the same kernel:
  the peer reference for what a hand-written model reaches. Its losses must match the
  framework's first steps (exit 1 otherwise): it is the same model, not a cheaper one.

Model FLOPs per token are ``llmexp.architecture.training_flops_per_token``: 6 per matmul weight
(the LM head included) plus the attention term 12·L·(heads·head_dim)·T. Tokens/s are steady
state: the steps after ``--warmup``. Each share is achieved FLOP/s over that round's peak; the
headline is the median of the rounds, target >= 0.55 for llmexp. The compile cost and the
steps after which compiling pays (cost / time saved per step) are printed beside it.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="llmexp-inductor-"))  # cold first compile

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from bench_train_throughput import setup  # noqa: E402
from llmexp.architecture import training_flops_per_token  # noqa: E402
from llmexp.machine import cpu_threads  # noqa: E402
from llmexp.results.tracking import make_tracker  # noqa: E402
from llmexp.techniques.contract import StageContext  # noqa: E402
from llmexp.training.loop import train  # noqa: E402
from llmexp.training.optimizer import adamw  # noqa: E402
from llmexp.training.schedule import data_order, warmup_cosine  # noqa: E402
from machine_load import OtherLoad, describe  # noqa: E402

TARGET_SHARE = 0.55
LOSS_TOLERANCE = 1e-3  # relative: the compact model's first losses against the framework's (float order differs)


def matmul_peak(device: str, reps: int = 5) -> float:
    """FLOP/s of one square matmul (fp32 n=2048 on a CPU, bf16 n=8192 on a GPU), the best of ``reps`` timed runs."""
    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (2048, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        _sync(device)
        best = max(best, 3 * 2 * n**3 / (time.perf_counter() - start))
    return best


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class CompactBlock(nn.Module):
    def __init__(self, m) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = m.num_attention_heads, m.num_key_value_heads, m.head_dim
        width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.attention_norm = nn.RMSNorm(m.hidden_size, eps=m.rms_norm_eps)
        self.qkv = nn.Linear(m.hidden_size, width + 2 * kv_width, bias=False)
        self.out = nn.Linear(width, m.hidden_size, bias=False)
        self.mlp_norm = nn.RMSNorm(m.hidden_size, eps=m.rms_norm_eps)
        self.gate_up = nn.Linear(m.hidden_size, 2 * m.intermediate_size, bias=False)
        self.down = nn.Linear(m.intermediate_size, m.hidden_size, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = self.qkv(self.attention_norm(x)).split([width, kv_width, kv_width], dim=-1)
        q = _rotate(q.view(b, t, self.heads, self.head_dim).transpose(1, 2), cos, sin)
        k = _rotate(k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2), cos, sin)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.out(attended.transpose(1, 2).reshape(b, t, width))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def _rotate(x, cos, sin):
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class CompactLlama(nn.Module):
    """The tiny Llama in ~40 lines, its weights copied from a transformers ``LlamaForCausalLM``."""

    def __init__(self, hf_model) -> None:
        super().__init__()
        m = hf_model.config
        self.embed = nn.Embedding(m.vocab_size, m.hidden_size)
        self.blocks = nn.ModuleList(CompactBlock(m) for _ in range(m.num_hidden_layers))
        self.norm = nn.RMSNorm(m.hidden_size, eps=m.rms_norm_eps)
        inverse = 1.0 / (m.rope_parameters["rope_theta"] ** (torch.arange(0, m.head_dim, 2).float() / m.head_dim))
        angles = torch.outer(torch.arange(m.max_position_embeddings).float(), inverse)
        self.register_buffer("cos", torch.cat((angles, angles), dim=-1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat((angles, angles), dim=-1).sin(), persistent=False)
        with torch.no_grad():
            self.embed.weight.copy_(hf_model.model.embed_tokens.weight)
            self.norm.weight.copy_(hf_model.model.norm.weight)
            for block, layer in zip(self.blocks, hf_model.model.layers):
                a, mlp = layer.self_attn, layer.mlp
                block.qkv.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
                block.out.weight.copy_(a.o_proj.weight)
                block.gate_up.weight.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
                block.down.weight.copy_(mlp.down_proj.weight)
                block.attention_norm.weight.copy_(layer.input_layernorm.weight)
                block.mlp_norm.weight.copy_(layer.post_attention_layernorm.weight)

    def forward(self, ids):
        t = ids.shape[1]
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h, self.cos[:t], self.sin[:t])
        logits = F.linear(self.norm(h), self.embed.weight)  # tied head
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


class StepClock(L.Callback):
    """Wall time of each optimiser step of a ``train`` run."""

    def __init__(self) -> None:
        self.step_s: List[float] = []
        self.last = 0.0

    def on_train_start(self, trainer, pl_module):
        self.last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        self.step_s.append(now - self.last)
        self.last = now


def framework(steps: int, compile_: bool, tmp: Path, overrides: List[str]) -> Dict[str, Any]:
    """One ``train`` of the embedded default's pretraining: step times, logged losses, metrics."""
    s = setup("pretrain", steps, overrides)
    s.cfg.technique.compile = compile_
    s.cfg.technique.log_every = 1
    s.cfg.technique.checkpoint_every = 0
    clock = StepClock()
    tracker = make_tracker(s.cfg.tracker, tmp, s.cfg)
    ctx = StageContext(s.cfg, s.cfg.technique, tmp / "pretrain", None, tracker, "pretrain")
    start_model = copy.deepcopy(s.model)
    if compile_:
        torch._dynamo.reset()  # compile afresh as a new process would: traced again, Inductor's on-disk cache consulted
    megatron = s.cfg.backend.name == "megatron"  # its loop takes no Lightning callback: the run's own tokens/s
    metrics = train(ctx, s.model, s.loss_fn, s.examples, s.collate, shuffle=s.shuffle, callbacks=[] if megatron else [clock])
    tracker.finish()
    return {"step_s": clock.step_s, "metrics": metrics, "setup": s, "start_model": start_model}


def compact(run: Dict[str, Any], steps: int) -> Dict[str, Any]:
    """The compact model from the framework run's starting weights, on its batches, with its schedule."""
    s = run["setup"]
    t, device = s.cfg.technique, "cuda" if torch.cuda.is_available() else "cpu"
    model = CompactLlama(run["start_model"]).to(device).train()
    optimizer = adamw(model.parameters(), t.lr, (t.beta1, t.beta2), t.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, t.warmup_steps, t.max_steps, t.min_lr_ratio))
    micro = s.cfg.parallelism.micro_batch
    order = data_order(len(s.examples), steps * micro, s.cfg.seed, s.shuffle).tolist()
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=s.cfg.precision == "bf16")
    losses, step_s = [], []
    for k in range(steps):
        start = time.perf_counter()
        batch = s.collate([s.examples[i] for i in order[k * micro:(k + 1) * micro]]).to(device)
        with autocast:
            loss = model(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step_s.append(time.perf_counter() - start)
    return {"step_s": step_s, "losses": losses}


CATEGORIES = (  # op-name fragments -> where a step's time goes
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("optimizer", ("_fused_adam", "foreach", "lerp", "addcdiv", "addcmul", "sqrt", "linalg_vector_norm")),
    ("elementwise", ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::neg", "aten::cat", "aten::silu", "aten::pow",
                     "aten::rsqrt", "aten::sum", "aten::mean", "aten::copy_", "aten::fill_", "aten::to", "aten::_to_copy",
                     "log_softmax", "nll_loss", "aten::cos", "aten::sin", "aten::embedding", "aten::index")),
)


def profile_steps(steps: int, overrides: List[str]) -> None:
    """Where an eager framework step's time goes: self CPU time of the ops by kind, the rest is Python and waits."""
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory(prefix="llmexp-bench-") as tmp, profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        framework(steps, False, Path(tmp), overrides)
        wall = time.perf_counter() - start
    spent = {name: 0.0 for name, _ in CATEGORIES}
    spent["other ops"] = 0.0
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):  # ranges (Lightning runs the whole step inside optimizer.step) are not ops
            continue
        name = next((name for name, fragments in CATEGORIES if any(f in event.key.lower() for f in fragments)), "other ops")
        spent[name] += event.self_cpu_time_total / 1e6
    spent["python, framework, waits"] = max(0.0, wall - sum(spent.values()))
    print(f"\nwhere {steps} eager steps' {wall:.1f} s go (torch.profiler self time; set-up included):")
    for name, seconds in sorted(spent.items(), key=lambda item: -item[1]):
        print(f"  {name:26s} {seconds:7.2f} s  {seconds / wall:6.1%}")


def tokens_per_s(step_s: List[float], warmup: int, tokens_per_step: int) -> float:
    steady = step_s[warmup:]
    return len(steady) * tokens_per_step / sum(steady)


def logged_losses(stage_dir: Path) -> List[float]:
    import json

    rows = [json.loads(line) for line in (stage_dir / "train_log.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--gpu-preset", default="h100", help="the hardware option a GPU run composes (bf16)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="also profile this many eager framework steps and print where the time goes")
    parser.add_argument("--backend", default="torch", choices=("torch", "megatron"),
                        help="megatron: megatron-core's loop on a GPU (its own tokens/s, warm-up included)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    overrides = [f"hardware={args.gpu_preset}", "precision=bf16", f"backend={args.backend}"] if device == "cuda" else []
    tolerance = 1e-2 if device == "cuda" else LOSS_TOLERANCE  # bf16 autocast on a GPU
    threads = cpu_threads.use_share_of_cores()
    torch.set_flush_denormal(True)
    cfg = setup("pretrain", 1, overrides).cfg
    per_token = training_flops_per_token(cfg.model, cfg.data.seq_len)
    tokens_per_step = cfg.parallelism.global_batch * cfg.data.seq_len
    print(f"# training FLOP/s against the matmul peak: {args.rounds} rounds of {args.steps} steps (first "
          f"{args.warmup} untimed), {device}, {threads} threads, torch {torch.__version__}; "
          f"{per_token:,} model FLOPs per token, {tokens_per_step} tokens per step")
    if args.backend == "megatron" and device != "cuda":
        parser.error("--backend megatron trains on a GPU only")
    megatron = args.backend == "megatron"
    sides = ["llmexp megatron"] if megatron else ["llmexp eager", "compact Llama"] + (["llmexp compiled"] if args.compile else [])
    shares: Dict[str, List[float]] = {side: [] for side in sides}
    rates: Dict[str, List[float]] = {side: [] for side in sides}
    compile_s: List[float] = []
    ok, meter = True, OtherLoad().start()
    for round_ in range(args.rounds):
        peak = matmul_peak(device)
        order = sides if round_ % 2 == 0 else sides[::-1]
        measured: Dict[str, float] = {}
        with tempfile.TemporaryDirectory(prefix="llmexp-bench-") as tmp:
            for side in order:
                if side == "compact Llama":
                    continue  # runs right after the eager framework run, from its starting weights
                run = framework(args.steps, side == "llmexp compiled", Path(tmp) / side.replace(" ", "_"), overrides)
                if megatron:
                    measured[side] = run["metrics"]["tokens_per_s"]
                    continue
                measured[side] = tokens_per_s(run["step_s"], args.warmup, tokens_per_step)
                if side == "llmexp compiled":
                    compile_s.append(run["metrics"].get("compile_time_s", 0.0))
                    continue
                hand = compact(run, args.steps)
                measured["compact Llama"] = tokens_per_s(hand["step_s"], args.warmup, tokens_per_step)
                framework_losses = logged_losses(Path(tmp) / side.replace(" ", "_") / "pretrain")
                same = all(abs(a - b) <= tolerance * abs(b) for a, b in zip(hand["losses"][:5], framework_losses[:5]))
                if not same:
                    print(f"compact losses {hand['losses'][:5]} differ from llmexp's {framework_losses[:5]}")
                ok &= same
        for side in sides:
            rates[side].append(measured[side])
            shares[side].append(measured[side] * per_token / peak)
        print(f"round {round_ + 1}: peak {peak / 1e9:.1f} GFLOP/s; " + "; ".join(
            f"{side} {measured[side]:,.0f} tok/s = {measured[side] * per_token / 1e9:.1f} GFLOP/s "
            f"({measured[side] * per_token / peak:.1%})" for side in sides), flush=True)
    print(f"\n{'side':16s} {'tokens/s':>9s} {'share of peak (median)':>23s}  rounds")
    for side in sides:
        print(f"{side:16s} {statistics.median(rates[side]):9,.0f} {statistics.median(shares[side]):23.1%}  "
              f"{' '.join(f'{x:.1%}' for x in shares[side])}")
    if "llmexp compiled" in sides:
        eager_step = tokens_per_step / statistics.median(rates["llmexp eager"])
        compiled_step = tokens_per_step / statistics.median(rates["llmexp compiled"])
        saved = eager_step - compiled_step
        print(f"\ncompiled / eager: {eager_step / compiled_step:.2f}x per step; compile cost: first (empty cache) "
              f"{compile_s[0]:.1f} s, later (cache warm) {', '.join(f'{c:.1f}' for c in compile_s[1:]) or '-'} s; "
              + (f"pays off after {compile_s[0] / saved:,.0f} steps cold, "
                 f"{statistics.median(compile_s[1:] or compile_s) / saved:,.0f} warm" if saved > 0 else "never pays off"))
    if args.profile:
        profile_steps(args.profile, overrides)
    print(f"target llmexp >= {TARGET_SHARE:.0%} of the matmul peak; compact losses "
          f"{'match' if ok else 'DIFFER'}; others' cores {describe(meter.cores())}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
