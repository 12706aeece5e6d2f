"""One training run, built and trained: what `python -m fineweb_gpt.train` (fineweb_gpt.train, the
command line) does once Hydra has composed the config.

Config flows one way: YAML -> Hydra -> plan and instantiate -> objects. This module and
plan.py read the composed config; everything they build receives plain arguments.
"""

import logging

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from fineweb_gpt.config_files import build, hydra_choices, in_multirun, sweep_names
from fineweb_gpt.console import StepProgressBar, route_warnings_to_log
from fineweb_gpt.errors import ConfigError, UserError, exit_with, one_line
from fineweb_gpt.lit_module import GPTLightningModule
from fineweb_gpt.loggers import RememberWandbRun, build_loggers, finish_wandb_run
from fineweb_gpt.model import GPTConfig
from fineweb_gpt.monitor.health import HealthMonitor
from fineweb_gpt.monitor.run_summary import RunSummary
from fineweb_gpt.monitor.step_metrics import StepMetrics
from fineweb_gpt.plan import out_of_memory_error, plan_run, trainer_arguments
from fineweb_gpt.run.checkpoint_files import read_checkpoint
from fineweb_gpt.run.evaluation_schedule import EvaluateLastStep
from fineweb_gpt.run.latest_link import LatestRun
from fineweb_gpt.run.ownership import (
    ClaimedFolder,
    TrainingStarted,
    claim_run_folder,
    discard_untrained_run,
    has_started_training,
    refuse_run,
)
from fineweb_gpt.run.resume_policy import ResumeSettings, choose_checkpoint
from fineweb_gpt.run.run_files import write_result
from fineweb_gpt.run.stop_signals import RunStopped, StopOnSignal, pass_signal_on

log = logging.getLogger("fineweb_gpt")


def train(cfg: DictConfig, folder: ClaimedFolder | None = None, plan: dict | None = None) -> float | None:
    """Run one training job; returns the final validation loss (for sweepers). Raises RunStopped
    when a signal stopped it part way. main() passes the run folder as claim_run_folder settled it
    and the plan it checked; a direct call (tests) works them out here."""
    plan = plan or plan_run(cfg, hydra_choices())  # refuses what cannot work, before anything is built
    L.seed_everything(cfg.seed, workers=True)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls left on Ampere and newer

    ckpt_path = folder.resume_from if folder else choose_checkpoint(cfg.ckpt_path, cfg.resume, cfg.run_dir)
    module = GPTLightningModule(
        model_config=GPTConfig(**cfg.model).to_dict(),
        optim={**OmegaConf.to_container(cfg.optim), "warmup_steps": plan["warmup_steps"]},  # fitted to the run
        loss_guard=OmegaConf.to_container(cfg.loss_guard),
        compile_model=plan["compile"],  # hw.compile, unless this machine cannot compile
        compile_tuning=cfg.hw.get("compile_tuning", False),
    )

    config = OmegaConf.to_container(cfg, resolve=True)
    summary = RunSummary(plan, run_dir=cfg.run_dir, config=config)
    health = HealthMonitor(summary)
    metrics = StepMetrics(plan, log_every_n_steps=cfg.trainer.log_every_n_steps or 1, observers=[health])
    stopper = StopOnSignal()
    configured = [build(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks = [
        summary,
        health,
        metrics,
        EvaluateLastStep(),
        ResumeSettings(config),
        TrainingStarted(cfg.run_dir),
        LatestRun(cfg.run_dir, cfg.get("latest_link")),
        RememberWandbRun(),
        StepProgressBar(),
        *configured,
        stopper,  # the last to look for a signal at a step's end; Lightning runs the checkpointer after it
    ]
    resumed_from = read_checkpoint(ckpt_path) if ckpt_path else None
    loggers = build_loggers(cfg.get("logger"), cfg.run_dir, resumed_from, sweep_names())
    trainer: L.Trainer = build(
        cfg.trainer,
        refusals=(MisconfigurationException, TypeError, ValueError),  # how the Trainer refuses an argument
        **trainer_arguments(cfg, plan, ckpt_path is not None, callbacks),
        logger=loggers or False,
    )
    if trainer.world_size != plan["world_size"]:
        raise ConfigError(
            f"trainer.devices={cfg.trainer.devices} gave {trainer.world_size} processes, not the "
            f"{plan['world_size']} the batch was planned for; give trainer.devices as a number"
        )
    sized = {"val_tokens": plan["val_tokens"]} if "val_tokens" in cfg.data else {}  # on the CPU, to the run
    datamodule = build(cfg.data, micro_batch_size=plan["micro_batch_size"], **sized)

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except torch.cuda.OutOfMemoryError as err:
        raise out_of_memory_error(plan, cfg.data.block_size) from err
    finally:
        finish_wandb_run(trainer)
    stopped = stopper.stop_message(trainer)
    if stopped:
        raise RunStopped(stopped, stopper.signal_received)
    return summary.report(trainer, metrics.tokens_seen)


def main(cfg: DictConfig) -> float | None:
    """One run; in a sweep, a failed run is reported and the sweep goes on (its value is NaN,
    which optimising sweepers count as a failed trial). A single run refused before training
    leaves no folder (or an earlier run's folder as it was)."""
    route_warnings_to_log()
    try:
        plan = plan_run(cfg, hydra_choices())  # refuses what cannot work; writes nothing
    except UserError as err:
        return refuse_run(cfg, err, own_folder=True)
    try:
        folder = claim_run_folder(cfg)  # the lock, the checkpoint to resume from, what it may change
    except UserError as err:  # the folder may hold another run's work: nothing is written in it
        return refuse_run(cfg, err, own_folder=False)
    try:
        final_val_loss = train(cfg, folder, plan)
        write_result(cfg.run_dir, "completed", final_val_loss=final_val_loss)
        return final_val_loss
    except RunStopped as stop:
        # Not finished, yet not a failure: a single run exits 0, so that a requeued job can
        # resume; in a sweep its value is NaN, as a failed run's is.
        log.info("%s", stop)
        write_result(cfg.run_dir, "stopped", error=str(stop))
        pass_signal_on(stop.signum)  # under SLURM: the requeue, through submitit's handler or scontrol
        if not in_multirun():
            return None
    except UserError as err:  # a config the built run refuses, a full disk, out of memory, a diverged loss
        if in_multirun() or has_started_training(cfg.run_dir):
            write_result(cfg.run_dir, "failed", error=one_line(err))
        if not in_multirun():
            discard_untrained_run(cfg.run_dir, folder.lock)
            exit_with(err)
        log.error("This run failed: %s", one_line(err))
    except Exception as err:
        if not in_multirun():
            discard_untrained_run(cfg.run_dir, folder.lock)
            raise
        write_result(cfg.run_dir, "failed", error=f"{type(err).__name__}: {one_line(err)}")
        log.exception("This run failed; the sweep goes on")
    finally:
        folder.release()
    return float("nan")
