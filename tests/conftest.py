import os

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from helpers import CONF_DIR

# No test may reach the network or wait for a W&B login.
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def make_config(tmp_path):
    """Compose the training config as `python -m fineweb_gpt.train <overrides>` would."""

    def _make(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            cfg.run_dir = str(tmp_path / "run")
            del cfg.hydra
        return cfg

    yield _make
    GlobalHydra.instance().clear()
