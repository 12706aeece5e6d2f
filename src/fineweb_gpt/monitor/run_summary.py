"""RunSummary: the run's summary, printed, saved and logged once at start, and its last word at the end."""

import json
import logging
from pathlib import Path

import lightning as L
import torch

from fineweb_gpt.flops import human_count, human_ratio, size_mismatch
from fineweb_gpt.run.names import SUMMARY_FILE
from fineweb_gpt.safe_files import write_atomically

log = logging.getLogger("fineweb_gpt")


class RunSummary(L.Callback):
    """At the first setup: the plan (worked out by plan.py) with what only the built run knows
    (the device, the data's size and epochs), printed as one block, written to run_summary.json
    and given, with the run's config, to every logger. `already_warned` holds the health checks
    the summary already warned about loudly (the model's size against its name), so the health
    monitor does not repeat them."""

    def __init__(self, plan: dict, run_dir: str | None = None, config: dict | None = None):
        self.plan = plan  # static facts of the run, worked out by plan.py
        self.config = config  # the resolved config, for the loggers
        self.run_dir = Path(run_dir) if run_dir else None
        self.summary: dict | None = None
        self.already_warned: set[str] = set()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.summary is not None:
            return
        datamodule = trainer.datamodule
        unique = getattr(datamodule, "unique_train_tokens", None)
        device = trainer.strategy.root_device
        self.summary = {
            **self.plan,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
            "unique_train_tokens": unique,
            "unique_train_tokens_estimated": getattr(datamodule, "unique_train_tokens_estimated", False),
            "planned_epochs": self.plan["planned_tokens"] / unique if unique else None,
            "data_files": [str(f) for f in getattr(datamodule, "files", [])],
        }
        if trainer.is_global_zero:
            self.already_warned = self.report_summary(trainer)

    def report_summary(self, trainer: L.Trainer) -> set[str]:
        """Print, save and log the summary; returns the health checks it already warned about."""
        s = self.summary
        peak = f", peak {s['peak_flops'] / 1e12:.1f} TFLOPS" if s["peak_flops"] else ", peak FLOPS unknown (no MFU)"
        approx = "~" if s["unique_train_tokens_estimated"] else ""
        data = (
            f"{len(s['data_files'])} file(s), {approx}{human_count(s['unique_train_tokens'])} unique training tokens: "
            f"{s['planned_epochs']:.2f} epochs planned"
            if s["unique_train_tokens"]
            else f"{len(s['data_files'])} file(s)"
        )
        lines = [
            f"run folder       {self.run_dir}",
            f"model            {s['model_name']}: {s['num_params'] / 1e6:.2f}M parameters (nanoGPT count), "
            f"{s['n_layer']} layers x {s['n_head']} heads x {s['n_embd']}, block {s['block_size']}, "
            f"dropout {s['dropout']}",
            f"hardware         {s['hw_name']} ({s['device_name']}), {s['precision']}{peak}",
            f"batch            {s['tokens_per_step']:,} tokens per optimizer step = micro-batch "
            f"{s['micro_batch_size']} x block {s['block_size']} x accumulation {s['grad_accum']} x "
            f"{s['world_size']} device(s)",
            f"plan             {s['max_steps']:,} steps = {human_count(s['planned_tokens'])} tokens "
            f"({human_ratio(s['planned_tokens'] / s['chinchilla_tokens'])}x the Chinchilla-optimal "
            f"{human_count(s['chinchilla_tokens'])} for this size)",
            f"data             {data}",
            f"schedule         lr {s['lr']:g} -> {s['min_lr']:g} (cosine), warmup {s['warmup_steps']} steps, "
            f"weight decay {s['weight_decay']:g}, evaluation every {s['val_every_steps']} steps",
            f"FLOPs per token  {human_count(s['flops_per_token'])} (6N + 12 L H Q T)",
        ]
        log.info("Run summary\n  %s", "\n  ".join(lines))
        if self.run_dir:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_atomically(self.run_dir / SUMMARY_FILE, json.dumps(s, indent=2) + "\n")
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": self.config or {}, "run": s})
        mismatch = size_mismatch(s["model_name"], s["num_params"])
        if mismatch:  # the commonest silent mistake gets a banner
            log.warning("\n%s\n!!! %s\n%s", "!" * 100, mismatch, "!" * 100)
            return {"model_size"}
        return set()

    def report(self, trainer: L.Trainer, tokens_seen: int) -> float | None:
        """Log how the run ended and where its files are; returns the final val loss."""
        final = float(trainer.callback_metrics["val/loss"]) if "val/loss" in trainer.callback_metrics else None
        log.info(
            "Finished %d steps, %s tokens. Final val loss: %s",
            trainer.global_step,
            human_count(tokens_seen),
            f"{final:.4f}" if final is not None else "n/a",
        )
        checkpoint = next((c for c in trainer.checkpoint_callbacks if c.last_model_path), None)
        if checkpoint is not None:
            log.info("Checkpoint: %s", checkpoint.last_model_path)
        log.info("Run folder: %s", self.run_dir)
        return final
