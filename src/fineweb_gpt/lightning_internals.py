"""The private parts of Lightning fineweb_gpt relies on, listed in one place.

pyproject.toml pins lightning to the range these were checked with, and
tests/test_lightning_internals.py checks every entry of PRIVATE_MEMBERS: if an upgrade renames
or removes one, that test fails by name instead of the behaviour silently going away (a slower
DDP loop, checkpoints saved mid-step, W&B warnings back on every run).
"""

import lightning as L

# (class, private member, what fineweb_gpt does with it)
PRIVATE_MEMBERS = [
    (
        "lightning.pytorch.loops.training_epoch_loop._TrainingEpochLoop",
        "_broadcast_sigterm_tensor",
        "StopOnSignal switches off its per-micro-batch broadcast (a wait for the GPU under DDP)",
    ),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_save_topk_checkpoint", "StepCheckpoint.save_now saves at a step"),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_save_last_checkpoint", "StepCheckpoint.save_now links last.ckpt"),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_monitor_candidates", "StepCheckpoint.save_now names the file"),
    (
        "lightning.pytorch.callbacks.ModelCheckpoint",
        "_link_checkpoint",
        "StepCheckpoint overrides it: an atomic rename",
    ),
    (
        "lightning.pytorch.callbacks.ModelCheckpoint",
        "_should_remove_checkpoint",
        "StepCheckpoint overrides it: the newest two replace a resumed-from file",
    ),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_train_time_interval", "StepCheckpoint sets every_n_minutes"),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_last_global_step_saved", "StepCheckpoint.saved_this_step"),
    ("lightning.pytorch.loggers.WandbLogger", "_wandb_init", "loggers.WandbLogger drops the `anonymous` argument"),
    (
        "lightning.pytorch.loops.evaluation_loop._EvaluationLoop",
        "run",
        "EvaluationSchedule runs a resumed run's pending evaluation (evaluate_now), as the fit loop runs one",
    ),
]
# Our overrides of private methods, which must take what Lightning passes.
OVERRIDDEN = [
    (
        "lightning.pytorch.callbacks.ModelCheckpoint",
        "fineweb_gpt.run.checkpoint_saving.StepCheckpoint",
        "_link_checkpoint",
    ),
    (
        "lightning.pytorch.callbacks.ModelCheckpoint",
        "fineweb_gpt.run.checkpoint_saving.StepCheckpoint",
        "_should_remove_checkpoint",
    ),
]


def stop_broadcasting_sigterm_every_micro_batch(trainer: L.Trainer) -> None:
    """Under DDP, Lightning's loop broadcasts its SIGTERM flag before every micro-batch; with our
    own handlers that flag never rises, and StopOnSignal shares its decision once per step."""
    epoch_loop = trainer.fit_loop.epoch_loop
    if not hasattr(epoch_loop, "_broadcast_sigterm_tensor"):
        raise RuntimeError(
            f"lightning {L.__version__} has no fit_loop.epoch_loop._broadcast_sigterm_tensor; "
            "fineweb_gpt is tested with the lightning range in its pyproject.toml"
        )
    epoch_loop._broadcast_sigterm_tensor = lambda: None


def evaluate_now(trainer: L.Trainer) -> None:
    """Run the fit's evaluation now, as Lightning's training loop does between two steps (from a
    callback's on_train_start: a resumed run's pending evaluation, before its first step)."""
    val_loop = trainer.fit_loop.epoch_loop.val_loop
    val_loop.restarting = False  # a whole evaluation, not the rest of one restored from the checkpoint
    trainer.validating = True
    val_loop.run()
    trainer.training = True
