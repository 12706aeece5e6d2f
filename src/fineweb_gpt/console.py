"""What a person sees while a run trains.

In a terminal: one progress bar in optimizer steps, log lines written above it (never glued
onto it), numbers written for people. Anywhere else (a SLURM log, `| tee`): no bar, one line
per logged step. Either way, no library notices a user can do nothing about.
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
]


def route_warnings_to_log() -> None:
    """Python warnings go through logging (above the bar, into train.log), less the library noise."""
    logging.captureWarnings(True)
    for category, message in LIBRARY_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)


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
        self.started = time.monotonic()
        if self.enabled and self.terminal:
            self.train_bar = self.new_bar(
                desc="Training", unit="step", total=trainer.max_steps, initial=trainer.global_step
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self.enabled or step == self.shown_step:
            return  # still accumulating
        if self.train_bar is not None:
            self.train_bar.set_postfix_str(self.postfix(trainer), refresh=False)
            self.train_bar.update(step - self.shown_step)
        elif step % max(1, trainer.log_every_n_steps) == 0:
            log.info("%s", self.progress_line(trainer))
        self.shown_step = step

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
        if not (self.enabled and self.terminal):
            return
        batches = trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches
        total = sum(batches)
        when = " (before training)" if trainer.sanity_checking else ""
        self.eval_bar = self.new_bar(
            desc=f"Evaluating at step {trainer.global_step}{when}",
            unit="batch",
            total=None if math.isinf(total) else int(total),
            leave=False,
        )

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.eval_bar is not None:
            self.eval_bar.update(1)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.eval_bar is not None:  # gone before the evaluation's result is logged
            self.eval_bar.close()
            self.eval_bar = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.train_bar is not None:
            self.train_bar.set_postfix_str(self.postfix(trainer))
