"""The LightningModule ``llmexp.training.loop.train`` fits: a technique's loss per micro-batch, and at each optimiser
step the step log, validation, checkpoints and a stop when the cluster asks.

The class is made on first use (``training_module_class``), with torch and lightning imported there, so that
importing this module (and ``llmexp.sdk``, which hands plugins the loop) stays free of them.
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any, Dict, Optional

from llmexp.display import console, progress
from llmexp.machine import cpu_threads
from llmexp.training import distributed, preemption
from llmexp.training.compilation import compiled
from llmexp.training.optimizer import adamw
from llmexp.training.schedule import warmup_cosine

STOP_SIGNAL_SKEW_S = 30  # how much later than another rank a rank may get the cluster's stop signal


def _await_own_stop_signal() -> None:
    """Wait until this rank has the stop signal another rank got first (its launcher's handler needs it).

    A cluster signals every task of a job, within moments of each other; the ranks stop after
    the step where the first of them had it, and each hands over to its launcher's handler.
    """
    deadline = time.monotonic() + STOP_SIGNAL_SKEW_S
    while not preemption.requested():
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"rank {distributed.rank()} stopped with the ranks that got the stop signal, but got none itself "
                f"within {STOP_SIGNAL_SKEW_S} s; its launcher must signal every task of the job."
            )
        time.sleep(0.05)


@functools.lru_cache(maxsize=None)
def training_module_class() -> type:
    """The LightningModule class, made on first use so that importing this module stays free of lightning."""
    import lightning as L
    import torch

    from llmexp.training import model_parallel, resume

    class TrainingModule(L.LightningModule):
        """Runs ``loss_fn`` per micro-batch; at each optimiser step logs, validates and checkpoints as due.

        Losses stay tensors between logged steps: reading one (``float``) waits for the device,
        and on several ranks averaging one is a collective, so both happen only on logged,
        validated and checkpointed steps. Every rank takes every such step alike; only rank 0 writes.
        """

        def __init__(
            self, name, model, loss_fn, tcfg, accumulation, extra_modules, val_batches, log_path, checkpoints,
            parallelism, split, steps, pipeline=None,
        ):
            super().__init__()
            self.model = model
            # parallelism.pp > 1: an llmexp.training.pipeline_stages.Pipeline runs each step's micro-batches (one
            # Lightning batch) and this module steps the optimiser itself
            self.pipeline = pipeline
            self.automatic_optimization = pipeline is None
            # what the loss calls: the model, or a compiled wrapper sharing its parameters (in a tuple: not a submodule,
            # so that checkpoints keep the model's keys)
            self._trained = (compiled(model) if tcfg.compile else model,)
            self.first_step_s: Optional[float] = None  # the first optimiser step's wall time: compiling it, when compiled
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
            # threads to the cores other processes leave free; a compiled step keeps its count, as Inductor builds its
            # kernels for one thread count and each new count would compile the step again
            self.free_cores = None if tcfg.compile else cpu_threads.FreeCores(name, console.warn)

        def configure_model(self):
            """Under ModelParallelStrategy: split the model over its device mesh (``llmexp.training.model_parallel``)."""
            if self.split:
                p = self.parallelism
                model_parallel.parallelize(self.model, self.device_mesh, tensor_parallel=p.tp > 1, shard=p.dp > 1)

        def training_step(self, batch, batch_idx):
            if self.free_cores is not None:
                self.free_cores.check()
            if self.pipeline is not None:
                return self._pipeline_step(batch)
            out = self.loss_fn(self._trained[0], batch)
            self.session_tokens += out.tokens
            loss = out.loss.detach()
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._logs = out.logs
            return out.loss

        def _pipeline_step(self, micro_batches):
            """One optimiser step through the pipeline: gradients exchanged and clipped over every stage."""
            optimizer, schedule = self.optimizers(), self.lr_schedulers()
            loss_sum, tokens, logs = self.pipeline.step(micro_batches)
            self.pipeline.synchronize_gradients()
            if self.tcfg.grad_clip:
                self.pipeline.clip_grad_norm_(self.tcfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            self.session_tokens += tokens
            self._loss_sum = torch.tensor(loss_sum, device=self.device)
            self._logs = logs

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
            if self.first_step_s is None:
                self.first_step_s = time.perf_counter() - self._started
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
            """This rank's loss of the step and the loss's first log (DPO's reward accuracy, GRPO's mean reward),
            and the tokens/s of every data-parallel rank (they see equal shares)."""
            seconds = max(time.perf_counter() - self._started, 1e-9)
            tokens_per_s = self.session_tokens * self.parallelism.dp / seconds
            first_log = "".join(f" {name} {float(value):.4g}" for name, value in list(self._logs.items())[:1])
            return f"loss {float(self._step_loss):.4g}{first_log} {progress.rate(tokens_per_s)} tok/s"

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
                    batch = self.trainer.strategy.batch_to_device(batch)
                    out = self.pipeline.evaluate(batch) if self.pipeline is not None else self.loss_fn(self.model, batch)
                    if out is None:  # an earlier pipeline stage: the last one has the loss
                        continue
                    for key, value in {"loss": out.loss, **out.logs}.items():
                        value = value.detach().float() if torch.is_tensor(value) else value
                        sums[key] = sums.get(key, 0.0) + value * out.tokens
                    tokens += out.tokens
            self.model.train(was_training)
            means = {key: float(total) / tokens for key, total in sums.items()} if tokens else {}
            if self.pipeline is not None:
                means = self.pipeline.from_last_stage(means)
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
            t = self.tcfg
            optimizer = adamw(self.model.parameters(), t.lr, (t.beta1, t.beta2), t.weight_decay,
                              mixed_precision="mixed" in str(self.trainer.precision))
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
