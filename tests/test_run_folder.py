"""Reading a run folder (old metric names, steps logged twice, NaN) and writing into one safely."""

import csv
import math
import os

import pytest

from fineweb_gpt.errors import ConfigError
from fineweb_gpt.run.run_files import final_checkpoint, quoted, read_metrics
from fineweb_gpt.safe_files import check_target, write_atomically


def write_csv(path, header, rows):
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)


def test_a_folder_written_with_the_old_metric_names_reads_under_todays(tmp_path):
    path = tmp_path / "metrics.csv"
    write_csv(path, ["step", "train/loss", "lr", "tokens_seen", "mfu", "val/loss"], [[1, 9.5, 1e-4, 256, 0.3, ""]])
    [row] = read_metrics(path)
    assert row == {"step": 1, "train/loss": 9.5, "train/lr": 1e-4, "data/tokens_seen": 256, "perf/mfu": 0.3}


def test_steps_trained_again_after_a_resume_are_read_once_the_resumed_runs(tmp_path):
    # Steps 1-5 and an evaluation at 4, killed; resumed from the step-3 checkpoint, steps 4-6 again.
    header = ["step", "train/loss", "val/loss"]
    first = [[1, 9.0, ""], [2, 8.0, ""], [3, 7.0, ""], [4, 6.0, ""], [4, "", 6.5], [5, 5.0, ""]]
    resumed = [[4, 6.1, ""], [4, "", 6.6], [5, 5.1, ""], [6, 4.1, ""]]
    path = tmp_path / "metrics.csv"
    write_csv(path, header, first + resumed)
    rows = read_metrics(path)
    assert [(r["step"], r.get("train/loss"), r.get("val/loss")) for r in rows] == [
        (1, 9.0, None),
        (2, 8.0, None),
        (3, 7.0, None),
        (4, 6.1, None),
        (4, None, 6.6),
        (5, 5.1, None),
        (6, 4.1, None),
    ]


def test_nan_losses_are_kept_and_a_step_that_is_no_number_is_dropped(tmp_path):
    path = tmp_path / "metrics.csv"
    write_csv(path, ["step", "train/loss", "val/loss"], [[1, "nan", ""], ["inf", 5.0, ""], [2, "", "-inf"], [3, 4.0]])
    rows = read_metrics(path)
    assert math.isnan(rows[0]["train/loss"]) and rows[2]["val/loss"] == -math.inf
    assert rows[1] == {"train/loss": 5.0} and rows[3] == {"step": 3, "train/loss": 4.0}


def test_files_are_written_whole_and_never_through_a_link(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    write_atomically(folder / "REPORT.md", "first\n")
    write_atomically(folder / "REPORT.md", "second\n")
    assert (folder / "REPORT.md").read_text() == "second\n" and sorted(os.listdir(folder)) == ["REPORT.md"]
    outside = tmp_path / "bashrc"
    outside.write_text("mine\n")
    (folder / "REPORT.png").symlink_to(outside)
    with pytest.raises(ConfigError, match="is a link"):
        write_atomically(folder / "REPORT.png", b"png")
    for name in ("../escape.md", "sub/REPORT.md", ".."):
        with pytest.raises(ConfigError, match="is not a file name"):
            check_target(folder, name)
    assert outside.read_text() == "mine\n" and not (tmp_path / "escape.md").exists()


def test_quoted_text_is_one_inert_line():
    text = quoted("a\nb\r`c` | [d](e) <f>\x1b[31m")
    assert text == "`a b 'c' \\| [d](e) <f> [31m`"


def test_final_checkpoint_names_what_last_ckpt_links_to_without_following_it_outside(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert final_checkpoint(run) == "none"
    (run / "checkpoints" / "step000003.ckpt").write_bytes(b"x")
    (run / "checkpoints" / "last.ckpt").symlink_to("step000003.ckpt")
    assert final_checkpoint(run) == os.path.join("checkpoints", "step000003.ckpt")
    (run / "checkpoints" / "last.ckpt").unlink()
    (run / "checkpoints" / "last.ckpt").symlink_to(tmp_path / "elsewhere.ckpt")
    assert final_checkpoint(run).startswith("none (last.ckpt points outside the run folder")
