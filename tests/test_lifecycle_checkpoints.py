"""Checkpoint files as disks and kills treat them: temporaries beside the file and cleaned up, a full
disk that tears nothing, a resume that refuses when no checkpoint loads (issue 19, items 4 and 5).
last.ckpt and the newest two across resumes (item 8) are checked on real runs in test_reliability.py."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from fineweb_gpt.errors import DiskFull
from fineweb_gpt.run.checkpoint_saving import BesideFileCheckpointIO
from fineweb_gpt.run.ownership import remove_cut_off_saves
from fineweb_gpt.run.run_files import read_metrics
from helpers import SMALL, cli_env, run_cli


def checkpoint(megabytes: float, fill: float = 1.0) -> dict:
    return {"state_dict": {"w": torch.full((int(megabytes * 2**18),), fill)}, "global_step": int(fill)}


def loads(path: Path) -> float | None:
    """The fill value of a checkpoint written by checkpoint(), or None if it does not load."""
    try:
        return float(torch.load(path, weights_only=True)["state_dict"]["w"][0])
    except Exception:
        return None


@pytest.fixture
def empty_tmpdir(tmp_path, monkeypatch):
    """$TMPDIR, watched: nothing may be left there."""
    import tempfile

    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_a_save_goes_through_a_temporary_beside_the_file_not_tmpdir(tmp_path, empty_tmpdir):
    folder = tmp_path / "checkpoints"
    BesideFileCheckpointIO().save_checkpoint(checkpoint(1, fill=2.0), folder / "step000002.ckpt")
    BesideFileCheckpointIO().save_checkpoint(checkpoint(1, fill=4.0), folder / "step000002.ckpt")  # replaced whole
    assert [p.name for p in folder.iterdir()] == ["step000002.ckpt"]
    assert loads(folder / "step000002.ckpt") == 4.0
    assert list(empty_tmpdir.iterdir()) == []


def test_a_full_disk_at_the_last_moment_leaves_the_old_file_whole_and_says_so_in_one_line(
    tmp_path, empty_tmpdir, monkeypatch
):
    # Some filesystems (NFS, delayed allocation) report a full disk only when the data is flushed:
    # simulated here by the flush, the last system call of the write, failing with ENOSPC.
    folder = tmp_path / "checkpoints"
    writer = BesideFileCheckpointIO()
    writer.save_checkpoint(checkpoint(1, fill=2.0), folder / "step000002.ckpt")
    os.symlink("step000002.ckpt", folder / "last.ckpt")

    def full(descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFull) as refused:
        writer.save_checkpoint(checkpoint(1, fill=4.0), folder / "step000002.ckpt")
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"No space left on device writing checkpoint {folder}/step000002.ckpt")
    assert f"last.ckpt is {folder}/step000002.ckpt" in message and "resume=auto" in message
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step000002.ckpt"]  # no temporary
    assert loads(folder / "step000002.ckpt") == 2.0
    assert list(empty_tmpdir.iterdir()) == []


def test_a_kill_during_a_save_leaves_its_temporary_beside_the_file_and_the_next_start_removes_it(
    tmp_path, empty_tmpdir
):
    folder = tmp_path / "checkpoints"
    BesideFileCheckpointIO().save_checkpoint(checkpoint(1, fill=2.0), folder / "step000002.ckpt")
    # A process killed (SIGKILL) in the middle of writing step 4: the kill comes while torch.save
    # pickles an object planted in the checkpoint, after the file is open.
    script = f"""
import os, signal, torch
from fineweb_gpt.run.checkpoint_saving import BesideFileCheckpointIO

class KillWhilePickled:
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)

checkpoint = {{"state_dict": {{"w": torch.ones(2**18)}}, "global_step": 4, "planted": KillWhilePickled()}}
BesideFileCheckpointIO().save_checkpoint(checkpoint, {str(folder / "step000004.ckpt")!r})
"""
    killed = subprocess.run([sys.executable, "-c", script], env=cli_env(), capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = sorted(p.name for p in folder.iterdir())
    assert left[0].startswith(".step000004.ckpt.") and left[0].endswith(".tmp") and left[1:] == ["step000002.ckpt"]
    assert list(empty_tmpdir.iterdir()) == []  # nothing leaked into $TMPDIR
    remove_cut_off_saves(folder)  # what the next run in the folder does once it holds the lock
    assert sorted(p.name for p in folder.iterdir()) == ["step000002.ckpt"]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 50 MB filesystem of its own (a tmpfs), for a disk that really fills up; needs root."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; the simulated full disk above still runs")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=50m", "tmpfs", str(mount_point)], check=True)
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


@pytest.mark.parametrize("writer", [pytest.param("lightning", marks=pytest.mark.library_behaviour), "fineweb_gpt"])
def test_a_really_full_disk_with_tmpdir_elsewhere(small_tmpfs, empty_tmpdir, writer):
    # The run folder on a small disk, $TMPDIR on another: Lightning's writer moves the checkpoint
    # in from $TMPDIR, which across filesystems is a copy, and the full disk tears the file under
    # its final name (issue 19, item 4). Ours fails before the final name is touched.
    folder = small_tmpfs / "checkpoints"
    save = (TorchCheckpointIO() if writer == "lightning" else BesideFileCheckpointIO()).save_checkpoint
    save(checkpoint(20, fill=2.0), folder / "step000002.ckpt")
    save(checkpoint(20, fill=4.0), folder / "step000004.ckpt")
    with pytest.raises((OSError, DiskFull)) as failed:
        save(checkpoint(20, fill=6.0), folder / "step000006.ckpt")
    assert loads(folder / "step000002.ckpt") == 2.0 and loads(folder / "step000004.ckpt") == 4.0
    if writer == "lightning":  # the failure this replaces
        assert (folder / "step000006.ckpt").exists() and loads(folder / "step000006.ckpt") is None
    else:
        assert isinstance(failed.value, DiskFull) and "No space left on device" in str(failed.value)
        assert sorted(p.name for p in folder.iterdir()) == ["step000002.ckpt", "step000004.ckpt"]
    shutil.rmtree(empty_tmpdir)  # what Lightning's writer leaves there is not this test's concern


@pytest.mark.slow
def test_a_run_that_fills_its_disk_stops_in_one_line_and_keeps_what_it_saved(small_tmpfs, tmp_path):
    # Checkpoints of this model take 19.5 MB: the newest two fit on the 50 MB disk, a third does
    # not while the oldest is still there.
    run_dir = small_tmpfs / "run"
    every_step = ["trainer.max_steps=5", "val_every_steps=5", "callbacks.model_checkpoint.every_n_train_steps=1"]
    result = run_cli(*SMALL, *every_step, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 2
    folder = run_dir / "checkpoints"
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: No space left on device writing checkpoint {folder}/step000003.ckpt: nothing of it is left, and "
        f"the checkpoints saved before are whole (last.ckpt is {folder}/step000002.ckpt); free space, then resume "
        "with resume=auto"
    )
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step000001.ckpt", "step000002.ckpt"]
    assert [
        torch.load(folder / name, weights_only=True)["global_step"] for name in ("step000001.ckpt", "last.ckpt")
    ] == [1, 2]
    assert json.loads((run_dir / "result.json").read_text())["status"] == "failed"
    trained = [int(row["step"]) for row in read_metrics(run_dir / "csv" / "metrics.csv") if "train/loss" in row]
    assert trained == [1, 2, 3]  # step 3's row, logged before its save failed, is kept


def test_a_disk_that_fills_right_after_the_last_save_ends_the_run_in_one_line(make_config, monkeypatch, capsys):
    # The disk fills after the final checkpoint: not even result.json's temporary can be made.
    # Before, an ENOSPC traceback (issue 28, item 11).
    from fineweb_gpt.train import main

    make_temporary = tempfile.mkstemp

    def full_for_the_result(*args, **kwargs):
        if kwargs.get("prefix", "").startswith(".result.json."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return make_temporary(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", full_for_the_result)
    cfg = make_config(*SMALL, "trainer.max_steps=1", "val_every_steps=1")
    with pytest.raises(SystemExit) as ended:
        main(cfg)
    assert ended.value.code == 2
    run_dir = Path(cfg.run_dir)
    assert capsys.readouterr().err == (
        f"error: No space left on device writing {run_dir}/result.json: nothing of it is left, and the file "
        "before it is whole; free space\n"
    )
    assert (run_dir / "checkpoints" / "step000001.ckpt").is_file() and not (run_dir / "result.json").exists()


def test_resume_auto_refuses_when_checkpoints_exist_but_none_loads_and_writes_nothing(tmp_path):
    # Before, it said "no checkpoint yet", started from scratch and exited 0 (issue 19, item 5).
    run_dir = tmp_path / "run"
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "step000004.ckpt").write_bytes(b"PK\x03\x04" + b"\0" * 100)  # a torn zip
    (folder / "step000006.ckpt").mkdir()  # not a file at all
    os.symlink("step000008.ckpt", folder / "last.ckpt")  # to a file that is gone
    (run_dir / "csv").mkdir()
    (run_dir / "csv" / "metrics.csv").write_text("step,train/loss\n1,10.5\n")
    (run_dir / "result.json").write_text(json.dumps({"status": "stopped", "error": "Stopped by SIGTERM at step 6"}))
    before = files(run_dir)

    result = run_cli(*SMALL, "resume=auto", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: resume=auto found checkpoints in {folder} but none loads (last.ckpt: links to ")
    assert "step000008.ckpt, which is missing; step000004.ckpt: " in line and "step000006.ckpt: " in line
    assert line.endswith("restore a readable checkpoint, or move these away to start from scratch")
    assert files(run_dir) == before
    assert not (run_dir / ".hydra").exists() and not (run_dir / "run_summary.json").exists()


def files(run_dir: Path) -> dict[Path, bytes]:
    """Every file of a run folder and its bytes, but the lock and the log Hydra opens before any check."""
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name not in (".lock", "train.log")}
