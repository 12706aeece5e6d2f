"""python -m fineweb_gpt.train: compose the config, build the run, train, report.

Config flows one way: YAML -> Hydra -> instantiate -> objects. This is the only module
that reads the whole config; everything below it receives plain arguments.
"""

import logging
import math
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from fineweb_gpt.errors import ConfigError
from fineweb_gpt.lit_module import GPTLightningModule
from fineweb_gpt.model import GPTConfig

log = logging.getLogger("fineweb_gpt")

CHINCHILLA_TOKENS_PER_PARAM = 20


def count_devices(devices, accelerator: str) -> int:
    """Processes per node for trainer.devices, read the way Lightning reads it."""
    if devices in ("auto", -1, "-1"):
        uses_cuda = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        return torch.cuda.device_count() if uses_cuda else 1
    if isinstance(devices, (list, tuple, ListConfig)):
        return len(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    return int(devices)


def gradient_accumulation(total_batch_tokens: int, micro_batch_size: int, block_size: int, world_size: int) -> int:
    """Micro-batches per optimizer step so that each step sees exactly total_batch_tokens."""
    tokens_per_micro_step = micro_batch_size * block_size * world_size
    if total_batch_tokens <= 0 or total_batch_tokens % tokens_per_micro_step:
        multiple = max(1, round(total_batch_tokens / tokens_per_micro_step)) * tokens_per_micro_step
        raise ConfigError(
            f"total_batch_tokens={total_batch_tokens} is not a multiple of hw.micro_batch_size x model.block_size x "
            f"world size = {micro_batch_size} x {block_size} x {world_size} = {tokens_per_micro_step}; "
            f"use total_batch_tokens={multiple} or change hw.micro_batch_size"
        )
    return total_batch_tokens // tokens_per_micro_step


def resolve_precision(precision: str, accelerator: str) -> str:
    """'auto' means bf16 on GPUs that have it, fp16 on older GPUs, fp32 on the CPU."""
    if precision != "auto":
        return precision
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def build(node: DictConfig, **kwargs):
    """hydra.utils.instantiate, letting our one-line ConfigError through unwrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise


def check_config(cfg: DictConfig, hw_name: str) -> None:
    """Refuse a run that cannot work before any data is read."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"{missing[0]} has no value; set it on the command line, e.g. {missing[0]}=/data/fineweb/000_00000.parquet"
        )
    if cfg.hw.requires_cuda and not torch.cuda.is_available():
        raise ConfigError(f"hw={hw_name} needs a CUDA GPU and this machine has none; use hw=cpu (or hw=auto)")
    for derived, instead in (
        ("accumulate_grad_batches", "total_batch_tokens"),
        ("val_check_interval", "val_every_steps"),
    ):
        if cfg.trainer.get(derived) is not None:
            raise ConfigError(f"trainer.{derived} is derived by fineweb_gpt; set {instead} instead")
    if cfg.val_every_steps <= 0:
        raise ConfigError(f"val_every_steps={cfg.val_every_steps} must be a positive number of optimizer steps")


def planned_steps(cfg: DictConfig, num_params: int) -> int:
    """trainer.max_steps if given, else max_tokens (default: Chinchilla-optimal) in steps."""
    if cfg.trainer.max_steps is not None and cfg.trainer.max_steps > 0:
        return int(cfg.trainer.max_steps)
    max_tokens = cfg.max_tokens or CHINCHILLA_TOKENS_PER_PARAM * num_params
    return max(1, math.ceil(max_tokens / cfg.total_batch_tokens))


def train(cfg: DictConfig) -> float | None:
    """Run one training job; returns the final validation loss (for sweepers)."""
    choices = cfg_choices()
    check_config(cfg, choices.get("hw", "?"))
    L.seed_everything(cfg.seed, workers=True)

    model_config = GPTConfig(**cfg.model)
    module = GPTLightningModule(model_config=model_config.to_dict(), **OmegaConf.to_container(cfg.optim))
    num_params = module.model.num_params()

    world_size = count_devices(cfg.trainer.devices, cfg.trainer.accelerator) * cfg.trainer.num_nodes
    accumulation = gradient_accumulation(
        cfg.total_batch_tokens, cfg.hw.micro_batch_size, model_config.block_size, world_size
    )
    max_steps = planned_steps(cfg, num_params)
    if cfg.optim.warmup_steps >= max_steps:
        raise ConfigError(
            f"optim.warmup_steps={cfg.optim.warmup_steps} is not below the run's {max_steps} steps; lower it"
        )

    callbacks = [build(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = [build(lg) for lg in (cfg.get("logger") or {}).values()]
    trainer: L.Trainer = build(
        cfg.trainer,
        precision=resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator),
        max_steps=max_steps,
        accumulate_grad_batches=accumulation,
        val_check_interval=cfg.val_every_steps * accumulation,
        callbacks=callbacks,
        logger=loggers or False,
    )
    if trainer.world_size != world_size:
        raise ConfigError(
            f"trainer.devices={cfg.trainer.devices} gave {trainer.world_size} processes, not the {world_size} "
            "the batch was planned for; give trainer.devices as a number"
        )

    datamodule = build(cfg.data, block_size=model_config.block_size, micro_batch_size=cfg.hw.micro_batch_size)

    run_dir = Path(cfg.run_dir)
    tokens_per_step = cfg.total_batch_tokens
    log.info("Run folder: %s", run_dir)
    log.info(
        "Model %s: %.2fM parameters (nanoGPT count, position embeddings excluded)",
        choices.get("model", "custom"),
        num_params / 1e6,
    )
    log.info(
        "Batch: %d tokens per optimizer step = micro-batch %d x block %d x accumulation %d x %d device(s)",
        tokens_per_step,
        cfg.hw.micro_batch_size,
        model_config.block_size,
        accumulation,
        world_size,
    )
    log.info("Plan: %d optimizer steps = %.1fM tokens", max_steps, max_steps * tokens_per_step / 1e6)

    if cfg.ckpt_path is None:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # the starting val loss, logged at step 0
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    if trainer.global_step % cfg.val_every_steps:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # the run ended between evaluations

    final_val_loss = float(trainer.callback_metrics["val/loss"]) if "val/loss" in trainer.callback_metrics else None
    checkpoint = next((c for c in trainer.checkpoint_callbacks if c.last_model_path), None)
    log.info(
        "Finished %d steps. Final val loss: %s",
        trainer.global_step,
        f"{final_val_loss:.4f}" if final_val_loss is not None else "n/a",
    )
    if checkpoint is not None:
        log.info("Checkpoint: %s", checkpoint.last_model_path)
    log.info("Run folder: %s", run_dir)
    return final_val_loss


def cfg_choices() -> dict:
    """Which option of each config group this run uses (model=124m -> {'model': '124m'})."""
    from hydra.core.hydra_config import HydraConfig

    return dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}


def error_line(err: ConfigError) -> str:
    """The error's one line; raised in a DataLoader worker, it arrives inside the worker's traceback."""
    return str(err).strip().splitlines()[-1].split("ConfigError: ", 1)[-1]


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        return train(cfg)
    except ConfigError as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
