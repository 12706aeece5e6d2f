"""The run plan, worked out from the config before anything is built: the checks that refuse a
config that cannot work (each key's type and range: config_schema), the batch (gradient
accumulation from tokens per step), the run length and warmup, the precision and the GPU's
peak FLOPS, and what the Trainer is given besides trainer.*. Its result is the run summary's
static part."""

import logging
import math
import os
import re
import shutil
from dataclasses import fields, replace

import torch
from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fineweb_gpt.config_schema import check_values, typed
from fineweb_gpt.data.settings import check_data_config
from fineweb_gpt.doctor.memory import training_memory
from fineweb_gpt.errors import ConfigError, OutOfMemory
from fineweb_gpt.evals.in_training import hellaswag_interval
from fineweb_gpt.flops import chinchilla_tokens, gpu_for_device, human_count, model_flops_per_token, parameter_count
from fineweb_gpt.model import GPTConfig
from fineweb_gpt.time_estimate import evaluation_plan
from fineweb_gpt.tokenizer import GPT2_VOCAB_SIZE, PADDED_VOCAB_SIZE

log = logging.getLogger("fineweb_gpt")
LIGHTNING_FSDP = "lightning.pytorch.strategies.FSDPStrategy"


# --- checks -------------------------------------------------------------------------------


def check_config(cfg: DictConfig, hw_name: str, data_name: str | None = None) -> None:
    """Refuse a run that cannot work before any data is read."""
    try:  # every ${...} of the config, before anything uses one
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        # The message's first line, without the name of the error a resolver raised (oc.env's KeyError).
        reason = str(getattr(err, "msg", None) or err).split("\n")[0]
        reason = re.sub(r'^\w+ raised while resolving interpolation: "?(.*?)"?$', r"\1", reason)
        raise ConfigError(f"{getattr(err, 'full_key', None) or 'the config'} cannot be resolved: {reason}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"{missing[0]} has no value; set it on the command line, e.g. {missing[0]}=/data/fineweb/000_00000.parquet"
        )
    check_values(cfg)
    check_data_config(cfg.data, cfg.hw.micro_batch_size, data_name)
    model_config(cfg.model)
    if cfg.hw.requires_cuda and not torch.cuda.is_available():
        raise ConfigError(f"hw={hw_name} needs a CUDA GPU and this machine has none; use hw=cpu (or hw=auto)")
    accelerator = cfg.trainer.accelerator
    kinds = ("cuda", "mps") if accelerator == "gpu" else () if accelerator == "auto" else (accelerator,)
    if kinds and not any(AcceleratorRegistry[kind]["accelerator"].is_available() for kind in kinds):
        raise ConfigError(
            f"trainer.accelerator={accelerator} is not available on this machine; "
            "use hw=cpu (or trainer.accelerator=auto)"
        )
    devices = str(cfg.trainer.devices).strip()
    if on_cpu(accelerator) and devices != "auto" and not (devices.isdigit() and int(devices) >= 1):
        # Lightning's CPU accelerator takes a number of processes only.
        raise ConfigError(
            f"trainer.devices={typed(cfg.trainer.devices)} is for GPUs (their ids, or -1: all of them); "
            "on the CPU give a number of processes, e.g. trainer.devices=2 (with trainer=ddp), or auto"
        )
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
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(
            f"optim.min_lr={cfg.optim.min_lr:g} is above optim.lr={cfg.optim.lr:g}: the cosine decay would rise; "
            "lower optim.min_lr (equal to optim.lr: a constant rate)"
        )
    if cfg.trainer.get("barebones"):
        raise ConfigError(
            "trainer.barebones=true turns off the logging and checkpoints a fineweb_gpt run is made of; "
            "time the bare loop with benchmarks/train_throughput.py instead"
        )
    if on_cpu(cfg.trainer.accelerator) and cfg.trainer.precision in ("16-mixed", "16", 16):
        # Lightning would train in bf16-mixed instead, while the run summary said fp16.
        raise ConfigError(
            f"trainer.precision={cfg.trainer.precision} (fp16 autocast) needs a CUDA GPU; on the CPU use "
            "trainer.precision=bf16-mixed or 32-true"
        )


def model_config(model: DictConfig) -> GPTConfig:
    """The model's config; GPTConfig checks its shape (one line naming the key)."""
    known = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(model) - known)
    if unknown:
        raise ConfigError(f"model.{unknown[0]} is not a model setting; the model has {', '.join(sorted(known))}")
    return GPTConfig(**model)


def on_cpu(accelerator: str) -> bool:
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


# --- the batch ----------------------------------------------------------------------------


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


def world_size_of(trainer: DictConfig) -> int:
    """Processes of the whole run: devices per node x nodes."""
    world_size = count_devices(trainer.devices, trainer.accelerator) * trainer.num_nodes
    check_fsdp(trainer.strategy, trainer.accelerator, world_size)
    return world_size


def gradient_accumulation(total_batch_tokens: int, micro_batch_size: int, block_size: int, world_size: int) -> int:
    """Micro-batches per optimizer step so that each step sees exactly total_batch_tokens."""
    tokens_per_micro_step = micro_batch_size * block_size * world_size
    if total_batch_tokens <= 0 or total_batch_tokens % tokens_per_micro_step:
        multiple = max(1, round(total_batch_tokens / tokens_per_micro_step)) * tokens_per_micro_step
        raise ConfigError(
            f"total_batch_tokens={total_batch_tokens} is not a multiple of hw.micro_batch_size x data.block_size x "
            f"world size (trainer.devices x trainer.num_nodes) = {micro_batch_size} x {block_size} x {world_size} = "
            f"{tokens_per_micro_step}; use total_batch_tokens={multiple} or change hw.micro_batch_size"
        )
    return total_batch_tokens // tokens_per_micro_step


def is_fsdp(strategy) -> bool:
    return "fsdp" in (strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy)).lower()


def check_fsdp(strategy, accelerator: str, world_size: int) -> None:
    """trainer=fsdp needs CUDA GPUs and at least two processes to shard across."""
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy)
    if not is_fsdp(strategy):
        return
    if (target == LIGHTNING_FSDP or target.startswith("fsdp")) and on_cpu(accelerator):
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


def out_of_memory_error(plan: dict, block_size: int) -> OutOfMemory:
    """The one-line advice for a CUDA out-of-memory error: the largest smaller micro-batch that
    still divides the tokens per step (accumulation grows to match)."""
    tokens, micro, ranks = plan["tokens_per_step"], plan["micro_batch_size"], plan["world_size"]
    smaller = next((m for m in range(micro - 1, 0, -1) if tokens % (m * block_size * ranks) == 0), None)
    advice = (
        f"use hw.micro_batch_size={smaller} (gradient accumulation becomes "
        f"{tokens // (smaller * block_size * ranks)}, still {tokens} tokens per step)"
        if smaller
        else "use a smaller model.block_size or model"
    )
    return OutOfMemory(
        f"CUDA out of memory at hw.micro_batch_size={micro} (block {block_size}, "
        f"{human_count(plan['num_params'])} parameters); {advice}"
    )


# --- the run ------------------------------------------------------------------------------


def planned_steps(max_steps: int | None, max_tokens: int | None, total_batch_tokens: int, num_params: int) -> int:
    """trainer.max_steps if given, else max_tokens (default: Chinchilla-optimal) in steps."""
    if max_steps is not None and max_steps > 0:
        return int(max_steps)
    return max(1, math.ceil((max_tokens or chinchilla_tokens(num_params)) / total_batch_tokens))


def fitted_warmup(warmup_steps: int, max_steps: int) -> int:
    """optim.warmup_steps, or a tenth of the run when the warmup would not end before the run
    does (trainer.max_steps=1 as a smoke test), said in one warning line."""
    if warmup_steps < max_steps:
        return warmup_steps
    fitted = max_steps // 10
    log.warning(
        "optim.warmup_steps=%d does not fit in the run's %d step(s): warming up over %d instead (a tenth of the "
        "run); set optim.warmup_steps below %d to choose",
        warmup_steps,
        max_steps,
        fitted,
        max_steps,
    )
    return fitted


def compiling_works(accelerator: str) -> bool:
    """Whether torch.compile can build kernels here; if not, one warning, and the run trains
    uncompiled (hw.compile=true is the default of GPU profiles, and a GPU without Triton, on
    Windows say, or a machine without a C++ compiler, would otherwise fail at the first step)."""
    if on_cpu(accelerator):
        found = any(shutil.which(name) for name in (os.environ.get("CXX", "g++"), "c++", "clang++"))
        missing = None if found else "there is no C++ compiler (g++ or clang++), which it needs on the CPU"
    else:
        from torch.utils._triton import has_triton

        missing = None if has_triton() else "Triton is not installed (pip install triton; on Windows: triton-windows)"
    if missing:
        log.warning(
            "hw.compile=true, but %s: training uncompiled, which needs more memory (a profile's micro-batch is "
            "sized for compiled training: halve hw.micro_batch_size if it runs out); set hw.compile=false to say so",
            missing,
        )
    return missing is None


def resolve_precision(precision: str, accelerator: str) -> str:
    """'auto' means bf16 on GPUs that have it, fp16 on older GPUs, fp32 on the CPU."""
    if precision != "auto":
        return precision
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def peak_flops(hw: DictConfig, hw_name: str) -> float | None:
    """hw.peak_flops, or the GPU table's value for this machine's GPU; warns when they disagree."""
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() and hw.accelerator != "cpu" else None
    gpu = gpu_for_device(device_name) if device_name else None
    configured, detected = hw.peak_flops, gpu.peak_flops if gpu else None
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


def plan_run(cfg: DictConfig, choices: dict) -> dict:
    """Check the config, then work out the run: what train.py builds from and the summary reports."""
    check_config(cfg, choices.get("hw", "custom"), choices.get("data"))
    world_size = world_size_of(cfg.trainer)
    accumulation = gradient_accumulation(
        cfg.total_batch_tokens, cfg.hw.micro_batch_size, cfg.data.block_size, world_size
    )
    config = model_config(cfg.model)
    check_memory(config, cfg.hw.micro_batch_size, cfg.data.block_size, bool(cfg.hw.compile), cfg.trainer.accelerator)
    return run_plan(cfg, config, parameter_count(config), choices, world_size, accumulation)


def check_memory(config: GPTConfig, micro_batch: int, block_size: int, compiled: bool, accelerator: str) -> None:
    """Refuse a micro-batch that the memory plan (doctor/memory.py) puts at more than twice the
    device's memory (the GPU's, or on the CPU the machine's): it could never run, and on the CPU it
    would take memory until the machine gives out. Closer calls are left to a real out-of-memory."""
    need = training_memory(replace(config, block_size=block_size), micro_batch, compiled)
    if torch.cuda.is_available() and not on_cpu(accelerator):
        have, device = torch.cuda.get_device_properties(0).total_memory / 2**30, "this GPU's memory"
    else:
        have, device = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, "this machine's memory"
    if need.gib > 2 * have:
        sizes = f"model.n_layer={config.n_layer}, model.n_embd={config.n_embd}, model.vocab_size={config.vocab_size}"
        raise ConfigError(
            f"a training step needs about {need.describe()} at hw.micro_batch_size={micro_batch} ({sizes}, "
            f"data.block_size={block_size}), more than twice {device} ({have:.0f} GiB); lower hw.micro_batch_size "
            "or the model (fineweb-gpt-doctor --plan gives a micro-batch that fits)"
        )


def run_plan(
    cfg: DictConfig, model_config: GPTConfig, num_params: int, choices: dict, world_size: int, grad_accum: int
) -> dict:
    """The static facts of a run that its summary reports (run_summary.json's keys, less the data's)."""
    hw_name = choices.get("hw", "custom")
    block_size, micro_batch_size = cfg.data.block_size, cfg.hw.micro_batch_size
    tokens_per_step = micro_batch_size * block_size * grad_accum * world_size
    max_steps = planned_steps(cfg.trainer.max_steps, cfg.max_tokens, cfg.total_batch_tokens, num_params)
    return {
        "model_name": choices.get("model", "custom"),
        "num_params": num_params,
        **model_config.to_dict(),
        "hw_name": hw_name,
        "peak_flops": peak_flops(cfg.hw, hw_name),
        "precision": resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator),
        "compile": bool(cfg.hw.compile) and compiling_works(cfg.trainer.accelerator),
        "micro_batch_size": micro_batch_size,
        "grad_accum": grad_accum,
        "world_size": world_size,
        "tokens_per_step": tokens_per_step,
        "max_steps": max_steps,
        "planned_tokens": max_steps * tokens_per_step,
        "chinchilla_tokens": chinchilla_tokens(num_params),
        **{key: cfg.optim[key] for key in ("lr", "min_lr", "weight_decay")},
        "warmup_steps": fitted_warmup(cfg.optim.warmup_steps, max_steps),
        "val_every_steps": cfg.val_every_steps,
        "hellaswag_every_steps": hellaswag_interval(
            OmegaConf.select(cfg, "eval.hellaswag_every_steps"),
            num_params,
            on_gpu=not on_cpu(cfg.trainer.accelerator),
            sharded=is_fsdp(cfg.trainer.strategy),
        ),
        "data_name": choices.get("data", "custom"),
        **evaluation_plan(cfg, choices.get("data"), max_steps, tokens_per_step, on_cpu(cfg.trainer.accelerator)),
        "flops_per_token": model_flops_per_token(model_config, block_size),
    }


# --- what the Trainer is given besides trainer.* -------------------------------------------


def trainer_arguments(cfg: DictConfig, plan: dict, resuming: bool, callbacks: list) -> dict:
    """The Trainer arguments fineweb_gpt works out: the derived ones (check_config refuses them set
    by hand), and callbacks that agree with trainer.enable_progress_bar and enable_checkpointing
    as set: false drops the progress bar or checkpoints; a progress bar from the callbacks group
    replaces fineweb_gpt's; no checkpoint callback (callbacks.model_checkpoint=null) means none."""
    trainer = cfg.trainer
    bars = [c for c in callbacks if isinstance(c, ProgressBar)]
    unwanted = bars if trainer.enable_progress_bar is False else bars[:-1]
    if trainer.enable_checkpointing is False:
        unwanted += [c for c in callbacks if isinstance(c, ModelCheckpoint)]
    callbacks = [c for c in callbacks if not any(c is u for u in unwanted)]
    checkpointing = trainer.enable_checkpointing
    if checkpointing is None:
        checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    sanity = trainer.num_sanity_val_steps
    return {
        "precision": plan["precision"],
        "max_steps": plan["max_steps"],
        "accumulate_grad_batches": plan["grad_accum"],
        "val_check_interval": cfg.val_every_steps * plan["grad_accum"],
        # A fresh run is scored before its first step, a resumed one where it left off.
        "num_sanity_val_steps": sanity if sanity is not None else 0 if resuming else -1,
        "enable_checkpointing": checkpointing,
        "callbacks": callbacks,
    }
