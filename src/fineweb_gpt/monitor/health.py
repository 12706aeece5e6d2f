"""HealthMonitor: the doctor's checks during training, each problem warned about once, when it
first appears, and logged as a health/<check> row at that step.

It imports the checks (doctor.checks and the modules they use), never the doctor's report,
plot, log readers or command line (a test guards this)."""

import logging
import os

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from fineweb_gpt.doctor.checks import CHECKS, NOTES_ONLY, diagnose
from fineweb_gpt.doctor.record import Finding, RunRecord, sanitized
from fineweb_gpt.loggers import AppendingCSVLogger
from fineweb_gpt.run.run_files import metric_rows

log = logging.getLogger("fineweb_gpt")
PROBLEM_CHECKS = tuple(check for check in CHECKS if check not in NOTES_ONLY)


class RunHealth:
    """Warns (logger "fineweb_gpt") when a problem the doctor would report first appears.

    Give it the run summary (run_summary.json's keys) and feed it the metric rows as they are
    logged through observe(); the checks run again whenever an observed row carries val/loss.
    A warning is one short line, the problem and where its evidence and fix are: the doctor's
    report on the run folder.
    """

    def __init__(self, summary: dict, already_warned: set[str] | None = None, run_dir: str | None = None):
        self.run = RunRecord(sanitized({"source": "fineweb_gpt", **summary}))
        self.warned: set[str] = set(already_warned or ())
        self.doctor = f"fineweb-gpt-doctor {shown_path(run_dir)}" if run_dir else "fineweb-gpt-doctor on the run folder"

    def observe(self, row: dict) -> list[Finding]:
        """Record one metrics row; after an evaluation's row, return the problems new since the last check."""
        self.run.rows.append(dict(row))
        return self.check() if "val/loss" in row else []

    def check(self) -> list[Finding]:
        """Problems not warned about before; each is logged once."""
        new = [f for f in diagnose(self.run, PROBLEM_CHECKS) if f.problem and f.check not in self.warned]
        for finding in new:
            self.warned.add(finding.check)
            self._warn(finding)
        return new

    @rank_zero_only
    def _warn(self, finding: Finding) -> None:
        log.warning("Run health: %s. Why, and what to change: %s", finding.title, self.doctor)


def shown_path(path: str) -> str:
    """The run folder as a person would type it here: relative when it is below this folder."""
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else str(path)


class HealthMonitor(L.Callback):
    """Runs RunHealth on the run's summary (from `summary`, a RunSummary earlier in the callbacks)
    and on every row StepMetrics logs (it is one of its observers). What it warned about is kept
    in checkpoints, so a resumed run neither warns nor logs it again."""

    def __init__(self, summary):
        self.summary = summary
        self.health: RunHealth | None = None
        self.warned: set[str] = set()  # restored from a checkpoint before training starts
        self.tokens_seen = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        warned = self.warned | self.summary.already_warned
        self.health = RunHealth(self.summary.summary, already_warned=warned, run_dir=self.summary.run_dir)
        # A resumed run's checks see the rows the run logged before, as the uninterrupted run's did.
        for logger in trainer.loggers:
            if isinstance(logger, AppendingCSVLogger):
                self.health.run.rows = metric_rows(logger.rows_before_resume())
        self.record(trainer, self.health.check(), trainer.global_step)

    def observe(self, trainer: L.Trainer, row: dict, step: int) -> None:
        self.tokens_seen = row.get("data/tokens_seen", self.tokens_seen)
        if self.health is not None:
            self.record(trainer, self.health.observe({"step": step, **row}), step)

    def record(self, trainer: L.Trainer, findings: list, step: int) -> None:
        """A problem the doctor would report also lands in the loggers, at the step it appeared."""
        if findings:
            row = {f"health/{finding.check}": 1.0 for finding in findings}
            for logger in trainer.loggers:
                logger.log_metrics({**row, "data/tokens_seen": self.tokens_seen}, step=step)

    def state_dict(self) -> dict:
        return {"warned": sorted(self.health.warned if self.health else self.warned), "tokens_seen": self.tokens_seen}

    def load_state_dict(self, state_dict: dict) -> None:
        self.warned = set(state_dict.get("warned", ()))
        self.tokens_seen = state_dict.get("tokens_seen", 0)
