import os

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from helpers import CONF_DIR

# No test may reach the network or wait for a W&B login.
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# pytest-xdist runs one worker per core; each worker's torch (and every command it starts) would
# otherwise use a thread per core too, and on a 2-core machine the oversubscribed threads made the
# small models' steps several times slower. Share the cores out instead.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    _threads = max(1, (os.cpu_count() or 1) // _workers)
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(_threads)


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


def pytest_collection_modifyitems(items):
    """Files with the most `slow` tests first: pytest-xdist (--dist loadfile) hands each worker a
    whole file as it becomes free, and the long files, late in the alphabet, otherwise start last
    and leave one worker running them alone at the end (longest job first)."""
    slow_in_file: dict[str, int] = {}
    for item in items:
        slow_in_file[item.fspath.strpath] = slow_in_file.get(item.fspath.strpath, 0) + bool(
            item.get_closest_marker("slow")
        )
    order = {path: rank for rank, path in enumerate(sorted(slow_in_file, key=lambda p: -slow_in_file[p]))}
    items.sort(key=lambda item: order[item.fspath.strpath])  # stable: each file keeps its own order
