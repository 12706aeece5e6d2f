"""Reading a run folder: the metric names of older runs, and steps logged twice around a resume."""

import csv

from fineweb_gpt.run_folder import read_metrics


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
