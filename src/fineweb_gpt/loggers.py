"""The loggers a run writes to: CSV (kept across resumes), Weights & Biases (never waits for a login)."""

import csv
import logging
import os

from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig

log = logging.getLogger("fineweb_gpt")


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Lightning deletes the metrics file of a reused folder; continue it under its header instead.
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])


class AppendingCSVLogger(CSVLogger):
    """CSVLogger that keeps a resumed run's earlier rows: metrics.csv grows instead of restarting."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def wandb_settings(node: DictConfig, run_dir: str, resume_run_id: str | None, sweep: tuple[str, str] | None) -> dict:
    """Arguments for WandbLogger beyond its config: offline without a login, the resumed run's id,
    and, in a sweep, one W&B run per sweep point grouped by the sweep (sweep = (group, name))."""
    import wandb

    extra = {}
    offline = node.offline or os.environ.get("WANDB_MODE") in ("offline", "dryrun")
    if not offline and not wandb.login(prompt=False, verify=False):
        log.warning("No W&B login found: logging offline; upload later with `wandb sync %s/wandb`", run_dir)
        offline = True
    if offline:  # as an argument: wandb's settings may have been read before WANDB_MODE is set
        extra.update(offline=True, mode="offline")
    if resume_run_id:
        extra["id"] = resume_run_id
    if sweep:
        group, name = sweep
        extra.setdefault("group", node.group or group)
        extra.setdefault("name", node.name or name)
    return extra


def build_loggers(logger_config: DictConfig | None, run_dir: str, resume_run_id: str | None, sweep=None) -> list:
    """The Lightning loggers of the `logger` config group (csv, wandb or both)."""
    loggers = []
    for node in (logger_config or {}).values():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue  # plain settings such as logger.offline
        extra = wandb_settings(node, run_dir, resume_run_id, sweep) if node._target_.endswith("WandbLogger") else {}
        loggers.append(instantiate(node, **extra))
    return loggers


def wandb_run_id(checkpoint: dict | None) -> str | None:
    """The W&B run a checkpoint was logging to, so a resumed run continues it."""
    return (checkpoint or {}).get("wandb_run_id")


def finish_wandb_run(trainer) -> None:
    """Close this job's W&B run: the next job of a sweep in this process starts its own."""
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger" and trainer.is_global_zero:
            logger.experiment.finish()
