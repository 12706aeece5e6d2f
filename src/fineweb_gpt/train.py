"""python -m fineweb_gpt.train: compose the config, build the run, train, report.

Config flows one way: YAML -> Hydra -> instantiate -> objects. This is the only module
that reads the whole config; everything below it receives plain arguments.
"""

import json
import logging
import math
import os
import re
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, ListConfig, OmegaConf

from fineweb_gpt.callbacks import RunMonitor, StepProgressBar
from fineweb_gpt.config_files import config_dir
from fineweb_gpt.data.settings import check_data_config
from fineweb_gpt.errors import ConfigError
from fineweb_gpt.flops import chinchilla_tokens, flops_per_token, gpu_for_device, human_count
from fineweb_gpt.lit_module import GPTLightningModule
from fineweb_gpt.model import GPT2_VOCAB_SIZE, PADDED_VOCAB_SIZE, GPTConfig

log = logging.getLogger("fineweb_gpt")


class RunStopped(Exception):
    """SIGTERM or SIGUSR1 stopped the run after it saved; the message says how to resume it."""


# Every DDP process runs this script; only the first one reports.
log.addFilter(lambda record: rank_zero_only.rank == 0)


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
            f"total_batch_tokens={total_batch_tokens} is not a multiple of hw.micro_batch_size x data.block_size x "
            f"world size = {micro_batch_size} x {block_size} x {world_size} = {tokens_per_micro_step}; "
            f"use total_batch_tokens={multiple} or change hw.micro_batch_size"
        )
    return total_batch_tokens // tokens_per_micro_step


LIGHTNING_FSDP = "lightning.pytorch.strategies.FSDPStrategy"


def check_fsdp(strategy, accelerator: str, world_size: int) -> None:
    """trainer=fsdp needs CUDA GPUs and at least two processes to shard across."""
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy)
    if "fsdp" not in target.lower():
        return
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if (target == LIGHTNING_FSDP or target.startswith("fsdp")) and on_cpu:
        raise ConfigError(
            "trainer=fsdp shards the model across CUDA GPUs and this run is on the CPU; "
            "use trainer=ddp trainer.devices=2 for several CPU processes"
        )
    if world_size < 2:
        # One process has nothing to shard, and torch's FSDP then (NO_SHARD) fails in bf16 on
        # the tied embedding: "attempting to assign a gradient with dtype BFloat16 ...".
        raise ConfigError(
            "trainer=fsdp with 1 process has nothing to shard; use trainer=default on one GPU, "
            "or trainer.devices=2 (or more) to shard across GPUs"
        )


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
    for key in ("val_every_steps", "total_batch_tokens", "max_tokens"):
        value = OmegaConf.select(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{key}={value} must be positive")
    max_steps = cfg.trainer.max_steps
    if max_steps is not None and (max_steps == 0 or max_steps < -1):
        raise ConfigError(f"trainer.max_steps={max_steps} must be positive (or -1: run length from max_tokens)")
    check_data_config(cfg.data, cfg.hw.micro_batch_size)
    if cfg.data.block_size > cfg.model.block_size:
        raise ConfigError(
            f"data.block_size={cfg.data.block_size} is longer than the model's context, model.block_size="
            f"{cfg.model.block_size}; lower data.block_size or raise model.block_size"
        )
    if cfg.model.vocab_size < GPT2_VOCAB_SIZE:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is below the GPT-2 tokenizer's {GPT2_VOCAB_SIZE} ids; "
            f"use model.vocab_size={PADDED_VOCAB_SIZE} (padded to a multiple of 64)"
        )
    if cfg.resume not in (None, "auto"):
        raise ConfigError(f"resume={cfg.resume} is not known; use resume=auto, or ckpt_path=<file> or ckpt_path=last")


def checkpoint_is_readable(path: Path) -> str | None:
    """None if the checkpoint loads, else why not (a truncated file, a wrong format)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if "state_dict" not in checkpoint or "global_step" not in checkpoint:
            return "not a training checkpoint"
    except Exception as err:  # every way a file can be damaged
        return " ".join(str(err).split())[:200]
    return None


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from: ckpt_path=<file>, or the run folder's newest good one for
    ckpt_path=last and resume=auto; a damaged file is named and the one before it used."""
    if cfg.ckpt_path not in (None, "last"):
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise ConfigError(f"ckpt_path={path} does not exist; give a checkpoint file, or ckpt_path=last")
        problem = checkpoint_is_readable(path)
        if problem:
            raise ConfigError(f"checkpoint {path} cannot be loaded ({problem}); use another checkpoint")
        return str(path)
    if cfg.ckpt_path is None and cfg.resume != "auto":
        return None
    folder = Path(cfg.run_dir) / "checkpoints"
    candidates = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime if p.exists() else 0, reverse=True)
    seen = set()
    for path in candidates:
        if not path.exists() or path.resolve() in seen:
            continue  # a dangling link, or last.ckpt and the file it points to
        seen.add(path.resolve())
        problem = checkpoint_is_readable(path)
        if problem is None:
            log.info("Resuming from %s", path)
            return str(path)
        log.warning("Checkpoint %s cannot be loaded (%s); trying the one before it", path, problem)
    if cfg.ckpt_path == "last":
        raise ConfigError(
            f"ckpt_path=last found no loadable checkpoint in {folder}; point hydra.run.dir at the run folder to resume"
        )
    log.info("resume=auto: no checkpoint in %s yet, starting from scratch", folder)
    return None


def smaller_micro_batch(total_batch_tokens: int, micro_batch_size: int, block_size: int, world_size: int) -> int | None:
    """The largest micro-batch below this one that still divides the tokens per step."""
    for candidate in range(micro_batch_size - 1, 0, -1):
        if total_batch_tokens % (candidate * block_size * world_size) == 0:
            return candidate
    return None


def planned_steps(cfg: DictConfig, num_params: int) -> int:
    """trainer.max_steps if given, else max_tokens (default: Chinchilla-optimal) in steps."""
    if cfg.trainer.max_steps is not None and cfg.trainer.max_steps > 0:
        return int(cfg.trainer.max_steps)
    max_tokens = cfg.max_tokens or chinchilla_tokens(num_params)
    return max(1, math.ceil(max_tokens / cfg.total_batch_tokens))


def peak_flops(cfg: DictConfig, hw_name: str) -> float | None:
    """hw.peak_flops, or the table's value for this machine's GPU; warns when they disagree."""
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() and cfg.hw.accelerator != "cpu" else None
    gpu = gpu_for_device(device_name) if device_name else None
    detected = gpu.peak_flops if gpu else None
    configured = cfg.hw.peak_flops
    if configured and detected and abs(configured - detected) > 0.05 * detected:
        log.warning(
            "hw=%s says %.1f TFLOPS but this GPU is a %s (%.1f TFLOPS): MFU will be measured against the "
            "profile's number; pick the matching hw profile or set hw.peak_flops",
            hw_name,
            configured / 1e12,
            device_name,
            detected / 1e12,
        )
    return configured or detected


def wandb_run_id(ckpt_path: str | None) -> str | None:
    """The W&B run a checkpoint was logging to, so a resumed run continues it."""
    if not ckpt_path or not Path(ckpt_path).is_file():
        return None
    return torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True).get("wandb_run_id")


def build_loggers(cfg: DictConfig, resume_run_id: str | None) -> list:
    loggers = []
    for node in (cfg.get("logger") or {}).values():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue  # plain settings such as logger.offline
        extra = {}
        if node._target_.endswith("WandbLogger"):
            import wandb

            # Never wait for a login: without one, log offline and say how to upload later.
            offline = node.offline or os.environ.get("WANDB_MODE") in ("offline", "dryrun")
            if not offline and not wandb.login(prompt=False, verify=False):
                log.warning("No W&B login found: logging offline; upload later with `wandb sync %s/wandb`", cfg.run_dir)
                offline = True
            if offline:  # as an argument: wandb's settings may have been read before WANDB_MODE is set
                extra.update(offline=True, mode="offline")
            if resume_run_id:
                extra["id"] = resume_run_id
            if in_multirun():  # one W&B run per sweep point, grouped by the sweep
                from hydra.core.hydra_config import HydraConfig

                job = HydraConfig.get()
                extra.setdefault("group", node.group or job.sweep.dir)
                extra.setdefault("name", node.name or job.job.override_dirname or str(job.job.num))
        loggers.append(build(node, **extra))
    return loggers


def run_plan(
    *,
    model_name: str,
    model_config: GPTConfig,
    num_params: int,
    block_size: int,
    hw_name: str,
    peak_flops: float | None,
    precision: str,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    max_steps: int,
    optim: dict,
    val_every_steps: int,
) -> dict:
    """The static facts of a run that its summary reports (run_summary.json's keys, less the data's)."""
    tokens_per_step = micro_batch_size * block_size * grad_accum * world_size
    return {
        "model_name": model_name,
        "num_params": num_params,
        **model_config.to_dict(),
        "hw_name": hw_name,
        "peak_flops": peak_flops,
        "precision": precision,
        "micro_batch_size": micro_batch_size,
        "grad_accum": grad_accum,
        "world_size": world_size,
        "tokens_per_step": tokens_per_step,
        "max_steps": max_steps,
        "planned_tokens": max_steps * tokens_per_step,
        "chinchilla_tokens": chinchilla_tokens(num_params),
        **{key: optim[key] for key in ("lr", "min_lr", "warmup_steps", "weight_decay")},
        "val_every_steps": val_every_steps,
        "flops_per_token": flops_per_token(
            num_params, model_config.n_layer, model_config.n_head, model_config.n_embd, block_size
        ),
    }


def finish_wandb_run(trainer: L.Trainer) -> None:
    """Close this job's W&B run: the next job of a sweep in this process starts its own."""
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger" and trainer.is_global_zero:
            logger.experiment.finish()


def train(cfg: DictConfig) -> float | None:
    """Run one training job; returns the final validation loss (for sweepers). Raises RunStopped
    when a signal stopped it part way."""
    choices = cfg_choices()
    hw_name = choices.get("hw", "custom")
    check_config(cfg, hw_name)
    L.seed_everything(cfg.seed, workers=True)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls left on Ampere and newer

    model_config = GPTConfig(**cfg.model)
    block_size = cfg.data.block_size  # the training sequence length: the model's context, or shorter
    world_size = count_devices(cfg.trainer.devices, cfg.trainer.accelerator) * cfg.trainer.num_nodes
    check_fsdp(cfg.trainer.strategy, cfg.trainer.accelerator, world_size)
    accumulation = gradient_accumulation(cfg.total_batch_tokens, cfg.hw.micro_batch_size, block_size, world_size)
    ckpt_path = resume_checkpoint(cfg)

    optim = OmegaConf.to_container(cfg.optim)
    module = GPTLightningModule(
        model_config=model_config.to_dict(),
        **optim,
        spike_factor=cfg.loss_guard.spike_factor,
        spike_action=cfg.loss_guard.action,
        compile_model=cfg.hw.compile,
        compile_tuning=cfg.hw.get("compile_tuning", False),
    )
    num_params = module.model.num_params()
    max_steps = planned_steps(cfg, num_params)
    if cfg.optim.warmup_steps >= max_steps:
        raise ConfigError(
            f"optim.warmup_steps={cfg.optim.warmup_steps} is not below the run's {max_steps} steps; lower it"
        )
    precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    plan = run_plan(
        model_name=choices.get("model", "custom"),
        model_config=model_config,
        num_params=num_params,
        block_size=block_size,
        hw_name=hw_name,
        peak_flops=peak_flops(cfg, hw_name),
        precision=precision,
        micro_batch_size=cfg.hw.micro_batch_size,
        grad_accum=accumulation,
        world_size=world_size,
        max_steps=max_steps,
        optim=optim,
        val_every_steps=cfg.val_every_steps,
    )

    monitor = RunMonitor(plan, run_dir=cfg.run_dir, log_every_n_steps=cfg.trainer.log_every_n_steps or 1)
    callbacks = [monitor, StepProgressBar()] + [build(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = build_loggers(cfg, wandb_run_id(ckpt_path))
    trainer: L.Trainer = build(
        cfg.trainer,
        precision=precision,
        max_steps=max_steps,
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

    datamodule = build(cfg.data, micro_batch_size=cfg.hw.micro_batch_size)

    try:
        # One fit, evaluating at step 0, every val_every_steps and at the last step (see RunMonitor).
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        stopped_by = trainer.checkpoint_callback.stopped_by_signal if trainer.checkpoint_callback else None
        if stopped_by:
            raise RunStopped(
                f"Stopped by {stopped_by} at step {trainer.global_step} of {trainer.max_steps} and saved "
                f"{trainer.checkpoint_callback.last_model_path}; resume with resume=auto hydra.run.dir={cfg.run_dir}"
            )
    except torch.cuda.OutOfMemoryError as err:
        smaller = smaller_micro_batch(cfg.total_batch_tokens, cfg.hw.micro_batch_size, block_size, world_size)
        advice = (
            f"use hw.micro_batch_size={smaller} (gradient accumulation becomes "
            f"{cfg.total_batch_tokens // (smaller * block_size * world_size)}, still {cfg.total_batch_tokens} "
            "tokens per step)"
            if smaller
            else "use a smaller model.block_size or model"
        )
        raise ConfigError(
            f"CUDA out of memory at hw.micro_batch_size={cfg.hw.micro_batch_size} (block {block_size}, "
            f"{human_count(num_params)} parameters); {advice}"
        ) from err
    finally:
        finish_wandb_run(trainer)

    final_val_loss = float(trainer.callback_metrics["val/loss"]) if "val/loss" in trainer.callback_metrics else None
    checkpoint = next((c for c in trainer.checkpoint_callbacks if c.last_model_path), None)
    log.info(
        "Finished %d steps, %s tokens. Final val loss: %s",
        trainer.global_step,
        human_count(monitor.tokens_seen),
        f"{final_val_loss:.4f}" if final_val_loss is not None else "n/a",
    )
    if checkpoint is not None:
        log.info("Checkpoint: %s", checkpoint.last_model_path)
    log.info("Run folder: %s", cfg.run_dir)
    return final_val_loss


def cfg_choices() -> dict:
    """Which option of each config group this run uses (model=124m -> {'model': '124m'})."""
    from hydra.core.hydra_config import HydraConfig

    return dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}


def error_line(err: ConfigError) -> str:
    """The error's one line; raised in a DataLoader worker, it arrives inside the worker's traceback."""
    return str(err).strip().splitlines()[-1].split("ConfigError: ", 1)[-1]


def check_group_options(argv: list[str]) -> None:
    """An unknown option of a config group (hw=rtx5090) gets one line instead of Hydra's listing."""
    if any(arg.startswith(("--config-dir", "-cd", "hydra.searchpath")) for arg in argv):
        return  # other config folders may add options
    for arg in argv:
        match = re.fullmatch(r"([a-z_]+)=(.+)", arg)  # group=option; sweeps and lists too
        if not match or not (config_dir() / match.group(1)).is_dir():
            continue
        group = match.group(1)
        known = sorted(path.stem for path in (config_dir() / group).glob("*.yaml"))
        for option in match.group(2).strip("[]").split(","):
            if option.strip() not in known + ["null"]:
                raise ConfigError(f"{group}={option.strip()} is not a {group} option; choose one of {', '.join(known)}")


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def write_result(run_dir: str, status: str, **details) -> None:
    """result.json in the run folder: how the run ended, for the sweep table."""
    if rank_zero_only.rank == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "result.json").write_text(json.dumps({"status": status, **details}) + "\n")


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """One run; in a sweep, a failed run is reported and the sweep goes on (its value is NaN,
    which optimising sweepers count as a failed trial)."""
    try:
        final_val_loss = train(cfg)
        write_result(cfg.run_dir, "completed", final_val_loss=final_val_loss)
        return final_val_loss
    except RunStopped as stop:
        # Not finished, yet not a failure: a single run exits 0, so that a requeued job can
        # resume; in a sweep its value is NaN, as a failed run's is.
        log.info("%s", stop)
        write_result(cfg.run_dir, "stopped", error=str(stop))
        if not in_multirun():
            return None
    except ConfigError as err:
        write_result(cfg.run_dir, "failed", error=error_line(err))
        if not in_multirun():
            print(f"error: {error_line(err)}", file=sys.stderr)
            sys.exit(2)
        log.error("This run failed: %s", error_line(err))
    except Exception as err:
        if not in_multirun():
            raise
        write_result(cfg.run_dir, "failed", error=f"{type(err).__name__}: {' '.join(str(err).split())[:300]}")
        log.exception("This run failed; the sweep goes on")
    return float("nan")


def cli() -> None:
    try:
        check_group_options(sys.argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
