"""The loggers a run writes to: its own CSV record (always), TensorBoard and Weights & Biases
(never waiting for a login, plotting against tokens seen)."""

import csv
import itertools
import logging
import os
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from fineweb_gpt.run.names import METRICS_FILE
from fineweb_gpt.safe_files import AtomicFile, check_target

log = logging.getLogger("fineweb_gpt")
TOKENS_SEEN = "data/tokens_seen"  # the x-axis W&B plots every metric against
CSV_ROWS = "csv_rows"  # in a checkpoint: the rows metrics.csv held when it was saved


class AppendingCSVLogger(Logger):
    """csv/metrics.csv, the run's own record (the doctor and the sweep table read it): a row per
    log_metrics call, under a header of every column logged so far.

    Lightning's CSVLogger rewrites the file in place when a column appears (a kill or a full
    disk at that moment leaves it empty) and deletes a reused folder's file. Here rows are only
    appended; a new column, or the first write of a resumed run, replaces the file atomically.
    A run resuming from a checkpoint first puts the file back as it was when that checkpoint was
    saved: the rows logged after it (steps trained again, an evaluation run again) go, so the
    resumed run's record is the uninterrupted one's. The checkpoint says how many rows the file
    held (RememberLoggers); an older one only its step S, and the rows logged after S go. A fresh
    run in the same folder starts a new file.
    """

    def __init__(
        self,
        save_dir: str,
        name: str = "csv",
        resume_step: int | None = None,
        resume_rows: int | None = None,
        flush_logs_every_n_steps=1,
    ):
        super().__init__()
        self._save_dir, self._name = str(save_dir), name
        self.resume_step = resume_step  # None: a fresh run
        self.resume_rows = resume_rows  # rows the file held when the resumed checkpoint was saved
        self.flush_every = max(1, int(flush_logs_every_n_steps))
        self.columns: list[str] | None = None  # the file's header, once this run has written to it
        self.pending: list[dict] = []
        self.rows = 0  # rows in the file once the pending ones are written

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def log_dir(self) -> str:
        return os.path.join(self._save_dir, self._name)

    @property
    def path(self) -> Path:
        return Path(self.log_dir) / METRICS_FILE.name

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        """Nothing: the config is in .hydra/config.yaml and the run's summary in run_summary.json."""

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        values = {key: value.item() if hasattr(value, "item") else value for key, value in metrics.items()}
        self.pending.append({"step": step, **values})
        self.rows += 1
        if len(self.pending) >= self.flush_every:
            self.save()

    @rank_zero_only
    def save(self) -> None:
        if not self.pending:
            return
        new = sorted({key for row in self.pending for key in row} - set(self.columns or ()))
        if self.columns is None:
            self.start()
        elif new:
            self.rewrite(self.columns + new)
        else:
            with open(self.path, "a", newline="") as file:
                csv.DictWriter(file, fieldnames=self.columns).writerows(self.pending)
        self.pending = []

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()

    def start(self) -> None:
        """This run's first write: the file's rows as the resumed checkpoint left them (none for a
        fresh run), its columns and the new ones, then the new rows, replacing the file at once."""
        folder = Path(self.log_dir)
        folder.mkdir(parents=True, exist_ok=True)
        check_target(folder, self.path.name)  # never write through a planted link
        for stale in folder.glob(f".{self.path.name}.*.tmp"):
            stale.unlink()  # left by a kill during an earlier replacement
        resuming = self.resume_step is not None
        header = (read_header(self.path) if resuming else []) or ["step"]
        new = sorted({key for row in self.pending for key in row} - set(header))
        if resuming:
            self.rewrite(header + new, keep_up_to=self.resume_step, keep_first=self.resume_rows)
        else:
            self.rewrite(header + new, keep_first=0)

    def rewrite(self, columns: list[str], keep_up_to: float = float("inf"), keep_first: int | None = None) -> None:
        """Replace the file with its first `keep_first` rows (all: None) that are up to step
        `keep_up_to`, under `columns`, then the pending rows, through safe_files: a kill or a full
        disk at any moment leaves the old file or the new one, whole."""
        kept = kept_rows(self.path, keep_first, keep_up_to)
        with AtomicFile(self.path, "w") as file:
            writer = csv.DictWriter(file, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)
            writer.writerows(self.pending)
        self.columns = columns
        self.rows = len(kept) + len(self.pending)

    def rows_before_resume(self) -> list[dict]:
        """The rows of the run before the resumed checkpoint, as start() keeps them ([] for a fresh run)."""
        if self.resume_step is None:
            return []
        return kept_rows(self.path, self.resume_rows, self.resume_step)


def kept_rows(path: Path, keep_first: int | None, keep_up_to: float) -> list[dict]:
    """The file's first `keep_first` rows (all: None) that are up to step `keep_up_to`."""
    return [row for row in itertools.islice(read_rows(path), keep_first) if row_step(row) <= keep_up_to]


def read_header(path: Path) -> list[str]:
    """The CSV file's columns ([] without a file)."""
    if not path.is_file():
        return []
    with open(path, newline="") as file:
        return next(csv.reader(file), [])


def read_rows(path: Path):
    """The file's rows, less a last line cut short by a kill (it lacks its line end)."""
    if not path.is_file():
        return
    with open(path, "rb") as file:
        file.seek(max(0, file.seek(0, os.SEEK_END) - 1))
        whole = file.read(1) in (b"\n", b"")
    with open(path, newline="") as file:
        previous = None
        for row in csv.DictReader(file):
            if previous is not None:
                yield previous
            previous = row
        if previous is not None and whole:
            yield previous


def row_step(row: dict) -> float:
    """A row's step; a row without one (a damaged line) counts as past any step."""
    try:
        return float(row.get("step"))
    except (TypeError, ValueError):
        return float("inf")


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger, with every metric plotted against data/tokens_seen (so runs with
    different batch sizes line up in one chart), and without the two warnings W&B prints for
    the arguments Lightning passes (`anonymous=None`; offline by changing WANDB_MODE: give
    `mode="offline"` instead)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
        self.on_tokens_axis: set[str] = set()

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        new = [key for key in metrics if key not in self.on_tokens_axis and key != TOKENS_SEEN]
        for key in new:  # W&B wants a metric's axis before the metric's first value
            self.experiment.define_metric(key, step_metric=TOKENS_SEEN)
        self.on_tokens_axis.update(new)
        super().log_metrics(metrics, step)


class RememberLoggers(L.Callback):
    """Puts in every checkpoint what the loggers need to go on from it: how many rows metrics.csv
    held (a resumed run puts the file back as it was then) and the W&B run's id (a resumed run
    continues the same W&B run)."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, LightningWandbLogger):
                checkpoint["wandb_run_id"] = logger.version
            if isinstance(logger, AppendingCSVLogger):
                checkpoint[CSV_ROWS] = logger.rows


def wandb_settings(node: DictConfig, offline: bool, run_dir: str, resume_run_id: str | None, sweep) -> dict:
    """Arguments for WandbLogger beyond its config: offline without a login, the resumed run's id,
    and, in a sweep, one W&B run per sweep point grouped by the sweep (sweep = (group, name))."""
    import wandb

    extra = {}
    offline = offline or os.environ.get("WANDB_MODE") in ("offline", "dryrun")
    if not offline and not wandb.login(prompt=False, verify=False):
        log.warning("No W&B login found: logging offline; upload later with `wandb sync %s/wandb`", run_dir)
        offline = True
    if offline:  # as wandb.init's mode: Lightning's offline=True sets WANDB_MODE after W&B read it (a warning)
        extra.update(offline=False, mode="offline")
    if resume_run_id:
        extra["id"] = resume_run_id
    if sweep:
        group, name = sweep
        extra.setdefault("group", node.group or group)
        extra.setdefault("name", node.name or name)
    return extra


def build_loggers(logger_config: DictConfig | None, run_dir: str, resumed_from: dict | None, sweep=None) -> list:
    """The loggers of the `logger` config group (csv, tensorboard, wandb, any of them), and the
    CSV record whatever they are: the doctor and the sweep table read it. `resumed_from` is the
    checkpoint a resumed run starts from."""
    logger_config = logger_config or DictConfig({})
    resume_step = resumed_from["global_step"] if resumed_from else None
    resume_rows = resumed_from.get(CSV_ROWS) if resumed_from else None
    loggers = []
    for node in logger_config.values():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue  # plain settings such as logger.offline
        extra = {}
        if node._target_ == f"{__name__}.WandbLogger":
            offline = bool(logger_config.get("offline") or node.get("offline"))
            extra = wandb_settings(node, offline, run_dir, wandb_run_id(resumed_from), sweep)
        elif node._target_ == f"{__name__}.AppendingCSVLogger":
            extra = {"resume_step": resume_step, "resume_rows": resume_rows}
        loggers.append(instantiate(node, **extra))
    if not any(isinstance(logger, AppendingCSVLogger) for logger in loggers):
        loggers.insert(0, AppendingCSVLogger(run_dir, resume_step=resume_step, resume_rows=resume_rows))
    return loggers


def wandb_run_id(checkpoint: dict | None) -> str | None:
    """The W&B run a checkpoint was logging to, so a resumed run continues it."""
    return (checkpoint or {}).get("wandb_run_id")


def finish_wandb_run(trainer) -> None:
    """Close this job's W&B run: the next job of a sweep in this process starts its own."""
    for logger in trainer.loggers:
        if isinstance(logger, LightningWandbLogger) and trainer.is_global_zero:
            logger.experiment.finish()
