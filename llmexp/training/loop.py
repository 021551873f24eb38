"""The one training loop every training technique shares (pretrain, continued pretraining, SFT, LoRA, DPO).

A technique brings its model, its examples, a collate function and a loss function; ``train``
does the rest: seeding, the order the examples are seen in, micro-batches, the Lightning
Trainer (precision, gradient accumulation to ``global_batch``, clipping), activation
checkpointing, AdamW with a warm-up + cosine schedule, validation, the step log
(``<stage_dir>/train_log.jsonl`` and the tracker's Lightning logger), resumable checkpoints
(``llmexp.training.resume``), a stop at a step boundary when the cluster asks (``llmexp.training.preemption``)
and the figures every technique reports.

On several ranks (``parallelism``, ``llmexp.training.distributed``) every rank runs ``train`` together:
data parallel through Lightning's DDP, and FSDP2 (``parallelism.sharding=fsdp``) and tensor
parallel through its ModelParallelStrategy (``llmexp.training.model_parallel``). Each data-parallel rank
sees its share of every optimiser step's global batch, so a step averages the gradient of the
same examples as on one rank; tensor-parallel ranks of a data-parallel group see the same
examples. Rank 0 does every write (step log, logger, checkpoints through Lightning's rank-zero
saving); the logged losses are means over the ranks.

Nothing heavy is imported at module level: technique schemas subclass ``TrainingConfig``
and the planner loads every schema without torch.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

from llmexp.display import console

from llmexp.training import distributed

from llmexp.display import progress
from llmexp.errors import UserError
from llmexp.configuration.pipeline import stage_node_path
from llmexp.results.record import redact_secrets
from llmexp.techniques.contract import StageContext, Technique, TechniqueConfig

# Lightning announces "GPU available: False", a product tip and more on every Trainer; its
# warnings still come through. The pytree notice is Lightning 2.6 calling an API torch 2.13 deprecated.
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
# Lightning warns on every fit where an `srun` is installed and the process was not started by it, lest a
# multi-GPU job hang; llmexp starts its ranks itself (llmexp.training.distributed) or through srun (the Slurm launcher).
warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not used")
# train() logs the last step itself, however few steps a run has (its log_every, not Lightning's, sets the rows).
warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging interval")
# On a mid-epoch resume the batch sampler starts at the saved data position itself (see _MicroBatches).
warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")

# Our precision names -> Lightning's. Mixed precision keeps fp32 master weights.
LIGHTNING_PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}
# What trains on a CPU: it has no FP16 autocast, and Lightning trains a CPU 16-mixed run in bf16 with only a warning.
CPU_TRAINING_PRECISIONS = ("fp32", "bf16")
TRAIN_LOG = "train_log.jsonl"
CHECKPOINT_DIR = "checkpoints"
STOP_SIGNAL_SKEW_S = 30  # how much later than another rank a rank may get the cluster's stop signal


@dataclass
class TrainingConfig(TechniqueConfig):
    """What every training technique's schema shares; batch sizes come from ``parallelism``.

    The defaults are the embedded default's recipe: AdamW (0.9, 0.95, wd 0.1), lr 1e-2 with
    50 warm-up steps and a cosine decay to 10%, 1,000 steps, clip 1.0.
    """

    max_steps: int = 1000  # optimiser steps; each sees parallelism.global_batch examples
    lr: float = 1e-2
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1  # not applied to norms and biases
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # gradient-norm clipping; 0 turns it off
    log_every: int = 10  # steps between rows of train_log.jsonl and points of the tracker's curve
    val_every: int = 0  # validate every N optimiser steps on the validation set, and after the last (0: never)
    checkpoint_every: int = 200  # resumable checkpoint every N optimiser steps (0: never)
    keep_checkpoints: int = 2  # the newest K are kept
    save_model: bool = True  # write the HF checkpoint to <stage dir>/model


class TrainingTechnique(Technique):
    """Base class of a technique that trains through ``train``: it makes a model and needs the stack."""

    memory: ClassVar[str] = "full"
    produces_model: ClassVar[bool] = True
    requires: ClassVar[Tuple[str, ...]] = ("torch", "transformers", "lightning")
    # training backends (``backend=``) whose loop can run its loss: megatron's computes next-token loss only
    backends: ClassVar[Tuple[str, ...]] = ("torch",)

    @classmethod
    def machine_problems(cls, config, node, field: str) -> List[str]:
        """The run's training backend must be able to run here (its packages; a GPU where it needs one)."""
        from llmexp.machine.backends import BACKENDS, unavailable_reason

        reason = unavailable_reason(BACKENDS[config.backend.name])
        if reason is None:
            return []
        return [f"backend={config.backend.name} cannot train on this machine ({field}: technique={node.name}): "
                f"{reason}. Run on a machine that has it (hydra/launcher=slurm cluster=... for a GPU cluster), or "
                "train here with backend=torch."]


@dataclass
class LossOutput:
    """A technique's loss on one micro-batch."""

    loss: Any  # scalar tensor to minimise
    tokens: int  # tokens it covers: throughput, and the weight of this batch in the validation mean
    logs: Dict[str, Any] = field(default_factory=dict)  # floats or 0-d tensors, logged as train/<k> or val/<k>


LossFn = Callable[[Any, Any], LossOutput]


def train(
    ctx: StageContext,
    model,
    loss_fn: LossFn,
    train_data: Sequence,
    collate: Callable,
    val_data: Optional[Sequence] = None,
    shuffle: bool = True,
    extra_modules: Sequence = (),
    callbacks: Sequence = (),
) -> Dict[str, float]:
    """Train ``model`` for ``max_steps`` optimiser steps of ``loss_fn(model, collate(examples))``; return its figures.

    ``extra_modules`` are frozen modules the loss uses (DPO's reference model): moved to the
    training device and put in eval mode, but not optimised and not saved in checkpoints.
    ``callbacks`` are extra Lightning callbacks (the throughput benchmark times steps with one).
    A stage directory holding checkpoints of the same config resumes from the newest valid one.

    Metrics: ``train_time_s``, ``tokens_per_s`` (this attempt's), ``train_tokens`` (the whole
    run's), ``final_loss`` (the last optimiser step's loss: the mean over its micro-batches),
    ``steps``, ``val_loss`` and ``val_<log>`` for the loss's other logs (the last validation, when
    validating), ``trainable_parameters``,
    ``total_parameters``, ``trainable_fraction``, ``peak_memory_mb``, ``resumed_from_step`` and
    ``fewest_threads`` (the fewest CPU threads it ran with: fewer than the cores when other processes used them).
    The model is left in eval mode.
    """
    if ctx.config.backend.name == "megatron":
        return _train_on_megatron(ctx, model, train_data, collate, val_data, shuffle, extra_modules, callbacks)
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from llmexp.training import model_parallel

    from llmexp.training import preemption

    from llmexp.training import resume
    from llmexp.machine.peak_memory import PeakMemory

    cfg, tcfg = ctx.config, ctx.stage_config
    lead = distributed.is_rank_zero()
    _check(tcfg, stage_node_path(ctx), train_data, val_data)
    if lead:
        ctx.stage_dir.mkdir(parents=True, exist_ok=True)
    torch.set_flush_denormal(True)  # denormals in tiny models' grads cost up to 10x on CPU
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    parallelism = cfg.parallelism
    accumulation = accumulation_steps(parallelism)
    micro_batch = parallelism.micro_batch
    order = data_order(len(train_data), tcfg.max_steps * parallelism.global_batch, cfg.seed, shuffle)

    checkpoints = resume.Checkpoints(
        ctx.stage_dir / CHECKPOINT_DIR, tcfg.checkpoint_every, tcfg.keep_checkpoints, config_fingerprint(cfg)
    )
    point = checkpoints.resume_point()
    log_path = ctx.stage_dir / TRAIN_LOG
    if lead:
        if point is not None:
            console.warn(f"{ctx.stage_name}: resuming from {point.path} (step {point.step} of {tcfg.max_steps})")
        resume.truncate_log(log_path, point.step if point else 0)

    if parallelism.activation_checkpointing:
        enable_activation_checkpointing(model)
    checkpoint_io = resume.AtomicCheckpointIO()
    if point is not None:
        checkpoint_io.preload(point)
    logger = ctx.tracker.lightning_logger(ctx.stage_name) if lead else False
    trainer = make_trainer(cfg, tcfg, logger, plugins=[checkpoint_io], callbacks=callbacks)
    # off a terminal Lightning's bar is drawn only at the end: plain step lines instead (llmexp.display.progress)
    steps = progress.Progress(ctx.stage_name, unit="step") if lead and not progress.is_live() else None
    position = point.state["micro_batches"] if point else 0
    loader = DataLoader(
        _Samples(train_data, order),
        batch_sampler=_MicroBatches(
            len(order) // micro_batch, micro_batch, position, distributed.rank() // parallelism.tp, parallelism.dp
        ),
        collate_fn=collate,
    )
    val_batches = functools.partial(_batches, val_data, collate, micro_batch) if tcfg.val_every else None
    model.train()  # Lightning keeps the modes it finds; a loaded model arrives in eval mode
    split = _splits_model(parallelism)
    trained = copy.deepcopy(model) if split else model  # split in place: ``model`` stays a plain HF model
    module = _module_class()(
        ctx.stage_name, trained, loss_fn, tcfg, accumulation, extra_modules, val_batches, log_path, checkpoints,
        parallelism, split, steps,
    )
    with PeakMemory(trainer.strategy.root_device) as peak, preemption.training_steps(), (
        steps or contextlib.nullcontext()
    ):
        start = time.perf_counter()
        trainer.fit(module, train_dataloaders=loader, ckpt_path=point.path if point else None, weights_only=True)
        seconds = time.perf_counter() - start
    if split:
        model_parallel.load_full_weights(trained, model)
    model.eval()

    trainable, total = parameter_counts(model)
    session_tokens = module.session_tokens_of_all_ranks()
    metrics = {
        "train_time_s": round(seconds, 3),
        "train_tokens": module.tokens_before + session_tokens,
        "tokens_per_s": round(session_tokens / seconds, 1),
        "final_loss": round(module.final_loss(), 5),
        "steps": trainer.global_step,
    }
    metrics.update({f"val_{key}": round(value, 5) for key, value in module.val_metrics.items()})
    metrics.update(
        trainable_parameters=trainable,
        total_parameters=total,
        trainable_fraction=round(trainable / total, 6),
        peak_memory_mb=peak.mb,
        resumed_from_step=point.step if point else 0,
        fewest_threads=module.free_cores.lowest or torch.get_num_threads(),
    )
    return metrics


def _train_on_megatron(ctx, model, train_data, collate, val_data, shuffle, extra_modules, callbacks):
    """``backend=megatron``: megatron-core runs the steps with its own next-token loss (``llmexp.training.megatron.train``)."""
    from llmexp.training.megatron import train as megatron_train

    if extra_modules or callbacks:
        raise UserError(
            f"{ctx.stage_name}: technique={ctx.stage_config.name} needs frozen helper models or step callbacks, which "
            "backend=megatron does not run; use backend=torch for it.")
    _check(ctx.stage_config, stage_node_path(ctx), train_data, val_data)
    return megatron_train.train(ctx, model, train_data, collate, val_data, shuffle)


def data_order(num_examples: int, num_samples: int, seed: int, shuffle: bool = True):
    """The example index of each of ``num_samples`` training samples, in the order they are seen (a LongTensor).

    Shuffled: seeded permutations of ``range(num_examples)``, one per pass, concatenated;
    unshuffled: ``0 .. num_examples - 1`` repeated. It depends on the arguments alone, so a
    resumed run sees the order the interrupted one would have.
    """
    import torch

    if not shuffle:
        return torch.arange(num_samples) % num_examples
    generator = torch.Generator().manual_seed(seed)
    passes = -(-num_samples // num_examples)
    return torch.cat([torch.randperm(num_examples, generator=generator) for _ in range(passes)])[:num_samples]


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def accumulation_steps(parallelism) -> int:
    """Micro-batches per optimiser step so that micro_batch * dp * steps = global_batch."""
    return parallelism.global_batch // (parallelism.micro_batch * parallelism.dp)


def make_trainer(config, training, logger=False, plugins: Sequence = (), callbacks: Sequence = ()):
    """The Lightning Trainer for ``config`` and the technique's ``training`` settings; refuses what cannot run here.

    On several ranks it joins the process group ``llmexp.training.distributed`` set up (Lightning's
    torchrun cluster environment: it starts no processes of its own), with the strategy of
    ``training_strategy``.
    """
    import lightning as L
    import torch
    from lightning.pytorch.plugins.environments import TorchElasticEnvironment

    precision = config.precision.value
    problem = torch_precision_problem(precision, config.hardware)
    if problem:
        raise UserError(problem)
    parallelism = config.parallelism
    world_size = distributed.world_size_of(parallelism)
    if world_size != distributed.world_size():
        raise UserError(
            f"parallelism={parallelism.name} trains on {world_size} ranks (tp*pp*dp), and this process is not one "
            f"of them; run it through `llmexp`, which starts the ranks (or under torchrun or a cluster launcher), "
            "or train in this process with parallelism=single."
        )
    if config.hardware.accelerator != "cpu" and not torch.cuda.is_available():
        raise UserError(
            f"hardware={config.hardware.name} needs a CUDA GPU and this machine has none; run with hardware=cpu, "
            "or use `llmexp plan` to check the configuration without running it."
        )
    layout: Dict[str, Any] = {"devices": 1}
    if world_size > 1:
        local = distributed.local_world_size()
        layout = dict(
            devices=local,
            num_nodes=world_size // local,
            strategy=training_strategy(parallelism, config.hardware.accelerator),
            use_distributed_sampler=False,  # train() gives each data-parallel rank its share itself
        )
        plugins = [*plugins, TorchElasticEnvironment()]
    return L.Trainer(
        accelerator="cpu" if config.hardware.accelerator == "cpu" else "gpu",
        **layout,
        precision=LIGHTNING_PRECISION[precision],
        max_steps=training.max_steps,
        max_epochs=1,  # the data order holds exactly max_steps optimiser steps of samples
        accumulate_grad_batches=accumulation_steps(parallelism),
        gradient_clip_val=training.grad_clip or None,
        logger=logger,
        log_every_n_steps=training.log_every,
        enable_checkpointing=False,  # llmexp.training.resume writes the checkpoints
        enable_model_summary=False,
        enable_progress_bar=progress.is_live(),  # train() prints plain step lines elsewhere
        num_sanity_val_steps=0,
        deterministic=True,
        plugins=list(plugins),
        callbacks=list(callbacks),
    )


def training_strategy(parallelism, accelerator: str):
    """Lightning's strategy for a layout of several ranks.

    Data parallel alone: DDP (every rank holds the whole model). FSDP2 or tensor parallel:
    ModelParallelStrategy, on a data x tensor device mesh; the module splits the model there
    (``llmexp.training.model_parallel``). Tensor parallel with dp > 1 shards over dp with FSDP2 whatever
    ``parallelism.sharding`` says: that strategy composes tensor parallelism with FSDP2 only.
    Its checkpoints are whole (gathered on rank 0) so ``llmexp.training.resume`` keeps one atomic file.
    """
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    backend = "gloo" if accelerator == "cpu" else "nccl"
    if parallelism.pp > 1:
        raise UserError(pipeline_training_problem(parallelism))
    if not _splits_model(parallelism):
        return DDPStrategy(process_group_backend=backend)
    return ModelParallelStrategy(
        data_parallel_size=parallelism.dp,
        tensor_parallel_size=parallelism.tp,
        save_distributed_checkpoint=False,
        process_group_backend=backend,
    )


def torch_precision_problem(precision: str, hardware) -> Optional[str]:
    """Why the torch backend cannot train in ``precision`` on ``hardware`` as asked, or None: Lightning has no
    FP8/FP4 training, and a CPU no FP16 one (Lightning would train in bf16 while the run records fp16)."""
    if precision not in LIGHTNING_PRECISION:
        return (
            f"precision={precision} is not available for training on the torch backend (it trains in "
            f"{', '.join(LIGHTNING_PRECISION)}); train with precision=bf16 and quantize afterwards "
            "(technique=quantize), or train with backend=megatron, whose Transformer Engine kernels train in "
            "FP8/FP4 on GPUs that have them."
        )
    if hardware.accelerator == "cpu" and precision not in CPU_TRAINING_PRECISIONS:
        return (
            f"precision={precision} is not available for training on hardware={hardware.name}: a CPU has no "
            f"{precision.upper()} mixed precision (Lightning would train in bf16 instead); train with "
            f"{' or '.join(f'precision={name}' for name in CPU_TRAINING_PRECISIONS[::-1])}, or in {precision} on a GPU "
            "preset."
        )
    return None


def pipeline_training_problem(parallelism) -> str:
    return (
        f"parallelism.pp={parallelism.pp} (parallelism={parallelism.name}): the torch backend does not train "
        "through pipeline stages; train with backend=megatron (CUDA GPUs), or split the model with parallelism.tp "
        "(tensor parallel) or parallelism.sharding=fsdp over parallelism.dp instead and set parallelism.pp=1."
    )


def _splits_model(parallelism) -> bool:
    """Whether the layout splits the model's weights (tensor parallel or FSDP2) rather than replicating them."""
    return parallelism.tp > 1 or (parallelism.sharding == "fsdp" and parallelism.dp > 1)


def enable_activation_checkpointing(model) -> None:
    """Hugging Face activation checkpointing (non-reentrant), for plain and PEFT-wrapped models alike.

    A model with frozen parameters (an adapter on a frozen base) also gets its input
    embeddings' output marked as requiring grad: otherwise no gradient would reach the
    adapters inside checkpointed blocks. A PEFT model passes both calls on to its base model.
    """
    # transformers 5 renamed gradient_checkpointing_enable (kept as a deprecated alias)
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(
        model, "gradient_checkpointing_enable", None
    )
    if enable is None:
        raise UserError(
            f"parallelism.activation_checkpointing=true needs a Hugging Face model, and {type(model).__name__} "
            "has no activation checkpointing; set parallelism.activation_checkpointing=false."
        )
    enable({"use_reentrant": False})
    if any(not p.requires_grad for p in model.parameters()):
        model.enable_input_require_grads()


def parameter_counts(model) -> Tuple[int, int]:
    """(trainable, total) parameters; tied parameters count once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def config_fingerprint(config) -> str:
    """The run's redacted config as canonical JSON: a checkpoint resumes only a run with the same one."""
    return json.dumps(redact_secrets(config), sort_keys=True, default=str)


def training_problems(node, key: str = "technique", min_steps: int = 1) -> List[str]:
    """Settings of a training node that cannot work (``key``: where the node sits in the config).

    Pure Python: plugins' plan checks call it, so a bad value stops the run before it starts.
    ``min_steps=0``: the technique takes ``max_steps=0`` as "use the starting model as it is".
    """
    problems = []
    for name, least in (("max_steps", min_steps), ("log_every", 1)):
        if node[name] < least:
            problems.append(f"{key}.{name}={node[name]} must be at least {least}; set it to {least} or more.")
    for name in ("val_every", "checkpoint_every"):
        if node[name] < 0:
            problems.append(f"{key}.{name}={node[name]} is negative; set it to 0 (never) or a step count.")
    if node["checkpoint_every"] and node["keep_checkpoints"] < 1:
        problems.append(
            f"{key}.keep_checkpoints={node['keep_checkpoints']} keeps no checkpoint to resume from; set it to 1 "
            f"or more, or turn checkpoints off with {key}.checkpoint_every=0."
        )
    return problems


def validation_problem(node, key: str) -> str:
    """The refusal of ``<key>.val_every`` on a stage that has no validation examples (``key``: where ``node`` sits)."""
    return (
        f"{key}.val_every={node.val_every} asks for validation, but {node.name} has no validation examples: sft, lora "
        "and dpo validate on data.validation_path or a data.validation_split share of their records, while pretrain, "
        f"cpt and distill read no validation set; give it validation data or set {key}.val_every=0."
    )


def _check(tcfg, key: str, train_data: Sequence, val_data: Optional[Sequence]) -> None:
    problems = training_problems(tcfg, key)  # max_steps=0 never reaches the loop: techniques taking it return first
    if problems:
        raise UserError(" ".join(problems))
    if len(train_data) == 0:
        raise UserError(f"{key} (technique={tcfg.name}) has no training examples; check the data.* settings that "
                        "select them.")
    if tcfg.val_every and not _has_examples(val_data):
        raise UserError(validation_problem(tcfg, key))


def _has_examples(data: Optional[Sequence]) -> bool:
    return data is not None and len(data) > 0  # not `bool(data)`: a tensor of examples has no truth value


class _Samples:
    """``data`` in the order of ``data_order``: sample ``i`` is ``data[order[i]]`` (a map-style dataset)."""

    def __init__(self, data: Sequence, order):
        self.data, self.order = data, order.numpy()

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int):
        return self.data[int(self.order[i])]


class _MicroBatches:
    """This data-parallel rank's share of micro-batches ``start .. total - 1``, each ``size`` consecutive samples.

    Rank ``shard`` of ``shards`` takes every ``shards``-th micro-batch, so the micro-batches of
    one optimiser step (``accumulation * shards`` consecutive ones) are split between the ranks.
    ``start`` counts micro-batches of all ranks. The length is this rank's share of the run's
    ``total`` even when it starts later: on a resume Lightning counts the epoch's batches from
    the restored position, so the run's last batch is still the last.
    """

    def __init__(self, total: int, size: int, start: int, shard: int = 0, shards: int = 1):
        self.total, self.size, self.start = total, size, start
        self.shard, self.shards = shard, shards

    def __len__(self) -> int:
        return self.total // self.shards

    def __iter__(self):
        for batch in range(self.start + self.shard, self.total, self.shards):
            yield list(range(batch * self.size, (batch + 1) * self.size))


def _batches(data: Sequence, collate: Callable, size: int):
    for begin in range(0, len(data), size):
        yield collate([data[i] for i in range(begin, min(begin + size, len(data)))])


def _await_own_stop_signal() -> None:
    """Wait until this rank has the stop signal another rank got first (its launcher's handler needs it).

    A cluster signals every task of a job, within moments of each other; the ranks stop after
    the step where the first of them had it, and each hands over to its launcher's handler.
    """
    from llmexp.training import preemption
    deadline = time.monotonic() + STOP_SIGNAL_SKEW_S
    while not preemption.requested():
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"rank {distributed.rank()} stopped with the ranks that got the stop signal, but got none itself "
                f"within {STOP_SIGNAL_SKEW_S} s; its launcher must signal every task of the job."
            )
        time.sleep(0.05)


@functools.lru_cache(maxsize=None)
def _module_class() -> type:
    """The LightningModule class, made on first use so that importing this module stays free of lightning."""
    import lightning as L
    import torch

    from llmexp.machine import cpu_threads

    from llmexp.training import model_parallel

    from llmexp.training import preemption

    from llmexp.training import resume
    class TrainingModule(L.LightningModule):
        """Runs ``loss_fn`` per micro-batch; at each optimiser step logs, validates and checkpoints as due.

        Losses stay tensors between logged steps: reading one (``float``) waits for the device,
        and on several ranks averaging one is a collective, so both happen only on logged,
        validated and checkpointed steps. Every rank takes every such step alike; only rank 0 writes.
        """

        def __init__(
            self, name, model, loss_fn, tcfg, accumulation, extra_modules, val_batches, log_path, checkpoints,
            parallelism, split, steps,
        ):
            super().__init__()
            self.model = model
            self.loss_fn, self.tcfg, self.accumulation = loss_fn, tcfg, accumulation
            self.extra_modules = list(extra_modules)  # a list, not submodules: neither saved nor optimised
            self.val_batches, self.log_path, self.checkpoints = val_batches, log_path, checkpoints
            self.parallelism, self.split = parallelism, split
            self.steps = steps  # an llmexp.display.progress.Progress printing step lines, or None
            self._steps_task = None
            self._started = 0.0
            self.replicas = parallelism.tp * parallelism.pp  # ranks that see the same examples
            self.tokens_before = 0  # of the attempts before this one, all ranks (restored from the checkpoint)
            self.session_tokens = 0  # this rank's, this attempt
            self.val_metrics: Dict[str, float] = {}  # the last validation's means: loss and the loss's logs
            self._loss_sum = self._step_loss = self._step_mean = None
            self._logs: Dict[str, Any] = {}
            self._done_step = 0
            self._restored: Optional[Dict[str, Any]] = None
            self.free_cores = cpu_threads.FreeCores(name, console.warn)  # threads to the cores other processes leave free

        def configure_model(self):
            """Under ModelParallelStrategy: split the model over its device mesh (``llmexp.training.model_parallel``)."""
            if self.split:
                p = self.parallelism
                model_parallel.parallelize(self.model, self.device_mesh, tensor_parallel=p.tp > 1, shard=p.dp > 1)

        def training_step(self, batch, batch_idx):
            self.free_cores.check()
            out = self.loss_fn(self.model, batch)
            self.session_tokens += out.tokens
            loss = out.loss.detach()
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._logs = out.logs
            return out.loss

        def on_fit_start(self):
            for module in self.extra_modules:
                module.to(self.device).eval()

        def on_train_start(self):
            self._done_step = self.trainer.global_step
            self._started = time.perf_counter()
            if self.steps is not None:
                self._steps_task = self.steps.add_task("", total=self.tcfg.max_steps, completed=self._done_step)
            if self._restored is not None:  # here, after Lightning made its data iterator (which draws a seed)
                resume.restore_rng(self._restored["rng"])

        def on_train_batch_end(self, outputs, batch, batch_idx):
            step = self.trainer.global_step
            if step == self._done_step:  # still accumulating micro-batches
                return
            self._done_step = step
            self._step_loss, self._loss_sum, self._step_mean = self._loss_sum / self.accumulation, None, None
            last = step == self.tcfg.max_steps
            if step % self.tcfg.log_every == 0 or last:
                self._log_step(step)
            if self.val_batches is not None and (step % self.tcfg.val_every == 0 or last):
                self._validate(step)
            stop = self._stop_requested()
            if self.checkpoints.due(step) or stop:
                self.checkpoints.save(self.trainer, step)
            if self.steps is not None:
                self.steps.update(self._steps_task, completed=step, detail=self._progress_detail)
            if stop:
                _await_own_stop_signal()
                preemption.requeue_now()

        def _progress_detail(self) -> str:
            """This rank's loss of the step, and the tokens/s of every data-parallel rank (they see equal shares)."""
            seconds = max(time.perf_counter() - self._started, 1e-9)
            tokens_per_s = self.session_tokens * self.parallelism.dp / seconds
            return f"loss {float(self._step_loss):.4g} {progress.rate(tokens_per_s)} tok/s"

        def _stop_requested(self) -> bool:
            """Whether a stop signal came to any rank: all of them stop after the same step."""
            flag = torch.tensor(int(preemption.requested()), device=self.device)
            return bool(self.trainer.strategy.reduce(flag, reduce_op="max"))

        def _mean(self, value) -> float:
            """The mean of ``value`` over the ranks (tensor-parallel ranks hold equal ones)."""
            tensor = torch.as_tensor(value, dtype=torch.float32, device=self.device).detach().clone()
            return float(self.trainer.strategy.reduce(tensor, reduce_op="mean"))

        def _mean_step_loss(self) -> float:
            if self._step_mean is None:
                self._step_mean = self._mean(self._step_loss)
            return self._step_mean

        def session_tokens_of_all_ranks(self) -> int:
            """Tokens every data-parallel rank trained on in this attempt (a collective)."""
            tokens = torch.tensor(self.session_tokens, dtype=torch.int64, device=self.device)
            return int(self.trainer.strategy.reduce(tokens, reduce_op="sum")) // self.replicas

        def _log_step(self, step: int) -> None:
            t = self.tcfg
            loss = self._mean_step_loss()
            lr = t.lr * warmup_cosine(step - 1, t.warmup_steps, t.max_steps, t.min_lr_ratio)
            logs = {k: self._mean(v) for k, v in self._logs.items()}
            self._record({"step": step, "loss": loss, "lr": lr, **logs}, "train", {"loss": loss, "lr": lr, **logs})
            self.log("train/loss", loss, prog_bar=True, logger=False)

        def _validate(self, step: int) -> None:
            """Every rank validates on the whole validation set: split models need all ranks in each forward."""
            was_training = self.model.training
            self.model.eval()
            sums: Dict[str, Any] = {}
            tokens = 0
            with torch.no_grad(), self.trainer.precision_plugin.forward_context():
                for batch in self.val_batches():
                    out = self.loss_fn(self.model, self.trainer.strategy.batch_to_device(batch))
                    for key, value in {"loss": out.loss, **out.logs}.items():
                        value = value.detach().float() if torch.is_tensor(value) else value
                        sums[key] = sums.get(key, 0.0) + value * out.tokens
                    tokens += out.tokens
            self.model.train(was_training)
            means = {key: float(total) / tokens for key, total in sums.items()}
            self.val_metrics = means
            row = {"step": step, **{f"val_{key}": value for key, value in means.items()}}
            self._record(row, "val", means)

        def _record(self, row: Dict[str, Any], prefix: str, metrics: Dict[str, float]) -> None:
            if not distributed.is_rank_zero():
                return
            with open(self.log_path, "a", encoding="utf-8") as log:  # closed at once: a killed run keeps its rows
                log.write(json.dumps(row) + "\n")
            for logger in self.trainer.loggers:
                logger.log_metrics({f"{prefix}/{k}": v for k, v in metrics.items()}, step=row["step"])
                logger.save()

        def final_loss(self) -> float:
            return self._mean_step_loss() if self._step_loss is not None else self._restored["stats"]["loss"]

        def configure_optimizers(self):
            decay, no_decay = [], []
            for param in self.model.parameters():
                if param.requires_grad:
                    (no_decay if param.ndim < 2 else decay).append(param)  # no decay on norms and biases
            t = self.tcfg
            optimizer = torch.optim.AdamW(
                [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                lr=t.lr,
                betas=(t.beta1, t.beta2),
            )
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: warmup_cosine(step, t.warmup_steps, t.max_steps, t.min_lr_ratio)
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            if self.split:  # gradients on several device meshes: Lightning's clipping cannot combine them
                model_parallel.clip_grad_norm_(self.model.parameters(), gradient_clip_val)
            else:
                self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

        def on_save_checkpoint(self, checkpoint):
            """Called on every rank (both reductions are collectives); rank 0's checkpoint is the one written."""
            stats = {
                "tokens": self.tokens_before + self.session_tokens_of_all_ranks(),
                "loss": self._mean_step_loss(),
                "val": self.val_metrics,
            }
            micro_batches = self.trainer.global_step * self.accumulation * self.parallelism.dp
            checkpoint[resume.STATE_KEY] = resume.resume_state(self.checkpoints.fingerprint, micro_batches, stats)

        def on_load_checkpoint(self, checkpoint):
            self._restored = checkpoint[resume.STATE_KEY]
            self.tokens_before = self._restored["stats"]["tokens"]
            self.val_metrics = self._restored["stats"]["val"]

    return TrainingModule
