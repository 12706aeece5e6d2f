"""What a run leaves in its folder: metrics.csv, run_summary.json, result.json.

The doctor and the sweep table read run folders through here, so they agree on what a
folder holds.
"""

import csv
import json
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only

METRICS_FILE = Path("csv") / "metrics.csv"
SUMMARY_FILE = "run_summary.json"
RESULT_FILE = "result.json"

# Metrics are grouped by prefix (train/, val/, perf/, data/, health/); folders written
# before that hold these names, read under the new ones.
OLD_METRIC_NAMES = {
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_seen": "data/tokens_seen",
    "epoch": "data/epoch",
    "tokens_per_param": "data/tokens_per_param",
    "tokens_per_sec": "perf/tokens_per_sec",
    "step_time_ms": "perf/step_time_ms",
    "mfu": "perf/mfu",
}


def read_metrics(path: Path) -> list[dict]:
    """CSVLogger rows as {column: float}, keeping only the cells that hold a number, under
    today's metric names.

    A run resumed from a checkpoint logs again the steps trained after that checkpoint; an
    older file may hold both copies. Where the step count goes back, the earlier rows from
    that step on are dropped, so each step is read once: the resumed run's.
    """
    rows: list[dict] = []
    last_step = -1.0
    with open(path, newline="") as file:
        for raw in csv.DictReader(file):
            row = {}
            for column, cell in raw.items():
                try:
                    row[OLD_METRIC_NAMES.get(column, column)] = float(cell)
                except (TypeError, ValueError):
                    continue  # empty: this row does not log that column
            if not row:
                continue
            step = row.get("step", last_step)
            if step < last_step:
                rows = [r for r in rows if r.get("step", -1) < step]
            last_step = step
            rows.append(row)
    return rows


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_result(run_dir: str, status: str, **details) -> None:
    """result.json in the run folder: how the run ended, for the sweep table."""
    if rank_zero_only.rank == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / RESULT_FILE).write_text(json.dumps({"status": status, **details}) + "\n")
