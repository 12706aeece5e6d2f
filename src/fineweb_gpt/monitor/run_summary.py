"""RunSummary: the run's summary, printed, saved and logged once at start, and its last word at the end."""

import json
import logging
from pathlib import Path

import lightning as L
import torch

from fineweb_gpt.flops import human_count, human_ratio, size_mismatch
from fineweb_gpt.run.names import SUMMARY_FILE
from fineweb_gpt.safe_files import write_atomically
from fineweb_gpt.time_estimate import (
    CPU_EVALUATION_SHARE,
    DAYS_WORTH_WARNING,
    TRAINING_EFFICIENCY,
    describe_seconds,
    interval_for_share,
    matmul_rate,
    precision_dtype,
    run_time,
    tokens_for_share,
)

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
            "val_tokens_scored": validation_tokens(datamodule),
        }
        if trainer.is_global_zero:
            self.summary.update(estimated_run_time(self.summary, device))
            self.already_warned = self.report_summary(trainer)

    def report_summary(self, trainer: L.Trainer) -> set[str]:
        """Print, save and log the summary; returns the health checks it already warned about."""
        s = self.summary
        peak = f", peak {s['peak_flops'] / 1e12:.1f} TFLOPS" if s["peak_flops"] else ", peak FLOPS unknown (no MFU)"
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
            f"data             {describe_data(s)}",
            f"schedule         lr {s['lr']:g} -> {s['min_lr']:g} (cosine), warmup {s['warmup_steps']} steps, "
            f"weight decay {s['weight_decay']:g}, evaluation every {s['val_every_steps']} steps",
            f"evaluation       {describe_evaluation(s)}",
            f"time             {describe_time(s)}",
            f"FLOPs per token  {human_count(s['flops_per_token'])} (6N + 12 L H Q T)",
        ]
        log.info("Run summary\n  %s", "\n  ".join(lines))
        if s.get("estimated_run_seconds", 0) > DAYS_WORTH_WARNING:
            log.warning("%s", too_long(s))
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


# --- what the summary says of the data, the evaluations and the time ---------------------------


def validation_tokens(datamodule) -> int | None:
    """Tokens each evaluation scores (the targets of its windows), once the DataModule is set up."""
    windows = getattr(datamodule, "val_windows", None)
    return len(windows) * (windows.window - 1) if windows is not None else None


def estimated_run_time(summary: dict, device: torch.device) -> dict:
    """The plan's seconds at a rate measured on `device` now (time_estimate.py); {} if it cannot be measured."""
    dtype = precision_dtype(summary["precision"])
    try:
        rate = matmul_rate(device, summary["n_embd"], summary["vocab_size"], dtype)
    except RuntimeError as err:  # out of memory, a dtype the device lacks: the summary goes on without it
        log.debug("No time estimate: %s", err)
        return {}
    return run_time(summary, rate, summary["val_tokens_scored"] or 0)


def describe_data(s: dict) -> str:
    """`single_parquet: /data/000_00000.parquet, ~1.12M unique training tokens: 0.15 epochs planned`."""
    files = s["data_files"]
    named = f": {files[0]}" + (f" and {len(files) - 1} more files" if len(files) > 1 else "") if files else ""
    text = f"{s['data_name']}{named}"
    if s["unique_train_tokens"]:
        approx = "~" if s["unique_train_tokens_estimated"] else ""
        text += (
            f", {approx}{human_count(s['unique_train_tokens'])} unique training tokens: "
            f"{s['planned_epochs']:.2f} epochs planned"
        )
    return text


def describe_evaluation(s: dict) -> str:
    """How much each evaluation scores and, when it was measured, what it costs; why it is not
    data.val_tokens, and what keeps it near a tenth of the run when it takes more."""
    scored, asked, evaluations = s["val_tokens_scored"], s["val_tokens_asked"], s["evaluations"]
    if scored is None:
        return "not known before the data is read"
    text = f"{scored:,} validation tokens x {evaluations} evaluations (step 0, every {s['val_every_steps']}, the last)"
    notes = []
    if s["val_tokens"] != asked:
        notes.append(
            f"data.val_tokens={asked:,} lowered on the CPU to keep evaluations near {CPU_EVALUATION_SHARE:.0%} of the "
            "run; set data.val_tokens to choose"
        )
    elif asked is not None and scored < asked - s["block_size"]:
        notes.append(f"all there is of the held-out data: data.val_tokens={asked:,} asks for more")
    if "estimated_evaluation_seconds" in s:
        each, run = s["estimated_evaluation_seconds"], s["estimated_run_seconds"]
        share = evaluations * each / run if run else 0.0
        text += f": about {describe_seconds(each)} each, {share:.0%} of the run"
        if share > 1.5 * CPU_EVALUATION_SHARE:
            notes.append(advice_for_share(s))
    return "\n                   ".join([text, *notes])


def advice_for_share(s: dict) -> str:
    """What keeps evaluations near a tenth of the run: fewer tokens, or fewer evaluations."""
    block = s["block_size"]
    tokens = max(block, tokens_for_share(CPU_EVALUATION_SHARE, s["planned_tokens"], s["evaluations"]) // block * block)
    train = s["max_steps"] * s["estimated_step_seconds"]
    allowed = int(CPU_EVALUATION_SHARE / (1 - CPU_EVALUATION_SHARE) * train / s["estimated_evaluation_seconds"])
    interval = interval_for_share(s["max_steps"], allowed)
    fewer = f" or val_every_steps={interval}" if interval else ""
    return f"data.val_tokens={tokens:,}{fewer} keeps evaluations near {CPU_EVALUATION_SHARE:.0%} of the run"


def describe_time(s: dict) -> str:
    if "estimated_run_seconds" not in s:
        return "not estimated (the device's rate could not be measured); the first steps will say"
    rate = s["measured_matmul_flops"]
    rate_text = f"{rate / 1e12:.1f} TFLOPS" if rate >= 1e12 else f"{rate / 1e9:.1f} GFLOPS"
    step, run = describe_seconds(s["estimated_step_seconds"]), describe_seconds(s["estimated_run_seconds"])
    share = f"{TRAINING_EFFICIENCY:.0%}"
    return f"about {step} per step, {run} for the run (its FLOPs at {share} of the {rate_text} a matmul reached here)"


def too_long(s: dict) -> str:
    """The warning before a run that would take days here, with the length that fits an hour."""
    step = s["estimated_step_seconds"]
    advice = [f"set trainer.max_steps={int(3600 // step)} for a run of about an hour"] if step < 1800 else []
    advice += ["use a smaller model (model=tiny)"] if s["model_name"] != "tiny" else []
    advice.append("train on a GPU")
    return (
        f"This run would take about {describe_seconds(s['estimated_run_seconds'])} on this machine "
        f"({describe_seconds(step)} per step x {s['max_steps']:,} steps, estimated): {', or '.join(advice)}"
    )
