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
parallel through its ModelParallelStrategy (``llmexp.training.model_parallel``), pipeline stages
(``parallelism.pp``) through torch.distributed.pipelining (``llmexp.training.pipeline_stages``: there one batch
is one optimiser step's micro-batches, which the pipeline's schedule runs). Each data-parallel rank
sees its share of every optimiser step's global batch, so a step averages the gradient of the
same examples as on one rank; tensor-parallel ranks and pipeline stages of a data-parallel group see
the same examples. Rank 0 does every write (step log, logger, checkpoints through Lightning's rank-zero
saving); the logged losses are means over the ranks.

What a training technique is (its schema, its plan, its loss's output) is ``llmexp.training.contract``;
the LightningModule is ``llmexp.training.lightning_module``. torch and lightning are imported inside the
functions: ``llmexp.sdk`` hands plugins ``train``, and importing the SDK must not import torch.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import time
import warnings
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from llmexp.configuration.pipeline import stage_node_path
from llmexp.display import console, progress
from llmexp.errors import UserError
from llmexp.machine.peak_memory import PeakMemory
from llmexp.results.record import redact_secrets
from llmexp.techniques.contract import StageContext
from llmexp.training import distributed, preemption
from llmexp.configuration.training_settings import splits_model, training_problems, validation_problem
from llmexp.training.contract import LIGHTNING_PRECISION, LossFn, torch_precision_problem
from llmexp.training.lightning_module import training_module_class
from llmexp.training.schedule import data_order

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

TRAIN_LOG = "train_log.jsonl"
CHECKPOINT_DIR = "checkpoints"


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
    ``total_parameters``, ``trainable_fraction``, ``peak_memory_mb``, ``resumed_from_step``,
    ``fewest_threads`` (the fewest CPU threads it ran with: fewer than the cores when other processes used them), and
    ``compile_time_s`` with ``compile=true`` (the first step's time beyond the others': compiling it).
    The model is left in eval mode.
    """
    if ctx.config.backend.name == "megatron":
        return _train_on_megatron(ctx, model, train_data, collate, val_data, shuffle, extra_modules, callbacks)
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from llmexp.training import model_parallel, pipeline_stages, resume

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
    micro_batches = _MicroBatches(len(order) // micro_batch, micro_batch, position,
                                  distributed.rank() // (parallelism.tp * parallelism.pp), parallelism.dp)
    pipelined = parallelism.pp > 1
    loader = DataLoader(
        _Samples(train_data, order),
        # pipelined: one batch is a step's micro-batches, collated one by one (the schedule runs them)
        batch_sampler=_StepBatches(micro_batches, accumulation) if pipelined else micro_batches,
        collate_fn=functools.partial(_collate_each, collate, micro_batch) if pipelined else collate,
    )
    val_batches = functools.partial(_batches, val_data, collate, micro_batch) if tcfg.val_every else None
    model.train()  # Lightning keeps the modes it finds; a loaded model arrives in eval mode
    split = splits_model(parallelism)
    trained = copy.deepcopy(model) if split or pipelined else model  # split in place: ``model`` stays a plain HF model
    pipeline = pipeline_stages.Pipeline(trained, parallelism, loss_fn, trainer.strategy.root_device) if pipelined else None
    module = training_module_class()(
        ctx.stage_name, trained, loss_fn, tcfg, accumulation, extra_modules, val_batches, log_path, checkpoints,
        parallelism, split, steps, pipeline,
    )
    with PeakMemory(trainer.strategy.root_device) as peak, preemption.training_steps(), (
        steps or contextlib.nullcontext()
    ):
        start = time.perf_counter()
        trainer.fit(module, train_dataloaders=loader, ckpt_path=point.path if point else None, weights_only=True)
        seconds = time.perf_counter() - start
    if split:
        model_parallel.load_full_weights(trained, model)
    if pipelined:
        pipeline_stages.load_full_weights(trained, model)
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
        fewest_threads=(module.free_cores and module.free_cores.lowest) or torch.get_num_threads(),
    )
    if pipelined:
        metrics.update(pipeline_stages.pipeline_metrics(model, parallelism, peak.mb))
    session_steps = trainer.global_step - (point.step if point else 0)
    if tcfg.compile and module.first_step_s is not None and session_steps > 1:
        # the first step compiles: its time beyond the other steps' mean
        later = (seconds - module.first_step_s) / (session_steps - 1)
        metrics["compile_time_s"] = round(max(0.0, module.first_step_s - later), 3)
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
    pipelined = parallelism.pp > 1  # its module steps the optimiser and clips itself (manual optimisation)
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
        accumulate_grad_batches=1 if pipelined else accumulation_steps(parallelism),
        gradient_clip_val=None if pipelined else training.grad_clip or None,
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

    Data parallel alone: DDP (every rank holds the whole model). Pipeline stages: DDP's process group without
    its wrapper (``llmexp.training.pipeline_stages``). FSDP2 or tensor parallel:
    ModelParallelStrategy, on a data x tensor device mesh; the module splits the model there
    (``llmexp.training.model_parallel``). Tensor parallel with dp > 1 shards over dp with FSDP2 whatever
    ``parallelism.sharding`` says: that strategy composes tensor parallelism with FSDP2 only.
    Its checkpoints are whole (gathered on rank 0) so ``llmexp.training.resume`` keeps one atomic file.
    """
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    backend = "gloo" if accelerator == "cpu" else "nccl"
    if parallelism.pp > 1:
        from llmexp.training.pipeline_stages import pipeline_strategy_class

        return pipeline_strategy_class()(process_group_backend=backend)
    if not splits_model(parallelism):
        return DDPStrategy(process_group_backend=backend)
    return ModelParallelStrategy(
        data_parallel_size=parallelism.dp,
        tensor_parallel_size=parallelism.tp,
        save_distributed_checkpoint=False,
        process_group_backend=backend,
    )


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


class _StepBatches:
    """``micro_batches`` grouped ``accumulation`` at a time: one optimiser step's samples of this data-parallel rank."""

    def __init__(self, micro_batches: _MicroBatches, accumulation: int):
        self.micro_batches, self.accumulation = micro_batches, accumulation

    def __len__(self) -> int:
        return len(self.micro_batches) // self.accumulation

    def __iter__(self):
        step: list = []
        for count, batch in enumerate(self.micro_batches, 1):
            step += batch
            if count % self.accumulation == 0:
                yield step
                step = []


def _collate_each(collate: Callable, size: int, samples: list) -> list:
    """A step's samples as its micro-batches, each collated alone (as without pipelining)."""
    return [collate(samples[begin:begin + size]) for begin in range(0, len(samples), size)]


def _batches(data: Sequence, collate: Callable, size: int):
    for begin in range(0, len(data), size):
        yield collate([data[i] for i in range(begin, min(begin + size, len(data)))])
