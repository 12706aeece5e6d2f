"""Saving checkpoints: only between optimizer steps, each file whole or not at all, the newest
two kept, and last.ckpt always naming the newest.

StepCheckpoint saves every `every_n_train_steps` steps, every `every_n_minutes` minutes, at the
end of training, and when asked (save_now: the stop signals' callback asks). It does nothing
else: what stops a run is stop_signals.py's, which checkpoint a run resumes from is
resume_policy.py's.
"""

import copy
import os
import tempfile
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from fineweb_gpt.errors import ConfigError, DiskFull
from fineweb_gpt.run.checkpoint_files import saved_checkpoints
from fineweb_gpt.run.names import LAST
from fineweb_gpt.safe_files import AtomicFile, disk_full, replace_with_link


class BesideFileCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint through safe_files: beside its final name, then renamed into place.

    Lightning's own writer pickles the whole checkpoint in memory and moves it in from $TMPDIR: a
    kill leaves the temporary there, and on another filesystem the move is a copy, so a kill or a
    full disk leaves a torn file under the final name. Here a reader sees the old file or the new
    one, a failed write leaves nothing behind, and a killed one leaves `.<name>.<...>.tmp` beside
    it, which the next run in the folder removes (ownership.py).
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r})")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with AtomicFile(path) as file:
                torch.save(checkpoint, file)
        except DiskFull as full:
            raise DiskFull(
                f"{disk_full(full).strerror} writing checkpoint {path}: nothing of it is left, and the "
                f"checkpoints saved before are whole ({newest_saved(path.parent)}); free space, then resume with "
                "resume=auto"
            ) from full


def check_writable_folder(dirpath: str) -> None:
    """Refuse, before the run starts, a checkpoint folder that cannot be made or written in
    (dirpath=/proc/self, a file, a read-only disk): the first save would fail part way through the
    run. The nearest folder that exists is tried with a file that has no name (gone at once)."""
    path = Path(dirpath)
    existing = next(folder for folder in (path, *path.parents) if os.path.lexists(folder))
    fix = "give a folder this run can write in"
    if not existing.is_dir():
        raise ConfigError(f"callbacks.model_checkpoint.dirpath={dirpath}: {existing} is not a folder; {fix}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ConfigError(
            f"callbacks.model_checkpoint.dirpath={dirpath}: no file can be made in {existing} ({err.strerror}); {fix}"
        ) from None


def newest_saved(folder: Path) -> str:
    link = folder / LAST
    return f"last.ckpt is {os.path.realpath(link)}" if link.exists() else "none was saved yet"


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint for step-budgeted runs that may be killed, preempted or stopped by hand.

    Saves every `every_n_train_steps` steps and every `every_n_minutes` minutes (Lightning
    refuses the two together, though its saving logic handles both), always between optimizer
    steps, never part way through a gradient accumulation, and at the end of training. The
    newest `save_top_k` files are kept, counted from what the folder holds (a copied folder,
    earlier runs' files), and a file for a step that exists is replaced (no `-v1` names), so
    last.ckpt always names the newest checkpoint.
    """

    def __init__(self, every_n_minutes: float | None = None, **kwargs):
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(**kwargs)
        if kwargs.get("dirpath"):
            check_writable_folder(str(kwargs["dirpath"]))
        if every_n_minutes:
            self._train_time_interval = timedelta(minutes=every_n_minutes)
        self._steps_seen = None
        self._as_of: dict | None = None  # save_now(as_of=...): the loop and data state to record instead

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # a plugin the user chose stays
            trainer.strategy.checkpoint_io = BesideFileCheckpointIO()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._steps_seen = trainer.global_step
        self.count_saved_checkpoints(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        # Only at the end of an optimizer step. Lightning would take a time-based checkpoint part
        # way through one, and a run resumed from it would lose the micro-batches already
        # accumulated; under DDP its per-micro-batch check is also a broadcast, a wait for the GPU.
        if trainer.global_step == self._steps_seen:
            return
        self._steps_seen = trainer.global_step
        if trainer.global_step >= trainer.max_steps > 0:
            return  # the last step is saved once, after its evaluation (on_train_end): a finished run's checkpoint
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save_now(trainer)

    def save_now(self, trainer: L.Trainer, as_of: dict | None = None) -> None:
        """Save this step's checkpoint (and point last.ckpt at it) unless it is already saved.
        `as_of`: Lightning's loop state and the data position to record instead of the current
        ones (a stop part way through a step saves the state at the step's start)."""
        if self.saved_this_step(trainer) or trainer.fast_dev_run:
            return
        resumed = [path for path, step in self.best_k_models.items() if int(step) == trainer.global_step]
        if resumed:  # a run resumed at its last step, that trained nothing: its file, saved again in place
            trainer.save_checkpoint(resumed[0])  # (as a new save, it would push out the older one kept)
            self._last_global_step_saved = trainer.global_step
            return
        self._as_of = as_of
        try:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        finally:
            self._as_of = None

    def saved_this_step(self, trainer: L.Trainer) -> bool:
        return self._last_global_step_saved == trainer.global_step

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self._as_of is not None:
            checkpoint["loops"]["fit_loop"] = copy.deepcopy(self._as_of["fit_loop"])
            if self._as_of["data"] is not None:
                checkpoint[type(trainer.datamodule).__qualname__] = copy.deepcopy(self._as_of["data"])

    # --- which files are kept -----------------------------------------------------------

    def load_state_dict(self, state_dict: dict) -> None:
        # Lightning restores its list of kept files from the checkpoint, which is wrong in a
        # copied folder or after a resume from an older file; count_saved_checkpoints reads the folder.
        pass

    def count_saved_checkpoints(self, trainer: L.Trainer) -> None:
        """Take the newest save_top_k loadable checkpoints of the folder (up to this run's step) as
        the ones kept so far, so that each new save replaces the oldest of them."""
        last = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        self.last_model_path = str(last) if os.path.lexists(last) else ""
        if self.monitor != "step" or self.save_top_k == 0:
            return
        steps = saved_checkpoints(Path(self.dirpath))[0] if trainer.is_global_zero else {}
        steps = trainer.strategy.broadcast(steps)
        newest = sorted((s, p) for p, s in steps.items() if s <= trainer.global_step and Path(p) != last)
        if self.save_top_k > 0:
            newest = newest[-self.save_top_k :]
        self.best_k_models = {path: torch.tensor(step) for step, path in newest}
        if newest:
            self.best_model_path, self.best_model_score = newest[-1][1], torch.tensor(newest[-1][0])
        if newest and len(newest) == self.save_top_k:
            self.kth_best_model_path, self.kth_value = newest[0][1], torch.tensor(newest[0][0])

    def _should_remove_checkpoint(self, trainer: L.Trainer, previous: str, current: str) -> bool:
        # Lightning never deletes the file a run resumed from, so one is left behind per resume.
        return previous != current and Path(self.dirpath).absolute() in Path(previous).absolute().parents

    @staticmethod
    def _link_checkpoint(trainer: L.Trainer, filepath: str, linkpath: str) -> None:
        # Lightning removes the old link and then creates the new one: a kill in between
        # would leave no last.ckpt. The new link replaces the old one by a rename.
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            replace_with_link(Path(linkpath), os.path.relpath(filepath, os.path.dirname(linkpath)))
        trainer.strategy.barrier()
