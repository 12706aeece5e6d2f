"""When a run evaluates: before its first step (Lightning's sanity check scores every validation
batch, plan.trainer_arguments), every val_every_steps optimizer steps (val_check_interval), and
at its last step; and a resumed run first evaluates the step its checkpoint was saved at when
that evaluation never finished.

A checkpoint is saved at the end of its step, before that step's evaluation: a kill -9 during
the evaluation, or a stop signal (which never waits for one), would otherwise lose it for good.
So each checkpoint says whether its step's evaluation is still to come (EVALUATION_PENDING),
and the resumed run runs it before its first step: its record is the uninterrupted run's.
"""

import lightning as L

from fineweb_gpt.lightning_internals import evaluate_now

EVALUATION_PENDING = "evaluation_pending"  # in a checkpoint: its step's evaluation never finished


def trainer_max_steps(max_steps: int, resumed_from: dict | None) -> int:
    """The Trainer's max_steps: the run's, or, resuming a finished run whose last evaluation is
    pending, one more, since Lightning starts no loop (and so no evaluation) at max_steps."""
    if resumed_from and resumed_from.get(EVALUATION_PENDING) and resumed_from["global_step"] >= max_steps:
        return int(resumed_from["global_step"]) + 1
    return max_steps


class EvaluationSchedule(L.Callback):
    """Evaluates the last step (stopping the fit from inside it, so that Lightning evaluates it:
    its own max_steps check would end the run without a final val/loss), records in each
    checkpoint whether its step's evaluation is still to come, and runs that evaluation first
    when a run resumes from it."""

    def __init__(self, val_every_steps: int, max_steps: int):
        self.val_every_steps, self.max_steps = val_every_steps, max_steps
        self.evaluated_step: int | None = None  # the step of the last evaluation that finished
        self.pending = False  # the resumed checkpoint's evaluation is still to come

    def due(self, step: int) -> bool:
        return step % self.val_every_steps == 0 or step >= self.max_steps

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking or trainer.global_step == 0:  # a fresh run's sanity check: step 0's
            self.evaluated_step = trainer.global_step

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        step = checkpoint["global_step"]
        checkpoint[EVALUATION_PENDING] = self.due(step) and self.evaluated_step != step

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.pending = bool(checkpoint.get(EVALUATION_PENDING))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.pending:
            self.pending = False
            evaluate_now(trainer)
        if trainer.global_step >= self.max_steps:  # it was the last step's: the run is finished
            trainer.should_stop = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if 0 < self.max_steps <= trainer.global_step:
            trainer.should_stop = True
