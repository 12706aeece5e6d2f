"""Which checkpoint a run resumes from, and whether this command may resume it.

choose_checkpoint picks it (ckpt_path=<file>, ckpt_path=last, resume=auto); may_resume compares
the checkpoint's settings with this command's, refusing in one line what cannot work and warning
in one line about every setting that differs; is_finished says there is nothing left to train.
What the command may change takes effect from the resumed step: ResumeSettings, a callback,
keeps the run's settings in every checkpoint for the next resume's comparison and makes the
learning rate follow this command's schedule.
"""

import logging
import os
from pathlib import Path

import lightning as L
import torch
from lightning_utilities.core.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from fineweb_gpt.errors import ConfigError
from fineweb_gpt.model_config import ARCHITECTURE_KEYS, resolved_model_settings
from fineweb_gpt.run.checkpoint_files import checkpoint_step, read_checkpoint, saved_checkpoints
from fineweb_gpt.run.evaluation_schedule import EVALUATION_PENDING
from fineweb_gpt.run.names import CHECKPOINTS
from fineweb_gpt.safe_files import regular_file

log = logging.getLogger("fineweb_gpt")


def choose_checkpoint(ckpt_path: str | None, resume: str | None, run_dir: str) -> str | None:
    """The checkpoint to resume from: ckpt_path=<file>, or for ckpt_path=last and resume=auto the run
    folder's loadable checkpoint of the highest step (a damaged newer one is named). When the folder
    holds checkpoints and none loads, refuse: starting again would throw the run away."""
    if resume not in (None, "auto"):
        raise ConfigError(f"resume={resume} is not known; use resume=auto, or ckpt_path=<file> or ckpt_path=last")
    if ckpt_path not in (None, "last"):
        path = regular_file(ckpt_path, "give a checkpoint file, or ckpt_path=last", name=f"ckpt_path={ckpt_path}")
        _, problem = checkpoint_step(path)
        if problem:
            raise ConfigError(f"checkpoint {path} cannot be loaded ({problem}); use another checkpoint")
        return str(path)
    if ckpt_path is None and resume != "auto":
        return None
    folder = Path(run_dir) / CHECKPOINTS
    loadable, damaged = saved_checkpoints(folder)
    asked = "ckpt_path=last" if ckpt_path == "last" else "resume=auto"
    if loadable:
        path = max(loadable, key=lambda p: (loadable[p], p))
        for other, problem in damaged.items():
            log.warning("Checkpoint %s cannot be loaded (%s); resuming from %s", other, problem, path)
        log.info("Resuming from %s (step %d)", path, loadable[path])
        return path
    if damaged:
        listed = "; ".join(f"{Path(p).name}: {why}" for p, why in list(damaged.items())[:3])
        more = f"; and {len(damaged) - 3} more" if len(damaged) > 3 else ""
        raise ConfigError(
            f"{asked} found checkpoints in {folder} but none loads ({listed}{more}); starting again would "
            "lose the run: restore a readable checkpoint, or move these away to start from scratch"
        )
    if ckpt_path == "last":
        raise ConfigError(
            f"ckpt_path=last found no loadable checkpoint in {folder}; point hydra.run.dir at the run folder to resume"
        )
    log.info("resume=auto: no checkpoint in %s yet, starting from scratch", folder)
    return None


def refuse_a_fresh_start_over_checkpoints(folder: Path) -> None:
    existing = sorted(p.name for p in folder.glob("*.ckpt"))
    if existing:
        raise ConfigError(
            f"{folder} already holds checkpoints ({', '.join(existing[:3])}); a new run here would overwrite them: "
            "add resume=auto to continue that run, or give another hydra.run.dir"
        )


# --- may this command resume that checkpoint? ---------------------------------------------------

# Resuming with another value of these cannot work: the weights or the optimizer state do not fit
# (model), or the restored optimizer keeps the checkpoint's value and ignores the command's (optim).
FIXED_OPTIM_KEYS = ("optimizer", "betas", "eps", "weight_decay", "muon_momentum")
# These say how to resume, not what the run is: every other setting that differs is warned about.
HOW_TO_RESUME = ("resume", "ckpt_path")


def run_settings(checkpoint: dict) -> dict:
    """The settings a checkpoint was trained with: the run config it carries (saved by ResumeSettings),
    with the model and optimizer from its hyper-parameters (checkpoints older than that carry only
    these; older still keep the optimizer's values beside model_config rather than under optim)."""
    settings = dict(checkpoint.get("run_config") or {})
    hparams = checkpoint.get("hyper_parameters") or {}
    if "model_config" in hparams:
        settings["model"] = resolved_model_settings(hparams["model_config"])
        flat = {k: v for k, v in hparams.items() if k not in ("model_config", "loss_guard", "optim")}
        settings["optim"] = {**settings.get("optim", {}), **(hparams.get("optim") or flat)}
    return settings


def command_settings(config: dict) -> dict:
    """This command's settings in the same shape, with the defaults the model fills in."""
    return {**config, "model": resolved_model_settings(config.get("model") or {})}


def setting(settings: dict, key: str):
    value = settings
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return list(value) if isinstance(value, (list, tuple)) else value


def leaf_keys(settings: dict, prefix: str = "") -> list[str]:
    """Every setting's dotted key (model.n_layer, callbacks.model_checkpoint.save_top_k, ...)."""
    keys = []
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            keys += leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def compare_with_checkpoint(old: dict, new: dict, checkpoint_path: str, step: int, derived=()) -> None:
    """Refuse, in one line, a resume that cannot work; warn, in one line, about every setting that
    differs from the checkpoint's run (all the run config it carries; only the model's and the
    optimizer's for checkpoints older than that). `derived`: keys that only repeat another
    (data.seed: ${seed}), not named twice."""
    # Optimizer keys this command's optimizer has (an adamw run has no muon_momentum to compare).
    fixed = [f"model.{k}" for k in ARCHITECTURE_KEYS] + [f"optim.{k}" for k in FIXED_OPTIM_KEYS]
    fixed = [key for key in fixed if not key.startswith("optim.") or setting(new, key) is not None]
    refused = [key for key in fixed if setting(old, key) is not None and setting(old, key) != setting(new, key)]
    if refused:
        differences = ", ".join(f"{k}={setting(new, k)} (the checkpoint has {setting(old, k)})" for k in refused)
        raise ConfigError(
            f"cannot resume {checkpoint_path} with {differences}: a checkpoint's weights and optimizer state fit only "
            "the model and optimizer they were trained with; resume with the checkpoint's values, or start a new run "
            "folder (another hydra.run.dir)"
        )
    keys = dict.fromkeys(leaf_keys(old) + leaf_keys(new))
    if "seed" not in old:  # the checkpoint carries no run config: only the model and the optimizer
        keys = [key for key in keys if key.startswith(("model.", "optim."))]
    changed = [
        key
        for key in keys
        if key not in derived
        and key.split(".")[0] not in HOW_TO_RESUME
        and not (key.startswith("optim.") and setting(new, key) is None)  # another optimizer's key
        and setting(old, key) != setting(new, key)
    ]
    if not changed:
        return
    note = ""
    if any((key.startswith("data.") and key != "data.num_workers") or key == "seed" for key in changed):
        note = (
            " The data position is the checkpoint's: with other data or another seed, documents of the current "
            "epoch may be skipped or seen twice."
        )
    log.warning(
        "Resuming %s at step %d with settings that differ from the checkpoint's: %s; from here on the run "
        "uses the new values.%s",
        checkpoint_path,
        step,
        ", ".join(f"{key} {setting(old, key)} -> {setting(new, key)}" for key in changed),
        note,
    )


def is_finished(checkpoint: dict, max_steps: int) -> bool:
    """A checkpoint of a run that reached max_steps and finished its last evaluation: resuming it
    trains nothing (a pending evaluation is run first: evaluation_schedule)."""
    return checkpoint["global_step"] >= max_steps and not checkpoint.get(EVALUATION_PENDING)


def compare_checkpoint_and_command(path: str, folder: Path, explicit: bool, new: dict, derived: set[str]) -> None:
    """Compare the checkpoint with this command. An explicit older checkpoint of this same folder
    would mix two runs' checkpoints (last.ckpt and the newest two)."""
    checkpoint = read_checkpoint(path)
    step = int(checkpoint["global_step"])
    if explicit and Path(path).resolve().parent == folder.resolve():
        newer = sorted(s for s in saved_checkpoints(folder)[0].values() if s > step)
        if newer:
            raise ConfigError(
                f"{folder} holds checkpoints newer than ckpt_path={path} (step {newer[-1]} > {step}): going on from an "
                "older one here would mix two runs; to branch from it, give another hydra.run.dir"
            )
    compare_with_checkpoint(run_settings(checkpoint), command_settings(new), path, step, derived)


def may_resume(cfg: DictConfig, path: str) -> None:
    """Refuse, in one line, resuming `path` with this command where it cannot work; warn about
    what changes the run. Keys that only repeat another (data.seed: ${seed}) are named once."""
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation that cannot be resolved: plan.check_config names it
        config = OmegaConf.to_container(cfg)
    derived = set(interpolated_keys(OmegaConf.to_container(cfg, resolve=False)))
    explicit = cfg.ckpt_path not in (None, "last")
    compare_checkpoint_and_command(path, Path(cfg.run_dir) / CHECKPOINTS, explicit, config, derived)


def interpolated_keys(settings: dict, prefix: str = "") -> list[str]:
    """The keys whose value this command takes from another (${seed}, ${run_dir}/checkpoints)."""
    keys = []
    for key, value in settings.items():
        if isinstance(value, dict):
            keys += interpolated_keys(value, f"{prefix}{key}.")
        elif isinstance(value, str) and "${" in value:
            keys.append(f"{prefix}{key}")
    return keys


def is_first_process() -> bool:
    """Global rank 0: Lightning's DDP processes and SLURM tasks carry their rank in the environment."""
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0)))
    return getattr(rank_zero_only, "rank", 0) == 0 and node == 0


# --- from the resumed step on ------------------------------------------------------------------


class ResumeSettings(L.Callback):
    """Puts the run's settings in every checkpoint it saves, for the next resume's comparison; on
    resume, the learning-rate schedule follows this command (apply_command_schedule)."""

    def __init__(self, config: dict):
        self.config = config

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["run_config"] = self.config

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # The schedule's base rates come from this command (optim.lr), not the checkpoint.
        for state in checkpoint.get("lr_schedulers", []):
            state.pop("base_lrs", None)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        apply_command_schedule(trainer)


def apply_command_schedule(trainer: L.Trainer) -> None:
    """A resumed run's learning rate follows this command's optim.lr, min_lr and warmup_steps from
    the resumed step. Lightning would restore the schedule's base rates from the checkpoint
    (ResumeSettings.on_load_checkpoint drops them) and the optimizer's current rates, which the
    first resumed step uses: set those from the schedule, which gives the checkpoint's own rates
    when nothing changed."""
    for config in trainer.lr_scheduler_configs:
        schedule = config.scheduler
        if isinstance(schedule, torch.optim.lr_scheduler.LambdaLR):
            for group, base, factor in zip(schedule.optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas):
                group["lr"] = base * factor(schedule.last_epoch)
