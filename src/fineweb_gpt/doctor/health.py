"""The doctor's checks during training: each problem warned about once, when it first appears."""

import logging

from lightning.pytorch.utilities import rank_zero_only

from fineweb_gpt.doctor.checks import CHECKS, NOTES_ONLY, diagnose
from fineweb_gpt.doctor.record import Finding, RunRecord, sanitized

log = logging.getLogger("fineweb_gpt")
PROBLEM_CHECKS = tuple(check for check in CHECKS if check not in NOTES_ONLY)


class RunHealth:
    """Warns (logger "fineweb_gpt") when a problem the doctor would report first appears.

    Give it the run summary (run_summary.json's keys) and feed it the metric rows as they
    are logged, per optimizer step and per evaluation, through observe(). callbacks.RunMonitor
    does both, checks once when training starts (size, planned tokens and epochs need no
    metrics), and the checks run again whenever an observed row carries val/loss.
    """

    def __init__(self, summary: dict, already_warned: set[str] | None = None):
        self.run = RunRecord(sanitized({"source": "fineweb_gpt", **summary}))
        self.warned: set[str] = set(already_warned or ())

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
        log.warning("Run health: %s. %s. Fix: %s", finding.title, finding.evidence, finding.fix or "see the doctor")
