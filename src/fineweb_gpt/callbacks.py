"""Lightning callbacks: what Lightning's own ones leave out for step-budgeted runs."""

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose last.ckpt always holds the final step.

    Lightning saves last.ckpt at the end of training only if it never saved one, so a run
    whose max_steps is not a multiple of every_n_train_steps would end with a stale file.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
