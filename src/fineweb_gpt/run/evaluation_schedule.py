"""When a run evaluates: before its first step (Lightning's sanity check scores every validation
batch, plan.trainer_arguments), every val_every_steps optimizer steps (val_check_interval), and
at its last step, which EvaluateLastStep adds."""

import lightning as L


class EvaluateLastStep(L.Callback):
    """Stops the fit at max_steps from inside the last step: Lightning then evaluates it, where
    stopping on its own max_steps check would end the run without a final val/loss."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True
