"""Every check, in report order, and diagnose(): the one list the doctor and training both run."""

from collections.abc import Callable

from fineweb_gpt.doctor.budget import check_epochs, check_model_size, check_token_budget
from fineweb_gpt.doctor.curve import (
    check_divergence,
    check_dropout,
    check_lr_at_plateau,
    check_overfitting,
    check_plateau,
)
from fineweb_gpt.doctor.forecast import check_forecast
from fineweb_gpt.doctor.memory import check_batch_plan
from fineweb_gpt.doctor.record import SOURCE_NAMES, Finding, RunRecord
from fineweb_gpt.doctor.reference import check_hellaswag, check_reference
from fineweb_gpt.doctor.speed import check_mfu


def check_settings(run: RunRecord) -> Finding | None:
    """Settings the log does not record: asked for in one line, and what they would unlock."""
    missing = []
    if not run.knows_tokens:
        needs = "the token budget, epochs, the reference"
        missing.append(("the tokens per optimizer step", "--tokens-per-step N", needs))
    if not run.num_params:
        missing.append(("the model size", "--params N (or --model 124m)", "the token budget, the reference, MFU"))
    if not missing:
        return None
    what = " and ".join(item for item, _, _ in missing)
    flags = " and ".join(flag for _, flag, _ in missing)
    skipped = ", ".join(dict.fromkeys(", ".join(needs for _, _, needs in missing).split(", ")))
    evidence = f"this {SOURCE_NAMES.get(run.source, 'log')} does not record {what}, so {skipped} are skipped"
    if not run.knows_tokens:
        evidence += "; the curve is read against steps"
    return Finding("settings", False, f"Not in the log: {what}", evidence, f"give {flags}")


CHECKS: tuple[Callable[[RunRecord], Finding | None], ...] = (
    check_settings,
    check_divergence,
    check_model_size,
    check_token_budget,
    check_epochs,
    check_overfitting,
    check_plateau,
    check_lr_at_plateau,
    check_dropout,
    check_reference,
    check_hellaswag,
    check_mfu,
    check_forecast,
    check_batch_plan,
)
# Checks that only ever give context: training, which warns about problems, need not run them.
NOTES_ONLY = (check_settings, check_reference, check_hellaswag, check_forecast, check_batch_plan)


def diagnose(run: RunRecord, checks=CHECKS) -> list[Finding]:
    """Every check's finding, problems first."""
    findings = [finding for check in checks if (finding := check(run)) is not None]
    return sorted(findings, key=lambda f: not f.problem)
