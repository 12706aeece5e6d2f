"""python -m fineweb_gpt.train: compose the config, build the run, train, report.

Config flows one way: YAML -> Hydra -> plan and instantiate -> objects. This module and
plan.py read the composed config; everything they build receives plain arguments.
"""

import logging

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from fineweb_gpt.callbacks import RunMonitor, StepProgressBar
from fineweb_gpt.checkpointing import RunStopped, hand_on
from fineweb_gpt.config_files import config_dir, hydra_choices, in_multirun, sweep_names
from fineweb_gpt.errors import ConfigError, exit_with, one_line
from fineweb_gpt.flops import human_count
from fineweb_gpt.lit_module import GPTLightningModule
from fineweb_gpt.loggers import build_loggers, finish_wandb_run, wandb_run_id
from fineweb_gpt.model import GPTConfig
from fineweb_gpt.plan import check_config, gradient_accumulation, out_of_memory_error, run_plan, world_size_of
from fineweb_gpt.resume import RunFolder, claim_run_folder, read_checkpoint, resume_checkpoint
from fineweb_gpt.run_folder import write_result

log = logging.getLogger("fineweb_gpt")
# Every DDP process runs this script; only the first one reports.
log.addFilter(lambda record: rank_zero_only.rank == 0)


def build(node: DictConfig, **kwargs):
    """hydra.utils.instantiate, letting our one-line ConfigError through unwrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise


def train(cfg: DictConfig, folder: RunFolder | None = None) -> float | None:
    """Run one training job; returns the final validation loss (for sweepers). Raises RunStopped
    when a signal stopped it part way. `folder`: the run folder as claim_run_folder settled it."""
    choices = hydra_choices()
    check_config(cfg, choices.get("hw", "custom"))
    L.seed_everything(cfg.seed, workers=True)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls left on Ampere and newer

    world_size = world_size_of(cfg.trainer)
    micro_batch_size, block_size = cfg.hw.micro_batch_size, cfg.data.block_size
    accumulation = gradient_accumulation(cfg.total_batch_tokens, micro_batch_size, block_size, world_size)
    ckpt_path = folder.resume_from if folder else resume_checkpoint(cfg.ckpt_path, cfg.resume, cfg.run_dir)
    model_config = GPTConfig(**cfg.model)
    module = GPTLightningModule(
        model_config=model_config.to_dict(),
        **OmegaConf.to_container(cfg.optim),
        spike_factor=cfg.loss_guard.spike_factor,
        spike_action=cfg.loss_guard.action,
        compile_model=cfg.hw.compile,
        compile_tuning=cfg.hw.get("compile_tuning", False),
    )
    num_params = module.model.num_params()
    plan = run_plan(cfg, model_config, num_params, choices, world_size, accumulation)

    monitor = RunMonitor(plan, run_dir=cfg.run_dir, log_every_n_steps=cfg.trainer.log_every_n_steps or 1)
    callbacks = [monitor, StepProgressBar(), *([folder] if folder else [])]
    callbacks += [build(c) for c in (cfg.get("callbacks") or {}).values()]
    resumed_from = read_checkpoint(ckpt_path) if ckpt_path else None
    loggers = build_loggers(cfg.get("logger"), cfg.run_dir, wandb_run_id(resumed_from), sweep_names())
    trainer: L.Trainer = build(
        cfg.trainer,
        precision=plan["precision"],
        max_steps=plan["max_steps"],
        accumulate_grad_batches=accumulation,
        val_check_interval=cfg.val_every_steps * accumulation,
        # A fresh run is scored before its first step, a resumed one where it left off.
        num_sanity_val_steps=-1 if ckpt_path is None else 0,
        callbacks=callbacks,
        logger=loggers or False,
    )
    if trainer.world_size != world_size:
        raise ConfigError(
            f"trainer.devices={cfg.trainer.devices} gave {trainer.world_size} processes, not the {world_size} "
            "the batch was planned for; give trainer.devices as a number"
        )
    for logger in trainer.loggers:
        logger.log_hyperparams({"config": OmegaConf.to_container(cfg, resolve=True)})
    datamodule = build(cfg.data, micro_batch_size=micro_batch_size)

    try:
        # One fit, evaluating at step 0, every val_every_steps and at the last step (see RunMonitor).
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except torch.cuda.OutOfMemoryError as err:
        raise out_of_memory_error(cfg.total_batch_tokens, micro_batch_size, block_size, world_size, num_params) from err
    finally:
        finish_wandb_run(trainer)
    stopped = trainer.checkpoint_callback.stop_message(trainer) if trainer.checkpoint_callback else None
    if stopped:
        raise RunStopped(stopped, trainer.checkpoint_callback.signal_received)
    return report(trainer, monitor, cfg.run_dir)


def report(trainer: L.Trainer, monitor: RunMonitor, run_dir: str) -> float | None:
    """Log how the run ended and where its files are; returns the final val loss."""
    final_val_loss = float(trainer.callback_metrics["val/loss"]) if "val/loss" in trainer.callback_metrics else None
    log.info(
        "Finished %d steps, %s tokens. Final val loss: %s",
        trainer.global_step,
        human_count(monitor.tokens_seen),
        f"{final_val_loss:.4f}" if final_val_loss is not None else "n/a",
    )
    checkpoint = next((c for c in trainer.checkpoint_callbacks if c.last_model_path), None)
    if checkpoint is not None:
        log.info("Checkpoint: %s", checkpoint.last_model_path)
    log.info("Run folder: %s", run_dir)
    return final_val_loss


def main(cfg: DictConfig) -> float | None:
    """One run; in a sweep, a failed run is reported and the sweep goes on (its value is NaN,
    which optimising sweepers count as a failed trial)."""
    try:
        folder = claim_run_folder(cfg)
    except ConfigError as err:  # refused with the run folder as it was: it may hold another run's work
        if not in_multirun():
            exit_with(err)
        log.error("This run was refused: %s", one_line(err))
        return float("nan")
    try:
        final_val_loss = train(cfg, folder)
        write_result(cfg.run_dir, "completed", final_val_loss=final_val_loss)
        return final_val_loss
    except RunStopped as stop:
        # Not finished, yet not a failure: a single run exits 0, so that a requeued job can
        # resume; in a sweep its value is NaN, as a failed run's is.
        log.info("%s", stop)
        write_result(cfg.run_dir, "stopped", error=str(stop))
        hand_on(stop.signum)  # under SLURM: the requeue, through submitit's handler or scontrol
        if not in_multirun():
            return None
    except ConfigError as err:
        write_result(cfg.run_dir, "failed", error=one_line(err))
        if not in_multirun():
            exit_with(err)
        log.error("This run failed: %s", one_line(err))
    except Exception as err:
        if not in_multirun():
            raise
        write_result(cfg.run_dir, "failed", error=f"{type(err).__name__}: {one_line(err)}")
        log.exception("This run failed; the sweep goes on")
    finally:
        folder.release()
    return float("nan")


def cli() -> None:
    """The console script and `python -m fineweb_gpt.train`, from any folder."""
    hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")(main)()


if __name__ == "__main__":
    cli()
