"""The table of a sweep: one row per run, best final val loss first.

Hydra calls SweepTable when a multirun ends; `python -m fineweb_gpt.sweep SWEEP_DIR` rebuilds
the same table later from the folder alone. Each row comes from that run's own files:
.hydra/overrides.yaml (the combination), run_summary.json (the real parameter count),
csv/metrics.csv (tokens seen, val losses, MFU) and result.json (finished or failed, and why).
"""

import argparse
import csv
import json
import logging
import math
import statistics
import sys
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fineweb_gpt.flops import human_count
from fineweb_gpt.run_folder import read_metrics

log = logging.getLogger("fineweb_gpt")
COLUMNS = ["run", "overrides", "status", "params", "tokens_seen", "final_val_loss", "best_val_loss", "mfu", "error"]


def read_overrides(run_dir: Path) -> list[str]:
    return yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []


def read_run(run_dir: Path, shown: set[str]) -> dict:
    """One sweep point's row, from its run folder; `shown`: the override keys that vary in the sweep."""
    overrides = [o for o in read_overrides(run_dir) if o.split("=", 1)[0] in shown]
    row = {"run": run_dir.name, "overrides": " ".join(overrides), "status": "not finished", "error": ""}
    result_file = run_dir / "result.json"
    if result_file.is_file():
        result = json.loads(result_file.read_text())
        row.update(status=result["status"], error=result.get("error", ""))
    summary_file = run_dir / "run_summary.json"
    if summary_file.is_file():
        row["params"] = json.loads(summary_file.read_text())["num_params"]
    metrics_file = run_dir / "csv" / "metrics.csv"
    if metrics_file.is_file():
        rows = read_metrics(metrics_file)
        val = [r["val/loss"] for r in rows if "val/loss" in r]
        tokens = [int(r["data/tokens_seen"]) for r in rows if "data/tokens_seen" in r]
        mfu = [r["perf/mfu"] for r in rows if "perf/mfu" in r]
        if val:
            row.update(final_val_loss=val[-1], best_val_loss=min(val))
        if tokens:
            row["tokens_seen"] = max(tokens)
        if mfu:
            row["mfu"] = statistics.median(mfu)
    return row


def collect(sweep_dir: Path) -> list[dict]:
    """Rows of every run under the sweep folder: finished ones by final val loss, then the rest."""
    runs = sorted(path.parent.parent for path in Path(sweep_dir).glob("*/.hydra/overrides.yaml"))
    # Show what tells the runs apart, not the settings they share.
    values: dict[str, set[str]] = {}
    for run in runs:
        for override in read_overrides(run):
            key, _, value = override.partition("=")
            values.setdefault(key, set()).add(value)
    varying = {key for key, seen in values.items() if len(seen) > 1} or set(values)
    rows = [read_run(run, varying) for run in runs]
    return sorted(rows, key=lambda r: (r["status"] != "completed", r.get("final_val_loss", math.inf)))


def as_markdown(rows: list[dict]) -> str:
    def cell(row: dict, key: str) -> str:
        value = row.get(key)
        if value is None or value == "":
            return ""
        if key in ("params", "tokens_seen"):
            return human_count(value)
        if key == "mfu":
            return f"{value:.1%}"
        if isinstance(value, float):
            return f"{value:.4f}"
        return str(value).replace("|", "\\|")

    header = ["run", "overrides", "status", "params", "tokens seen", "final val loss", "best val loss", "MFU", "error"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(row, key) for key in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(sweep_dir: Path) -> list[dict]:
    """Write sweep_results.md and sweep_results.csv into the sweep folder, print the table."""
    rows = collect(sweep_dir)
    markdown = as_markdown(rows)
    (Path(sweep_dir) / "sweep_results.md").write_text(markdown)
    with open(Path(sweep_dir) / "sweep_results.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nSweep {sweep_dir}: {len(rows)} runs, best first\n\n{markdown}", flush=True)
    failed = [row for row in rows if row["status"] != "completed"]
    for row in failed:
        log.error("Run %s (%s) %s: %s", row["run"], row["overrides"], row["status"], row["error"])
    return rows


class SweepTable(Callback):
    """Hydra callback: the table when a multirun ends; a failed run makes the exit status 1."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        rows = write_table(Path(config.hydra.sweep.dir))
        if any(row["status"] != "completed" for row in rows):
            sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rebuild a sweep's table from its folder.")
    parser.add_argument("sweep_dir", type=Path, help="the multirun folder, e.g. outputs/multirun/2026-11-23/10-00-00")
    args = parser.parse_args(argv)
    if not any(args.sweep_dir.glob("*/.hydra/overrides.yaml")):
        print(f"error: {args.sweep_dir} holds no sweep runs (no */.hydra/overrides.yaml)", file=sys.stderr)
        return 2
    rows = write_table(args.sweep_dir)
    return 0 if all(row["status"] == "completed" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
