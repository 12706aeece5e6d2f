"""StepMetrics: what users watch, measured once per optimizer step, and each evaluation's result."""

import logging
import math
import time

import lightning as L
import torch

from fineweb_gpt.console import format_duration
from fineweb_gpt.flops import human_count, model_flops_utilization
from fineweb_gpt.optimization import learning_rates

log = logging.getLogger("fineweb_gpt")


class StepMetrics(L.Callback):
    """What users watch, measured once per optimizer step rather than per micro-batch.

    Lightning's own logging records the last micro-batch's loss at each step, and its
    ThroughputMonitor counts micro-batches and uses a peak-FLOPs table without the RTX 4070
    (and FP32 peaks for GeForce cards). This callback logs, per optimizer step: train/loss
    (the mean of all its micro-batches and ranks), lr, grad_norm, tokens_seen,
    tokens_per_sec, step_time_ms (training work only: evaluations and checkpoints happen
    between steps and are timed apart), mfu against hw.peak_flops, epoch (a fraction) and
    tokens_per_param; and per evaluation val/loss, val/ppl and val/time_ms. Every row carries
    data/tokens_seen, the x-axis that lines up runs with different batch sizes. Each row also
    goes to the `observers` (the health monitor): observer.observe(trainer, row, step).
    """

    def __init__(self, plan: dict, log_every_n_steps: int = 1, observers: tuple = ()):
        self.plan = plan  # static facts of the run, worked out by plan.py
        self.log_every_n_steps = max(1, log_every_n_steps)
        self.observers = list(observers)
        self.tokens_seen = 0
        self.train_seconds = 0.0  # measured training time of the timed steps
        self.timed_steps = 0
        self.val_seconds: list[float] = []
        self.last_step = None  # optimizer steps done at the last micro-batch seen
        self.micro_tokens = 0
        self.step_started = None
        self.val_started = None

    # --- per optimizer step ---------------------------------------------------------------

    def on_train_start(self, trainer, pl_module) -> None:
        self.last_step = trainer.global_step  # a resumed run starts part way
        self.micro_tokens, self.step_started = 0, None
        if trainer.global_step > 0:
            log.info(
                "Resumed at step %d of %d, %s tokens seen",
                trainer.global_step,
                trainer.max_steps,
                human_count(self.tokens_seen),
            )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.step_started is None and self.logs_step(trainer.global_step + 1):
            self.wait_for_device(pl_module)  # earlier steps' queued GPU work is not this step's
            self.step_started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.micro_tokens += batch.shape[0] * (batch.shape[1] - 1)
        step = trainer.global_step
        if step == self.last_step:  # still accumulating
            return
        self.last_step = step
        tokens = self.micro_tokens * trainer.world_size  # every rank trains on same-shaped micro-batches
        self.tokens_seen += tokens
        self.micro_tokens = 0
        if not self.logs_step(step):
            return

        # The mean over the step's micro-batches, already read by the module; over all ranks, too.
        loss = pl_module.step_loss_value
        if trainer.world_size > 1:
            loss = float(trainer.strategy.reduce(pl_module.step_loss, reduce_op="mean"))
        metrics = {
            "train/loss": loss,
            **learning_rates(trainer.optimizers[0]),
            "data/tokens_seen": self.tokens_seen,
            "data/tokens_per_param": self.tokens_seen / self.plan["num_params"],
        }
        if getattr(pl_module, "grad_norm", None) is not None:
            metrics["train/grad_norm"] = float(pl_module.grad_norm)
        epochs = getattr(trainer.datamodule, "epochs_seen", None)
        if epochs is not None:
            metrics["data/epoch"] = epochs
        if self.step_started is not None:
            seconds = time.perf_counter() - self.step_started
            self.step_started = None
            self.train_seconds += seconds
            self.timed_steps += 1
            metrics["perf/step_time_ms"] = 1000 * seconds
            metrics["perf/tokens_per_sec"] = tokens / seconds
            if self.plan["peak_flops"]:
                metrics["perf/mfu"] = model_flops_utilization(
                    self.plan["flops_per_token"], tokens / seconds, self.plan["peak_flops"], trainer.world_size
                )
        self.log_metrics(trainer, metrics, step)
        self.show_in_progress_bar(pl_module, metrics)
        if self.timed_steps == 5 and trainer.is_global_zero:
            log.info(
                "Measured over 5 steps: %.0f tokens/s%s; estimated time to finish: %s",
                metrics.get("perf/tokens_per_sec", 0),
                f", MFU {metrics['perf/mfu']:.1%}" if "perf/mfu" in metrics else "",
                format_duration(self.seconds_to_finish(trainer)),
            )

    def logs_step(self, step: int) -> bool:
        return step % self.log_every_n_steps == 0

    @staticmethod
    def wait_for_device(pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def seconds_to_finish(self, trainer: L.Trainer) -> float:
        remaining = max(0, trainer.max_steps - trainer.global_step)
        per_step = self.train_seconds / max(1, self.timed_steps)
        per_eval = sum(self.val_seconds) / len(self.val_seconds) if self.val_seconds else 0.0
        return remaining * per_step + math.ceil(remaining / self.plan["val_every_steps"]) * per_eval

    @staticmethod
    def show_in_progress_bar(pl_module: L.LightningModule, metrics: dict) -> None:
        shown = {"loss": metrics["train/loss"]}
        if "perf/tokens_per_sec" in metrics:
            shown["tok/s"] = metrics["perf/tokens_per_sec"]
        if "perf/mfu" in metrics:
            shown["mfu"] = metrics["perf/mfu"]
        for key, value in shown.items():
            # As a CPU tensor: Lightning turns a number into a tensor on the GPU, and then reads
            # every progress-bar value back at the end of every micro-batch, a wait for the GPU
            # each time (found on an H100, where uncompiled Lightning ran 4% behind a bare loop).
            pl_module.log(key, torch.tensor(float(value)), prog_bar=True, logger=False, rank_zero_only=True)

    def log_metrics(self, trainer: L.Trainer, metrics: dict, step: int) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        for observer in self.observers:
            observer.observe(trainer, metrics, step)

    # --- evaluations ----------------------------------------------------------------------

    def on_validation_start(self, trainer, pl_module) -> None:
        self.wait_for_device(pl_module)
        self.val_started = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        # The sanity check before a fresh run scores every validation batch: the step-0 evaluation.
        if (trainer.sanity_checking and trainer.global_step > 0) or "val/loss" not in trainer.callback_metrics:
            return
        val_loss = float(trainer.callback_metrics["val/loss"])  # averaged over batches and ranks
        seconds = time.perf_counter() - self.val_started
        if trainer.global_step > 0:
            self.val_seconds.append(seconds)
        metrics = {
            "val/loss": val_loss,
            "val/ppl": math.exp(min(val_loss, 50.0)),
            "val/time_ms": 1000 * seconds,
            "data/tokens_seen": self.tokens_seen,
        }
        epochs = getattr(trainer.datamodule, "epochs_seen", None)
        if epochs is not None:
            metrics["data/epoch"] = epochs
        self.log_metrics(trainer, metrics, trainer.global_step)
        if trainer.is_global_zero:
            progress = ""
            if self.timed_steps:
                speed = self.plan["tokens_per_step"] * self.timed_steps / self.train_seconds
                progress = f", {speed:,.0f} tokens/s, {format_duration(self.seconds_to_finish(trainer))} to go"
            log.info(
                "step %d/%d: val loss %.4f (ppl %.1f), %s tokens seen%s",
                trainer.global_step,
                trainer.max_steps,
                val_loss,
                metrics["val/ppl"],
                human_count(self.tokens_seen),
                progress,
            )

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # Checkpoints of earlier versions keep this state under the callback's old name.
        states = checkpoint.get("callbacks") or {}
        if "RunMonitor" in states and self.state_key not in states:
            self.load_state_dict(states["RunMonitor"])

    def state_dict(self) -> dict:
        return {"tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds, "timed_steps": self.timed_steps}

    def load_state_dict(self, state_dict: dict) -> None:
        self.tokens_seen = state_dict["tokens_seen"]
        self.train_seconds = state_dict["train_seconds"]
        self.timed_steps = state_dict["timed_steps"]
