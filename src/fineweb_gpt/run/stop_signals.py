"""The signals that stop a run, and what the run does about them.

A stop signal (SIGTERM, Ctrl-C, SLURM's time-limit warning SIGUSR1 or SIGUSR2) makes the run
save at the end of the current optimizer step and stop; a second one, in a run of one process,
stops at the next micro-batch with the state of the last finished step. StopOnSignal asks the
checkpointer (checkpoint_saving.StepCheckpoint) to save; after the run has written its result,
pass_signal_on gives the signal to the handler that was there before (under SLURM: the requeue).
DataLoader workers ignore the stop signals (ignore_stop_signals): SLURM and a terminal signal
every process of the job, and a worker killed by one would end the run before it could save.
"""

import logging
import os
import signal
import subprocess
import threading

import lightning as L
from lightning_utilities.core.rank_zero import rank_zero_only

from fineweb_gpt.errors import one_line
from fineweb_gpt.lightning_internals import stop_broadcasting_sigterm_every_micro_batch
from fineweb_gpt.random_state import capture_rng_states, restore_rng_states

log = logging.getLogger("fineweb_gpt")


def warning_signals() -> set[int]:
    """The signals that warn of a SLURM time limit: SIGUSR1 (`#SBATCH --signal=USR1@...`) and
    SIGUSR2, which hydra/launcher=slurm asks for (submitit's, or its SUBMITIT_PREEMPT_SIGNAL)."""
    named = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return {signal.SIGUSR1, signal.SIGUSR2, getattr(signal, f"SIG{named}", signal.SIGUSR2)}


def stop_signals() -> set[int]:
    """Every signal that makes a run save and stop: the warnings, SIGTERM and Ctrl-C (SIGINT)."""
    return warning_signals() | {signal.SIGTERM, signal.SIGINT}


def ignore_stop_signals(worker_id: int) -> None:
    """worker_init_fn for DataLoaders: the workers ignore the stop signals, and the training
    process decides. Setting a worker_init_fn turns off the one Lightning adds under
    seed_everything(workers=True), so this one calls it."""
    for signum in stop_signals():
        signal.signal(signum, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)


class RunStopped(Exception):
    """A stop signal ended the run after it saved; the message says how to resume it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopOnSignal(L.Callback):
    """Stops the run at the first stop signal, after the checkpointer saved the step; sooner at
    the second (one process only: several cannot agree part way through a step without waiting
    for each other at every micro-batch); at the third, the signal's own action."""

    def __init__(self):
        self.signal_received: int | None = None
        self.stopped_by: str | None = None  # the signal's name, once the run stops for it
        self.cut_short = False
        self._signals_seen = 0
        self._signals_told = 0
        self._one_process = True
        self._steps_seen = None
        self._step_start: dict | None = None  # one process: the state a save part way through a step records

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._steps_seen = trainer.global_step
        self._one_process = trainer.world_size == 1
        if threading.current_thread() is threading.main_thread():
            for signum in stop_signals():
                signal.signal(signum, self._on_stop_signal)  # Lightning puts back the earlier ones after fit
            # With its handler replaced, Lightning's SIGTERM flag stays down, yet under DDP its loop
            # broadcasts that flag before every micro-batch: a wait for the GPU each time
            # (Lightning-AI/pytorch-lightning#21487). Ours is shared once per optimizer step instead.
            stop_broadcasting_sigterm_every_micro_batch(trainer)

    def _on_stop_signal(self, signum: int, frame) -> None:
        # Only flags: a handler that writes to the console can break a write the run was making.
        self._signals_seen += 1
        if self._signals_seen == 1:
            self.signal_received = signum
        elif self._signals_seen == 2 and self._one_process:
            self.cut_short = True
        else:
            for stop in stop_signals():
                signal.signal(stop, signal.default_int_handler if stop == signal.SIGINT else signal.SIG_DFL)
            signal.raise_signal(signum)

    def announce_new_signals(self) -> None:
        """Say, once per signal, what the run does about it (from the training loop, not the handler)."""
        if self._signals_told < self._signals_seen:
            name = signal.Signals(self.signal_received).name
            if self._signals_told == 0:
                log.warning("%s: saving at the end of this optimizer step, then stopping (again: stop sooner)", name)
            if self.cut_short:
                log.warning("%s again: stopping at the next micro-batch, saving the last finished step", name)
            self._signals_told = self._signals_seen

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        self.announce_new_signals()
        if self.cut_short:
            self.stop_part_way(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self.announce_new_signals()
        if trainer.global_step == self._steps_seen:  # part way through a step
            if self.cut_short:
                self.stop_part_way(trainer)
            return
        self._steps_seen = trainer.global_step
        if self._one_process:
            self._step_start = step_start_state(trainer)
        # Every rank stops at the same step, whichever of them got the signal: one collective a step.
        if not trainer.strategy.reduce_boolean_decision(self.signal_received is not None, all=False):
            return
        self.stopped_by = signal.Signals(self.signal_received or signal.SIGTERM).name
        if trainer.checkpoint_callback is not None:
            trainer.checkpoint_callback.save_now(trainer)
        if self.cut_short:
            raise RunStopped(self.stop_message(trainer), self.signal_received)
        trainer.should_stop = True

    def stop_part_way(self, trainer: L.Trainer) -> None:
        """A second signal part way through a step: the weights and optimizer are still those of
        the last finished step, but the data, the random streams and Lightning's loop counters
        have moved on. Save them as they were at the end of that step, then stop (no evaluation)."""
        self.stopped_by = signal.Signals(self.signal_received).name
        checkpointer = trainer.checkpoint_callback
        if self._step_start is not None and checkpointer is not None and not checkpointer.saved_this_step(trainer):
            restore_rng_states(self._step_start["rng"])
            checkpointer.save_now(trainer, as_of=self._step_start)
        raise RunStopped(self.stop_message(trainer), self.signal_received)

    def stop_message(self, trainer: L.Trainer) -> str | None:
        """How to resume, when a signal stopped this run; None when it was not stopped."""
        if not self.stopped_by:
            return None
        step = f"at step {trainer.global_step} of {trainer.max_steps}"
        checkpointer = trainer.checkpoint_callback
        if checkpointer is None:
            saved = "nothing saved (checkpoints are off)"
        elif checkpointer.saved_this_step(trainer) and checkpointer.last_model_path:
            saved = f"saved {os.path.realpath(checkpointer.last_model_path)}"
        elif trainer.ckpt_path:
            saved = f"nothing new to save since {trainer.ckpt_path}"
        else:
            saved = "before finishing a step, nothing to save"
        resume = f"resume with resume=auto hydra.run.dir={trainer.default_root_dir}"
        return f"Stopped by {self.stopped_by} {step}, {saved}; {resume}"


def step_start_state(trainer: L.Trainer) -> dict:
    """What changes between a step's micro-batches, while the weights and optimizer wait for the
    step's end: Lightning's loop counters, the data position and the random streams."""
    import copy

    datamodule = trainer.datamodule
    return {
        "fit_loop": copy.deepcopy(trainer.fit_loop.state_dict()),
        "data": copy.deepcopy(datamodule.state_dict()) if datamodule is not None else None,
        "rng": capture_rng_states(),
    }


def pass_signal_on(signum: int) -> None:
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
