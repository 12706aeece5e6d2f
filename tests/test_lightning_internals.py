"""The private parts of Lightning this project relies on. pyproject.toml pins lightning to the
range these were checked with; if an upgrade renames or removes one, this fails by name instead
of the behaviour silently going away (a slower DDP loop, checkpoints saved mid-step, W&B
warnings back on every run)."""

import inspect

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

from fineweb_gpt.checkpointing import StepCheckpoint
from fineweb_gpt.loggers import WandbLogger

# (class, private name, what fineweb_gpt does with it)
USED = [
    (_TrainingEpochLoop, "_broadcast_sigterm_tensor", "StepCheckpoint switches off its per-micro-batch broadcast"),
    (ModelCheckpoint, "_save_topk_checkpoint", "StepCheckpoint.save_now saves at a step boundary"),
    (ModelCheckpoint, "_save_last_checkpoint", "StepCheckpoint.save_now points last.ckpt at the save"),
    (ModelCheckpoint, "_monitor_candidates", "StepCheckpoint.save_now names the file"),
    (ModelCheckpoint, "_link_checkpoint", "StepCheckpoint replaces it with an atomic rename"),
    (ModelCheckpoint, "_should_remove_checkpoint", "StepCheckpoint lets the newest two replace a resumed-from file"),
]
# Overridden: our version must take what Lightning passes.
OVERRIDDEN = [
    (ModelCheckpoint, StepCheckpoint, "_link_checkpoint"),
    (ModelCheckpoint, StepCheckpoint, "_should_remove_checkpoint"),
]


@pytest.mark.parametrize("owner, name, why", USED, ids=[f"{c.__name__}.{n}" for c, n, _ in USED])
def test_each_private_lightning_method_we_use_exists(owner, name, why):
    assert callable(getattr(owner, name, None)), f"{owner.__name__}.{name} is gone; {why}"


@pytest.mark.parametrize("base, ours, name", OVERRIDDEN, ids=[n for _, _, n in OVERRIDDEN])
def test_our_overrides_take_the_arguments_lightning_passes(base, ours, name):
    assert (
        inspect.signature(getattr(base, name)).parameters.keys()
        == inspect.signature(getattr(ours, name)).parameters.keys()
    )


def test_private_attributes_we_read_and_set_exist(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path)
    kept = ("best_k_models", "kth_best_model_path", "kth_value", "best_model_path", "best_model_score")
    for attribute in ("_train_time_interval", "_last_global_step_saved", *kept):
        assert hasattr(checkpoint, attribute), f"ModelCheckpoint.{attribute} is gone; StepCheckpoint uses it"
    logger = WandbLogger(project="p", save_dir=tmp_path, mode="offline")
    assert isinstance(logger._wandb_init, dict), "WandbLogger._wandb_init is gone; our WandbLogger edits it"
    assert "anonymous" not in logger._wandb_init and "anonymous" in LightningWandbLogger()._wandb_init
