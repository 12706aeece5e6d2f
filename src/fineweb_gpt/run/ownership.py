"""Whose a run folder is: claiming it before a run writes anything, and removing it after a
refusal only when this command made it and no other run ever held it.

A single run's folder is made here, just before Hydra would make it (NoteNewRunFolder, a Hydra
callback in train.yaml): each missing folder is made with one mkdir, which only one of two
commands started at the same moment can win, so "this command made it" is never a guess.
claim_run_folder then locks the folder (one run at a time), refuses a link planted where the run
writes its files, removes what a killed save left, and settles the checkpoint it resumes from and
whether this command may resume it (resume_policy). Hydra's record of the run (.hydra/*.yaml) is
written only once the data is checked too (RecordRun): a refused command never rewrites the
record of the run it would have resumed. A run refused before training leaves no folder behind,
but removes one only while holding its lock, when this command made it and no other process
ever held the lock: a refused second run never removes the folder the first is training in, or
trained in; nor, in a sweep, writes its refusal into a folder another run holds or held.
"""

import logging
import os
import shutil
from pathlib import Path

import lightning as L
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from fineweb_gpt.config_files import in_multirun
from fineweb_gpt.errors import ConfigError, UserError, exit_with, one_line
from fineweb_gpt.run.folder_lock import FolderLock
from fineweb_gpt.run.names import (
    CHECKPOINTS,
    HYDRA_CONFIG,
    HYDRA_DIR,
    HYDRA_OVERRIDES,
    HYDRA_SETTINGS,
    METRICS_FILE,
    RESULT_FILE,
    SUMMARY_FILE,
)
from fineweb_gpt.run.resume_policy import (
    choose_checkpoint,
    is_first_process,
    may_resume,
    refuse_a_fresh_start_over_checkpoints,
)
from fineweb_gpt.run.run_files import record_result, write_hydra_record, write_result
from fineweb_gpt.safe_files import check_target

log = logging.getLogger("fineweb_gpt")

made_by_this_command: dict[str, list[Path]] = {}  # run folder -> the folders this command made for it, innermost first
trained: set[str] = set()  # run folders this process started training in


class NoteNewRunFolder(Callback):
    """Hydra callback: makes a single run's folder before Hydra does, noting which folders this
    command made (Hydra's own mkdir then finds them there)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig

        try:
            HydraConfig.instance().set_config(config)  # as Hydra does next: hydra.run.dir may use ${hydra:...}
            run_dir = Path(os.path.abspath(str(OmegaConf.select(config, "hydra.run.dir"))))
        except Exception:  # a folder we cannot name is a folder we never remove
            return
        existing = next(folder for folder in (run_dir, *run_dir.parents) if os.path.lexists(folder))
        if not existing.is_dir():  # Hydra's own mkdir would fail with a traceback
            exit_with(ConfigError(f"hydra.run.dir={run_dir}: {existing} is a file, not a folder; give another one"))
        missing = [folder for folder in (run_dir, *run_dir.parents) if not os.path.lexists(folder)]
        made = []
        for folder in reversed(missing):  # the outermost first
            try:
                os.mkdir(folder)
            except FileExistsError:  # another command made it at this very moment: it is not ours
                continue
            except OSError:  # it cannot be made: Hydra says why when it tries
                return
            made.append(folder)
        if run_dir in made:
            made_by_this_command[str(run_dir)] = made[::-1]


class ClaimedFolder:
    """This run's hold on its folder: the lock (until release()) and the checkpoint it resumes from."""

    def __init__(self, run_dir: Path, resume_from: str | None, lock: FolderLock | None = None):
        self.run_dir, self.resume_from, self.lock = Path(run_dir), resume_from, lock

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def claim_run_folder(cfg: DictConfig) -> ClaimedFolder:
    """Lock the run folder and settle what this run starts from, before anything is written in it.
    A refusal is a one-line ConfigError; the folder is then left exactly as it was."""
    run_dir = Path(cfg.run_dir)
    if not is_first_process():  # DDP's other processes: rank 0 holds the folder
        return ClaimedFolder(run_dir, choose_checkpoint(cfg.ckpt_path, cfg.resume, cfg.run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(run_dir).acquire()
    try:
        refuse_planted_links(run_dir)
        remove_cut_off_saves(run_dir / CHECKPOINTS)
        resume_from = choose_checkpoint(cfg.ckpt_path, cfg.resume, cfg.run_dir)
        if resume_from is None:
            refuse_a_fresh_start_over_checkpoints(run_dir / CHECKPOINTS)
        else:
            may_resume(cfg, resume_from)
    except BaseException:
        lock.release()
        raise
    return ClaimedFolder(run_dir, resume_from, lock)


def refuse_planted_links(run_dir: Path) -> None:
    """Refuse, before anything is written, a run folder where a file the run writes is a link or
    not a regular file (a copied folder with `run_summary.json -> ~/.bashrc`): the writes would
    refuse it too, but only part way through the run."""
    if (run_dir / HYDRA_DIR).is_symlink():
        raise ConfigError(f"{run_dir / HYDRA_DIR} is a link; delete it, the run records its config there")
    for name in (SUMMARY_FILE, RESULT_FILE, METRICS_FILE, HYDRA_CONFIG, HYDRA_SETTINGS, HYDRA_OVERRIDES):
        path = run_dir / name
        if os.path.lexists(path):
            check_target(path.parent, path.name)


def remove_cut_off_saves(folder: Path) -> None:
    """Remove the temporaries of saves cut off by a kill (.<name>.<...>.tmp): under the lock, no
    other run is writing here."""
    for leftover in folder.glob(".*.tmp"):
        if leftover.is_file() or leftover.is_symlink():
            leftover.unlink()
            log.info("Removed %s, left by a save that was cut off", leftover)


def has_started_training(run_dir: str) -> bool:
    return os.path.abspath(run_dir) in trained


def discard_untrained_run(run_dir: str, lock: FolderLock | None = None) -> bool:
    """Remove run_dir, and the empty folders made for it, if this command made it, never started
    training in it, and no other process ever held its lock; True if it did. `lock`: the folder's
    lock if this process holds it; otherwise it is taken here, and a folder whose lock another
    process holds is kept."""
    run_dir = os.path.abspath(run_dir)
    made = made_by_this_command.get(run_dir)
    if not made or run_dir in trained or not os.path.isdir(run_dir):
        return False
    own_lock = lock is None or not lock.held
    if own_lock:
        try:
            lock = FolderLock(run_dir).acquire()
        except UserError:  # another run holds it: the folder is that run's now
            return False
    try:
        if not lock.only_this_process_held_it():
            return False
        close_logs_inside(Path(run_dir))
        shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        if own_lock:
            lock.release()
    for parent in made[1:]:
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
    """A run refused before training: one line and exit 2, leaving no folder this command made
    (discard_untrained_run decides). In a sweep: NaN, and, where the refusal came before the
    folder was claimed (own_folder), the point's record and a failed result there for the sweep
    table; a folder refused at the claim may hold another run's work and is not written in."""
    if not in_multirun():
        discard_untrained_run(cfg.run_dir)
        exit_with(err)
    if own_folder:
        record_refusal(Path(cfg.run_dir), cfg, err)
    log.error("This run was refused: %s", one_line(err))
    return float("nan")


def record_refusal(run_dir: Path, cfg: DictConfig, err: UserError) -> None:
    """A refused sweep point's record and failed result, for the sweep table, written only under
    the folder's lock and only where no other process ever held it (another sweep started in the
    same second has the same folders)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = FolderLock(run_dir).acquire()
    except UserError:
        return
    try:
        if lock.only_this_process_held_it():
            write_hydra_record(run_dir, cfg)
            write_result(cfg.run_dir, "failed", error=one_line(err))
    finally:
        lock.release()


def record_failure(cfg: DictConfig, err: UserError) -> None:
    """A sweep point that failed in its claimed folder: its record (if the run did not get as far
    as writing it) and its failed result, for the sweep table; never a reason to stop the sweep."""
    run_dir = Path(cfg.run_dir)
    try:
        if not os.path.lexists(run_dir / HYDRA_OVERRIDES):
            write_hydra_record(run_dir, cfg)
    except UserError as unwritten:
        log.warning("The run's record was not written: %s", one_line(unwritten))
    record_result(cfg.run_dir, "failed", error=one_line(err))


class RecordRun(L.Callback):
    """Writes Hydra's record of the run (.hydra/*.yaml) once the run is accepted: at setup, after
    the data module has read and checked the data (Lightning sets it up before any callback)."""

    def __init__(self, run_dir: str, cfg: DictConfig):
        self.run_dir, self.cfg = Path(run_dir), cfg

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            write_hydra_record(self.run_dir, self.cfg)


class AfterFirstStep(L.Callback):
    """Calls first_step_done(trainer) once, when the first optimizer step this process trains ends
    (a resumed run's too): what is kept or pointed at only once a run has trained something."""

    def __init__(self):
        self.first_step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.first_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self.first_step is not None and trainer.global_step > self.first_step:
            self.first_step = None
            self.first_step_done(trainer)

    def first_step_done(self, trainer: L.Trainer) -> None:
        raise NotImplementedError


class TrainingStarted(AfterFirstStep):
    """Marks the run as trained when its first optimizer step in this process ends: from then on its
    folder is never removed. A run that fails before (bad data in the first batch, out of memory at
    the first micro-batch) has nothing worth keeping."""

    def __init__(self, run_dir: str):
        super().__init__()
        self.run_dir = run_dir

    def first_step_done(self, trainer: L.Trainer) -> None:
        trained.add(os.path.abspath(self.run_dir))
