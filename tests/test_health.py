"""The doctor's checks during training (RunHealth, which callbacks.RunMonitor drives): each
problem warned about once, at the evaluation where it first appears; a healthy run warns nothing."""

import logging

from doctor_fixtures import CHINCHILLA_STEPS_40M, TOKENS_PER_STEP, metric_rows, power_law, run_summary
from fineweb_gpt.doctor.health import RunHealth

RUN_TOKENS = CHINCHILLA_STEPS_40M * TOKENS_PER_STEP


def overfitting_after_half(tokens: float) -> float:
    return power_law(tokens) + 1.5 * max(0.0, tokens / RUN_TOKENS - 0.5) ** 2


def warnings_logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fineweb_gpt" and r.levelno == logging.WARNING]


def test_each_problem_is_warned_once_when_it_first_appears(caplog):
    summary = run_summary(model_name="124m")  # a 40.56M model named 124m: wrong from the start
    monitor = RunHealth(summary, already_warned=set())
    caplog.set_level(logging.WARNING, logger="fineweb_gpt")

    monitor.check()  # as RunMonitor does when training starts
    assert [m.split(".")[0] for m in warnings_logged(caplog)] == ["Run health: Model size does not match its name"]

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
    monitor.check()  # as RunMonitor does when training starts
    for row in metric_rows(summary):
        monitor.observe(row)
    assert warnings_logged(caplog) == []
