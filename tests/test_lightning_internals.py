"""The private parts of Lightning this project relies on (fineweb_gpt.lightning_internals lists
them). pyproject.toml pins lightning to the range these were checked with; if an upgrade renames
or removes one, this fails by name instead of the behaviour silently going away (a slower DDP
loop, checkpoints saved mid-step, W&B warnings back on every run)."""

import importlib
import inspect

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

from fineweb_gpt.lightning_internals import OVERRIDDEN, PRIVATE_MEMBERS
from fineweb_gpt.loggers import WandbLogger


def resolve(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def instance_of(owner):
    """An object of `owner` to look for attributes set in __init__ (methods are on the class)."""
    if owner is ModelCheckpoint:
        return ModelCheckpoint()
    if owner is LightningWandbLogger:
        return LightningWandbLogger(project="p", mode="offline")
    return owner


@pytest.mark.parametrize(
    "owner, name, why", PRIVATE_MEMBERS, ids=[f"{o.split('.')[-1]}.{n}" for o, n, _ in PRIVATE_MEMBERS]
)
def test_each_private_lightning_member_we_use_exists(owner, name, why, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # W&B's offline folder
    owner = resolve(owner)
    assert hasattr(owner, name) or hasattr(instance_of(owner), name), f"{owner.__name__}.{name} is gone; {why}"


@pytest.mark.parametrize("base, ours, name", OVERRIDDEN, ids=[n for _, _, n in OVERRIDDEN])
def test_our_overrides_take_the_arguments_lightning_passes(base, ours, name):
    assert (
        inspect.signature(getattr(resolve(base), name)).parameters.keys()
        == inspect.signature(getattr(resolve(ours), name)).parameters.keys()
    )


def test_our_wandb_logger_drops_the_argument_lightning_passes(tmp_path):
    logger = WandbLogger(project="p", save_dir=tmp_path, mode="offline")
    assert "anonymous" not in logger._wandb_init and "anonymous" in LightningWandbLogger()._wandb_init
