"""The signals that stop a run, and what the run does about them.

A stop signal (SIGTERM, Ctrl-C, SLURM's time-limit warning SIGUSR1 or SIGUSR2) makes the run
save at the end of the current optimizer step and stop there, with no evaluation added (under
SLURM the grace period is short, and the resumed run evaluates a step whose evaluation was due:
evaluation_schedule.py). Arriving during an evaluation, it stops the evaluation too. Before the
run's first step has finished there is nothing to save, and the run stops at once. A second
signal, in a run of one process, stops at the next micro-batch with the state of the last
finished step; a third takes the signal's own action. StopOnSignal asks the checkpointer
(checkpoint_saving.StepCheckpoint) to save; after the run has written its result, pass_signal_on
gives the signal to the handler that was there before (under SLURM: the requeue).
DataLoader workers ignore the stop signals (ignore_stop_signals): SLURM and a terminal signal
every process of the job, and a worker killed by one would end the run before it could save.
"""

import logging
import os
import shlex
import signal
import subprocess
import threading

import lightning as L
from lightning_utilities.core.rank_zero import rank_zero_only

from fineweb_gpt.errors import one_line
from fineweb_gpt.lightning_internals import stop_broadcasting_sigterm_every_micro_batch
from fineweb_gpt.random_state import capture_rng_states, restore_rng_states
from fineweb_gpt.run.run_files import read_overrides

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


class RunStopped(BaseException):
    """A stop signal ended the run, after it saved what there was to save; the message says how to
    resume it. A BaseException, as KeyboardInterrupt is: raised by the signal handler itself
    before the first step, it must not be taken for an error by an `except Exception` on the way
    (a log handler's, a library's)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopOnSignal(L.Callback):
    """Stops the run at the first stop signal: at once before the run's first step has finished
    (nothing to save), else at the end of the step it came in (or during an evaluation: there),
    after the checkpointer saved that step; sooner at the second (one process only: several
    cannot agree part way through a step without waiting for each other at every micro-batch);
    at the third, the signal's own action. install() before the fit; restore() after it."""

    def __init__(self, run_dir: str, world_size: int = 1):
        self.run_dir = os.path.abspath(run_dir)
        self.signal_received: int | None = None
        self.stopped_by: str | None = None  # the signal's name, once the run stops for it
        self.cut_short = False
        self.trainer: L.Trainer | None = None
        self._signals_seen = 0
        self._signals_told = 0
        self._one_process = world_size == 1
        self._first_step: int | None = None  # the step this process started training from
        self._steps_seen: int | None = None
        self._step_start: dict | None = None  # one process: the state a save part way through a step records
        self._before: dict[int, object] = {}  # the handlers there before install()

    # --- the handlers ----------------------------------------------------------------------

    def install(self) -> None:
        """Our handler for every stop signal (from the main thread only). Called before the fit,
        and again once Lightning has put in its own SIGTERM handler (whose flag would make its
        loops exit without a word)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in stop_signals():
            if signum not in self._before:
                self._before[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_stop_signal)

    def restore(self) -> None:
        """Put back the handlers that were there before install() (submitit's, under SLURM)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._before.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._before = {}

    def _on_stop_signal(self, signum: int, frame) -> None:
        # Flags, or an exception: a handler that writes to the console can break a write the run was making.
        self._signals_seen += 1
        if self._signals_seen == 1:
            self.signal_received = signum
            if self._one_process and not self.finished_a_step():  # nothing to save: stop at once
                self.stopped_by = signal.Signals(signum).name
                raise RunStopped(self.stop_message(self.trainer), signum)
        elif self._signals_seen == 2 and self._one_process:
            self.cut_short = True
        else:
            for stop in stop_signals():
                signal.signal(stop, signal.default_int_handler if stop == signal.SIGINT else signal.SIG_DFL)
            signal.raise_signal(signum)

    def finished_a_step(self) -> bool:
        """Whether an optimizer step has finished in this process (its update is made, even if this
        callback has not seen its end yet): from then on a stop saves first."""
        return self._first_step is not None and self.trainer is not None and self.trainer.global_step > self._first_step

    def announce_new_signals(self) -> None:
        """Say, once per signal, what the run does about it (from the training loop, not the handler)."""
        if self._signals_told < self._signals_seen:
            name = signal.Signals(self.signal_received).name
            if self._signals_told == 0:
                log.warning("%s: saving at the end of this optimizer step, then stopping (again: stop sooner)", name)
            if self.cut_short:
                log.warning("%s again: stopping at the next micro-batch, saving the last finished step", name)
            self._signals_told = self._signals_seen

    # --- where the run looks for them ------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.trainer = trainer

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.install()  # in place of Lightning's, set just before

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._first_step = self._steps_seen = trainer.global_step
        self._one_process = trainer.world_size == 1
        self.install()
        # With its handler replaced, Lightning's SIGTERM flag stays down, yet under DDP its loop
        # broadcasts that flag before every micro-batch: a wait for the GPU each time
        # (Lightning-AI/pytorch-lightning#21487). Ours is shared once per optimizer step instead.
        stop_broadcasting_sigterm_every_micro_batch(trainer)

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
        if trainer.strategy.reduce_boolean_decision(self.signal_received is not None, all=False):
            self.stop_now(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._one_process and self.signal_received is not None and not trainer.sanity_checking:
            self.stop_now(trainer)  # the evaluation is not waited for: the resumed run does it

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Several processes agree once an evaluation is over (the step-0 one included), not at each batch.
        if not self._one_process and trainer.strategy.reduce_boolean_decision(
            self.signal_received is not None, all=False
        ):
            self.stop_now(trainer)

    # --- stopping --------------------------------------------------------------------------

    def stop_now(self, trainer: L.Trainer) -> None:
        """Save the step just finished (unless it is saved, or none is), then stop: no evaluation."""
        self.stopped_by = signal.Signals(self.signal_received or signal.SIGTERM).name
        if trainer.checkpoint_callback is not None and self.finished_a_step():
            trainer.checkpoint_callback.save_now(trainer)
        raise RunStopped(self.stop_message(trainer), self.signal_received or signal.SIGTERM)

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

    def stop_message(self, trainer: L.Trainer | None) -> str:
        """What was saved, and the command that resumes the run with its own settings."""
        checkpointer = trainer.checkpoint_callback if trainer is not None else None
        if trainer is None:
            where, saved = "before training started", "nothing to save"
        else:
            where = f"at step {trainer.global_step} of {trainer.max_steps}"
            if checkpointer is None:
                saved = "nothing saved (checkpoints are off)"
            elif checkpointer.saved_this_step(trainer) and checkpointer.last_model_path:
                saved = f"saved {os.path.realpath(checkpointer.last_model_path)}"
            elif trainer.ckpt_path:
                saved = f"nothing new to save since {trainer.ckpt_path}"
            else:
                saved = "before a step finished, nothing to save"
        return f"Stopped by {self.stopped_by} {where}, {saved}; resume with: {resume_command(self.run_dir)}"


def resume_command(run_dir: str) -> str:
    """The command that resumes the run in run_dir with the settings it was started with: its
    overrides (.hydra/overrides.yaml, else this command's), then resume=auto and the folder."""
    overrides = read_overrides(run_dir) or command_overrides()
    kept = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] not in ("resume", "ckpt_path")]
    return shlex.join(["python", "-m", "fineweb_gpt.train", *kept, "resume=auto", f"hydra.run.dir={run_dir}"])


def command_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


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
