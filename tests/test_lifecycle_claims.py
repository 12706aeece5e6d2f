"""One run at a time in a run folder, and a resume settled before anything is written: the lock
(issue 19, item 6) and the comparison of a checkpoint's settings with the command's (item 7)."""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fineweb_gpt.data import bundled_sample_path
from fineweb_gpt.errors import ConfigError
from fineweb_gpt.optimization import learning_rate
from fineweb_gpt.run.folder_lock import FolderLock
from fineweb_gpt.run.ownership import claim_run_folder
from fineweb_gpt.run.run_files import read_metrics
from helpers import SMALL, cli_env, run_cli

TESTS = Path(__file__).parent
RUN = [*SMALL, "trainer.max_steps=2", "val_every_steps=2", "callbacks.model_checkpoint.every_n_train_steps=1"]


def hold_the_lock(run_dir: Path, by_hand: bool = False) -> subprocess.Popen:
    """Another process that takes the folder's lock and keeps it; returns once it holds it.
    by_hand: a bare POSIX lock, without fineweb_gpt (and its imports)."""
    lock = str(run_dir / ".lock")
    take = (
        f"import fcntl, os\nfcntl.lockf(os.open({lock!r}, os.O_RDWR | os.O_CREAT), fcntl.LOCK_EX)\n"
        if by_hand
        else f"from fineweb_gpt.run.folder_lock import FolderLock\nFolderLock({str(run_dir)!r}).acquire()\n"
    )
    script = take + "print('held', flush=True)\nimport time\ntime.sleep(600)\n"
    holder = subprocess.Popen([sys.executable, "-c", script], env=cli_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def start_training(*overrides: str) -> subprocess.Popen:
    """The training command in the background, its stderr kept for the test's messages."""
    command = [sys.executable, "-m", "fineweb_gpt.train", *overrides]
    return subprocess.Popen(
        command, cwd=TESTS, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def test_a_held_folder_is_refused_naming_the_holder_and_a_stale_lock_can_be_deleted(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = hold_the_lock(run_dir)
    try:
        with pytest.raises(ConfigError) as refused:
            FolderLock(run_dir).acquire()
        message = str(refused.value)
        assert message.startswith(f"run folder {run_dir} is in use by process {holder.pid} on {os.uname().nodename}")
        assert f" (since {time.strftime('%Y-%m-%d')}" in message and ": -c)" in message  # when, and its command line
        assert message.endswith(f"delete {run_dir}/.lock and run again")
        # The way past a lock whose holder cannot be reached (a crashed node on a network filesystem).
        (run_dir / ".lock").unlink()
        FolderLock(run_dir).acquire().release()
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_run_goes_with_it(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = hold_the_lock(run_dir, by_hand=True)
    with pytest.raises(ConfigError, match="is in use by another process"):
        FolderLock(run_dir).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    FolderLock(run_dir).acquire().release()  # no stale lock after kill -9: the system drops it


@pytest.mark.slow
def test_two_runs_of_the_same_command_the_second_is_refused_naming_the_first(tmp_path):
    # A requeued job overlapping the old one, or the same command typed twice (issue 19, item 6):
    # before, both trained into the folder, interleaving metrics.csv and forking the checkpoints.
    run_dir = tmp_path / "run"
    command = [*RUN, "trainer.max_steps=4", "resume=auto", f"hydra.run.dir={run_dir}"]
    cue = tmp_path / "second_one_was_refused"
    held = ["+callbacks.wait._target_=helpers.WaitForFile", f"+callbacks.wait.path={cue}"]
    first = start_training(*command, *held)
    try:
        while b"pid" not in ((run_dir / ".lock").read_bytes() if (run_dir / ".lock").exists() else b""):
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.2)
        second = run_cli(*command, cwd=TESTS)
        cue.touch()
        assert second.returncode == 2
        line = second.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: run folder {run_dir} is in use by process {first.pid} on ")
        assert "fineweb_gpt/train.py hw=cpu" in line  # the other run's command line
        assert first.wait(timeout=600) == 0, first.stderr.read()
    finally:
        first.kill()
    with open(run_dir / "csv" / "metrics.csv") as file:
        rows = list(csv.reader(file))
    assert {len(row) for row in rows} == {len(rows[0])}  # one header, every row aligned with it
    trained = [int(row["step"]) for row in read_metrics(run_dir / "csv" / "metrics.csv") if "train/loss" in row]
    assert trained == [1, 2, 3, 4]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "last.ckpt",
        "step000003.ckpt",
        "step000004.ckpt",
    ]


def test_a_refused_run_never_removes_a_folder_another_run_trained_in(tmp_path):
    # Two commands on one folder (the same hydra.run.dir, or two started in the same second):
    # the second made the folder, was held up, and by the time it was refused the first had
    # trained in it. Before, the refusal removed the folder "it made", checkpoints and all.
    run_dir = tmp_path / "run"
    paused, go = tmp_path / "paused", tmp_path / "go"
    hold = [
        "+hydra.callbacks.pause._target_=helpers.PauseAfterRunStart",
        f"+hydra.callbacks.pause.paused={paused}",
        f"+hydra.callbacks.pause.go={go}",
    ]
    second = start_training(*RUN, f"hydra.run.dir={run_dir}", *hold)
    try:
        while not paused.exists():
            assert second.poll() is None, second.stderr.read()
            time.sleep(0.1)
        first = run_cli(*RUN, f"hydra.run.dir={run_dir}", cwd=TESTS)
        assert first.returncode == 0, first.stderr[-2000:]
        go.touch()
        assert second.wait(timeout=300) == 2
        assert "already holds checkpoints" in second.stderr.read().strip().splitlines()[-1]
    finally:
        second.kill()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "last.ckpt",
        "step000001.ckpt",
        "step000002.ckpt",
    ]
    assert json.loads((run_dir / "result.json").read_text())["status"] == "completed"


def test_a_refusal_removes_a_folder_only_while_holding_its_lock_and_if_no_other_run_held_it(tmp_path, monkeypatch):
    from fineweb_gpt.run import ownership

    def made_here(name: str) -> Path:
        run_dir = tmp_path / name
        run_dir.mkdir()
        monkeypatch.setitem(ownership.made_by_this_command, str(run_dir), [run_dir])
        return run_dir

    fresh = made_here("fresh")
    assert ownership.discard_untrained_run(str(fresh)) and not fresh.exists()

    held = made_here("held")
    holder = hold_the_lock(held)
    try:
        assert not ownership.discard_untrained_run(str(held))  # another run holds it: it is that run's
    finally:
        holder.kill()
        holder.wait()
    assert held.is_dir()
    assert not ownership.discard_untrained_run(str(held))  # and held it once: still that run's
    assert held.is_dir() and f'"pid": {holder.pid}' in (held / ".lock").read_text()

    mine = made_here("mine")
    lock = FolderLock(mine).acquire()
    lock.release()
    lock = FolderLock(mine).acquire()  # taken twice by this process (the claim, then the refusal)
    assert ownership.discard_untrained_run(str(mine), lock) and not mine.exists()


# --- resuming with other settings -----------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run folder two steps in, with checkpoints at steps 1 and 2, trained on a parquet file."""
    folder = tmp_path_factory.mktemp("trained")
    data = folder / "data" / "000_00000.parquet"
    data.parent.mkdir()
    shutil.copy(bundled_sample_path(), data)
    result = run_cli(*RUN, "data=single_parquet", f"data.path={data}", f"hydra.run.dir={folder / 'run'}", cwd=TESTS)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def files(run_dir: Path) -> dict[Path, bytes]:
    """Every file of a run folder and its bytes, but the lock and the log Hydra opens before any check."""
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name not in (".lock", "train.log")}


def test_a_resume_that_cannot_work_is_refused_on_the_command_line_before_anything_is_written(tmp_path, trained):
    # Before (issue 19, item 7): a traceback, after run_summary.json and .hydra/config.yaml had
    # been overwritten with the new settings.
    run_dir = tmp_path / "run"
    shutil.copytree(trained / "run", run_dir, symlinks=True)
    before = files(run_dir)
    data = f"data.path={trained / 'data' / '000_00000.parquet'}"
    result = run_cli(
        *RUN, "data=single_parquet", data, "model.n_embd=64", "resume=auto", f"hydra.run.dir={run_dir}", cwd=TESTS
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: cannot resume {run_dir}/checkpoints/step000002.ckpt with model.n_embd=64 (the checkpoint has 32): "
        "a checkpoint's weights and optimizer state fit only the model and optimizer they were trained with; resume "
        "with the checkpoint's values, or start a new run folder (another hydra.run.dir)"
    )
    assert files(run_dir) == before  # run_summary.json, .hydra/*.yaml, result.json, csv, checkpoints


def copy_of(trained: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the trained run folder, and the data.path it trained on."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained / "run", run_dir, symlinks=True)
    return run_dir, f"data.path={trained / 'data' / '000_00000.parquet'}"


def test_a_resume_refused_for_its_data_leaves_the_runs_record_as_it_was(tmp_path, trained):
    # Before: exit 2 in one line, but .hydra/*.yaml then held the refused command (issue 28, item 5).
    run_dir, _ = copy_of(trained, tmp_path)
    before = files(run_dir)
    missing = f"data.path={tmp_path / 'gone.parquet'}"
    longer = ["trainer.max_steps=3", "resume=auto"]
    result = run_cli(*RUN, "data=single_parquet", missing, *longer, f"hydra.run.dir={run_dir}", cwd=TESTS)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: data file {tmp_path / 'gone.parquet'} does not exist; check data.path / data.paths"
    )
    assert files(run_dir) == before


def test_resuming_a_finished_run_says_it_is_complete_and_keeps_its_result(tmp_path, trained):
    # Before: "Final val loss: n/a", and result.json's final_val_loss became null (issue 28 item
    # 11, issue 30.6).
    run_dir, data = copy_of(trained, tmp_path)
    before = files(run_dir)
    final = json.loads((run_dir / "result.json").read_text())["final_val_loss"]
    result = run_cli(*RUN, "data=single_parquet", data, "resume=auto", f"hydra.run.dir={run_dir}", cwd=TESTS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        f"The run in {run_dir} is already complete: step 2 of 2, final val loss {final:.4f}; nothing to train"
    ) in result.stdout
    assert files(run_dir) == before  # its result, record, metrics and checkpoints


@pytest.mark.parametrize("planted", ["train.log", "result.json"])
def test_a_link_planted_where_a_run_writes_is_refused_before_anything_is_written(tmp_path, trained, planted):
    # A copied run folder with links to files outside it, then resume=auto. Before: the outside
    # log was appended to, and a result.json link gave a traceback once training was over.
    run_dir, data = copy_of(trained, tmp_path)
    outside = tmp_path / "outside"
    outside.write_text("mine\n")
    (run_dir / planted).unlink(missing_ok=True)
    (run_dir / planted).symlink_to(outside)
    before = files(run_dir)
    longer = ["trainer.max_steps=3", "resume=auto"]
    result = run_cli(*RUN, "data=single_parquet", data, *longer, f"hydra.run.dir={run_dir}", cwd=TESTS)
    assert result.returncode == 2, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    if planted == "train.log":
        assert line == (
            f"error: the run's log {run_dir / 'train.log'} is a link (to {outside}); fineweb_gpt never writes "
            "through a link: delete it, or give another hydra.run.dir"
        )
    else:
        assert line == (
            f"error: {run_dir / 'result.json'} is a link (to {outside}); fineweb_gpt never writes through a link: "
            "delete the link, or give another path"
        )
    assert outside.read_text() == "mine\n" and files(run_dir) == before


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.arch=modern", "resume=auto"], "with model.arch=modern (the checkpoint has gpt2), model.norm=rmsnorm"),
        (["model.bias=true", "resume=auto"], "with model.bias=True (the checkpoint has False): a checkpoint's"),
        (["optim=muon", "resume=auto"], "with optim.optimizer=muon (the checkpoint has adamw): a checkpoint's"),
        (["optim.weight_decay=0.0", "resume=auto"], "with optim.weight_decay=0.0 (the checkpoint has 0.1)"),
        (["ckpt_path=last", "model.n_layer=2"], "with model.n_layer=2 (the checkpoint has 1)"),
        ([], "already holds checkpoints (last.ckpt, step000001.ckpt, step000002.ckpt); a new run here would"),
        (["ckpt_path=RUN/checkpoints/step000001.ckpt"], "holds checkpoints newer than ckpt_path=RUN/checkpoints/step0"),
    ],
    ids=["arch", "bias", "optimizer", "weight_decay", "ckpt_path=last", "fresh start", "older checkpoint"],
)
def test_what_cannot_work_is_refused_with_the_folder_left_as_it_was(make_config, tmp_path, trained, overrides, message):
    # The same claim the command line makes first (train.main), composed in this process.
    run_dir = tmp_path / "run"
    shutil.copytree(trained / "run", run_dir, symlinks=True)
    before = files(run_dir)
    overrides = [o.replace("RUN", str(run_dir)) for o in overrides]
    data = f"data.path={trained / 'data' / '000_00000.parquet'}"
    cfg = make_config(*RUN, "data=single_parquet", data, *overrides)
    with pytest.raises(ConfigError, match=re.escape(message.replace("RUN", str(run_dir)))):
        claim_run_folder(cfg)
    assert files(run_dir) == before


def test_a_resume_with_changed_data_batch_seed_and_rate_is_warned_and_takes_the_new_values(tmp_path, trained):
    run_dir = tmp_path / "run"
    shutil.copytree(trained / "run", run_dir, symlinks=True)
    moved = tmp_path / "elsewhere" / "000_00000.parquet"
    moved.parent.mkdir()
    shutil.copy(trained / "data" / "000_00000.parquet", moved)
    old_lr = json.loads((run_dir / "run_summary.json").read_text())["lr"]
    changed = ["data=single_parquet", f"data.path={moved}", "total_batch_tokens=512", "seed=7", "optim.lr=1e-3"]
    changed += ["val_every_steps=4"]  # before, not named: only a hand-kept list of settings was compared
    result = run_cli(*RUN, *changed, "trainer.max_steps=4", "resume=auto", f"hydra.run.dir={run_dir}", cwd=TESTS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exists and is not empty" not in result.stdout + result.stderr  # Lightning's notice on every resume
    warning = next(line for line in result.stdout.splitlines() if "settings that differ" in line)
    for difference in (
        f"optim.lr {old_lr} -> 0.001",
        "total_batch_tokens 256 -> 512",
        "seed 1337 -> 7",
        "trainer.max_steps 2 -> 4",
        f"data.path {trained / 'data' / '000_00000.parquet'} -> {moved}",
        "val_every_steps 2 -> 4",
    ):
        assert difference in warning
    assert "documents of the current epoch may be skipped or seen twice" in warning
    assert "data.seed" not in warning  # it only repeats seed
    # The schedule follows the new optim.lr from the resumed step (before, the checkpoint's base
    # rate was kept and multiplied by the new schedule's factors: neither old nor new).
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["lr"] == 1e-3 and summary["tokens_per_step"] == 512
    logged = {
        int(row["step"]): row["train/lr"] for row in read_metrics(run_dir / "csv" / "metrics.csv") if "train/lr" in row
    }
    for step in (3, 4):
        expected = learning_rate(step, 1e-3, summary["min_lr"], summary["warmup_steps"], summary["max_steps"])
        assert logged[step] == pytest.approx(expected, rel=1e-9)
    assert "seed: 7" in (run_dir / ".hydra" / "config.yaml").read_text()  # the accepted run's record
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["run_config"]["seed"] == 7
