"""Reading what a user points the doctor at: a run folder, a metrics CSV, or a trainer's log,
whose format is told from its content (`--format` forces one)."""

import csv
import os
import re
from pathlib import Path

from fineweb_gpt.doctor.buildnanogpt_log import LOG_LINE, parse_buildnanogpt_log
from fineweb_gpt.doctor.llmc_log import CONSOLE_STEP_LINE, MAIN_LOG_LINE, parse_llmc_log
from fineweb_gpt.doctor.modded_log import STEP_LINE, parse_modded_log
from fineweb_gpt.doctor.nanogpt_log import EVAL_LINE, ITER_LINE, parse_nanogpt_log
from fineweb_gpt.doctor.record import RunRecord, sanitized
from fineweb_gpt.errors import ConfigError
from fineweb_gpt.run.names import METRICS_FILE
from fineweb_gpt.run.run_files import read_metrics, read_summary
from fineweb_gpt.safe_files import regular_file

FORMATS = ("run", "csv", "nanogpt", "llmc", "modded", "buildnanogpt")
LOG_PARSERS = {
    "nanogpt": parse_nanogpt_log,
    "llmc": parse_llmc_log,
    "modded": parse_modded_log,
    "buildnanogpt": parse_buildnanogpt_log,
}
SIGNATURES = {
    "nanogpt": (ITER_LINE, EVAL_LINE),
    "llmc": (MAIN_LOG_LINE, CONSOLE_STEP_LINE),
    "modded": (STEP_LINE,),
    "buildnanogpt": (LOG_LINE,),
}
MAX_LOG_BYTES = 512 * 2**20
# Colour and cursor codes (CSI and OSC sequences), as a terminal or tee leaves them in a log.
TERMINAL_CODES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-_]")


def log_lines(path: Path) -> list[str]:
    """The log's lines without terminal codes; a progress bar's carriage returns end lines too."""
    regular_file(path, "give a run folder or a training log")
    try:
        size = path.stat().st_size
        if size > MAX_LOG_BYTES:
            raise ConfigError(f"{path} is {size / 2**20:.0f} MiB; give a log under {MAX_LOG_BYTES // 2**20} MiB")
        text = path.read_text(errors="replace")
    except OSError as err:
        raise ConfigError(f"{path} cannot be read ({err.strerror}); give a run folder or a training log") from err
    text = TERMINAL_CODES.sub("", text).replace("\x00", "")
    return [line.strip() for line in re.split(r"\r\n|\r|\n", text)]


def detect_format(lines: list[str]) -> str | None:
    """The log format whose lines appear most often, or None when no known line appears."""
    counts = {
        name: sum(1 for line in lines if any(pattern.search(line) for pattern in patterns))
        for name, patterns in SIGNATURES.items()
    }
    best = max(counts, key=counts.get)
    return best if counts[best] else None


def read_run_folder(run_dir: Path) -> RunRecord:
    if not run_dir.is_dir():
        raise ConfigError(f"run folder {run_dir} does not exist; give the run folder fineweb_gpt.train printed")
    metrics = run_dir / METRICS_FILE
    if not os.path.lexists(metrics):
        wandb = " It logged to W&B (wandb/ is here): rerun with" if (run_dir / "wandb").is_dir() else " Rerun with"
        raise ConfigError(
            f"{run_dir} has no {METRICS_FILE}, the run's own record of its metrics: it stopped before its first "
            f"logged step, or ran with a logger that writes none.{wandb} 'logger=[csv,wandb]' to get it, or give the "
            "doctor a CSV of the run's history (columns step, train/loss, val/loss) exported from W&B"
        )
    summary = sanitized({**read_summary(run_dir), "source": "fineweb_gpt"})
    return RunRecord(summary, read_metrics_file(metrics))


def read_metrics_file(path: Path) -> list[dict]:
    try:
        rows = read_metrics(path)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(f"{path} cannot be read as CSV ({err}); give the CSVLogger's metrics.csv") from err
    if not any("train/loss" in row or "val/loss" in row for row in rows):
        raise ConfigError(f"{path} holds no train/loss or val/loss values yet; wait for the first logged step")
    return rows


def read_run(path: Path, format: str | None = None) -> RunRecord:
    """A run record from a run folder, a metrics CSV or a log of nanoGPT, llm.c or modded-nanogpt."""
    path = Path(path)
    if path.is_dir() or format == "run":
        return read_run_folder(path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist; give a run folder or a training log")
    if format == "csv" or (format is None and path.suffix.lower() == ".csv"):
        if path.name == METRICS_FILE.name and path.parent.name == METRICS_FILE.parent.name:
            try:
                return read_run_folder(path.parent.parent)  # a run folder's own CSV: read the whole folder
            except ConfigError:
                pass
        return RunRecord({"source": "csv"}, read_metrics_file(path))
    lines = log_lines(path)
    format = format or detect_format(lines)
    if format is None:
        raise ConfigError(
            f"{path} has no lines of a known training log (nanoGPT 'iter N: loss', llm.c 's:N trl:' or "
            "'step N/T | loss', modded-nanogpt 'step:N/T val_loss:', build-nanogpt 'N val L'); give one, or "
            "--format to force one"
        )
    record = LOG_PARSERS[format](lines, str(path))
    return RunRecord(sanitized(record.summary), record.rows)
