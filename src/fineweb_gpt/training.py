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

from fineweb_gpt.config_files import build, in_multirun, sweep_names
from fineweb_gpt.console import StepProgressBar, route_warnings_to_log
from fineweb_gpt.errors import ConfigError, UserError, exit_with, one_line
from fineweb_gpt.evals.in_training import hellaswag_callbacks
from fineweb_gpt.export import initial_weights, use_init_from
from fineweb_gpt.lit_module import GPTLightningModule
from fineweb_gpt.loggers import RememberLoggers, build_loggers, finish_wandb_run
from fineweb_gpt.model import GPTConfig
from fineweb_gpt.monitor.health import HealthMonitor
from fineweb_gpt.monitor.run_summary import RunSummary
from fineweb_gpt.monitor.step_metrics import StepMetrics
from fineweb_gpt.plan import out_of_memory_error, plan_run, trainer_arguments
from fineweb_gpt.run.checkpoint_files import read_checkpoint
from fineweb_gpt.run.evaluation_schedule import EvaluationSchedule, trainer_max_steps
from fineweb_gpt.run.latest_link import LatestRun
from fineweb_gpt.run.ownership import (
    ClaimedFolder,
    RecordRun,
    TrainingStarted,
    claim_run_folder,
    discard_untrained_run,
    has_started_training,
    record_failure,
    refuse_run,
)
from fineweb_gpt.run.resume_policy import ResumeSettings, choose_checkpoint, is_finished
from fineweb_gpt.run.run_files import final_val_loss_of, record_result, write_result
from fineweb_gpt.run.stop_signals import RunStopped, StopOnSignal, pass_signal_on
from fineweb_gpt.safe_files import refused_log_files

log = logging.getLogger("fineweb_gpt")
REFUSALS = (MisconfigurationException, TypeError, ValueError)  # how Lightning's classes refuse an argument


def train(cfg: DictConfig, folder: ClaimedFolder | None = None, plan: dict | None = None) -> float | None:
    """Run one training job; returns the final validation loss (for sweepers). Raises RunStopped
    when a signal stopped it part way. main() passes the run folder as claim_run_folder settled it
    and the plan it checked; a direct call (tests) works them out here."""
    plan = plan or plan_run(cfg, use_init_from(cfg))  # refuses what cannot work, before anything is built
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
    if cfg.get("init_from") and ckpt_path is None:  # a resumed run has its own weights
        module.model.load_state_dict(initial_weights(cfg.init_from, module.model.config))

    config = OmegaConf.to_container(cfg, resolve=True)
    summary = RunSummary(plan, run_dir=cfg.run_dir, config=config)
    health = HealthMonitor(summary)
    metrics = StepMetrics(plan, log_every_n_steps=cfg.trainer.log_every_n_steps or 1, observers=[health])
    stopper = StopOnSignal(cfg.run_dir, plan["world_size"])
    configured = [build(c, refusals=REFUSALS) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks = [
        *([RecordRun(cfg.run_dir, cfg)] if folder else []),  # .hydra/*.yaml, once the data is checked
        summary,
        health,
        metrics,
        # After StepMetrics, which has then timed the step: HellaSwag's time stays out of the step's.
        *hellaswag_callbacks(cfg.get("eval"), plan["hellaswag_every_steps"], cfg.run_dir, metrics),
        ResumeSettings(config),
        TrainingStarted(cfg.run_dir),
        LatestRun(cfg.run_dir, cfg.get("latest_link")),
        RememberLoggers(),
        StepProgressBar(),
        *configured,
        stopper,  # the last to look for a signal at a step's end; Lightning runs the checkpointer after it
        EvaluationSchedule(cfg.val_every_steps, plan["max_steps"]),  # a pending evaluation, with the stopper's handlers
    ]
    resumed_from = read_checkpoint(ckpt_path) if ckpt_path else None
    loggers = build_loggers(cfg.get("logger"), cfg.run_dir, resumed_from, sweep_names())
    arguments = trainer_arguments(cfg, plan, ckpt_path is not None, callbacks)
    arguments["max_steps"] = trainer_max_steps(plan["max_steps"], resumed_from)
    trainer: L.Trainer = build(cfg.trainer, refusals=REFUSALS, **arguments, logger=loggers or False)
    if trainer.world_size != plan["world_size"]:
        raise ConfigError(
            f"trainer.devices={cfg.trainer.devices} gave {trainer.world_size} processes, not the "
            f"{plan['world_size']} the batch was planned for; give trainer.devices as a number"
        )
    sized = {"val_tokens": plan["val_tokens"]} if "val_tokens" in cfg.data else {}  # on the CPU, to the run
    datamodule = build(cfg.data, micro_batch_size=plan["micro_batch_size"], **sized)

    stopper.install()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except torch.cuda.OutOfMemoryError as err:
        raise out_of_memory_error(plan, cfg.data.block_size) from err
    finally:
        stopper.restore()
        finish_wandb_run(trainer)
    return summary.report(trainer, metrics.tokens_seen)


def already_complete(cfg: DictConfig, folder: ClaimedFolder, plan: dict) -> tuple[bool, float | None]:
    """(True, its final val loss) when the checkpoint resumed is of a run that has finished: it is
    said in one line, and the run's result is kept (written from its metrics if it is missing)."""
    checkpoint = read_checkpoint(folder.resume_from)
    if not is_finished(checkpoint, plan["max_steps"]):
        return False, None
    final, recorded = final_val_loss_of(cfg.run_dir, checkpoint["global_step"])
    log.info(
        "The run in %s is already complete: step %d of %d, final val loss %s; nothing to train "
        "(to train it longer, raise trainer.max_steps)",
        cfg.run_dir,
        checkpoint["global_step"],
        plan["max_steps"],
        f"{final:.4f}" if final is not None else "n/a",
    )
    if not recorded:
        write_result(cfg.run_dir, "completed", final_val_loss=final)
    return True, final


def main(cfg: DictConfig) -> float | None:
    """One run; in a sweep, a failed run is reported and the sweep goes on (its value is NaN,
    which optimising sweepers count as a failed trial). A single run refused before training
    leaves no folder (or an earlier run's folder as it was)."""
    route_warnings_to_log()
    for refusal in refused_log_files():  # a planted <job>.log link: nothing else is done
        return refuse_run(cfg, refusal, own_folder=False)
    try:
        plan = plan_run(cfg, use_init_from(cfg))  # refuses what cannot work; writes nothing
    except UserError as err:
        return refuse_run(cfg, err, own_folder=True)
    except Exception:
        if not in_multirun():
            discard_untrained_run(cfg.run_dir)  # a traceback leaves no folder behind either
        raise
    try:
        folder = claim_run_folder(cfg)  # the lock, the checkpoint to resume from, what it may change
    except UserError as err:  # the folder may hold another run's work: nothing is written in it
        return refuse_run(cfg, err, own_folder=False)
    try:
        if folder.resume_from:
            complete, final_val_loss = already_complete(cfg, folder, plan)
            if complete:
                return final_val_loss
        final_val_loss = train(cfg, folder, plan)
        write_result(cfg.run_dir, "completed", final_val_loss=final_val_loss)
        return final_val_loss
    except RunStopped as stop:
        # Not finished, yet not a failure: a single run exits 0, so that a requeued job can
        # resume; in a sweep its value is NaN, as a failed run's is.
        log.info("%s", stop)
        record_result(cfg.run_dir, "stopped", error=str(stop))
        pass_signal_on(stop.signum)  # under SLURM: the requeue, through submitit's handler or scontrol
        if not in_multirun():
            return None
    except UserError as err:  # a config the built run refuses, a full disk, out of memory, a diverged loss
        if in_multirun():
            record_failure(cfg, err)
        elif has_started_training(cfg.run_dir):  # a refused resume leaves the run's result as it was
            record_result(cfg.run_dir, "failed", error=one_line(err))
        if not in_multirun():
            discard_untrained_run(cfg.run_dir, folder.lock)
            exit_with(err)
        log.error("This run failed: %s", one_line(err))
    except Exception as err:
        if not in_multirun():
            discard_untrained_run(cfg.run_dir, folder.lock)
            raise
        record_result(cfg.run_dir, "failed", error=f"{type(err).__name__}: {one_line(err)}")
        log.exception("This run failed; the sweep goes on")
    finally:
        folder.release()
    return float("nan")
