"""What a person sees while a run trains.

In a terminal: one progress bar in optimizer steps, log lines written above it (never glued
onto it), numbers written for people. Anywhere else (a SLURM log, `| tee`): no bar, one line
per logged step. Either way, no library notices a user can do nothing about, and a step or an
evaluation that takes long shows how far it has come (the micro-batch, the batch).
"""

import logging
import math
import sys
import time
import warnings

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from tqdm import tqdm

log = logging.getLogger("fineweb_gpt")

# Warnings a user can do nothing about: (category, the start of the message).
LIBRARY_NOISE = [
    # torch 2.10+ deprecates a class that Lightning 2.6 still uses, once per run.
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # Every resume: fineweb_gpt's own folder claim has already decided what may be in the folder.
    (UserWarning, r"Checkpoint directory .* exists and is not empty"),
]
# Lightning's loggers: their INFO lines are notices ("GPU available", a tip, "`Trainer.fit` stopped").
LIBRARY_LOGGERS = ("lightning.pytorch", "lightning.fabric")
# A step that has run this long shows its micro-batches on the bar.
LONG_STEP_SECONDS = 2.0
# Without a terminal, a step or an evaluation still going after this long says how far it has
# come, and again each time as long again has passed.
LINE_EVERY_SECONDS = 60.0


def route_warnings_to_log() -> None:
    """Python warnings go through logging (above the bar, into train.log), less the library noise."""
    logging.captureWarnings(True)
    for category, message in LIBRARY_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)


def quiet_console() -> None:
    """The console of a script that trains outside the command line (benchmarks): fineweb_gpt's and
    Python's warnings through logging, Lightning's notices left out, as the training command's
    Hydra logging config does (conf/train.yaml, hydra.job_logging)."""
    if not logging.getLogger().handlers:
        handler = ConsoleHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logging.basicConfig(level=logging.INFO, handlers=[handler])
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    route_warnings_to_log()


def in_terminal() -> bool:
    """A bar only where a person watches both streams; a file or a pipe gets one line per step."""
    return sys.stdout.isatty() and sys.stderr.isatty()


class ConsoleHandler(logging.StreamHandler):
    """The console's log handler (hydra.job_logging): tqdm clears the bar, the line is written,
    the bar is drawn again below it. (tqdm's own handler is private: tqdm.contrib.logging.)"""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


class FirstRankOnly(logging.Filter):
    """Under DDP every process logs; the console shows the first one's lines (each process
    still writes its own log file)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(rank_zero_only, "rank", 0) == 0


def format_duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{int(seconds % 60):02d}s"


# How each progress-bar value RunMonitor and the module log is written: (label, format).
SHOWN = {
    "loss": ("loss", "{:.4f}"),
    "val/loss": ("val", "{:.4f}"),
    "tok/s": ("tok/s", "{:,.0f}"),
    "mfu": ("mfu", "{:.1%}"),
}


def shown_values(metrics: dict) -> list[tuple[str, str]]:
    """(label, text) of each progress-bar value, in SHOWN's order, then any others."""
    shown = []
    for key in [key for key in SHOWN if key in metrics] + [key for key in metrics if key not in SHOWN]:
        label, form = SHOWN.get(key, (key, "{:.4g}"))
        shown.append((label, form.format(float(metrics[key]))))
    return shown


class StepProgressBar(ProgressBar):
    """Progress in optimizer steps out of trainer.max_steps (Lightning's bar counts the
    micro-batches of an endless epoch, and describes itself three times).

    In a terminal: one training bar whose count and clock start where this process starts (a
    resumed run's rate and time left count only the steps it trained), and, while an evaluation
    runs, a second bar below it. Elsewhere: one line per logged step (trainer.log_every_n_steps).
    """

    def __init__(self):
        super().__init__()
        self.terminal = in_terminal()
        self.enabled = True
        self.train_bar: tqdm | None = None
        self.eval_bar: tqdm | None = None
        self.first_step = 0
        self.shown_step = 0
        self.started = 0.0
        self.step_started = 0.0  # when the step in progress began
        self.micro_batches = 0  # of the step in progress
        self.eval_started = 0.0  # when the evaluation in progress began
        self.eval_batches = 0  # of the evaluation in progress
        self.progress_said = 0.0  # when a line last said how far a long step or evaluation had come

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def print(self, *args, sep: str = " ", **kwargs) -> None:
        tqdm.write(sep.join(str(arg) for arg in args))

    def new_bar(self, **kwargs) -> tqdm:
        return tqdm(file=sys.stderr, dynamic_ncols=True, **kwargs)

    # --- training ------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.first_step = self.shown_step = trainer.global_step
        self.started = self.step_started = time.monotonic()
        self.micro_batches = 0
        if self.enabled and self.terminal:
            self.train_bar = self.new_bar(
                desc="Training", unit="step", total=trainer.max_steps, initial=trainer.global_step
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self.enabled:
            return
        if step == self.shown_step:  # still accumulating
            self.micro_batches += 1
            self.show_inside_step(trainer)
            return
        if self.train_bar is not None:
            self.train_bar.set_postfix_str(self.postfix(trainer), refresh=False)
            self.train_bar.update(step - self.shown_step)
        elif step % max(1, trainer.log_every_n_steps) == 0:
            log.info("%s", self.progress_line(trainer))
        self.shown_step = step
        self.step_started, self.micro_batches = time.monotonic(), 0

    def show_inside_step(self, trainer: L.Trainer) -> None:
        """A long step (a large model on a CPU, many micro-batches) shows its micro-batches: on the
        bar at each one, or without a terminal in a line now and then (progress_due)."""
        done = f"micro-batch {self.micro_batches}/{trainer.accumulate_grad_batches}"
        if self.train_bar is not None:
            if time.monotonic() - self.step_started >= LONG_STEP_SECONDS:
                postfix = self.postfix(trainer)
                self.train_bar.set_postfix_str(f"{postfix}, {done}" if postfix else done)
        elif self.progress_due(self.step_started):
            elapsed = format_duration(time.monotonic() - self.step_started)
            log.info("step %d/%d: %s, %s into the step", trainer.global_step + 1, trainer.max_steps, done, elapsed)

    def progress_due(self, began: float) -> bool:
        """Whether a step or evaluation that began at `began` should say how far it has come: once
        it has run LINE_EVERY_SECONDS, and as often again."""
        now = time.monotonic()
        if now - max(began, self.progress_said) < LINE_EVERY_SECONDS:
            return False
        self.progress_said = now
        return True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.close_bars()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.close_bars()  # so that the traceback starts on a line of its own

    def close_bars(self) -> None:
        for bar in (self.eval_bar, self.train_bar):
            if bar is not None:
                bar.close()
        self.eval_bar = self.train_bar = None

    def postfix(self, trainer: L.Trainer) -> str:
        return ", ".join(f"{label}={text}" for label, text in shown_values(trainer.progress_bar_metrics))

    def progress_line(self, trainer: L.Trainer) -> str:
        """`step 20/40 (50%): loss 7.9520, tok/s 2,030, 0m41s elapsed, 0m41s left`."""
        step, total = trainer.global_step, trainer.max_steps
        elapsed = time.monotonic() - self.started
        parts = [f"{label} {text}" for label, text in shown_values(trainer.progress_bar_metrics) if label != "val"]
        parts.append(f"{format_duration(elapsed)} elapsed")
        if step > self.first_step:  # the steps this process trained, not those it resumed from
            parts.append(f"{format_duration(elapsed / (step - self.first_step) * (total - step))} left")
        return f"step {step}/{total} ({step / total:.0%}): {', '.join(parts)}"

    # --- evaluations ---------------------------------------------------------------------

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.eval_started, self.eval_batches = time.monotonic(), 0
        if not (self.enabled and self.terminal):
            return
        total = self.evaluation_batches(trainer)
        when = " (before training)" if trainer.sanity_checking else ""
        self.eval_bar = self.new_bar(
            desc=f"Evaluating at step {trainer.global_step}{when}", unit="batch", total=total, leave=False
        )

    @staticmethod
    def evaluation_batches(trainer: L.Trainer) -> int | None:
        batches = trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches
        total = sum(batches)
        return None if math.isinf(total) else int(total)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.eval_batches += 1
        if self.eval_bar is not None:
            self.eval_bar.update(1)
            return
        if self.enabled and self.progress_due(self.eval_started):
            log.info(
                "evaluating at step %d: batch %d/%s, %s so far",
                trainer.global_step,
                self.eval_batches,
                self.evaluation_batches(trainer) or "?",
                format_duration(time.monotonic() - self.eval_started),
            )

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.eval_bar is not None:  # gone before the evaluation's result is logged
            self.eval_bar.close()
            self.eval_bar = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.step_started = time.monotonic()  # the next step's time starts after the evaluation
        if self.train_bar is not None:
            self.train_bar.set_postfix_str(self.postfix(trainer))
