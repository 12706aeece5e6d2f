"""SLURM through hydra/launcher=slurm: the warning before the time limit (submitit's SIGUSR2) ends in
the step-boundary save and one requeue, through submitit, of a job that resumes (issue 16's SLURM item).
Without a cluster: submitit's own job environment and handlers, and a SLURM of one node
(fake_slurm.py: sbatch, srun, scontrol, sacct) on PATH."""

import os
import signal
import stat
import sys
from pathlib import Path

import pytest
import submitit
from submitit.core.utils import DelayedSubmission, JobPaths

from fineweb_gpt.run.run_files import read_json, read_metrics
from fineweb_gpt.run.stop_signals import pass_signal_on
from helpers import SMALL, run_cli

TESTS = Path(__file__).parent


def fake_slurm_on_path(tmp_path: Path) -> dict:
    """Commands named sbatch, srun, scontrol and sacct that run fake_slurm.py; the environment to use."""
    bin_dir, state = tmp_path / "bin", tmp_path / "slurm"
    bin_dir.mkdir()
    state.mkdir()
    for command in ("sbatch", "srun", "scontrol", "sacct"):
        wrapper = bin_dir / command
        wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {TESTS / "fake_slurm.py"} {command} "$@"\n')
        wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SLURM_DIR": str(state)}


class Resubmittable:
    """A job function that, like hydra's submitit launcher, resubmits itself when asked to checkpoint."""

    def __call__(self):
        return "done"

    def checkpoint(self):
        return DelayedSubmission(self)


def test_after_the_save_submitits_own_handler_requeues_the_job_once(tmp_path, monkeypatch):
    # Inside a submitit job, submitit's handlers are in place before the run starts; Lightning puts
    # them back after fit, and pass_signal_on gives them the signal that stopped the run.
    for key, value in {**fake_slurm_on_path(tmp_path), "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SLURM_PROCID", "0")
    environment = submitit.JobEnvironment()
    assert type(environment).__name__ == "SlurmJobEnvironment"
    paths = JobPaths(tmp_path / "submitit", job_id=environment.job_id)
    paths.folder.mkdir(parents=True)
    delayed = DelayedSubmission(Resubmittable())
    delayed.set_timeout(timeout_min=240, max_num_timeout=3)
    delayed.dump(paths.submitted_pickle)
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGUSR2, signal.SIGTERM, signal.SIGCONT)}
    try:
        environment._handle_signals(paths, delayed)
        pass_signal_on(signal.SIGTERM)  # submitit lets SIGTERM pass (the job goes on to its end)
        assert not (tmp_path / "slurm" / "scontrol_calls").exists()
        with pytest.raises(SystemExit):  # submitit exits once it has requeued
            pass_signal_on(signal.SIGUSR2)
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
    assert (tmp_path / "slurm" / "scontrol_calls").read_text().splitlines() == ["requeue 4242"]
    assert DelayedSubmission.load(paths.submitted_pickle)._timeout_countdown == 3  # preempted, not timed out


@pytest.mark.slow
def test_the_time_limit_warning_saves_requeues_through_submitit_and_the_job_resumes(tmp_path):
    env = fake_slurm_on_path(tmp_path)
    sweep = tmp_path / "sweep"
    run_dir = sweep / "0"
    warning = [  # SLURM's warning, to the whole job step (DataLoader workers too), part way through step 3
        "+callbacks.warn._target_=helpers.SignalAtStep",
        "+callbacks.warn.step=2",
        "+callbacks.warn.signal_name=SIGUSR2",
        "+callbacks.warn.first_micro_batch=true",
        "+callbacks.warn.process_group=true",
        f"+callbacks.warn.once_file={tmp_path / 'warned'}",  # the requeued job is not warned again
    ]
    result = run_cli(
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.timeout_min=1",  # so that submitit counts the job as timed out, not preempted
        f"hydra.sweep.dir={sweep}",
        *SMALL,
        "data.num_workers=2",
        "trainer.max_steps=5",
        "val_every_steps=5",
        "resume=auto",
        *warning,
        cwd=TESTS,
        env=env,
    )
    state = tmp_path / "slurm"
    job_logs = "".join(path.read_text() for path in (sweep / ".submitit").rglob("*_log.*"))
    assert result.returncode == 0, result.stderr[-3000:] + job_logs[-3000:]
    assert "#SBATCH --signal=USR2@120" in (state / "sbatch_scripts").read_text()  # the preset's warning
    assert "Stopped by SIGUSR2 at step 3 of 5" in job_logs  # saved at the end of the step it was in
    assert "Requeued job 4242 (19 remaining timeouts)" in job_logs  # submitit, with the preset's 20
    assert (state / "scontrol_calls").read_text().splitlines() == ["requeue 4242"]  # once
    assert f"Resuming from {run_dir}/checkpoints/step000003.ckpt (step 3)" in job_logs
    assert read_json(run_dir / "result.json")["status"] == "completed"
    trained = [int(row["step"]) for row in read_metrics(run_dir / "csv" / "metrics.csv") if "train/loss" in row]
    assert trained == [1, 2, 3, 4, 5]  # each step once: nothing lost, nothing redone
    assert "| completed |" in (sweep / "sweep_results.md").read_text()
