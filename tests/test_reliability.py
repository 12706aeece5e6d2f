"""Crashes, kills, preemption, divergence and bad configuration, as users meet them."""

import csv
import json
import os
import shlex
import shutil
import stat
from pathlib import Path

import pytest
import torch

from fineweb_gpt.config_files import load_option
from fineweb_gpt.errors import ConfigError
from fineweb_gpt.flops import gpt2_shaped, human_count, parameter_count
from fineweb_gpt.lit_module import GPTLightningModule, LossGuard
from fineweb_gpt.training import train
from helpers import SMALL, quiet_cpu_trainer, run_cli

# Dropout on, so a resumed run must also continue the random streams; two data workers,
# so it must also continue each worker's place in the data (and a signal to the whole
# process group must leave the workers to the training process's decision).
RUN = [
    *SMALL,
    "model.dropout=0.1",
    "data.num_workers=2",
    "data.rows_per_chunk=16",
    "optim.warmup_steps=2",
    "trainer.max_steps=10",
    "val_every_steps=5",
    "callbacks.model_checkpoint.every_n_train_steps=2",
]
PER_STEP = ("train/loss", "train/lr", "data/tokens_seen", "train/grad_norm")
# Bit-exact comparisons need the same arithmetic in every run: with several threads the math
# libraries may change how they split a sum when the machine is busy.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def train_cli(*args: str, env: dict | None = None):
    # In a process group of its own, as a terminal or a SLURM job step starts it.
    return run_cli(*args, cwd=Path(__file__).parent, env={**ONE_THREAD, **(env or {})}, own_process_group=True)


def per_step_rows(run_dir: Path) -> dict[int, list[dict]]:
    """Every logged row of each optimizer step, as the CSV holds them."""
    rows: dict[int, list[dict]] = {}
    with open(run_dir / "csv" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                rows.setdefault(int(row["step"]), []).append({key: row[key] for key in PER_STEP})
    return rows


@pytest.fixture(scope="module")
def uninterrupted_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("uninterrupted")
    result = train_cli(*RUN, f"hydra.run.dir={folder}")
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_folder) -> dict[int, dict]:
    rows = per_step_rows(uninterrupted_folder)
    assert sorted(rows) == list(range(1, 11))
    return {step: logged[0] for step, logged in rows.items()}


DETERMINISTIC = ("step", *PER_STEP, "val/loss", "data/epoch")  # not the timings


def record(run_dir: Path) -> list[dict]:
    """Every row of the run's CSV record, in order: its deterministic values and any health/ column."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [
            {key: value for key, value in row.items() if key in DETERMINISTIC or key.startswith("health/")}
            for row in csv.DictReader(f)
        ]


def follow_resume_command(output: str, env: dict | None = None):
    """Run the command the stop message says resumes the run, as a user pastes it."""
    command = shlex.split(output.split("resume with: ")[1].splitlines()[0])
    assert command[:3] == ["python", "-m", "fineweb_gpt.train"]
    return train_cli(*command[3:], env=env)


def assert_continues_exactly(run_dir: Path, uninterrupted: dict[int, dict]) -> None:
    rows = per_step_rows(run_dir)
    assert sorted(rows) == list(range(1, 11))
    for step, logged in rows.items():  # the steps redone after the kill are in the CSV once
        assert logged == [uninterrupted[step]], f"step {step}"


@pytest.mark.slow
# Killed mid-step after a checkpoint; a kill at a step boundary right after one is the evaluation test below.
@pytest.mark.parametrize("kill_after, mid_step", [(6, True)])
def test_kill_9_then_resume_equals_the_uninterrupted_run(tmp_path, uninterrupted, kill_after, mid_step):
    run_dir = tmp_path / "run"
    killer = [
        "+callbacks.kill._target_=helpers.SignalAtStep",
        f"+callbacks.kill.step={kill_after}",
        f"+callbacks.kill.first_micro_batch={str(mid_step).lower()}",
    ]
    killed = train_cli(*RUN, *killer, f"hydra.run.dir={run_dir}")
    assert killed.returncode == -9
    resumed = train_cli(*RUN, "resume=auto", f"hydra.run.dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stdout + resumed.stderr
    assert_continues_exactly(run_dir, uninterrupted)
    # last.ckpt names the newest, with no -v1 copies, and only the newest two are kept, the file it
    # resumed from included (killed after step 3, it resumed from the run's first checkpoint, step 2).
    assert_newest_two_kept(run_dir / "checkpoints", [8, 10])


def assert_newest_two_kept(folder: Path, steps: list[int]) -> None:
    names = [f"step{step:06d}.ckpt" for step in steps]
    assert sorted(path.name for path in folder.iterdir()) == ["last.ckpt", *names]
    assert os.readlink(folder / "last.ckpt") == names[-1]
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == steps[-1]


@pytest.mark.slow
def test_a_copied_run_folder_resumes_into_its_own_files(tmp_path, uninterrupted_folder):
    # A run folder copied without its links (shutil.copytree, cp -rL, a download): last.ckpt is a
    # plain file there. The copy goes on with its own last.ckpt link and its own newest two, and
    # the original is not touched.
    copy = tmp_path / "copy"
    shutil.copytree(uninterrupted_folder, copy)
    assert not (copy / "checkpoints" / "last.ckpt").is_symlink()
    original = {path: path.stat().st_mtime_ns for path in uninterrupted_folder.rglob("*")}
    longer = train_cli(*RUN, "trainer.max_steps=12", "resume=auto", f"hydra.run.dir={copy}")
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "trainer.max_steps 10 -> 12" in longer.stdout  # warned: the schedule is stretched from step 10
    assert_newest_two_kept(copy / "checkpoints", [10, 12])
    assert {path: path.stat().st_mtime_ns for path in uninterrupted_folder.rglob("*")} == original


@pytest.mark.slow
def test_kill_9_during_an_evaluation_then_resume_records_what_the_uninterrupted_run_did(tmp_path, uninterrupted_folder):
    # The step-5 checkpoint is saved before step 5's evaluation; killed during that evaluation,
    # the run resumed after step 5 and the evaluation was lost for good (issue 28, item 2).
    run_dir = tmp_path / "run"
    at_5 = ["callbacks.model_checkpoint.every_n_train_steps=5"]
    kill = ["+callbacks.kill._target_=helpers.SignalDuringEvaluation", "+callbacks.kill.step=5"]
    killed = train_cli(*RUN, *at_5, *kill, f"hydra.run.dir={run_dir}")
    assert killed.returncode == -9
    assert saved_step(run_dir) == 5
    resumed = train_cli(*RUN, *at_5, "resume=auto", f"hydra.run.dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert record(run_dir) == record(uninterrupted_folder)  # row by row: evaluations and health rows too


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_resumes_from_the_previous_good_one(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    torn = ["+trainer.plugins=[{_target_: helpers.TornWrites, tear_at: 3}]"]  # the step-6 checkpoint is torn
    killed = train_cli(*RUN, *torn, f"hydra.run.dir={run_dir}")
    assert killed.returncode == -9
    assert (run_dir / "checkpoints" / "step000006.ckpt").stat().st_size < (
        run_dir / "checkpoints" / "step000004.ckpt"
    ).stat().st_size
    resumed = train_cli(*RUN, "resume=auto", f"hydra.run.dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert f"Checkpoint {run_dir}/checkpoints/step000006.ckpt cannot be loaded" in output
    assert "Resuming from" in output and "step000004.ckpt" in output
    assert_continues_exactly(run_dir, uninterrupted)


@pytest.mark.slow
def test_a_checkpoint_due_by_the_clock_waits_for_the_end_of_the_step(tmp_path, uninterrupted):
    # Checkpoints every 3 s, and the first micro-batch of step 2 starts 4 s late: the time is up
    # half way through step 2's accumulation. The save must wait for the step to end, or a run
    # resumed from it would skip the micro-batch already trained and lose its gradients.
    run_dir = tmp_path / "run"
    by_the_clock = [
        *(arg for arg in RUN if not arg.startswith("callbacks.model_checkpoint.every_n_train_steps=")),
        "callbacks.model_checkpoint.every_n_train_steps=1000",
        "callbacks.model_checkpoint.every_n_minutes=0.05",
        "+callbacks.pause._target_=helpers.PauseMidStep",
        "+callbacks.pause.step=1",
        "+callbacks.pause.seconds=4",
        "+callbacks.kill._target_=helpers.SignalAtStep",
        "+callbacks.kill.step=3",
    ]
    killed = train_cli(*by_the_clock, f"hydra.run.dir={run_dir}")
    assert killed.returncode == -9
    assert [path.name for path in (run_dir / "checkpoints").glob("step*.ckpt")] == ["step000002.ckpt"]
    resumed = train_cli(*RUN, "resume=auto", f"hydra.run.dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_continues_exactly(run_dir, uninterrupted)


def saved_step(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]


def signal_mid_step(signal_name: str, after_step: int, times: int = 1) -> list[str]:
    """Send `signal_name` to the run's whole process group, DataLoader workers included (as SLURM
    and a terminal's Ctrl-C do), after the first micro-batch of step after_step + 1."""
    return [
        "+callbacks.stop._target_=helpers.SignalAtStep",
        f"+callbacks.stop.step={after_step}",
        f"+callbacks.stop.signal_name={signal_name}",
        "+callbacks.stop.first_micro_batch=true",
        "+callbacks.stop.process_group=true",
        f"+callbacks.stop.times={times}",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("signal_name, stopped_at", [("SIGTERM", 10), ("SIGINT", 5)])
def test_a_stop_signal_saves_at_the_end_of_the_step_and_the_printed_command_resumes_it(
    tmp_path, uninterrupted_folder, signal_name, stopped_at
):
    # SIGTERM (SLURM's preemption and end of job) and SIGINT (Ctrl-C) part way through a step
    # the run evaluates: the middle one, and the last.
    run_dir = tmp_path / "run"
    once = [f"+callbacks.stop.once_file={tmp_path / 'sent'}"]  # the resumed run is not signalled again
    stop = [*signal_mid_step(signal_name, after_step=stopped_at - 1), *once]
    stopped = train_cli(*RUN, *stop, f"hydra.run.dir={run_dir}")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    output = stopped.stdout + stopped.stderr
    assert f"Stopped by {signal_name} at step {stopped_at} of 10, saved {run_dir}/checkpoints/" in output
    # Saved at the end of the step it was in, not at the last periodic save nor part way, and
    # without that step's evaluation (before, the stop made Lightning evaluate: time SLURM's
    # grace period does not have, and at any step); it is the resumed run's first work.
    assert saved_step(run_dir) == stopped_at
    assert [row["step"] for row in record(run_dir) if row["val/loss"]] == ["0", "5"][: 1 + (stopped_at > 5)]
    # A sweep's table must not count it as finished.
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "stopped" and f"at step {stopped_at} of 10" in result["error"]
    # The printed command keeps the run's own settings (before: resume=auto alone, which went
    # back to the defaults without a word).
    resumed = follow_resume_command(output)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "settings that differ" not in resumed.stdout + resumed.stderr
    assert record(run_dir) == record(uninterrupted_folder)
    assert json.loads((run_dir / "result.json").read_text())["status"] == "completed"
    assert_newest_two_kept(run_dir / "checkpoints", [8, 10])


@pytest.mark.parametrize(
    "signal_name, when",
    [
        ("SIGTERM", ["+callbacks.stop._target_=helpers.SignalDuringEvaluation", "+callbacks.stop.step=0"]),
        ("SIGINT", ["+callbacks.stop._target_=helpers.SignalAtStep", "+callbacks.stop.step=0"]),
    ],
    ids=["SIGTERM during the step-0 evaluation", "Ctrl-C after the first micro-batch"],
)
def test_a_stop_signal_before_the_first_step_finished_stops_at_once(tmp_path, signal_name, when):
    # Before: SIGTERM during the step-0 evaluation exited 0 with no word and no result.json;
    # Ctrl-C during the first step waited for the step (minutes, compiled, on a big batch), then
    # evaluated, and outputs/latest named a folder without checkpoints (issue 28 item 11, 30.2).
    run_dir = tmp_path / "outputs" / "run"
    stop = [*when, f"+callbacks.stop.signal_name={signal_name}", "+callbacks.stop.process_group=true"]
    stopped = run_cli(*RUN, *stop, f"hydra.run.dir={run_dir}", cwd=tmp_path, own_process_group=True, env=ONE_THREAD)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    output = stopped.stdout + stopped.stderr
    assert f"Stopped by {signal_name} at step 0 of 10, before a step finished, nothing to save; resume with: " in output
    assert json.loads((run_dir / "result.json").read_text())["status"] == "stopped"
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
    if (run_dir / "csv").exists():
        assert not any(row.get("train/loss") for row in record(run_dir))  # no step was trained
    assert not os.path.lexists(tmp_path / "outputs" / "latest")


@pytest.mark.slow
def test_a_second_signal_cuts_the_step_short_and_saves_the_last_finished_one(tmp_path, uninterrupted):
    # Ctrl-C twice after the first of step 4's two micro-batches: the run must not wait for the
    # step to end (on a CPU, or with long accumulation, that is minutes). Its weights and optimizer
    # are still step 3's, but the data position, the random streams and Lightning's counters have
    # moved on; the save must record them as they were at step 3's end, or the resumed run would
    # differ from the uninterrupted one. (Step 3 is not a periodic save: those come every 2 steps.)
    run_dir = tmp_path / "run"
    stopped = train_cli(*RUN, *signal_mid_step("SIGINT", after_step=3, times=2), f"hydra.run.dir={run_dir}")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    output = stopped.stdout + stopped.stderr
    assert "SIGINT again: stopping at the next micro-batch" in output
    assert "Stopped by SIGINT at step 3 of 10" in output
    assert saved_step(run_dir) == 3
    assert sorted(per_step_rows(run_dir)) == [1, 2, 3]  # step 4 never finished
    with open(run_dir / "csv" / "metrics.csv") as f:
        assert [int(row["step"]) for row in csv.DictReader(f) if row.get("val/loss")] == [0]  # nor evaluated
    resumed = train_cli(*RUN, "resume=auto", f"hydra.run.dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_continues_exactly(run_dir, uninterrupted)


@pytest.mark.slow
def test_sigusr1_under_slurm_requeues_the_job_once(tmp_path):
    # SLURM's warning (#SBATCH --signal=USR1@120), sent to every process of the job step.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol_calls\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    result = train_cli(*RUN, *signal_mid_step("SIGUSR1", after_step=2), f"hydra.run.dir={tmp_path / 'run'}", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Stopped by SIGUSR1 at step 3 of 10" in result.stdout + result.stderr
    assert (tmp_path / "scontrol_calls").read_text().splitlines() == ["requeue 4242"]


def test_planted_nan_stops_with_the_step_lr_and_an_intact_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    poison = ["+callbacks.poison._target_=helpers.PoisonWeights", "+callbacks.poison.step=5"]
    result = train_cli(*RUN, "data.num_workers=0", *poison, f"hydra.run.dir={run_dir}")
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: train loss is nan at step 6 (lr ")
    assert f"the last good checkpoint, {run_dir}/checkpoints/last.ckpt, is untouched" in line
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())


def test_out_of_memory_names_the_micro_batch_and_a_smaller_one(tmp_path):
    oom = ["+callbacks.oom._target_=helpers.RunOutOfMemory"]
    result = train_cli(*RUN, "data.num_workers=0", *oom, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    params = human_count(parameter_count(gpt2_shaped(n_layer=1, n_embd=32)))
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: CUDA out of memory at hw.micro_batch_size=4 (block 32, {params} parameters); use "
        "hw.micro_batch_size=2 (gradient accumulation becomes 4, still 256 tokens per step)"
    )


def test_loss_guard_verdicts():
    guard = LossGuard(spike_factor=2.0, action="skip")
    assert [guard.verdict(3.0 - i * 0.01) for i in range(12)] == [None] * 12
    assert guard.verdict(10.0) == "skip"  # above 2x the recent median
    assert guard.verdict(float("nan")) == "nonfinite" and guard.verdict(float("inf")) == "nonfinite"
    assert LossGuard().verdict(1e6) is None  # no spike factor: only non-finite losses count
    with pytest.raises(ConfigError, match="loss_guard.action='pause' must be 'stop' or 'skip'"):
        LossGuard(action="pause")


def test_a_skipped_spike_leaves_the_weights_alone(caplog):
    import lightning as L

    # The guard compares with the median of the last 50 steps: by step 80 they are all learned ones.
    SPIKE_AT = 80
    module = GPTLightningModule(
        model_config=dict(block_size=8, n_layer=1, n_head=1, n_embd=16),
        optim={**load_option("optim", "adamw"), "lr": 1e-2, "warmup_steps": 1},
        loss_guard={"spike_factor": 2.0, "action": "skip"},
    )
    before = {}

    class Spike(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == SPIKE_AT:
                before.update({k: v.clone() for k, v in pl_module.state_dict().items()})
                batch[:, 1:] = 50300  # targets the model has learned never come: a loss spike

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == SPIKE_AT + 1:
                for key, value in pl_module.state_dict().items():
                    assert torch.equal(value, before[key]), key
                pl_module.checked = True

    windows = torch.randint(0, 100, (1, 9)).repeat(400, 1)  # one window, learned quickly
    trainer = quiet_cpu_trainer(
        max_steps=SPIKE_AT + 4,
        callbacks=[Spike()],
    )
    trainer.fit(module, torch.utils.data.DataLoader(windows, batch_size=4))
    assert getattr(module, "checked", False)
    assert f"Skipped step {SPIKE_AT + 1}: loss" in caplog.text


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.block_size=64"], "data.block_size=64 is longer than the model's context, model.block_size=32"),
        (["model.vocab_size=50000"], "model.vocab_size=50000 is below the GPT-2 tokenizer's 50257 ids"),
        (["model.n_embd=100", "model.n_head=12"], "model.n_embd=100 is not divisible by model.n_head=12"),
        (["trainer.max_steps=0"], "trainer.max_steps=0 must be a whole number at least 1, or -1"),
        (["trainer.max_steps=-5"], "trainer.max_steps=-5 must be a whole number at least 1, or -1"),
        (["val_every_steps=0"], "val_every_steps=0 must be a whole number at least 1"),
        (["resume=yes"], "resume=yes is not known"),
        (["ckpt_path=/nowhere/last.ckpt"], "ckpt_path=/nowhere/last.ckpt does not exist"),
        # Tracebacks before (issue 28, item 11):
        (
            ["callbacks.model_checkpoint.every_n_train_steps=-1"],
            "callbacks.model_checkpoint.every_n_train_steps=-1 must be a whole number at least 0, or null",
        ),
        (
            ["callbacks.model_checkpoint.every_n_train_steps=abc"],
            "callbacks.model_checkpoint.every_n_train_steps=abc must be a whole number at least 0, or null",
        ),
        (
            ["callbacks.model_checkpoint.save_top_k=-5"],
            "callbacks.model_checkpoint.save_top_k=-5 must be a whole number at least 0, or -1",
        ),
        (
            ["callbacks.model_checkpoint.dirpath=/proc/self"],
            "callbacks.model_checkpoint.dirpath=/proc/self: no file can be made in /proc/self (",
        ),
        (["data.text_column=${oc.env:NOPE}"], "data.text_column cannot be resolved: Environment variable 'NOPE' not"),
        (
            ["hw.micro_batch_size=100000000", "total_batch_tokens=3200000000"],
            "a training step needs about ",
        ),
    ],
)
def test_bad_configuration_is_refused_before_any_data_is_read(make_config, overrides, message):
    # The data file does not exist either: the configuration must be refused first.
    small = [o for o in RUN if not o.startswith(("data.", "trainer.max_steps"))]
    cfg = make_config(*small, "data=single_parquet", "data.path=/nowhere/000_00000.parquet", *overrides)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        train(cfg)


def test_an_unknown_hw_profile_is_named_with_the_options_that_exist(tmp_path):
    result = run_cli("hw=rtx5090", cwd=tmp_path)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]  # the line read first ends on the cause
    options = last.split("(it has ")[1].split(")")[0].split(", ")
    assert options == ["a100", "auto", "cpu", "h100", "h100_pcie", "h200", "rtx3090", "rtx4070", "rtx4090"]
    assert last.endswith("did you mean hw=rtx4090?")
    assert not (tmp_path / "outputs").exists()  # refused before any run folder was made
