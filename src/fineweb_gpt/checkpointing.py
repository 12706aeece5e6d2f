"""Checkpoints that survive kills and preemption, and the policy for resuming from them.

StepCheckpoint saves only between optimizer steps, makes each save atomic and turns SIGTERM
or SIGUSR1 into a save and a clean stop; resume_checkpoint decides which file a run resumes
from (ckpt_path=<file>, ckpt_path=last, resume=auto).
"""

import logging
import os
import signal
import subprocess
import threading
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from fineweb_gpt.errors import ConfigError, one_line

log = logging.getLogger("fineweb_gpt")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class RunStopped(Exception):
    """A stop signal ended the run after it saved; the message says how to resume it."""


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint for step-budgeted runs that may be killed or preempted.

    Saves every `every_n_train_steps` steps and every `every_n_minutes` minutes (Lightning
    refuses the two together, though its saving logic handles both), always between
    optimizer steps, never part way through a gradient accumulation; at the end of
    training (Lightning saves then only if it never saved), and when SIGTERM or SIGUSR1
    (SLURM's warning before the time limit) arrives: at the end of the current optimizer
    step it saves and stops the run, and on SIGUSR1 under SLURM it requeues the job.
    Lightning writes each file to a temporary name and renames it, and last.ckpt is
    switched to the newest file by an atomic rename, so a kill never leaves it half written.
    """

    def __init__(self, every_n_minutes: float | None = None, **kwargs):
        super().__init__(**kwargs)
        if every_n_minutes:
            self._train_time_interval = timedelta(minutes=every_n_minutes)
        self.signal_received: int | None = None
        self.stopped_by_signal: str | None = None
        self._steps_seen = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._steps_seen = trainer.global_step
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                signal.signal(signum, self._remember_signal)  # Lightning restores its own after fit
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

    def _remember_signal(self, signum: int, frame) -> None:
        self.signal_received = signum

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        # Saving and stopping wait for the end of the optimizer step. Lightning would take a
        # time-based checkpoint part way through one, and a run resumed from it would lose the
        # micro-batches already accumulated; under DDP its per-micro-batch check is also a
        # broadcast, a wait for the GPU.
        if trainer.global_step == self._steps_seen:
            return
        self._steps_seen = trainer.global_step
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # Every rank stops at the same step, whichever of them got the signal.
        if not trainer.strategy.reduce_boolean_decision(self.signal_received is not None, all=False):
            return
        self.stopped_by_signal = signal.Signals(self.signal_received or signal.SIGTERM).name
        self.save_now(trainer)
        trainer.should_stop = True
        if self.signal_received == signal.SIGUSR1 and "SLURM_JOB_ID" in os.environ and trainer.is_global_zero:
            requeue_slurm_job()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save_now(trainer)

    def save_now(self, trainer: L.Trainer) -> None:
        """Save this step's checkpoint (and point last.ckpt at it) unless it is already saved."""
        if self._last_global_step_saved != trainer.global_step and not trainer.fast_dev_run:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    @staticmethod
    def _link_checkpoint(trainer: L.Trainer, filepath: str, linkpath: str) -> None:
        # Lightning removes the old link and then creates the new one: a kill in between
        # would leave no last.ckpt. Make the new link under another name and rename it over.
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            temporary = f"{linkpath}.{os.getpid()}.tmp"
            if os.path.lexists(temporary):
                os.remove(temporary)
            os.symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), temporary)
            os.replace(temporary, linkpath)
        trainer.strategy.barrier()

    def stop_message(self, trainer: L.Trainer, run_dir: str) -> str | None:
        """How to resume, when a signal stopped this run; None when it was not stopped."""
        if not self.stopped_by_signal:
            return None
        return (
            f"Stopped by {self.stopped_by_signal} at step {trainer.global_step} of {trainer.max_steps} and saved "
            f"{self.last_model_path}; resume with resume=auto hydra.run.dir={run_dir}"
        )


def requeue_slurm_job() -> None:
    """Put this SLURM job back in the queue, as Lightning's own SLURM handler does."""
    job = os.environ["SLURM_JOB_ID"]
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode == 0:
        log.info("Requeued SLURM job %s", job)
    else:
        log.warning("Could not requeue SLURM job %s: %s", job, result.stderr.strip())


# --- which checkpoint to resume from ----------------------------------------------------


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint's contents on the CPU, memory-mapped (weights are not read until used)."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def checkpoint_problem(path: Path) -> str | None:
    """None if the checkpoint loads, else why not (a truncated file, a wrong format)."""
    try:
        checkpoint = read_checkpoint(path)
        if "state_dict" not in checkpoint or "global_step" not in checkpoint:
            return "not a training checkpoint"
    except Exception as err:  # every way a file can be damaged
        return one_line(err, limit=200)
    return None


def resume_checkpoint(ckpt_path: str | None, resume: str | None, run_dir: str) -> str | None:
    """The checkpoint to resume from: ckpt_path=<file>, or the run folder's newest good one for
    ckpt_path=last and resume=auto; a damaged file is named and the one before it used."""
    if resume not in (None, "auto"):
        raise ConfigError(f"resume={resume} is not known; use resume=auto, or ckpt_path=<file> or ckpt_path=last")
    if ckpt_path not in (None, "last"):
        path = Path(ckpt_path)
        if not path.is_file():
            raise ConfigError(f"ckpt_path={path} does not exist; give a checkpoint file, or ckpt_path=last")
        problem = checkpoint_problem(path)
        if problem:
            raise ConfigError(f"checkpoint {path} cannot be loaded ({problem}); use another checkpoint")
        return str(path)
    if ckpt_path is None and resume != "auto":
        return None
    folder = Path(run_dir) / "checkpoints"
    candidates = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime if p.exists() else 0, reverse=True)
    seen = set()
    for path in candidates:
        if not path.exists() or path.resolve() in seen:
            continue  # a dangling link, or last.ckpt and the file it points to
        seen.add(path.resolve())
        problem = checkpoint_problem(path)
        if problem is None:
            log.info("Resuming from %s", path)
            return str(path)
        log.warning("Checkpoint %s cannot be loaded (%s); trying the one before it", path, problem)
    if ckpt_path == "last":
        raise ConfigError(
            f"ckpt_path=last found no loadable checkpoint in {folder}; point hydra.run.dir at the run folder to resume"
        )
    log.info("resume=auto: no checkpoint in %s yet, starting from scratch", folder)
    return None
