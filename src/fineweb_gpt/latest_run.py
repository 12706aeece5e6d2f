"""Which run folders a command leaves behind: `outputs/latest` names the newest run in outputs/
that trained, and a run refused before training leaves no folder.

Hydra makes the run folder, and writes .hydra/ and the log into it, before the task function
runs; whether the folder is new is noted just before that (NoteNewRunFolder, a Hydra callback
in train.yaml). A folder that existed before the command (`resume=auto hydra.run.dir=<old
run>`) is never removed, whatever happens.
"""

import logging
import os
import shutil
import threading
from pathlib import Path

import lightning as L
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from fineweb_gpt.config_files import in_multirun
from fineweb_gpt.errors import ConfigError, exit_with, one_line
from fineweb_gpt.resume import write_hydra_record
from fineweb_gpt.run_folder import write_result

log = logging.getLogger("fineweb_gpt")

made_by_this_command: dict[str, list[Path]] = {}  # run folder -> the folders Hydra makes for it, innermost first
trained: set[str] = set()  # run folders this process started training in


class NoteNewRunFolder(Callback):
    """Hydra callback: notes, before Hydra makes it, whether a single run's folder is new."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig

        try:
            HydraConfig.instance().set_config(config)  # as Hydra does next: hydra.run.dir may use ${hydra:...}
            run_dir = Path(os.path.abspath(str(OmegaConf.select(config, "hydra.run.dir"))))
        except Exception:  # a folder we cannot name is a folder we never remove
            return
        new = [folder for folder in (run_dir, *run_dir.parents) if not os.path.lexists(folder)]
        if new:
            made_by_this_command[str(run_dir)] = new


class LatestRun(L.Callback):
    """When training starts, the run counts as trained, and `link` (latest_link: outputs/latest,
    from the folder the command was started in) points at it if the run is inside the link's
    folder: outputs/latest names the newest run in outputs/, and a run elsewhere
    (hydra.run.dir=/scratch/...) leaves it alone."""

    def __init__(self, run_dir: str, link: str | None):
        self.run_dir = Path(os.path.abspath(run_dir))
        self.link = Path(os.path.abspath(os.path.join(launch_folder(), link))) if link else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trained.add(str(self.run_dir))
        if self.link and self.run_dir.is_relative_to(self.link.parent) and trainer.is_global_zero:
            point_link(self.link, self.run_dir)


def started_training(run_dir: str) -> bool:
    return os.path.abspath(run_dir) in trained


def launch_folder() -> str:
    """Where the command was started (the current folder, unless hydra.job.chdir moved it)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.cwd if HydraConfig.initialized() else os.getcwd()


def point_link(link: Path, run_dir: Path) -> None:
    """Make `link` a symlink to run_dir, a folder beside or below it, atomically: a new link under
    another name renamed over the old one, so a reader always finds the old run or the new one.
    The link is relative (a moved or copied outputs/ keeps it working). Anything at `link` that
    is not a link is left alone."""
    if os.path.lexists(link) and not link.is_symlink():
        log.warning("%s is not a link, so it is left as it is and does not name this run", link)
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(run_dir, link.parent)
    temporary = link.with_name(f".{link.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    if os.path.lexists(temporary):
        os.remove(temporary)
    os.symlink(target, temporary)
    os.replace(temporary, link)


def discard_untrained_run(run_dir: str) -> bool:
    """Remove run_dir, and the empty folders made for it, if this command made it and never
    started training in it; True if it did. Folders that now hold anything else are kept."""
    run_dir = os.path.abspath(run_dir)
    new = made_by_this_command.get(run_dir)
    if not new or run_dir in trained:
        return False
    close_logs_inside(Path(run_dir))
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in new[1:]:
        try:
            os.rmdir(parent)  # only if empty: another run may have started beside this one
        except OSError:
            break
    return True


def close_logs_inside(folder: Path) -> None:
    """Close the log files (Hydra's <job>.log) kept open inside a folder about to be removed."""
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in list(getattr(logger, "handlers", [])):
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).is_relative_to(folder):
                logger.removeHandler(handler)
                handler.close()


def refuse_run(cfg: DictConfig, err: ConfigError, own_folder: bool) -> float:
    """A run refused before training: one line and exit 2, leaving no folder this command made;
    in a sweep, NaN and (in the point's own folder) a failed result for the sweep table."""
    if not in_multirun():
        discard_untrained_run(cfg.run_dir)
        exit_with(err)
    if own_folder:  # the point's own folder: its record and result, for the sweep table
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        write_hydra_record(Path(cfg.run_dir), cfg)
        write_result(cfg.run_dir, "failed", error=one_line(err))
    log.error("This run was refused: %s", one_line(err))
    return float("nan")
