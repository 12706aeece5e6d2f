"""The signals that stop a run (SLURM's time-limit warning, SIGTERM, Ctrl-C), and DataLoader
workers that ignore them: SLURM and a terminal signal every process of the job, and a worker
killed by one would end the run before the training process could save (checkpointing.py)."""

import os
import signal


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
    process decides. SLURM (and Ctrl-C in a terminal) signals every process of the job, and a
    worker killed by it ends the run before it can save. Setting a worker_init_fn turns off the
    one Lightning adds under seed_everything(workers=True), so this one calls it."""
    for signum in stop_signals():
        signal.signal(signum, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)
