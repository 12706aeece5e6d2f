"""The doctor's checks during training (RunHealth, which monitor.health.HealthMonitor drives): each
problem warned about once, at the evaluation where it first appears; a healthy run warns nothing."""

import logging
from pathlib import Path

from doctor_fixtures import CHINCHILLA_STEPS_40M, TOKENS_PER_STEP, metric_rows, power_law, run_summary
from fineweb_gpt.monitor.health import RunHealth

RUN_TOKENS = CHINCHILLA_STEPS_40M * TOKENS_PER_STEP


def overfitting_after_half(tokens: float) -> float:
    return power_law(tokens) + 1.5 * max(0.0, tokens / RUN_TOKENS - 0.5) ** 2


def warnings_logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fineweb_gpt" and r.levelno == logging.WARNING]


def test_each_problem_is_warned_once_when_it_first_appears(caplog):
    summary = run_summary(model_name="124m")  # a 40.56M model named 124m: wrong from the start
    monitor = RunHealth(summary, already_warned=set(), run_dir=str(Path.cwd() / "outputs" / "run"))
    caplog.set_level(logging.WARNING, logger="fineweb_gpt")

    monitor.check()  # as HealthMonitor does when training starts: one short line, the evidence in the doctor's
    assert warnings_logged(caplog) == [
        "Run health: Model size does not match its name. Why, and what to change: fineweb-gpt-doctor outputs/run"
    ]

    first_overfit_eval = None
    for row in metric_rows(summary, val_loss=overfitting_after_half, noise=0.0):
        new = monitor.observe(row)
        if any(f.check == "overfitting" for f in new):
            first_overfit_eval = row["step"]
    messages = warnings_logged(caplog)
    assert sum("Overfitting since step" in m for m in messages) == 1
    assert first_overfit_eval is not None and first_overfit_eval < CHINCHILLA_STEPS_40M
    titles = [m.split(". ")[0].split(" since ")[0] for m in messages]
    assert len(titles) == len(set(titles))  # (the flat bottom before the rise may be warned as a plateau, once)

    # Later evaluations, and a check at the end, repeat nothing.
    monitor.observe({"step": CHINCHILLA_STEPS_40M, "val/loss": 9.0, "data/tokens_seen": RUN_TOKENS})
    assert monitor.check() == []
    assert warnings_logged(caplog) == messages


def test_a_plateau_while_the_learning_rate_stays_high_is_warned_during_training(caplog):
    summary = run_summary(min_lr=6e-4)  # a constant learning rate

    def flat_after_half(tokens):
        return power_law(min(tokens, RUN_TOKENS / 2))

    monitor = RunHealth(summary, already_warned=set())
    caplog.set_level(logging.WARNING, logger="fineweb_gpt")
    seen = {}
    for row in metric_rows(summary, val_loss=flat_after_half, constant_lr=True, noise=0.002):
        for finding in monitor.observe(row):
            seen.setdefault(finding.check, row["step"])
    assert set(seen) == {"plateau", "learning_rate"}
    assert CHINCHILLA_STEPS_40M / 2 < seen["plateau"] <= CHINCHILLA_STEPS_40M  # found while it happened
    assert sum("Run health: Plateau since step" in m for m in warnings_logged(caplog)) == 1


def test_healthy_run_warns_nothing(caplog):
    summary = run_summary()
    monitor = RunHealth(summary, already_warned=set())
    caplog.set_level(logging.WARNING, logger="fineweb_gpt")
    monitor.check()  # as HealthMonitor does when training starts
    for row in metric_rows(summary):
        monitor.observe(row)
    assert warnings_logged(caplog) == []


def test_training_imports_the_checks_but_not_the_doctors_report_tool():
    # The health monitor runs the doctor's checks; the report, the plot, the log readers and the
    # command line stay out of a training process.
    import subprocess
    import sys

    from helpers import cli_env

    script = (
        "import sys, fineweb_gpt.training\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('fineweb_gpt.doctor'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", script], env=cli_env(), capture_output=True, text=True, check=True)
    modules = set(loaded.stdout.split())
    assert "fineweb_gpt.doctor.checks" in modules  # the checks are what the monitor runs
    report_tool = {"cli", "report", "plot", "sources", "nanogpt_log", "llmc_log", "modded_log"}
    assert not {m.rsplit(".", 1)[-1] for m in modules} & report_tool, modules


def test_a_resumed_run_does_not_warn_or_log_again_what_it_already_warned_about():
    from types import SimpleNamespace

    from fineweb_gpt.monitor.health import HealthMonitor

    summary = SimpleNamespace(summary=run_summary(max_steps=10), already_warned=set(), run_dir=None)  # undertrained
    first = HealthMonitor(summary)
    rows = []
    logger = SimpleNamespace(log_metrics=lambda row, step: rows.append((step, row)))
    trainer = SimpleNamespace(loggers=[logger], global_step=0)
    first.on_train_start(trainer, None)
    assert [step for step, _ in rows] == [0] and "health/token_budget" in rows[0][1]
    resumed = HealthMonitor(summary)
    resumed.load_state_dict(first.state_dict())  # what a checkpoint carries
    resumed.on_train_start(trainer, None)
    assert len(rows) == 1  # nothing new: no second health row for the same step
