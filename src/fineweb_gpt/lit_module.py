"""Training and validation steps, optimizer and learning-rate schedule for the GPT."""

import math

import lightning as L
import torch

from fineweb_gpt.model import GPT, GPTConfig
from fineweb_gpt.tokenizer import END_OF_TEXT_ID, GPT2_RANKS_SHA256


def learning_rate(step: int, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """Linear warmup to lr over warmup_steps, then cosine decay to min_lr at decay_steps.

    `step` counts optimizer steps already taken, so micro-batches never move the schedule.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


class GPTLightningModule(L.LightningModule):
    def __init__(
        self,
        model_config: dict,
        lr: float = 6e-4,
        min_lr: float = 6e-5,
        weight_decay: float = 0.1,
        warmup_steps: int = 200,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
    ):
        super().__init__()
        # Stored in every checkpoint, so a checkpoint alone can rebuild the model.
        self.save_hyperparameters()
        self.model = GPT(GPTConfig(**model_config))
        self.grad_norm: torch.Tensor | None = None  # of the last optimizer step, before clipping

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)[0]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # With the model config in hyper_parameters, this makes a checkpoint self-contained.
        checkpoint["tokenizer"] = {"name": "gpt2", "ranks_sha256": GPT2_RANKS_SHA256, "end_of_text_id": END_OF_TEXT_ID}

    def training_step(self, windows: torch.Tensor, batch_idx: int) -> torch.Tensor:
        # windows: (micro_batch, block_size + 1) tokens; targets are the inputs shifted by one.
        _, loss = self.model(windows[:, :-1], windows[:, 1:])
        return loss  # logged per optimizer step by callbacks.RunMonitor

    def validation_step(self, windows: torch.Tensor, batch_idx: int) -> None:
        _, loss = self.model(windows[:, :-1], windows[:, 1:])
        # For checkpoint callbacks and the progress bar; RunMonitor writes it to the loggers.
        self.log("val/loss", loss, prog_bar=True, logger=False, sync_dist=True)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning's mixed-precision plugin refuses to clip for a fused optimizer even in bf16,
        # where no loss scaling needs undoing, so clip by norm here.
        if gradient_clip_algorithm not in (None, "norm"):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        # With no clipping asked for, an infinite limit still measures the norm for the logs.
        self.grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val or float("inf"))

    def configure_optimizers(self):
        hp = self.hparams
        # Decay only matrices (linear weights and embeddings); gains and biases stay free.
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": hp.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # Fused AdamW on CUDA, except with fp16 loss scaling: Lightning must unscale the
        # gradients before clipping, and cannot with a fused optimizer.
        fused = self.device.type == "cuda" and not str(self.trainer.precision).startswith("16")
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, fused=fused)
        decay_steps = self.trainer.max_steps

        def lr_factor(step: int) -> float:
            return learning_rate(step, hp.lr, hp.min_lr, hp.warmup_steps, decay_steps) / hp.lr

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
