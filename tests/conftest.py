import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

import fineweb_gpt

CONF_DIR = Path(fineweb_gpt.__file__).parent / "conf"

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


def run_cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m fineweb_gpt.train ARGS` the way a user does, offline."""
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fineweb_gpt.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class BatchRecorder:
    """A Lightning callback that appends each trained batch's step and checksum to a file."""

    def __new__(cls, path: str):
        import hashlib

        import lightning as L

        class _Recorder(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                digest = hashlib.sha1(batch.cpu().numpy().tobytes()).hexdigest()
                with open(path, "a") as f:
                    f.write(f"{trainer.global_step} {digest}\n")

        return _Recorder()
