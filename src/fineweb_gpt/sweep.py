"""The table of a sweep: one row per run, best final val loss first.

Hydra calls SweepTable when a multirun ends; `python -m fineweb_gpt.sweep SWEEP_DIR` rebuilds
the same table later from the folder alone. Each row comes from that run's own files, read
through run_folder: .hydra/overrides.yaml (the combination), run_summary.json (the real
parameter count), csv/metrics.csv (tokens seen, val losses, MFU), result.json (finished or
failed, and why) and checkpoints/last.ckpt (where its final checkpoint is). Run folders are
not trusted: what they say is quoted, and the table is written through safe_files.
"""

import argparse
import csv
import io
import logging
import math
import statistics
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fineweb_gpt.errors import ConfigError, UserError, exit_with
from fineweb_gpt.flops import human_count
from fineweb_gpt.run.names import METRICS_FILE, RESULT_FILE, SUMMARY_FILE
from fineweb_gpt.run.run_files import final_checkpoint, one_line_text, quoted, read_json, read_metrics, read_overrides
from fineweb_gpt.safe_files import check_target, write_atomically

log = logging.getLogger("fineweb_gpt")
COLUMNS = [
    "run",
    "overrides",
    "status",
    "params",
    "tokens_seen",
    "final_val_loss",
    "best_val_loss",
    "mfu",
    "final_checkpoint",
    "error",
]
HEADER = ["run", "overrides", "status", "params", "tokens seen", "final val loss", "best val loss", "MFU"]
HEADER += ["final checkpoint", "error"]
STATUSES = ("completed", "failed", "stopped", "not finished")  # what train.py writes into result.json


def finite_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def read_run(run_dir: Path, shown: set[str]) -> dict:
    """One sweep point's row, from its run folder; `shown`: the override keys that vary in the sweep."""
    overrides = [o for o in read_overrides(run_dir) if o.split("=", 1)[0] in shown]
    row = {"run": run_dir.name, "overrides": " ".join(overrides), "status": "not finished", "error": ""}
    row["final_checkpoint"] = final_checkpoint(run_dir)
    try:
        if (run_dir / RESULT_FILE).is_file():
            result = read_json(run_dir / RESULT_FILE)
            status = result.get("status")
            row.update(status=status if status in STATUSES else "unknown", error=str(result.get("error", "")))
        if (run_dir / SUMMARY_FILE).is_file():
            params = read_json(run_dir / SUMMARY_FILE).get("num_params")
            if finite_number(params):
                row["params"] = params
        if (run_dir / METRICS_FILE).is_file():
            rows = read_metrics(run_dir / METRICS_FILE)
            val = [r["val/loss"] for r in rows if "val/loss" in r]
            tokens = [r["data/tokens_seen"] for r in rows if finite_number(r.get("data/tokens_seen"))]
            mfu = [r["perf/mfu"] for r in rows if finite_number(r.get("perf/mfu"))]
            if val:  # a NaN final loss is the run's result; the best is the lowest finite one
                row["final_val_loss"] = val[-1]
                if finite := [v for v in val if math.isfinite(v)]:
                    row["best_val_loss"] = min(finite)
            if tokens:
                row["tokens_seen"] = int(max(tokens))
            if mfu:
                row["mfu"] = statistics.median(mfu)
    except (ConfigError, OSError, UnicodeDecodeError, csv.Error) as err:
        row["error"] = f"{row['error']} (its files cannot be read: {err})".strip()
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

    def order(row: dict) -> tuple:
        final = row.get("final_val_loss")
        return row["status"] != "completed", final if finite_number(final) else math.inf

    return sorted(rows, key=order)


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
        if key == "status":
            return value  # one of STATUSES
        return quoted(value, 300)  # names, overrides, paths and errors come from the run folders

    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cell(row, key) for key in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# A spreadsheet runs a cell that starts with one of these as a formula (OWASP's CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@")


def csv_cell(value):
    """A text from a run folder as one inert spreadsheet cell: one line, and a leading quote
    before a text a spreadsheet would run as a formula (a run folder named =cmd|' -C calc'!A0)."""
    if not isinstance(value, str):
        return value
    text = one_line_text(value, 2000)
    return f"'{text}" if text.startswith(FORMULA_STARTS) else text


def as_csv(rows: list[dict]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows([{key: csv_cell(value) for key, value in row.items()} for row in rows])
    return text.getvalue()


def write_table(sweep_dir: Path) -> list[dict]:
    """Write sweep_results.md and sweep_results.csv into the sweep folder, print the table."""
    rows = collect(sweep_dir)
    markdown = as_markdown(rows)
    for name in ("sweep_results.md", "sweep_results.csv"):  # refuse before writing either
        check_target(Path(sweep_dir), name)
    write_atomically(Path(sweep_dir) / "sweep_results.md", markdown)
    write_atomically(Path(sweep_dir) / "sweep_results.csv", as_csv(rows))
    print(f"\nSweep {sweep_dir}: {len(rows)} runs, best first\n\n{markdown}", flush=True)
    failed = [row for row in rows if row["status"] != "completed"]
    for row in failed:
        log.error("Run %s (%s) %s: %s", *(one_line_text(row[key]) for key in ("run", "overrides", "status", "error")))
    return rows


class SweepTable(Callback):
    """Hydra callback: the table when a multirun ends; a failed run makes the exit status 1."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        try:
            rows = write_table(Path(config.hydra.sweep.dir))
        except ConfigError as err:  # a planted link where the table goes: say so, touch nothing
            log.error("Sweep table not written: %s", err)
            sys.exit(1)
        if any(row["status"] != "completed" for row in rows):
            sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fineweb-gpt-sweep", description="Rebuild a sweep's table from its folder.")
    parser.add_argument("sweep_dir", type=Path, help="the multirun folder, e.g. outputs/multirun/2026-11-23/10-00-00")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        what = "is not a folder" if args.sweep_dir.exists() else "does not exist"
        print(f"error: {args.sweep_dir} {what}; give a sweep's folder: outputs/multirun/<date>/<time>", file=sys.stderr)
        return 2
    if not any(args.sweep_dir.glob("*/.hydra/overrides.yaml")):
        print(f"error: {args.sweep_dir} holds no sweep runs (no */.hydra/overrides.yaml)", file=sys.stderr)
        return 2
    try:
        rows = write_table(args.sweep_dir)
    except UserError as err:
        exit_with(err)
    return 0 if all(row["status"] == "completed" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
