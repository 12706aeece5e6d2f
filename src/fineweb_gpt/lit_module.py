"""The LightningModule: training and validation steps of the GPT, and the guard on each step's loss."""

import logging
import math
import statistics
from collections import deque

import lightning as L
import torch

from fineweb_gpt.errors import ConfigError, TrainingDiverged
from fineweb_gpt.model import GPT, GPTConfig, compile_gpt
from fineweb_gpt.optimization import build_optimizer, check_optimizer, learning_rates, warmup_cosine
from fineweb_gpt.random_state import capture_rng_states, restore_rng_states
from fineweb_gpt.tokenizer import END_OF_TEXT_ID, GPT2_RANKS_SHA256

log = logging.getLogger("fineweb_gpt")


class LossGuard:
    """Judges each optimizer step's loss: a non-finite one always stops the run; a spike above
    spike_factor x the median of the last `window` steps skips the step or stops, as asked."""

    def __init__(self, spike_factor: float | None = None, action: str = "stop", window: int = 50):
        if action not in ("stop", "skip"):
            raise ConfigError(f"loss_guard.action={action!r} must be 'stop' or 'skip'")
        self.spike_factor = spike_factor
        self.action = action
        self.recent: deque[float] = deque(maxlen=window)

    def verdict(self, loss: float) -> str | None:
        """None to go on, else 'nonfinite', 'skip' or 'stop'."""
        if not math.isfinite(loss):
            return "nonfinite"
        spike = (
            self.spike_factor is not None
            and len(self.recent) >= 10
            and loss > self.spike_factor * statistics.median(self.recent)
        )
        self.recent.append(loss)  # spikes too, so a lasting shift in level stops counting as one
        return self.action if spike else None


class GPTLightningModule(L.LightningModule):
    """The GPT's training and validation steps. `optim` is the config's optim group as it stands
    (conf/optim/*.yaml hold every value; warmup_steps fitted to the run by the plan), `loss_guard`
    the config's loss_guard group."""

    def __init__(
        self,
        model_config: dict,
        optim: dict,
        loss_guard: dict | None = None,
        compile_model: bool = False,
        compile_tuning: bool = False,
    ):
        super().__init__()
        # Stored in every checkpoint, so a checkpoint alone can rebuild the model.
        self.save_hyperparameters()
        check_optimizer(optim["optimizer"])
        self.model = GPT(GPTConfig(**model_config))
        self.guard = LossGuard(**(loss_guard or {}))
        # Of the last optimizer step: mean loss over its micro-batches, gradient norm before clipping.
        self.step_loss: torch.Tensor | None = None
        self.step_loss_value: float | None = None  # the same, read once per step
        self.grad_norm: torch.Tensor | None = None
        self._loss_sum: torch.Tensor | None = None
        self._micro_batches = 0
        self._rng_to_restore: dict | None = None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)[0]

    def configure_model(self) -> None:
        # Compiled once the model is on its device; kept outside the module tree so that
        # checkpoints hold the plain model's keys either way.
        if self.hparams.compile_model and "compiled" not in self.__dict__:
            self.__dict__["compiled"] = compile_gpt(self.model, self.hparams.compile_tuning)

    @property
    def step_model(self):
        return self.__dict__.get("compiled", self.model)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # With the model config in hyper_parameters, this makes a checkpoint self-contained.
        checkpoint["tokenizer"] = {"name": "gpt2", "ranks_sha256": GPT2_RANKS_SHA256, "end_of_text_id": END_OF_TEXT_ID}
        # Dropout draws from these: a resumed run continues the same random streams.
        checkpoint["rng_states"] = capture_rng_states(("torch", "cuda"))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._rng_to_restore = checkpoint.get("rng_states")

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Restored here, not at load time: starting the data loaders on resume draws from the
        # random stream, which the uninterrupted run did not do between these two steps.
        states, self._rng_to_restore = self._rng_to_restore, None
        if states:
            restore_rng_states(states)

    def training_step(self, windows: torch.Tensor, batch_idx: int) -> torch.Tensor:
        # windows: (micro_batch, block_size + 1) tokens; targets are the inputs shifted by one.
        # Compiled, the head and the loss are fused (the logits are never needed in training).
        _, loss = self.step_model(windows[:, :-1], windows[:, 1:], fused_loss=self.hparams.compile_model)
        self._loss_sum = loss.detach() if self._loss_sum is None else self._loss_sum + loss.detach()
        self._micro_batches += 1
        return loss  # logged per optimizer step by monitor.StepMetrics

    def validation_step(self, windows: torch.Tensor, batch_idx: int) -> None:
        _, loss = self.step_model(windows[:, :-1], windows[:, 1:])
        # For checkpoint callbacks and the progress bar; the monitor writes it to the loggers.
        self.log("val/loss", loss, prog_bar=True, logger=False, sync_dist=True)

    def on_before_optimizer_step(self, optimizer) -> None:
        # Once per optimizer step, after the last micro-batch's backward and before clipping:
        # the step's loss is the mean over its micro-batches, and a spike is judged before the update.
        self.step_loss, self._loss_sum, self._micro_batches = self._loss_sum / self._micro_batches, None, 0
        if self.guard.spike_factor is not None:  # judging before the update costs a wait for the GPU
            self.judge_step(optimizer, float(self.step_loss), before_update=True)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning's mixed-precision plugin refuses to clip for a fused optimizer even in bf16,
        # where no loss scaling needs undoing, so clip by norm here.
        if gradient_clip_algorithm not in (None, "norm"):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        # With no clipping asked for, an infinite limit still measures the norm for the logs.
        limit = gradient_clip_val or float("inf")
        sharded = getattr(self.trainer.model, "clip_grad_norm_", None)  # FSDP: the norm over every shard
        self.grad_norm = sharded(limit) if sharded else torch.nn.utils.clip_grad_norm_(self.parameters(), limit)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # The one wait for the GPU per optimizer step, once the update is queued: a non-finite
        # loss stops the run here, before any callback can checkpoint the damaged weights.
        self.step_loss_value = float(self.step_loss)
        if not math.isfinite(self.step_loss_value):
            self.judge_step(optimizer, self.step_loss_value, before_update=False)

    def judge_step(self, optimizer, loss: float, before_update: bool) -> None:
        """Stop at a non-finite loss; skip or stop on a spike if asked (before the update only)."""
        verdict = self.guard.verdict(loss) if before_update else "nonfinite"
        if verdict is None:
            return
        step, lr = self.trainer.global_step + 1, learning_rates(optimizer)["train/lr"]  # the step being taken
        checkpoint = self.trainer.checkpoint_callback.last_model_path if self.trainer.checkpoint_callback else ""
        kept = f"the last good checkpoint, {checkpoint}, is untouched" if checkpoint else "no checkpoint was saved yet"
        if verdict == "skip":
            log.warning("Skipped step %d: loss %.4f is a spike (lr %.2e); its update is not applied", step, loss, lr)
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # AdamW leaves parameters without gradients alone
            return
        what = f"train loss is {loss}" if verdict == "nonfinite" else f"train loss spiked to {loss:.4f}"
        raise TrainingDiverged(
            f"{what} at step {step} (lr {lr:.2e}); the run stopped there and {kept}: "
            "lower optim.lr or raise optim.warmup_steps, then resume from that checkpoint with ckpt_path=..."
        )

    def configure_optimizers(self):
        optim = self.hparams.optim
        # Fused AdamW on CUDA, except with fp16 loss scaling: Lightning must unscale the
        # gradients before clipping, and cannot with a fused optimizer.
        fused = self.device.type == "cuda" and not str(self.trainer.precision).startswith("16")
        optimizer = build_optimizer(self.model, optim, fused=fused)
        schedule = warmup_cosine(
            optimizer, optim["lr"], optim["min_lr"], optim["warmup_steps"], decay_steps=self.trainer.max_steps
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
