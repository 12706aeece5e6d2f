"""Checkpoints that survive kills, full disks and preemption, and the signals that stop a run.

StepCheckpoint saves only between optimizer steps, writes each file beside its final name and
renames it into place, keeps the newest two whichever run wrote them, and points last.ckpt at
the newest. A stop signal (SIGTERM, Ctrl-C, SLURM's warning SIGUSR1 or SIGUSR2) saves at the end
of the current optimizer step and stops the run; a second one, in a run of one process, stops at
the next micro-batch with the state of the last finished step. Which checkpoint a run resumes
from, and whether this command may resume it, is resume.py's.
"""

import copy
import errno
import logging
import os
import random
import signal
import subprocess
import threading
from datetime import timedelta
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_utilities.core.rank_zero import rank_zero_only

from fineweb_gpt.errors import DiskFull, one_line
from fineweb_gpt.resume import follow_the_command_schedule, saved_checkpoints
from fineweb_gpt.stop_signals import stop_signals, warning_signals

log = logging.getLogger("fineweb_gpt")


class RunStopped(Exception):
    """A stop signal ended the run after it saved; the message says how to resume it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def hand_on(signum: int) -> None:
    """After a stopped run has saved and written its result: give the signal to the handler that
    was there before the run. Under hydra/launcher=slurm that is submitit's: it requeues the job
    (or says why not, once the job has timed out max_num_timeout times) and exits. Without one, a
    SLURM job stopped by its warning signal is requeued here; either way, once."""
    handler = signal.getsignal(signum)
    if callable(handler) and handler is not signal.default_int_handler:
        try:
            handler(signum, None)
        except Exception as err:  # submitit's way of saying it will not requeue
            log.warning("The job was not requeued: %s", one_line(err))
    elif signum in warning_signals() and "SLURM_JOB_ID" in os.environ and rank_zero_only.rank == 0:
        requeue_slurm_job()


def requeue_slurm_job() -> None:
    """Put this SLURM job back in the queue (the same job id, so the same run folder)."""
    job = os.environ["SLURM_JOB_ID"]
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode == 0:
        log.info("Requeued SLURM job %s", job)
    else:
        log.warning("Could not requeue SLURM job %s: %s", job, result.stderr.strip())


# --- writing a checkpoint ----------------------------------------------------------------


class BesideFileCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside its final name, then renames it into place.

    Lightning's own writer pickles the whole checkpoint in memory and moves it in from $TMPDIR: a
    kill leaves the temporary there, and on another filesystem the move is a copy, so a kill or a
    full disk leaves a torn file under the final name. Here a reader sees the old file or the new
    one, a failed write leaves nothing behind, and a killed one leaves `.<name>.<pid>.tmp` beside
    it, which the next run in the folder removes (resume.py).
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r})")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            if os.path.lexists(temporary):
                os.remove(temporary)
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with os.fdopen(descriptor, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())  # a full disk may only say so here
            os.replace(temporary, path)
        except BaseException as err:
            if os.path.lexists(temporary):
                os.remove(temporary)
            full = disk_full(err)
            if full:
                raise DiskFull(
                    f"{full.strerror} writing checkpoint {path}: nothing of it is left, and the checkpoints "
                    f"saved before are whole ({newest_saved(path.parent)}); free space, then resume with resume=auto"
                ) from err
            raise
        sync_folder(path.parent)


def disk_full(err: BaseException) -> OSError | None:
    """The "no space" or "quota" error behind `err` (torch.save reports it as a RuntimeError of its
    zip writer, with the OSError as its context), or None."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return err
        err = err.__cause__ or err.__context__
    return None


def newest_saved(folder: Path) -> str:
    link = folder / "last.ckpt"
    return f"last.ckpt is {os.path.realpath(link)}" if link.exists() else "none was saved yet"


def sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (its directory entry), where the system allows it."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


# --- the checkpoint callback -------------------------------------------------------------


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint for step-budgeted runs that may be killed, preempted or stopped by hand.

    Saves every `every_n_train_steps` steps and every `every_n_minutes` minutes (Lightning
    refuses the two together, though its saving logic handles both), always between optimizer
    steps, never part way through a gradient accumulation; at the end of training, and when a
    stop signal arrives. The newest `save_top_k` files are kept, counted from what the folder
    holds (a copied folder, earlier runs' files), and a file for a step that exists is replaced
    (no `-v1` names), so last.ckpt always names the newest checkpoint.
    """

    def __init__(self, every_n_minutes: float | None = None, **kwargs):
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(**kwargs)
        if every_n_minutes:
            self._train_time_interval = timedelta(minutes=every_n_minutes)
        self.signal_received: int | None = None
        self.stopped_by_signal: str | None = None
        self.cut_short = False
        self._signals_seen = 0
        self._signals_told = 0
        self._one_process = True
        self._steps_seen = None
        self._step_start: dict | None = None  # one process: the state a save part way through a step records
        self._saving_step_start = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # a plugin the user chose stays
            trainer.strategy.checkpoint_io = BesideFileCheckpointIO()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._steps_seen = trainer.global_step
        self._one_process = trainer.world_size == 1
        self.count_saved_checkpoints(trainer)
        follow_the_command_schedule(trainer)
        if threading.current_thread() is threading.main_thread():
            for signum in stop_signals():
                signal.signal(signum, self._on_stop_signal)  # Lightning puts back the earlier ones after fit
            # With its handler replaced, Lightning's SIGTERM flag stays down, yet under DDP its loop
            # broadcasts that flag before every micro-batch: a wait for the GPU each time
            # (Lightning-AI/pytorch-lightning#21487). Ours is shared once per optimizer step instead.
            epoch_loop = trainer.fit_loop.epoch_loop
            if not hasattr(epoch_loop, "_broadcast_sigterm_tensor"):
                raise RuntimeError(
                    f"lightning {L.__version__} has no fit_loop.epoch_loop._broadcast_sigterm_tensor; "
                    "fineweb_gpt is tested with the lightning range in its pyproject.toml"
                )
            epoch_loop._broadcast_sigterm_tensor = lambda: None

    def _on_stop_signal(self, signum: int, frame) -> None:
        # Only flags: a handler that writes to the console can break a write the run was making.
        self._signals_seen += 1
        if self._signals_seen == 1:
            self.signal_received = signum
        elif self._signals_seen == 2 and self._one_process:
            self.cut_short = True
        else:
            # Several processes cannot agree part way through a step without waiting for each
            # other at every micro-batch, and a third signal means now: the signal's own action.
            for stop in stop_signals():
                signal.signal(stop, signal.default_int_handler if stop == signal.SIGINT else signal.SIG_DFL)
            signal.raise_signal(signum)

    def tell_what_happens(self) -> None:
        """Say, once per signal, what the run does about it."""
        if self._signals_told < self._signals_seen:
            name = signal.Signals(self.signal_received).name
            if self._signals_told == 0:
                log.warning("%s: saving at the end of this optimizer step, then stopping (again: stop sooner)", name)
            if self.cut_short:
                log.warning("%s again: stopping at the next micro-batch, saving the last finished step", name)
            self._signals_told = self._signals_seen

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        self.tell_what_happens()
        if self.cut_short:
            self.stop_part_way(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        # Saving and stopping wait for the end of the optimizer step. Lightning would take a
        # time-based checkpoint part way through one, and a run resumed from it would lose the
        # micro-batches already accumulated; under DDP its per-micro-batch check is also a
        # broadcast, a wait for the GPU.
        self.tell_what_happens()
        if trainer.global_step == self._steps_seen:
            if self.cut_short:
                self.stop_part_way(trainer)
            return
        self._steps_seen = trainer.global_step
        if self._one_process:
            self._step_start = step_start_state(trainer)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # Every rank stops at the same step, whichever of them got the signal.
        if not trainer.strategy.reduce_boolean_decision(self.signal_received is not None, all=False):
            return
        self.stopped_by_signal = signal.Signals(self.signal_received or signal.SIGTERM).name
        self.save_now(trainer)
        if self.cut_short:
            raise RunStopped(self.stop_message(trainer), self.signal_received)
        trainer.should_stop = True

    def stop_part_way(self, trainer: L.Trainer) -> None:
        """A second signal part way through a step: the weights and optimizer are still those of
        the last finished step, but the data, the random streams and Lightning's loop counters
        have moved on. Save them as they were at the end of that step, then stop (no evaluation)."""
        self.stopped_by_signal = signal.Signals(self.signal_received).name
        if self._step_start is not None and self._last_global_step_saved != trainer.global_step:
            set_rng_states(self._step_start["rng"])
            self._saving_step_start = True
            try:
                self.save_now(trainer)
            finally:
                self._saving_step_start = False
        raise RunStopped(self.stop_message(trainer), self.signal_received)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self._saving_step_start:
            checkpoint["loops"]["fit_loop"] = copy.deepcopy(self._step_start["fit_loop"])
            if self._step_start["data"] is not None:
                checkpoint[type(trainer.datamodule).__qualname__] = copy.deepcopy(self._step_start["data"])

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # The schedule's base rates come from this command (optim.lr), not the checkpoint: see
        # resume.follow_the_command_schedule.
        for state in checkpoint.get("lr_schedulers", []):
            state.pop("base_lrs", None)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save_now(trainer)

    def save_now(self, trainer: L.Trainer) -> None:
        """Save this step's checkpoint (and point last.ckpt at it) unless it is already saved."""
        if self._last_global_step_saved != trainer.global_step and not trainer.fast_dev_run:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    def stop_message(self, trainer: L.Trainer) -> str | None:
        """How to resume, when a signal stopped this run; None when it was not stopped."""
        if not self.stopped_by_signal:
            return None
        step = f"at step {trainer.global_step} of {trainer.max_steps}"
        if self._last_global_step_saved == trainer.global_step and self.last_model_path:
            saved = f"saved {os.path.realpath(self.last_model_path)}"
        elif trainer.ckpt_path:
            saved = f"nothing new to save since {trainer.ckpt_path}"
        else:
            saved = "before finishing a step, nothing to save"
        resume = f"resume with resume=auto hydra.run.dir={trainer.default_root_dir}"
        return f"Stopped by {self.stopped_by_signal} {step}, {saved}; {resume}"

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
        # would leave no last.ckpt. Make the new link under another name and rename it over.
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            temporary = os.path.join(os.path.dirname(linkpath), f".{os.path.basename(linkpath)}.{os.getpid()}.tmp")
            if os.path.lexists(temporary):
                os.remove(temporary)
            os.symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), temporary)
            os.replace(temporary, linkpath)
            sync_folder(Path(linkpath).parent)
        trainer.strategy.barrier()


# --- the state at the start of a step -------------------------------------------------------


def step_start_state(trainer: L.Trainer) -> dict:
    """What changes between a step's micro-batches, while the weights and optimizer wait for the
    step's end: Lightning's loop counters, the data position and the random streams."""
    datamodule = trainer.datamodule
    return {
        "fit_loop": copy.deepcopy(trainer.fit_loop.state_dict()),
        "data": copy.deepcopy(datamodule.state_dict()) if datamodule is not None else None,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        },
    }


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
